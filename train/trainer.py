"""The training loop: sequence-length curriculum over packed memmaps, FP8 or BF16, DDP-ready.

Tokens per optimizer step are constant across stages; gradient accumulation is derived per stage.
Loss values are synced to the host only every `log_every` steps (one finiteness check of the
gradient norm per step decides whether a NaN/Inf step is skipped). Validation reports nats/token
and bits per byte.

The loop reads like torchtitan's trainer: `train_step` takes exactly one optimizer step and nothing
else; when to log, evaluate and checkpoint are one-line decisions beside it (`should_log`,
`should_eval`, `should_checkpoint`); anything else that watches the steps (the profiler) is an
after-step hook.

What a run writes beside its checkpoints, `config.resolved.json` and `run.json` (the step budget,
which the learning-rate schedule is a function of), is what `--resume` continues. A failed write
(disk full, read-only folder) stops the run with one line; checkpoints already written stay intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from train import checkpoint, microbatch
from train.config import ConfigError, TrainConfig, flatten, from_dict
from train.devices import peak_memory_bytes
from train.flops import peak_bf16_flops
from train.graphs import GraphedLayers, graphs_unused_because, transformer_engine_graphs
from train.loader import IGNORE_INDEX, Batch, PackedLoader, make_batch
from train.loss import Loss
from train.model import Transformer
from pipeline.manifest import atomic_path, tokens_info, write_json_atomic
from pipeline.packed import PackedDataError, PackedDataMissing, PackedSplit, check_seq_len
from train.precision import Precision

RUN_CONFIG, RUN_BUDGET, METRICS = "config.resolved.json", "run.json", "metrics.jsonl"


class TrainError(Exception):
    """The run cannot go on; the message says why and what to change."""


def checkpoint_note(checkpoints: Path) -> str:
    """Where a stopped run stands, for its last line: the checkpoint --resume would continue from."""
    last = checkpoint.latest(checkpoints)
    if last is None:
        return "no checkpoint was written yet, so there is nothing to resume: start the run again"
    return f"the last checkpoint, {last}, is intact: --resume continues from it"


@contextlib.contextmanager
def writing(what: Path | str, checkpoints: Path, *errors: type[Exception]) -> Iterator[None]:
    """A failed write of `what` (disk full, read-only folder; OSError and `errors`, what libraries
    writing files raise instead) as TrainError, naming the checkpoint to resume from."""
    try:
        yield
    except (OSError, *errors) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
        raise TrainError(f"cannot write {what}: {reason}; {checkpoint_note(checkpoints)}") from None


def write_run_files(run_dir: Path, config: TrainConfig, max_steps: int | None, total_steps: int) -> None:
    """What --resume continues: the resolved config, and the step budget the lr schedule depends on."""
    write_json_atomic(run_dir / RUN_CONFIG, config.to_dict())
    write_json_atomic(run_dir / RUN_BUDGET, {"max_steps": max_steps, "total_steps": total_steps})


def read_run_files(run_dir: Path) -> tuple[TrainConfig, dict | None]:
    """The run's config and step budget (None for a run started before run.json was written)."""
    found = {}
    for name in (RUN_CONFIG, RUN_BUDGET):
        try:
            found[name] = json.loads((run_dir / name).read_text())
        except FileNotFoundError:
            found[name] = None
        except (OSError, ValueError) as err:
            raise TrainError(f"{run_dir / name} cannot be read ({err}); the run cannot be resumed") from None
    if found[RUN_CONFIG] is None:
        raise TrainError(f"{run_dir} holds no {RUN_CONFIG}: not a run that can be resumed")
    try:
        config = from_dict(found[RUN_CONFIG])
    except ConfigError as err:
        raise TrainError(f"{run_dir / RUN_CONFIG}: {err}") from None
    budget = found[RUN_BUDGET]
    if budget is not None and not (isinstance(budget, dict) and isinstance(budget.get("total_steps"), int)
                                   and (budget.get("max_steps") is None or isinstance(budget["max_steps"], int))):
        raise TrainError(f"{run_dir / RUN_BUDGET} is damaged (max_steps and total_steps expected)")
    return config, budget


@dataclass
class Stage:
    index: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    steps: int
    first_step: int  # global optimizer step at which this stage starts (0-based)
    train: PackedSplit
    val: PackedSplit


@dataclass
class StepResult:
    """What one optimizer step hands the loop. The tensors stay on the device: reading them is a host
    sync, which the loop does only when it logs."""
    lr: float
    loss: torch.Tensor  # this rank's share of the step's mean loss over every target of all ranks
    grad_norm: torch.Tensor  # before clipping
    skipped: bool  # non-finite gradients: no update, not counted in the logged loss


class LogWindow:
    """The steps since the last metrics line: their summed loss (on the device) and their wall time.

    The loop restarts it after the line's evaluation and checkpoint, so neither counts as training
    time in tokens/s."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def restart(self) -> None:
        self.loss_sum.zero_()
        self.steps = 0
        self.start = time.perf_counter()


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        if "RANK" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def stage_steps(config: TrainConfig, max_steps: int | None) -> list[int]:
    """Optimizer steps per stage: its token budget / tokens per step; --max-steps scales them all."""
    tokens_per_step = config.optim.tokens_per_step
    steps = [max(1, stage.tokens // tokens_per_step) for stage in config.curriculum]
    if max_steps is None or max_steps >= sum(steps):
        return steps
    if max_steps < len(steps):
        raise ConfigError(f"--max-steps {max_steps} is fewer than the {len(steps)} curriculum stages")
    scaled = [max(1, int(s * max_steps / sum(steps))) for s in steps]
    scaled[-1] += max_steps - sum(scaled)
    return scaled


def pack_command(lengths: list[int], data_dir: Path, manifests: Path) -> str:
    """The `just pack` command line that makes these lengths where this run reads them."""
    command = f"just pack --seq-len {','.join(str(n) for n in sorted(set(lengths)))}"
    if str(data_dir) != "data":
        command += f" --data-dir {data_dir}"
    if str(manifests) != "manifests":
        command += f" --manifests {manifests}"
    return f"`{command}`"


def plan_stages(config: TrainConfig, world_size: int, max_steps: int | None, verify: bool = False,
                choose: microbatch.Chooser = microbatch.cpu_choice) -> list[Stage]:
    """Check every pack the curriculum needs before step 1; resolve micro_batch = "auto" with `choose`;
    derive gradient accumulation per stage."""
    data_dir, manifests = Path(config.data.data_dir), Path(config.data.manifests)
    splits, missing = {}, []
    for stage in config.curriculum:
        try:
            check_seq_len(stage.seq_len)
        except ValueError as err:
            raise ConfigError(f"curriculum: {err}") from None
        try:
            splits[stage.seq_len] = tuple(PackedSplit.open(data_dir, stage.seq_len, split, manifests, verify=verify)
                                          for split in ("train", "val"))
        except PackedDataMissing:
            missing.append(stage.seq_len)
    if missing:
        raise PackedDataError(f"the curriculum needs packed data that is missing; run "
                              f"{pack_command(missing, data_dir, manifests)}")
    current = tokens_info(manifests).tokenizer_sha256
    stale = [n for n, (train, _) in splits.items() if train.tokenizer_sha256 != current]
    if stale:
        raise PackedDataError(f"packed data made with another tokenizer than the current `tokenize` output "
                              f"({manifests / 'tokenize.json'}); run {pack_command(stale, data_dir, manifests)}")
    auto = microbatch.auto_stages(config, world_size)
    chosen = choose(auto, splits[config.curriculum[0].seq_len][0].vocab_size) if auto else {}
    tokens_per_step = config.optim.tokens_per_step
    stages, first = [], 0
    for index, (stage, steps) in enumerate(zip(config.curriculum, stage_steps(config, max_steps))):
        micro_batch = chosen.get(index, stage.micro_batch)
        per_micro = micro_batch * stage.seq_len * world_size
        if tokens_per_step % per_micro:
            raise ConfigError(f"optim.tokens_per_step ({tokens_per_step}) must be a multiple of micro_batch x seq_len x "
                              f"GPUs for stage {index} ({micro_batch} x {stage.seq_len} x {world_size})")
        train, val = splits[stage.seq_len]
        stages.append(Stage(index, stage.seq_len, micro_batch, tokens_per_step // per_micro, steps, first, train, val))
        first += steps
    return stages


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Warmup then cosine or WSD, as a function of tokens seen."""
    o = config.optim
    tokens, total = step * o.tokens_per_step, total_steps * o.tokens_per_step
    floor = o.lr * o.min_lr_ratio
    if o.warmup_tokens and tokens < o.warmup_tokens:
        return o.lr * (tokens + o.tokens_per_step) / (o.warmup_tokens + o.tokens_per_step)
    if o.schedule == "wsd":
        decay_start = total * (1 - o.decay_fraction)
        if tokens < decay_start:
            return o.lr
        return floor + (o.lr - floor) * max(0.0, (total - tokens) / max(total - decay_start, 1))
    progress = min(1.0, (tokens - o.warmup_tokens) / max(total - o.warmup_tokens, 1))
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on projection matrices only: never on norms, biases or embeddings."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, loss: Loss, split: PackedSplit, precision: Precision, micro_batch: int, max_rows: int,
             doc_mask: bool, device: torch.device, dist_info: Distributed) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte over the val split (or its first max_rows)."""
    n_rows = split.n_rows if not max_rows else min(max_rows, split.n_rows)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    for start in range(dist_info.rank * micro_batch, n_rows, micro_batch * dist_info.world_size):
        rows = torch.arange(start, min(start + micro_batch, n_rows)).numpy()
        batch = make_batch(split, rows, pin=False).to(device)
        with precision.autocast():
            output = model(batch.inputs, batch.doc_lens if doc_mask else None, **loss.forward_kwargs)
        nll += loss(output, batch.targets).double()
        count += (batch.targets != IGNORE_INDEX).sum()
    model.train()
    if dist_info.world_size > 1:
        for t in (nll, count):
            dist.all_reduce(t)
    evaluated_targets = split_targets(split, n_rows)
    all_targets = evaluated_targets if n_rows == split.n_rows else split_targets(split, split.n_rows)
    evaluated_bytes = split.utf8_bytes * evaluated_targets / max(all_targets, 1)
    nll_sum, n = float(nll), float(count)
    return {"val_loss": nll_sum / max(n, 1), "val_bpb": nll_sum / math.log(2) / max(evaluated_bytes, 1),
            "val_tokens": n}


def split_targets(split: PackedSplit, n_rows: int) -> int:
    """Non-padding targets in the first n_rows rows (row[1:] of each)."""
    total = 0
    for start in range(0, n_rows, 4096):
        block = split.rows[start:min(start + 4096, n_rows), 1:]
        total += int((block != split.pad_id).sum())
    return total


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: Path, device: torch.device, max_steps: int | None = None,
                 resume: bool = False, stop_at_step: int | None = None, dist_info: Distributed | None = None,
                 profile_steps: int = 0):
        self.config, self.run_dir, self.device = config, run_dir, device
        self.checkpoints = run_dir / "checkpoints"
        self.dist = dist_info or Distributed()
        self.stop_at_step, self.max_steps = stop_at_step, max_steps
        microbatch.limit_process_memory(device, config.run.memory_fraction)
        self.stages = plan_stages(config, self.dist.world_size, max_steps, verify=config.data.verify,
                                  choose=microbatch.chooser(config, device, run_dir, self.dist.world_size, self.log_line))
        self.total_steps = sum(s.steps for s in self.stages)
        self.profiler = self.make_profiler(profile_steps)
        # Called with the step count after every optimizer step, in order; they observe, never decide.
        self.after_step_hooks: list[Callable[[int], None]] = [self.profiler.after_step] if self.profiler else []
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.peak_flops = peak_bf16_flops(self.device_name)  # None: MFU is written as 0.0, never guessed
        self.precision = Precision(config.precision, device)
        self.vocab_size = self.stages[0].train.vocab_size
        self.tokenizer_sha256 = self.stages[0].train.tokenizer_sha256
        torch.manual_seed(config.run.seed)
        max_len = max(s.seq_len for s in self.stages)
        self.model = Transformer(config.model, self.vocab_size, self.precision, max_positions=max_len).to(device)
        for stage in self.stages:
            self.precision.check_shapes(self.projection_shapes(), stage.micro_batch * stage.seq_len,
                                        f"curriculum stage {stage.index}")
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.optim.weight_decay), lr=config.optim.lr,
                                           betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps,
                                           fused=device.type == "cuda")
        self.step, self.positions, self.bad_steps, self.skipped_steps = 0, {}, 0, 0
        self.best_val = math.inf
        if resume:
            self.load_latest()
            if self.profiler is not None and self.step >= self.profiler.first_step:
                raise ConfigError(f"--profile-steps: the run resumes at step {self.step}, past the first profiled "
                                  f"step {self.profiler.first_step + 1}; profile fewer steps")
        if stop_at_step is not None and stop_at_step <= self.step:
            raise ConfigError(f"--stop-at-step {stop_at_step}: the run is at step {self.step} already; name a later "
                              f"step")
        self.compiled = config.run.compile and device.type == "cuda"
        self.graphs_unused = graphs_unused_because(config.run.cuda_graphs, device, self.precision.mode,
                                                   config.attention.doc_mask, self.dist.world_size)
        if self.graphs_unused is None:
            self.model.graphed_blocks = GraphedLayers(self.model.blocks, self.compiled,
                                                      transformer_engine_graphs(self.precision),
                                                      lambda: torch.cuda.reset_peak_memory_stats(device))
        self.forward_model = self.wrap_model()
        # Compiled, the loss's FP32 upcast, log-softmax and their backward fuse into a few kernels
        # reading the BF16 logits: no FP32 copy of the logits is written (it grows with the vocabulary).
        self.loss = Loss(config.run, self.model, self.compiled)

    def budget_change(self, planned_steps: int) -> str:
        """What a resume's new step budget does, in a line: the schedule is a function of the total, so
        from the resumed step on the lr follows the new total's curve. ConfigError when the new budget
        leaves nothing to train."""
        if self.step >= self.total_steps:
            raise ConfigError(f"--max-steps {self.max_steps}: the run is at step {self.step} already, past the new "
                              f"budget of {self.total_steps} steps")
        before, after = (learning_rate(self.config, self.step, total) for total in (planned_steps, self.total_steps))
        return (f"resume: the step budget goes from {planned_steps} to {self.total_steps} steps; the learning-rate "
                f"schedule follows the new total from step {self.step + 1} on (lr there {before:.3g} -> {after:.3g})")

    def make_profiler(self, steps: int):
        if steps < 0:
            raise ConfigError(f"--profile-steps {steps}: give a number of steps, or 0 for no profile")
        if not steps:
            return None
        if self.device.type != "cuda":
            raise ConfigError("--profile-steps profiles GPU kernels; it needs a CUDA device")
        last = min(self.total_steps, self.stop_at_step or self.total_steps)
        if steps >= last:
            raise ConfigError(f"--profile-steps {steps} must be fewer than the run's {last} steps (the first ones "
                              f"compile and warm up)")
        from train.profile import StepProfiler

        return StepProfiler(self.run_dir, last, steps) if self.dist.is_main else None

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        m = self.config.model
        head_dim = m.d_model // m.n_heads
        return {"q": (m.d_model, m.n_heads * head_dim), "k": (m.d_model, m.n_kv_heads * head_dim),
                "v": (m.d_model, m.n_kv_heads * head_dim), "o": (m.n_heads * head_dim, m.d_model),
                "gate": (m.d_model, m.ffn_dim), "up": (m.d_model, m.ffn_dim), "down": (m.ffn_dim, m.d_model),
                "lm_head": (m.embed_rank or m.d_model, self.model.vocab_size)}

    def wrap_model(self):
        model = self.model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.compiled:
            model = torch.compile(model)  # TE projections are graph breaks: compiled around, run eagerly
        return model

    # ------------------------------------------------------------------------------------ checkpoints

    def train_state(self) -> dict:
        """What an exact resume needs besides the weights."""
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "positions": self.positions,
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps, "best_val": self.best_val,
                "rng": checkpoint.rng_state(),
                "stage": self.stage_at(self.step).index if self.step < self.total_steps else len(self.stages) - 1}

    def save(self, is_best: bool = False) -> None:
        if self.dist.is_main:
            from safetensors import SafetensorError

            meta = {"vocab_size": self.vocab_size, "tokenizer_sha256": self.tokenizer_sha256,
                    "config": self.config.to_dict()}
            # safetensors raises its own error type on a failed write, torch.save a RuntimeError; either
            # leaves no step folder (checkpoint.save writes it under a temporary name).
            with writing(f"checkpoint step {self.step} in {self.checkpoints}", self.checkpoints, SafetensorError,
                         RuntimeError):
                checkpoint.save(self.checkpoints, self.step, self.model.state_dict(), meta, self.train_state(),
                                self.config.run.keep_last, is_best)

    def load_latest(self) -> None:
        try:
            found = checkpoint.latest_intact(self.checkpoints, self.log_line)
        except checkpoint.CheckpointError as err:
            raise TrainError(f"--resume: {err}") from None
        if found is None:
            raise TrainError(f"--resume: no checkpoint in {self.checkpoints}; start the run again with --force")
        if found.tokenizer_sha256 != self.tokenizer_sha256:
            raise TrainError(f"{found.path} was trained with another tokenizer than the current packs; refusing to mix")
        mine, saved = flatten(self.config.to_dict()["model"]), flatten(found.config.get("model", {}))
        differ = [f"{key} {saved[key]!r} vs {mine[key]!r}" for key in sorted(saved)
                  if saved[key] != mine.get(key, saved[key])]
        if differ:
            raise TrainError(f"{found.path} holds another model than the run's config ({', '.join(differ)}); "
                             f"resume with the config the run was trained with")
        state = found.train_state
        self.model.load_state_dict({**found.weights, **state["extra_state"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.positions = state["step"], state["positions"]
        self.bad_steps, self.skipped_steps, self.best_val = state["bad_steps"], state["skipped_steps"], state["best_val"]
        checkpoint.restore_rng(state["rng"])
        self.log_line(f"resumed from {found.path} at step {self.step}")
        if self.dist.is_main:
            self.trim_metrics()

    def trim_metrics(self) -> None:
        """Drop the metrics lines past the resumed checkpoint, and any line that is not a whole record
        (a run killed while appending leaves its last line cut short), saying so."""
        metrics = self.run_dir / METRICS
        if not metrics.exists():
            return
        kept, damaged = [], []
        for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                damaged.append(number)
            elif record["step"] <= self.step:
                kept.append(line)
        if damaged:
            self.log_line(f"{metrics}: dropped line(s) {', '.join(map(str, damaged[:5]))} (not whole JSON records: "
                          f"a run killed while writing them)")
        with writing(metrics, self.checkpoints), atomic_path(metrics) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------------------------------- running

    def stage_at(self, step: int) -> Stage:
        return next(s for s in self.stages if s.first_step <= step < s.first_step + s.steps)

    def log_line(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def run(self) -> dict:
        """Train to the end of the curriculum (or stop_at_step); return the last metrics."""
        self.log_line(self.precision.table())
        self.log_line("layer stack: CUDA graphs in training, one per micro-batch shape" if self.graphs_unused is None
                      else f"layer stack: launched layer by layer ({self.graphs_unused})")
        self.log_line(f"MFU against {self.peak_flops / 1e12:.4g} TFLOP/s dense BF16 ({self.device_name})"
                      if self.peak_flops else
                      f"MFU not reported: train/flops.py has no peak FLOP/s for {self.device_name}")
        for stage in self.stages:
            self.log_line(f"stage {stage.index}: seq {stage.seq_len}, micro-batch {stage.micro_batch}, "
                          f"grad accum {stage.grad_accum}, {stage.steps} steps")
        if self.step >= self.total_steps:
            self.log_line(f"the run is complete at step {self.step} of {self.total_steps}; --max-steps N extends it")
        if self.dist.is_main:
            with writing(self.run_dir / RUN_CONFIG, self.checkpoints):
                write_run_files(self.run_dir, self.config, self.max_steps, self.total_steps)
        metrics: dict = {}
        with self.tensorboard() as writer:
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main)
            try:
                while self.step < self.total_steps and not self.stop_requested():
                    stage = self.stage_at(self.step)
                    try:
                        metrics = self.train_stage(stage, bar, writer)
                    except torch.OutOfMemoryError:
                        raise TrainError(f"CUDA out of memory at stage {stage.index} (seq {stage.seq_len}, micro-batch "
                                         f"{stage.micro_batch}): lower curriculum[{stage.index}].micro_batch (gradient "
                                         f"accumulation keeps the tokens per step)") from None
            finally:
                bar.close()
        return metrics

    @contextlib.contextmanager
    def tensorboard(self) -> Iterator:
        """The run's TensorBoard writer (None but on rank 0), closed at the end. It writes from a thread
        of its own and raises that thread's error in ours at its next call, where `writing` turns it into
        the one-line error; the thread's own traceback would only repeat it, so it is not printed."""
        if not self.dist.is_main:
            yield None
            return
        from torch.utils.tensorboard import SummaryWriter

        folder, previous = self.run_dir / "tensorboard", threading.excepthook

        def skip_tensorboard_threads(args: threading.ExceptHookArgs) -> None:
            if not type(args.thread).__module__.startswith("tensorboard."):
                previous(args)

        threading.excepthook = skip_tensorboard_threads
        try:
            with writing(folder, self.checkpoints):
                writer = SummaryWriter(str(folder))
            try:
                yield writer
            finally:
                with writing(folder, self.checkpoints):
                    writer.close()
        finally:
            threading.excepthook = previous

    def train_stage(self, stage: Stage, bar, writer) -> dict:
        """Train from the current step to the stage's end (or stop_at_step); return the last metrics line."""
        loader = self.stage_loader(stage)
        end = stage.first_step + stage.steps
        window, last = LogWindow(self.device), {}
        try:
            while self.step < end and not self.stop_requested():
                result = self.train_step([next(loader) for _ in range(stage.grad_accum)])
                if not result.skipped:
                    window.add(result.loss)
                self.step += 1
                self.positions[str(stage.index)] = loader.position
                bar.update(1)
                for hook in self.after_step_hooks:
                    hook(self.step)
                logged = self.should_log(self.step, end)
                if logged:
                    last = self.window_metrics(stage, result, window)
                    loss = "skipped" if last["loss"] is None else f"{last['loss']:.3f}"
                    bar.set_postfix_str(f"stage {stage.index} loss {loss} "
                                        f"{last['tokens_per_s'] / 1e3:.1f}k tok/s MFU {last['mfu']:.1%}")
                    if self.should_eval(self.step, end):
                        last.update(self.validate(stage))
                    self.write_metrics(last, writer)
                if self.should_checkpoint(self.step, end):
                    self.save_checkpoint(last)
                if logged:
                    window.restart()  # evaluation and checkpointing are not training time
        finally:
            loader.close()
        return last

    def stage_loader(self, stage: Stage) -> PackedLoader:
        """The stage's batches from where this run left them (a resume restores the position)."""
        rows = stage.micro_batch * self.dist.world_size
        return PackedLoader(stage.train, batch_rows=rows, seed=self.config.data.seed, rank=self.dist.rank,
                            world_size=self.dist.world_size, position=self.positions.get(str(stage.index), 0),
                            device=self.device, epoch_multiple=rows * stage.grad_accum)

    def train_step(self, batches: list[Batch]) -> StepResult:
        """Exactly one optimizer step over its micro-batches (gradient accumulation), at the scheduled lr.

        A step whose gradient norm is not finite is skipped: no update, counted, and after
        run.max_bad_steps of them in a row the run stops with TrainError."""
        cfg = self.config
        lr = learning_rate(cfg, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The loss is the mean over every target of the step, all ranks together: the same
        # computation whatever the GPU count or gradient accumulation.
        n_targets = sum((b.targets != IGNORE_INDEX).sum() for b in batches).float()
        distributed = self.dist.world_size > 1
        if distributed:
            dist.all_reduce(n_targets)
        amax_group = dist.group.WORLD if distributed else None  # FP8 scales agree across ranks
        step_loss = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            self.precision.first_microbatch = micro == 0
            no_sync = distributed and micro < len(batches) - 1  # DDP reduces gradients after the last one only
            with (self.forward_model.no_sync() if no_sync else contextlib.nullcontext()):
                with self.precision.autocast(amax_group):
                    output = self.forward_model(batch.inputs, batch.doc_lens if cfg.attention.doc_mask else None,
                                                **self.loss.forward_kwargs)
                loss = self.loss(output, batch.targets) / n_targets
                (loss * self.dist.world_size).backward()  # DDP averages gradients over ranks
            step_loss += loss.detach()
        self.precision.first_microbatch = None  # evaluation and the next step recast the weights
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        if not bool(torch.isfinite(grad_norm)):  # the step's one host sync
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            self.log_line(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                          f"({self.bad_steps} in a row)")
            if self.bad_steps >= cfg.run.max_bad_steps:
                raise TrainError(f"{self.bad_steps} non-finite steps in a row; stopped (lower optim.lr or check the "
                                 f"data); {checkpoint_note(self.checkpoints)}")
            return StepResult(lr, step_loss, grad_norm, skipped=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps = 0
        return StepResult(lr, step_loss, grad_norm, skipped=False)

    # ------------------------------------------ decisions, on the number of steps taken (1, 2, ...)

    def stop_requested(self) -> bool:
        """--stop-at-step: no step past it (the schedule stays that of the whole run)."""
        return self.stop_at_step is not None and self.step >= self.stop_at_step

    def should_log(self, step: int, stage_end: int) -> bool:
        """A metrics line (one host sync of the loss) every log_every steps, at each stage's end, and at
        each evaluation, whose results join it."""
        return step % self.config.run.log_every == 0 or self.should_eval(step, stage_end)

    def should_eval(self, step: int, stage_end: int) -> bool:
        """Validation every eval_every steps and at each stage's end, whatever log_every is."""
        return step % self.config.run.eval_every == 0 or step == stage_end

    def should_checkpoint(self, step: int, stage_end: int) -> bool:
        """Every checkpoint_every steps, at each stage's end, and at --stop-at-step (for --resume)."""
        return step % self.config.run.checkpoint_every == 0 or step == stage_end or step == self.stop_at_step

    # ------------------------------------------------------------------------------ around the step

    def window_metrics(self, stage: Stage, result: StepResult, window: LogWindow) -> dict:
        """The metrics line closing the window at this step: its mean loss (the one host sync of the
        loss), throughput and MFU; lr and grad_norm are those of the last step."""
        if self.dist.world_size > 1:
            dist.all_reduce(window.loss_sum)  # each rank holds its share of the global mean
        tokens_per_step = self.config.optim.tokens_per_step
        tokens_per_s = window.steps * tokens_per_step / max(time.perf_counter() - window.start, 1e-9)
        flops_per_s = self.model.flops_per_token(stage.seq_len) * tokens_per_s
        on_gpu = self.device.type == "cuda"
        return {"step": self.step, "stage": stage.index, "seq_len": stage.seq_len, "micro_batch": stage.micro_batch,
                "tokens": self.step * tokens_per_step,
                "loss": float(window.loss_sum) / window.steps if window.steps else None,  # None: every step skipped
                "lr": result.lr, "grad_norm": float(result.grad_norm), "tokens_per_s": tokens_per_s,
                "mfu": flops_per_s / (self.peak_flops * self.dist.world_size) if self.peak_flops else 0.0,
                "memory_gb": peak_memory_bytes(self.device) / 2**30 if on_gpu else 0.0,
                "skipped_steps": self.skipped_steps}

    def validate(self, stage: Stage) -> dict[str, float]:
        """Validation loss and bits per byte on the stage's val split, at its sequence length."""
        result = evaluate(self.forward_model, self.loss, stage.val, self.precision, stage.micro_batch,
                          self.config.run.eval_rows, self.config.attention.doc_mask, self.device, self.dist)
        self.log_line(f"step {self.step}: val loss {result['val_loss']:.4f}, val bpb {result['val_bpb']:.4f}")
        return result

    def save_checkpoint(self, last: dict) -> None:
        """Save; its weights also become best/ when this very step was evaluated and beat every earlier evaluation."""
        is_best = "val_loss" in last and last["step"] == self.step and last["val_loss"] < self.best_val
        if is_best:
            self.best_val = last["val_loss"]
        self.save(is_best)

    def write_metrics(self, metrics: dict, writer) -> None:
        """One line of metrics.jsonl, and the same values to TensorBoard. A value that is not finite
        (the grad norm of a skipped step) is written as null: the line stays valid JSON."""
        if not self.dist.is_main:
            return
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        with writing(self.run_dir / METRICS, self.checkpoints), open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(values) + "\n")
        with writing(self.run_dir / "tensorboard", self.checkpoints):
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(key, value, values["step"])
