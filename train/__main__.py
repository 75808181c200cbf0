"""`just train`: train a model on the packed data, moving through the config's curriculum.

Single GPU or CPU: `python -m train --config configs/small.toml`. Several GPUs:
`torchrun --nproc_per_node=G -m train --config ...` (DDP; rank 0 logs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

from pipeline import HelpFormatter
from pipeline.errors import StageError
from pipeline.locks import LOCK_FILE, exclusive
from train.config import (PRECISIONS, RECIPES, RESUME_ADJUSTABLE, ConfigError, RunConfig, TrainConfig,
                          apply_overrides, apply_settings, load, resume_changes)

DEFAULT_CONFIG = Path("configs/small.toml")
RESUME_RULES = textwrap.fill(
    "`--run NAME --resume` continues runs/NAME as it was started: with its own config (config.resolved.json) and "
    "step budget (run.json), not configs/small.toml. A flag that would change the run is refused; a resume may "
    "change only --device, --stop-at-step, --profile-steps, --max-steps, where the data is read from "
    "(--data-dir, --manifests) and, with --set, "
    f"{', '.join(sorted(RESUME_ADJUSTABLE - {'data.data_dir', 'data.manifests'}))}. A new --max-steps changes the "
    "run's step budget, and with it the learning-rate schedule, a function of the total steps: from the resumed "
    "step on, the rate follows the new total's curve (extending a finished cosine run raises it again from its "
    "floor), and the curriculum's stages are rescaled to the new total.", width=100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="just train", description=f"{__doc__}\n{RESUME_RULES}",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, default=None,
                        help=f"TOML config file of a new run (default: {DEFAULT_CONFIG}); the presets are "
                             f"configs/tiny.toml, small.toml, yxanul-197m.toml, base.toml, small-q-bf16.toml. With "
                             f"--resume the run's own config is used, and a --config must agree with it")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="override the config's precision.mode: fp8 (Transformer Engine, GPU 8.9+), te-bf16 (TE modules with BF16 "
                             "GEMMs: what TE costs apart from FP8), bf16, fp32")
    parser.add_argument("--recipe", choices=RECIPES, default=None, help="override the config's FP8 scaling recipe (precision.recipe)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train this many optimizer steps in all, each stage's share scaled down alike (default: the "
                             "whole curriculum; with --resume, the run's own budget). On --resume another N changes "
                             "the budget and the learning-rate schedule with it (see above)")
    parser.add_argument("--run", "--run-name", dest="run", default=None,
                        help="run name: outputs go to OUT_DIR/NAME (default: the config's run.name); under torchrun write "
                             "--run-name, since torchrun reads --run as its own --run-path")
    parser.add_argument("--resume", action="store_true",
                        help="continue OUT_DIR/NAME from its last checkpoint, with the config and step budget it was "
                             "started with; flags that would change the run are refused (see above)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and stop after this step without changing the schedule (resume later)")
    parser.add_argument("--data-dir", default=None, help="where packed/ lives (default: the config's data.data_dir)")
    parser.add_argument("--manifests", default=None, help="manifests folder (default: the config's data.manifests)")
    parser.add_argument("--out-dir", default=None,
                        help=f"parent folder of the run directory (default: the config's run.out_dir; with --resume "
                             f"and no --config, {RunConfig().out_dir})")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set optim.tokens_per_step=65536 (repeatable; curriculum.N.key "
                             "for a stage)")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="profile the run's last N steps on the GPU: kernel time per category (GEMM, attention, "
                             "FP8 casts, ...) and idle time into OUT_DIR/NAME/profile.json (0: off)")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory of the same name")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM to a single-process run: stopped like Ctrl-C, exit status 143."""


def stop_on_sigterm(rank: int, run_dir: Path) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: say so in one line and exit."""
    from train.trainer import checkpoint_note

    def handler(signum, frame):
        print(f"error: train: rank {rank} stopped by SIGTERM (another rank failed, or the job was stopped); "
              f"{checkpoint_note(run_dir / 'checkpoints')}", file=sys.stderr, flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def terminate(signum, frame) -> None:
    raise Terminated


def requested_config(args: argparse.Namespace, config: TrainConfig) -> TrainConfig:
    """`config` with this command line's overrides on top."""
    config = apply_overrides(apply_settings(config, args.set), args.precision, args.recipe, args.run)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    if args.manifests:
        config.data.manifests = args.manifests
    if args.out_dir:
        config.run.out_dir = args.out_dir
    return config


def resolve_run(args: argparse.Namespace, say) -> tuple[Path, TrainConfig, int | None, int | None]:
    """The run directory, config and step budget (--max-steps) this command trains with: a new run's
    from --config, a resumed one's from the run itself, with only the changes a resume allows; and
    the total steps the run was planned for (None for a new run)."""
    from train.trainer import TrainError, read_run_files

    if args.resume and args.force:
        raise ConfigError("--resume continues a run and --force replaces it: pass one of them")
    if not args.resume:
        config = requested_config(args, load(args.config or DEFAULT_CONFIG))
        return Path(config.run.out_dir) / config.run.name, config, args.max_steps, None
    from_file = requested_config(args, load(args.config)) if args.config else None
    name = args.run or (from_file.run.name if from_file else None)
    if name is None:
        raise ConfigError("--resume needs the run to continue: --run NAME")
    run_dir = Path(args.out_dir or (from_file.run.out_dir if from_file else RunConfig().out_dir)) / name
    if not run_dir.is_dir():
        raise TrainError(f"--resume: there is no run {run_dir}; start it without --resume (or pass --out-dir)")
    saved, budget = read_run_files(run_dir)
    saved.run.name, saved.run.out_dir = name, str(run_dir.parent)
    config = from_file or requested_config(args, saved)
    config.run.name, config.run.out_dir = name, str(run_dir.parent)
    for change in resume_changes(saved, config, run_dir / "config.resolved.json"):
        say(f"resume: {change}")
    if budget is None:
        say(f"resume: {run_dir} has no run.json (it was started before runs recorded their step budget); the "
            f"budget is this command's: {f'--max-steps {args.max_steps}' if args.max_steps else 'the whole curriculum'}")
        return run_dir, config, args.max_steps, None
    max_steps = budget["max_steps"] if args.max_steps is None else args.max_steps
    return run_dir, config, max_steps, budget["total_steps"]


def resolve_device(name: str | None, local_rank: int):
    """The device to train on, checked here so a typo or a missing GPU is one line."""
    from train.devices import resolve_device as resolve

    try:
        return resolve(name, local_rank)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@contextmanager
def claimed(run_dir: Path, resume: bool, force: bool) -> Iterator[None]:
    """Hold the run directory for the whole run (a second trainer on it is refused), creating it for
    a new run; a new run that stops before its first checkpoint leaves no directory behind, so
    running it again needs no --force."""
    from train import checkpoint
    from train.trainer import TrainError, writing

    if resume:
        with exclusive(run_dir, f"run {run_dir}"):
            yield
        return
    if run_dir.exists() and not force:
        raise TrainError(f"{run_dir} exists; pass --resume to continue it, --force to replace it, or --run NAME for "
                         f"a new run")
    with writing(run_dir, run_dir / "checkpoints"):
        run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run_dir, f"run {run_dir}"):
        with writing(run_dir, run_dir / "checkpoints"):
            for old in run_dir.iterdir():  # --force: the previous run's files, now that nobody writes them
                if old.name != LOCK_FILE:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        try:
            yield
        except BaseException:
            if not checkpoint.all_steps(run_dir / "checkpoints"):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from train.trainer import Distributed, Trainer, TrainError, checkpoint_note

    dist_info = Distributed.from_env()
    run_dir, on_sigterm = None, signal.getsignal(signal.SIGTERM)
    try:
        say = print if dist_info.is_main else lambda text: None
        run_dir, config, max_steps, planned_steps = resolve_run(args, say)
        device = resolve_device(args.device, dist_info.local_rank)
        if dist_info.world_size > 1:
            stop_on_sigterm(dist_info.rank, run_dir)
        else:
            signal.signal(signal.SIGTERM, terminate)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist_info.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
        with claimed(run_dir, args.resume, args.force) if dist_info.is_main else nullcontext():
            if dist_info.world_size > 1:
                dist.barrier()
            trainer = Trainer(config, run_dir, device, max_steps=max_steps, resume=args.resume,
                              stop_at_step=args.stop_at_step, dist_info=dist_info, profile_steps=args.profile_steps)
            if planned_steps not in (None, trainer.total_steps):
                say(trainer.budget_change(planned_steps))
            metrics = trainer.run()
        if dist_info.is_main and metrics:
            print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in metrics.items()))
        return 0
    except (ConfigError, StageError, TrainError) as err:
        print(f"error: train: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        note = checkpoint_note(run_dir / "checkpoints") if run_dir else "no checkpoint was written yet"
        print(f"error: train: interrupted; {note}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        if dist_info.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
