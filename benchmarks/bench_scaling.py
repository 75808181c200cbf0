"""`just bench-scaling`: DDP on 2 GPUs verified and measured against 1 GPU, side by side.

For each precision mode: the same preset, packed data and global batch on 1 GPU and on 2 GPUs
(torchrun) at the same per-GPU micro-batch; tokens/s per GPU, scaling efficiency and the largest
relative gap between the two loss curves. Then checkpoints cross GPU counts (2 -> 1 and 1 -> 2
resume to the same losses) and a killed rank stops the job with a message instead of a hang.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline import HelpFormatter
from train import checkpoint

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
       "PYTHONUNBUFFERED": "1"}


def command(nproc: int, args, run: str, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    return launcher + ["--config", args.config, "--run-name", run, "--out-dir", args.out_dir, "--max-steps",
                       str(args.steps), *(["--device", "cpu"] if args.cpu else []), *extra,
                       *[f"--set={s}" for s in args.set]]


def train(nproc: int, args, run: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command(nproc, args, run, *extra), capture_output=True, text=True,
                            env={**os.environ, **ENV})
    if check and result.returncode != 0:
        raise SystemExit(f"bench-scaling: {run} failed:\n{result.stderr[-3000:]}")
    return result


def metrics(args, run: str) -> list[dict]:
    return [json.loads(line) for line in (Path(args.out_dir) / run / "metrics.jsonl").read_text().splitlines()]


def max_gap(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))


def rank_death(args) -> str:
    """Start a 2-process run, SIGKILL rank 1 after the first checkpoint, time how the job ends."""
    run = "scaling-kill"
    process = subprocess.Popen(command(2, args, run, "--force", "--precision", args.modes.split(",")[0],
                                       "--set=run.checkpoint_every=5"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    checkpoints = Path(args.out_dir) / run / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint.all_steps(checkpoints):
        time.sleep(0.5)
    victim = None
    for pid in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"LOCAL_RANK=1" in environ and b"train" in cmdline and b"torch.distributed.run" not in cmdline:
            victim = int(pid)
    if victim is None:
        process.kill()
        return "rank 1 not found"
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        return "HUNG: the job did not stop within 180 s"
    latest = checkpoint.latest(checkpoints)
    step = checkpoint.load(latest).step
    messages = [line for line in stderr.splitlines() if "error: train" in line or "ChildFailedError" in line]
    return (f"rank 1 killed (SIGKILL) after checkpoint {latest.name}; the job exited with code {process.returncode} "
            f"{time.time() - killed_at:.1f} s later; last checkpoint loads (step {step}); "
            f"messages: {messages[:2]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just bench-scaling", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/small.toml", help="config file of every run")
    parser.add_argument("--modes", default="bf16,fp8",
                        help="trainer --precision values, comma separated; resume and kill use the first")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (curriculum scaled alike)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override passed to every run (repeatable)")
    parser.add_argument("--out-dir", default="runs/scaling", help="where the runs go")
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU (a functional check, no timing)")
    parser.add_argument("--parts", default="scaling,resume,kill",
                        help="checks to run, comma separated: scaling (1 vs 2 GPUs), resume (across GPU counts), "
                             "kill (a rank dies)")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the result into docs/benchmarks.md, section \"Scaling\" (not with --cpu)")
    args = parser.parse_args(argv)
    if args.cpu and args.write_docs:
        parser.error("--write-docs: the CPU check is functional only and has no section in docs/benchmarks.md")
    from benchmarks.report import markdown_table, publish

    parts = args.parts.split(",")
    lines = []
    if "scaling" in parts:
        rows = []
        for mode in args.modes.split(","):
            runs = {n: f"scaling-{mode}-{n}gpu" for n in (1, 2)}
            for n, run in runs.items():
                print(f"bench-scaling: {mode} on {n} GPU(s)", flush=True)
                train(n, args, run, "--force", "--precision", mode)
            one, two = metrics(args, runs[1]), metrics(args, runs[2])
            tps = {n: sum(m["tokens_per_s"] for m in ms[2:]) / max(len(ms[2:]), 1) for n, ms in ((1, one), (2, two))}
            rows.append([mode, f"{tps[1] / 1e3:.0f}k", f"{tps[2] / 2e3:.0f}k", f"{tps[2] / (2 * tps[1]):.1%}",
                         f"{one[-1]['loss']:.4f} / {two[-1]['loss']:.4f}", f"{max_gap(two, one):.2e}",
                         f"{one[-1].get('val_bpb', float('nan')):.4f} / {two[-1].get('val_bpb', float('nan')):.4f}"])
            print(" | ".join(rows[-1]), flush=True)
        lines.append(markdown_table(["mode", "tokens/s 1 GPU", "tokens/s per GPU, 2 GPUs", "scaling efficiency",
                                     "final loss 1 / 2 GPUs", "max rel. loss gap", "val bpb 1 / 2 GPUs"], rows))
    if "resume" in parts:
        mode = args.modes.split(",")[0]
        half = str(args.steps // 2)
        checks = []
        for first, second in ((2, 1), (1, 2)):
            run = f"scaling-resume-{first}to{second}"
            train(first, args, run, "--force", "--precision", mode, "--stop-at-step", half)
            train(second, args, run, "--resume", "--precision", mode)
            reference = Path(args.out_dir) / f"scaling-{mode}-{second}gpu" / "metrics.jsonl"
            straight = metrics(args, f"scaling-{mode}-{second}gpu") if reference.exists() else None
            gap = max_gap(metrics(args, run), straight) if straight else float("nan")
            checks.append(f"{first} GPU(s) -> stop at step {half} -> resume on {second}: max rel. loss gap to the "
                          f"uninterrupted {second}-GPU run {gap:.2e}")
        lines.append("Resume across GPU counts (" + mode + "):\n\n" + "\n".join(f"- {c}" for c in checks))
    if "kill" in parts:
        lines.append("Rank death: " + rank_death(args))
    import torch

    device = "CPU (gloo)" if args.cpu else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    body = (f"`python -m benchmarks.bench_scaling --config {args.config} --modes {args.modes} --steps {args.steps}"
            + "".join(f" --set {s}" for s in args.set) + f"` on {device} ({time.strftime('%Y-%m-%d')}).\n\n"
            + "\n\n".join(lines))
    return publish("Scaling", body, args.write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
