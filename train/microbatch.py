"""`micro_batch = "auto"`: per curriculum stage, the largest micro-batch that fits the GPU's memory.

The tokens of an optimizer step are fixed (optim.tokens_per_step), so a stage's micro-batch must
divide its rows per step and GPU (tokens_per_step / (seq_len x GPUs)); gradient accumulation makes up
the rest. Those divisors (for FP8, those whose micro_batch x seq_len Transformer Engine accepts) are
the candidates. Memory grows with the micro-batch, so a binary search over them finds the largest
that fits, each of its steps a probe: on a throwaway copy of the run's model, built and compiled as
the run's, two micro-batches of forward and backward (the second accumulates into the first's
gradients, as gradient accumulation does), the optimizer step (AdamW allocates its states on the
first) and an evaluation forward, all at the stage's shape. A micro-batch fits when that raises no
out-of-memory error and its peak allocation stays under (1 - HEADROOM) x the memory limit: what the
GPU has free for this process, or run.memory_fraction of the GPU (which the run is then held to,
through `torch.cuda.set_per_process_memory_fraction`, so a 24 GB card can be emulated on a larger one).

The choices go to the run folder's micro_batch.json, keyed by GPU model, memory, GPU count and every
setting that changes memory: a resumed run reads them instead of probing. Under DDP every rank
probes its own GPU and all take the smallest choice (the ranks must run as many micro-batches per
step); the probe's peak then also counts DDP's gradient buckets, a copy of the gradients.

On a CPU there is no memory to probe: "auto" takes the largest candidate of at most CPU_TOKENS tokens,
a size at which the CPU runs at full speed without holding gigabytes of logits.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.manifest import write_json_atomic
from train.config import AUTO, ConfigError, TrainConfig
from train.precision import token_multiple

# Of the limit, kept free: allocator fragmentation, checkpoint copies, what the probe omits. The probe runs the
# blocks eagerly; the run's CUDA graphs (run.cuda_graphs) held 1-2 GB more on an H100 (docs/benchmarks.md).
HEADROOM = 0.10
CPU_TOKENS = 4096  # "auto" on a CPU: the largest micro-batch of at most this many tokens
CACHE_FILE = "micro_batch.json"


@dataclass(frozen=True)
class AutoStage:
    """A curriculum stage whose micro_batch is "auto"."""

    index: int
    seq_len: int
    rows_per_step: int  # rows of one optimizer step per GPU: micro_batch x gradient accumulation


# (the "auto" stages, the vocabulary size) -> the micro-batch of each, by stage index
Chooser = Callable[[list[AutoStage], int], dict[int, int]]
# (micro_batch, seq_len) -> peak bytes of a probe, or None when it ran out of memory
Probe = Callable[[int, int], "int | None"]


def auto_stages(config: TrainConfig, world_size: int) -> list[AutoStage]:
    stages = []
    for index, stage in enumerate(config.curriculum):
        if stage.micro_batch != AUTO:
            continue
        rows, rest = divmod(config.optim.tokens_per_step, stage.seq_len * world_size)
        if rest:
            raise ConfigError(f"optim.tokens_per_step ({config.optim.tokens_per_step}) must be a multiple of seq_len x "
                              f"GPUs for stage {index} ({stage.seq_len} x {world_size})")
        stages.append(AutoStage(index, stage.seq_len, rows))
    return stages


def candidates(stage: AutoStage, multiple: int = 1) -> list[int]:
    """The micro-batches a stage can run, ascending: divisors of its rows per step whose token count
    micro_batch x seq_len is a multiple of `multiple`."""
    return [m for m in range(1, stage.rows_per_step + 1)
            if stage.rows_per_step % m == 0 and m * stage.seq_len % multiple == 0]


def largest_fitting(options: list[int], fits: Callable[[int], bool]) -> int | None:
    """The largest option that fits, by binary search (fits holds up to some option, not above it);
    None when even the smallest does not."""
    low, high, best = 0, len(options) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(options[middle]):
            best, low = options[middle], middle + 1
        else:
            high = middle - 1
    return best


def cpu_choice(stages: list[AutoStage], vocab_size: int, say: Callable[[str], None] = print) -> dict[int, int]:
    """"auto" without a GPU: the largest candidate of at most CPU_TOKENS tokens (the smallest if none is)."""
    chosen = {}
    for stage in stages:
        options = candidates(stage)
        chosen[stage.index] = max([m for m in options if m * stage.seq_len <= CPU_TOKENS] or options[:1])
        say(f"stage {stage.index}: micro-batch {chosen[stage.index]} (auto on the CPU: the largest dividing "
            f"{stage.rows_per_step} rows per step with at most {CPU_TOKENS} tokens)")
    return chosen


class AutoMicroBatch:
    """The GPU chooser: the cached choice of each stage, else a binary search of probes."""

    def __init__(self, key: dict, cache: Path, limit: int, make_probe: Callable[[int, int], Probe],
                 multiple: int, say: Callable[[str], None], agree: Callable[[list[int]], list[int]] = list,
                 writes_cache: bool = True):
        """`key`: what the choices depend on besides the stage (GPU, memory, config); `limit`: bytes the
        run may allocate; `make_probe(vocab_size, max_seq_len)`: builds the probe (its `close()`, if
        any, frees it); `agree`: the choices all ranks take (the minimum under DDP)."""
        self.key, self.cache, self.limit, self.make_probe = key, cache, limit, make_probe
        self.multiple, self.say, self.agree, self.writes_cache = multiple, say, agree, writes_cache

    def entry_key(self, stage: AutoStage, vocab_size: int) -> str:
        described = {**self.key, "seq_len": stage.seq_len, "rows_per_step": stage.rows_per_step,
                     "vocab_size": vocab_size}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    def __call__(self, stages: list[AutoStage], vocab_size: int) -> dict[int, int]:
        cached = json.loads(self.cache.read_text()) if self.cache.exists() else {}
        keys = {stage.index: self.entry_key(stage, vocab_size) for stage in stages}
        todo = [stage for stage in stages if keys[stage.index] not in cached]
        entries = {keys[s.index]: cached[keys[s.index]] for s in stages if s not in todo}
        for stage in stages:
            if stage not in todo:
                self.say(f"stage {stage.index}: micro-batch {entries[keys[stage.index]]['micro_batch']} (auto, "
                         f"from {self.cache})")
        if todo:
            probe = self.make_probe(vocab_size, max(stage.seq_len for stage in todo))
            try:
                for stage in todo:
                    entries[keys[stage.index]] = self.search(stage, probe)
            finally:
                if hasattr(probe, "close"):
                    probe.close()
        agreed = self.agree([entries[keys[stage.index]]["micro_batch"] for stage in stages])
        for stage, micro_batch in zip(stages, agreed):
            if not micro_batch:
                smallest = candidates(stage, self.multiple)[:1] or ["none"]
                raise ConfigError(f"curriculum stage {stage.index}: no micro-batch fits in {self.limit / 2**30:.1f} GB "
                                  f"(micro-batch {smallest[0]} x {stage.seq_len} does not); use a smaller model or "
                                  f"seq_len, run.loss = \"chunked\", or a larger run.memory_fraction")
            entries[keys[stage.index]]["micro_batch"] = micro_batch
        if todo and self.writes_cache:
            write_json_atomic(self.cache, {**cached, **entries})
        return {stage.index: micro_batch for stage, micro_batch in zip(stages, agreed)}

    def search(self, stage: AutoStage, probe: Probe) -> dict:
        """The largest candidate whose probe fits, and the probes' peaks (GB, None: out of memory)."""
        budget = (1 - HEADROOM) * self.limit
        peaks: dict[int, int | None] = {}

        def fits(micro_batch: int) -> bool:
            peaks[micro_batch] = probe(micro_batch, stage.seq_len)
            return peaks[micro_batch] is not None and peaks[micro_batch] <= budget

        options = candidates(stage, self.multiple)
        chosen = largest_fitting(options, fits)
        probed = {str(m): None if peak is None else round(peak / 2**30, 2) for m, peak in sorted(peaks.items())}
        self.say(f"stage {stage.index}: micro-batch {chosen} (auto: the largest of {options} whose probe peaked under "
                 f"{budget / 2**30:.1f} GB, {1 - HEADROOM:.0%} of {self.limit / 2**30:.1f} GB; probed GB: " +
                 ", ".join(f"{m}: {'out of memory' if gb is None else gb}" for m, gb in probed.items()) + ")")
        return {"micro_batch": chosen or 0, "seq_len": stage.seq_len, "limit_gb": round(self.limit / 2**30, 2),
                "probed_gb": probed, **self.key}


class MemoryProbe:
    """Peak GPU memory of one training step and one evaluation forward at a given micro-batch, on a
    throwaway model built as the run's (compiled with dynamic shapes, so one compilation serves every
    probed shape; the run compiles its own afterwards)."""

    def __init__(self, config: TrainConfig, device: torch.device, vocab_size: int, max_seq_len: int,
                 world_size: int):
        from train.loss import Loss
        from train.model import Transformer
        from train.precision import Precision

        self.config, self.device, self.vocab_size = config, device, vocab_size
        self.precision = Precision(config.precision, device)
        self.model = Transformer(config.model, vocab_size, self.precision, max_positions=max_seq_len).to(device)
        compiled = config.run.compile and device.type == "cuda"
        self.forward = torch.compile(self.model, dynamic=True) if compiled else self.model
        self.loss = Loss(config.run, self.model, compiled)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), fused=device.type == "cuda")
        # DDP copies the gradients into its buckets
        self.ddp_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()) if world_size > 1 else 0

    def __call__(self, micro_batch: int, seq_len: int) -> int | None:
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.step(micro_batch, seq_len)
            return torch.cuda.max_memory_allocated(self.device) + self.ddp_bytes
        except torch.OutOfMemoryError:
            pass
        finally:
            self.precision.first_microbatch = None
            self.optimizer.zero_grad(set_to_none=True)
            self.model.train()
        gc.collect()  # out of the except block: its traceback's tensors are garbage now
        torch.cuda.empty_cache()
        return None

    def step(self, micro_batch: int, seq_len: int) -> None:
        """What the trainer does with one micro-batch, twice (the second accumulating), then its optimizer
        step and an evaluation forward."""
        inputs = torch.randint(0, self.vocab_size, (micro_batch, seq_len), device=self.device)
        doc_lens = (torch.full((micro_batch,), seq_len, device=self.device)
                    if self.config.attention.doc_mask else None)
        for first in (True, False):
            self.precision.first_microbatch = first
            with self.precision.autocast():
                output = self.forward(inputs, doc_lens, **self.loss.forward_kwargs)
            self.loss(output, inputs).backward()
            del output
        self.precision.first_microbatch = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        with torch.no_grad(), self.precision.autocast():
            self.loss(self.forward(inputs, doc_lens, **self.loss.forward_kwargs), inputs)

    def close(self) -> None:
        """Free the probe's model and compiled graphs before the run builds its own."""
        del self.model, self.forward, self.loss, self.optimizer
        gc.collect()
        torch.cuda.empty_cache()
        torch.compiler.reset()


def limit_process_memory(device: torch.device, fraction: float) -> None:
    """Hold this process to `fraction` of the GPU (run.memory_fraction; 0: no limit)."""
    if fraction and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, device)


def memory_limit(device: torch.device, fraction: float) -> int:
    """Bytes this process may allocate: the GPU's free memory plus what its allocator holds, capped at
    `fraction` of the whole when set."""
    free, total = torch.cuda.mem_get_info(device)
    available = free + torch.cuda.memory_reserved(device)
    return min(available, int(total * fraction)) if fraction else available


def min_over_ranks(values: list[int]) -> list[int]:
    """Each value's minimum over the DDP ranks (the values themselves outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def chooser(config: TrainConfig, device: torch.device, run_dir: Path, world_size: int,
            say: Callable[[str], None]) -> Chooser:
    """The run's way of resolving "auto": probes on a GPU, the CPU rule elsewhere."""
    if device.type != "cuda":
        return lambda stages, vocab_size: cpu_choice(stages, vocab_size, say)
    import torch.distributed as dist

    total = torch.cuda.get_device_properties(device).total_memory
    key = {"gpu": torch.cuda.get_device_name(device), "memory_gb": round(total / 2**30, 1),
           "memory_fraction": config.run.memory_fraction, "gpus": world_size, "torch": torch.__version__,
           "tokens_per_step": config.optim.tokens_per_step,
           "config": {name: dataclasses.asdict(getattr(config, name)) for name in ("model", "precision", "attention")},
           "run": {name: getattr(config.run, name) for name in ("compile", "loss", "loss_chunk_tokens")}}
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return AutoMicroBatch(key, run_dir / CACHE_FILE, memory_limit(device, config.run.memory_fraction),
                          lambda vocab_size, max_seq_len: MemoryProbe(config, device, vocab_size, max_seq_len,
                                                                      world_size),
                          token_multiple(config.precision), say, agree=min_over_ranks, writes_cache=rank == 0)
