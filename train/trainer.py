"""The training loop: sequence-length curriculum over packed memmaps, FP8 or BF16, DDP-ready.

Tokens per optimizer step are constant across stages; gradient accumulation is derived per stage.
Loss values are synced to the host only every `log_every` steps (one finiteness check of the
gradient norm per step decides whether a NaN/Inf step is skipped). Validation reports nats/token
and bits per byte.

The loop reads like torchtitan's trainer: `train_step` takes exactly one optimizer step and nothing
else; when to log, evaluate and checkpoint are one-line decisions beside it (`should_log`,
`should_eval`, `should_checkpoint`); anything else that watches the steps (the profiler) is an
after-step hook.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from train import checkpoint, microbatch
from train.config import ConfigError, TrainConfig
from train.flops import peak_bf16_flops
from train.loader import IGNORE_INDEX, Batch, PackedLoader, make_batch
from train.loss import Loss
from train.model import Transformer
from pipeline.packed import PackedDataError, PackedDataMissing, PackedSplit, check_seq_len
from train.precision import Precision


class TrainError(Exception):
    """The run cannot go on; the message says why and what to change."""


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
        lengths = ",".join(str(n) for n in sorted(set(missing)))
        raise PackedDataError(f"the curriculum needs packed data that is missing for length(s) {lengths}; run "
                              f"`just pack --seq-len {lengths}`" + (f" --data-dir {data_dir}" if str(data_dir) != "data" else ""))
    fingerprints = {s[0].tokenizer_sha256 for s in splits.values()}
    if len(fingerprints) > 1:
        raise PackedDataError("the packs were made from different tokenizers; rerun `just pack` for every length")
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
        self.dist = dist_info or Distributed()
        self.stop_at_step = stop_at_step
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
        self.compiled = config.run.compile and device.type == "cuda"
        self.forward_model = self.wrap_model()
        # Compiled, the loss's FP32 upcast, log-softmax and their backward fuse into a few kernels
        # reading the BF16 logits: no FP32 copy of the logits is written (it grows with the vocabulary).
        self.loss = Loss(config.run, self.model, self.compiled)

    def make_profiler(self, steps: int):
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
            meta = {"vocab_size": self.vocab_size, "tokenizer_sha256": self.tokenizer_sha256,
                    "config": self.config.to_dict()}
            checkpoint.save(self.run_dir / "checkpoints", self.step, self.model.state_dict(), meta, self.train_state(),
                            self.config.run.keep_last, is_best)

    def load_latest(self) -> None:
        try:
            found = checkpoint.latest_intact(self.run_dir / "checkpoints", self.log_line)
        except checkpoint.CheckpointError as err:
            raise TrainError(f"--resume: {err}") from None
        if found is None:
            raise TrainError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if found.tokenizer_sha256 != self.tokenizer_sha256:
            raise TrainError(f"{found.path} was trained with another tokenizer than the current packs; refusing to mix")
        state = found.train_state
        self.model.load_state_dict({**found.weights, **state["extra_state"]})
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.positions = state["step"], state["positions"]
        self.bad_steps, self.skipped_steps, self.best_val = state["bad_steps"], state["skipped_steps"], state["best_val"]
        checkpoint.restore_rng(state["rng"])
        self.log_line(f"resumed from {found.path} at step {self.step}")
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists() and self.dist.is_main:  # drop lines of the interrupted run past the checkpoint
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------------------------------- running

    def stage_at(self, step: int) -> Stage:
        return next(s for s in self.stages if s.first_step <= step < s.first_step + s.steps)

    def log_line(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

    def run(self) -> dict:
        """Train to the end of the curriculum (or stop_at_step); return the last metrics."""
        self.log_line(self.precision.table())
        self.log_line(f"MFU against {self.peak_flops / 1e12:.4g} TFLOP/s dense BF16 ({self.device_name})"
                      if self.peak_flops else
                      f"MFU not reported: train/flops.py has no peak FLOP/s for {self.device_name}")
        for stage in self.stages:
            self.log_line(f"stage {stage.index}: seq {stage.seq_len}, micro-batch {stage.micro_batch}, "
                          f"grad accum {stage.grad_accum}, {stage.steps} steps")
        writer = None
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.dist.is_main)
        metrics: dict = {}
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
            if writer is not None:
                writer.close()
        return metrics

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
                    bar.set_postfix_str(f"stage {stage.index} loss {last['loss']:.3f} "
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
                raise TrainError(f"{self.bad_steps} non-finite steps in a row; stopped. The last good checkpoint "
                                 f"is in {self.run_dir / 'checkpoints'}; lower optim.lr or check the data")
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
        """A metrics line (one host sync of the loss) every log_every steps and at each stage's end."""
        return step % self.config.run.log_every == 0 or step == stage_end

    def should_eval(self, step: int, stage_end: int) -> bool:
        """Validation every eval_every steps and at each stage's end; it joins that step's metrics line,
        so it happens only where should_log is true too."""
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
                "tokens": self.step * tokens_per_step, "loss": float(window.loss_sum) / max(window.steps, 1),
                "lr": result.lr, "grad_norm": float(result.grad_norm), "tokens_per_s": tokens_per_s,
                "mfu": flops_per_s / (self.peak_flops * self.dist.world_size) if self.peak_flops else 0.0,
                "memory_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if on_gpu else 0.0,
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
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key, value, metrics["step"])
