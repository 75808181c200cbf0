"""`just bench-train`: the same model and packed data for a fixed number of steps in each precision
mode, side by side in one run; a markdown table of tokens/s, MFU (against 989 TFLOP/s dense BF16),
peak memory, the micro-batches run, the loss curve's start and end, and the final val bpb (with
--write-docs also written to docs/benchmarks.md).

Each mode trains in its own process (fresh memory peak) with the same seed, tokens per step and
data order, so losses compare at equal tokens. A mode may carry config overrides after `+`, e.g.
`fp8-delayed+run.compile=false+curriculum.0.micro_batch=16`: one lever per row. With
`--profile-steps N` each run also profiles its last N steps and a second table says where the GPU
time went (see train/profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import HelpFormatter
from pipeline.errors import StageError

MODES = {  # name -> trainer arguments (run.compile is on by default: TE projections stay eager)
    "bf16-compiled": ["--precision", "bf16"],
    "te-bf16": ["--precision", "te-bf16"],
    "fp8-delayed": ["--precision", "fp8", "--recipe", "delayed"],
    "fp8-current": ["--precision", "fp8", "--recipe", "current"],
    "fp8-block": ["--precision", "fp8", "--recipe", "block"],
}


def mode_arguments(mode: str) -> list[str]:
    """`fp8-delayed+a.b=1+c.d=2` -> the trainer arguments of fp8-delayed and two --set overrides."""
    name, *settings = mode.split("+")
    if name not in MODES:
        raise SystemExit(f"error: bench-train: unknown mode {name!r}; known: {', '.join(MODES)}")
    return MODES[name] + [f"--set={s}" for s in settings]


def summarize(run_dir: Path, profile_steps: int) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]["step"]
    # the first windows hold compilation and warm-up; profiled steps run slower
    timed = [m for m in lines[2:] if m["step"] <= last - profile_steps] or lines
    evals = [m for m in lines if "val_bpb" in m]
    micro_batches = list(dict.fromkeys(m["micro_batch"] for m in lines))  # per stage, as run (also when "auto")
    return {"tokens_per_s": sum(m["tokens_per_s"] for m in timed) / len(timed),
            "micro_batch": "/".join(map(str, micro_batches)),
            "mfu": sum(m["mfu"] for m in timed) / len(timed), "memory_gb": max(m["memory_gb"] for m in lines),
            "loss_start": lines[0]["loss"], "loss_end": lines[-1]["loss"], "steps": lines[-1]["step"],
            "tokens": lines[-1]["tokens"], "val_bpb": evals[-1]["val_bpb"] if evals else float("nan")}


def preset_rows(preset: str, results: list[tuple[str, dict | None, float]]) -> list[list[str]]:
    """Table rows of one preset; ratios against its fastest compiled-BF16 row (the baseline to beat)."""
    compiled = [s for mode, s, _ in results if s and mode.split("+")[0] == "bf16-compiled"]
    baseline = max(compiled, key=lambda s: s["tokens_per_s"]) if compiled else None
    rows = []
    for mode, s, wall in results:
        if s is None:
            continue  # already listed as failed
        ratio = f"{s['tokens_per_s'] / baseline['tokens_per_s']:.2f}x" if baseline else ""
        bpb = f"{s['val_bpb']:.4f}" + (f" ({s['val_bpb'] / baseline['val_bpb'] - 1:+.2%})" if baseline else "")
        rows.append([preset, mode, f"{s['tokens_per_s'] / 1e3:.0f}k", ratio, f"{s['mfu']:.1%}", f"{s['memory_gb']:.1f}",
                     s["micro_batch"], f"{s['loss_start']:.3f} -> {s['loss_end']:.3f}", bpb,
                     f"{s['steps']} / {s['tokens'] / 1e6:.1f}M", f"{wall:.0f}"])
    return rows


def config_path(preset: str) -> str:
    """A preset's name (`small`) names configs/small.toml; a path to a .toml file is taken as it is."""
    return preset if preset.endswith(".toml") else f"configs/{preset}.toml"


def vocabulary(config: str, settings: list[str], manifests: str | None) -> int:
    """The vocabulary size of the packs a run of `config` reads (from their tokenize manifest)."""
    from pipeline.manifest import tokens_info
    from train.config import apply_settings, load

    return tokens_info(Path(manifests or apply_settings(load(Path(config)), settings).data.manifests)).vocab_size


def section_title(configs: list[str], settings: list[str], vocab_size: int) -> str:
    """The docs section of a call, from its presets, their stage lengths and the packs' vocabulary:
    `Train: small at T=2048, vocabulary 65,536`."""
    from train.config import apply_settings, load

    lengths = []
    for config in configs:
        for stage in apply_settings(load(Path(config)), settings).curriculum:
            if stage.seq_len not in lengths:
                lengths.append(stage.seq_len)
    return (f"Train: {', '.join(Path(c).stem for c in configs)} at T={'/'.join(map(str, lengths))}, "
            f"vocabulary {vocab_size:,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just bench-train", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--presets", "--configs", dest="presets", default="small",
                        help="presets to run, comma separated: names of configs/NAME.toml (small, base, yxanul-197m, "
                             "...) or paths to .toml files")
    parser.add_argument("--data-dir", default=None,
                        help="where the packs are, passed to every run (default: the config's data.data_dir)")
    parser.add_argument("--manifests", default=None,
                        help="manifests of those packs, passed to every run (default: the config's data.manifests)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma separated, each one of {', '.join(MODES)}, optionally followed by +KEY=VALUE "
                             "config overrides for that run only")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (curriculum scaled alike)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override passed to every run (repeatable); a mode's own overrides win")
    parser.add_argument("--profile-steps", type=int, default=0, metavar="N",
                        help="profile each run's last N steps: GPU time per kernel category in a second table (0: off)")
    parser.add_argument("--out-dir", default="runs/bench", help="where the runs go (their checkpoints are deleted)")
    parser.add_argument("--title", default=None,
                        help="section of docs/benchmarks.md that --write-docs replaces (default: from the presets "
                             "and their sequence lengths after --set, e.g. \"Train: small at T=2048\")")
    parser.add_argument("--write-docs", action="store_true", help="also write the tables into docs/benchmarks.md")
    args = parser.parse_args(argv)
    from benchmarks.report import markdown_table, update_section

    from train.profile import ORDER

    for mode in args.modes.split(","):
        mode_arguments(mode)  # an unknown mode fails before any run
    configs = [config_path(preset) for preset in args.presets.split(",")]
    missing = [config for config in configs if not Path(config).is_file()]
    if missing:
        raise SystemExit(f"error: bench-train: no config {', '.join(missing)}; presets are the names in configs/")
    data = [*(["--data-dir", args.data_dir] if args.data_dir else []),
            *(["--manifests", args.manifests] if args.manifests else [])]
    try:
        vocab_size = vocabulary(configs[0], args.set, args.manifests)
    except StageError as err:
        raise SystemExit(f"error: bench-train: {err}") from None
    title = args.title or (section_title(configs, args.set, vocab_size) if args.write_docs else None)
    rows, profile_rows = [], []
    for config in configs:
        preset, results = Path(config).stem, []
        for index, mode in enumerate(args.modes.split(",")):
            name = f"{preset}-{index}-{mode.split('+')[0]}"
            # the mode's own overrides come last: they win over the ones given to every run
            command = [sys.executable, "-m", "train", "--config", config, "--max-steps", str(args.steps), "--run",
                       name, "--out-dir", args.out_dir, "--force", "--profile-steps", str(args.profile_steps), *data,
                       *[f"--set={s}" for s in args.set], *mode_arguments(mode)]
            print(f"bench-train: {' '.join(command[1:])}", flush=True)
            started = time.perf_counter()
            result = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if result.returncode != 0:
                error = (result.stderr.strip().splitlines() or ["?"])[-1]
                results.append((mode, None, wall))
                rows.append([preset, mode, "failed: " + error[:150], *[""] * 8])
                if args.profile_steps:
                    profile_rows.append([preset, mode, "failed", *[""] * len(ORDER)])
                print(result.stderr[-3000:], flush=True)
                continue
            summary = summarize(Path(args.out_dir) / name, args.profile_steps)
            shutil.rmtree(Path(args.out_dir) / name / "checkpoints", ignore_errors=True)  # GBs each; not needed here
            results.append((mode, summary, wall))
            print(f"{mode}: {summary['tokens_per_s'] / 1e3:.0f}k tokens/s, val bpb {summary['val_bpb']:.4f}", flush=True)
            if args.profile_steps:
                profile = json.loads((Path(args.out_dir) / name / "profile.json").read_text())
                profile_rows.append([preset, mode, f"{profile['window_ms_per_step']:.1f}",
                                     *(f"{profile['share'][k]:.0%}" for k in ORDER)])
                for kernel in profile["top_kernels"][:8]:
                    print(f"  {kernel['ms_per_step']:7.2f} ms/step  {kernel['category']:<13} {kernel['name'][:90]}")
        rows += preset_rows(preset, results)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    versions = f"torch {torch.__version__}"
    try:
        import transformer_engine

        versions += f", Transformer Engine {transformer_engine.__version__}"
    except ImportError:
        pass
    table = markdown_table(["preset", "mode", "tokens/s", "vs best bf16-compiled", "MFU", "peak GB", "micro-batch",
                            "loss start -> end", "val bpb (vs that run)", "steps / tokens", "wall s"], rows)
    invocation = (f"python -m benchmarks.bench_train --presets {args.presets} --modes {args.modes} --steps {args.steps}"
                  + (f" --profile-steps {args.profile_steps}" if args.profile_steps else "")
                  + "".join(f" {option} {value}" for option, value in zip(data[::2], data[1::2]))
                  + "".join(f" --set {s}" for s in args.set))
    body = (f"`{invocation}` on {device} ({time.strftime('%Y-%m-%d')}, {versions}; packs of a {vocab_size:,}-token "
            f"vocabulary).\n\n{table}\n\n"
            "tokens/s and MFU average the logged windows after the first two (compilation, warm-up); "
            "MFU counts 6 x matmul parameters + attention FLOPs per token against 989 TFLOP/s.")
    if profile_rows:
        body += (f"\n\nWhere the GPU time goes: the last {args.profile_steps} steps of each run under `torch.profiler` "
                 "(kernels sorted by name, see train/profile.py; idle = no kernel running: launch gaps, host work):\n\n"
                 + markdown_table(["preset", "mode", "ms/step", *ORDER], profile_rows))
    print(body)
    if args.write_docs:
        update_section(title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
