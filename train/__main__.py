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
from datetime import timedelta
from pathlib import Path

from pipeline import HelpFormatter
from pipeline.errors import StageError
from train.config import PRECISIONS, RECIPES, ConfigError, apply_overrides, apply_settings, load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="just train", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/small.toml"),
                        help="TOML config file; the presets are configs/tiny.toml, small.toml, yxanul-197m.toml, "
                             "base.toml, small-q-bf16.toml")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="override the config's precision.mode: fp8 (Transformer Engine, GPU 8.9+), te-bf16 (TE modules with BF16 "
                             "GEMMs: what TE costs apart from FP8), bf16, fp32")
    parser.add_argument("--recipe", choices=RECIPES, default=None, help="override the config's FP8 scaling recipe (precision.recipe)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train this many optimizer steps in all, each stage's share scaled down alike (default: the "
                             "whole curriculum)")
    parser.add_argument("--run", "--run-name", dest="run", default=None,
                        help="run name: outputs go to OUT_DIR/NAME (default: the config's run.name); under torchrun write "
                             "--run-name, since torchrun reads --run as its own --run-path")
    parser.add_argument("--resume", action="store_true", help="continue OUT_DIR/NAME exactly from its last checkpoint")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and stop after this step without changing the schedule (resume later)")
    parser.add_argument("--data-dir", default=None, help="where packed/ lives (default: the config's data.data_dir)")
    parser.add_argument("--manifests", default=None, help="manifests folder (default: the config's data.manifests)")
    parser.add_argument("--out-dir", default=None, help="parent folder of the run directory (default: the config's run.out_dir)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set optim.tokens_per_step=65536 (repeatable; curriculum.N.key "
                             "for a stage)")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="profile the run's last N steps on the GPU: kernel time per category (GEMM, attention, "
                             "FP8 casts, ...) and idle time into OUT_DIR/NAME/profile.json (0: off)")
    parser.add_argument("--force", action="store_true", help="replace an existing run directory of the same name")
    return parser


def stop_on_sigterm(rank: int, run_dir: Path) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: say so in one line and exit."""
    def handler(signum, frame):
        print(f"error: train: rank {rank} stopped by SIGTERM (another rank failed, or the job was stopped); the last "
              f"checkpoint in {run_dir / 'checkpoints'} is intact: --resume continues", file=sys.stderr, flush=True)
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from train.trainer import Distributed, Trainer, TrainError

    dist_info = Distributed.from_env()
    try:
        config = apply_overrides(apply_settings(load(args.config), args.set), args.precision, args.recipe, args.run)
        if dist_info.world_size > 1:
            stop_on_sigterm(dist_info.rank, Path(config.run.out_dir) / config.run.name)
        if args.data_dir:
            config.data.data_dir = args.data_dir
        if args.manifests:
            config.data.manifests = args.manifests
        if args.out_dir:
            config.run.out_dir = args.out_dir
        if args.device:
            device = torch.device(args.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", dist_info.local_rank)
        else:
            device = torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist_info.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
        run_dir = Path(config.run.out_dir) / config.run.name
        if dist_info.is_main:
            if run_dir.exists() and not args.resume:
                if not args.force:
                    raise TrainError(f"{run_dir} exists; pass --resume to continue it, --force to replace it, or "
                                     f"--run NAME for a new run")
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        if dist_info.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        trainer = Trainer(config, run_dir, device, max_steps=args.max_steps, resume=args.resume,
                          stop_at_step=args.stop_at_step, dist_info=dist_info, profile_steps=args.profile_steps)
        if dist_info.is_main:
            import json

            (run_dir / "config.resolved.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        metrics = trainer.run()
        if dist_info.is_main and metrics:
            print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in metrics.items()))
        return 0
    except (ConfigError, StageError, TrainError) as err:
        print(f"error: train: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: train: interrupted; the last checkpoint is intact (--resume continues)", file=sys.stderr)
        return 130
    finally:
        if dist_info.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
