"""Where a training step's GPU time goes: `just train ... --profile-steps N`.

Profiles the run's last N optimizer steps with `torch.profiler` and sorts every GPU kernel into a
category by its name (GEMMs, attention, FP8 casts and scaling, compiled Triton kernels, the
optimizer, other eager kernels, copies). Time the GPU spends in no kernel within the window is
reported as idle: launch gaps, host syncs, Python overhead the GPU waits on. Writes
`runs/NAME/profile.json`; `just bench-train --profile-steps N` puts it in a table.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

# First match wins; the patterns are substrings of kernel names as cuBLAS, cuDNN, flash-attention,
# Transformer Engine, Triton (torch.compile) and PyTorch's eager kernels print them.
CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "triton_tem")),
    ("compiled", ("triton",)),
    ("fp8 cast", ("cast", "quantize", "amax", "fp8", "scale", "transpose")),
    ("optimizer", ("multi_tensor", "adam")),
)
TOP_KERNELS = 15  # the costliest kernels, by name, kept in profile.json
OTHER, COPIES, IDLE = "other kernels", "copies", "idle"
ORDER = tuple(name for name, _ in CATEGORIES) + (OTHER, COPIES, IDLE)


def classify(kernel_name: str) -> str:
    lowered = kernel_name.lower()
    for category, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return OTHER


def summarize_trace(events: list[dict], window_us: float, steps: int) -> dict:
    """Milliseconds per step in each category, and the share of the window each takes."""
    per_category = dict.fromkeys(ORDER, 0.0)
    per_kernel: dict[str, float] = {}
    intervals = []
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        start, duration = float(event["ts"]), float(event.get("dur", 0))
        category = classify(event["name"]) if event["cat"] == "kernel" else COPIES
        per_category[category] += duration
        per_kernel[event["name"]] = per_kernel.get(event["name"], 0.0) + duration
        intervals.append((start, start + duration))
    busy = union_length(intervals)
    per_category[IDLE] = max(window_us - busy, 0.0)
    return {"steps": steps, "window_ms_per_step": window_us / steps / 1e3,
            "ms_per_step": {k: v / steps / 1e3 for k, v in per_category.items()},
            "share": {k: v / window_us if window_us else 0.0 for k, v in per_category.items()},
            "top_kernels": [{"name": name[:120], "category": classify(name), "ms_per_step": total / steps / 1e3}
                            for name, total in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]]}


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (kernels on several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class StepProfiler:
    """Profiles optimizer steps first_step+1 .. last_step; the trainer calls `after_step` after each."""

    def __init__(self, run_dir: Path, last_step: int, steps: int):
        self.run_dir, self.last_step, self.steps = run_dir, last_step, steps
        self.first_step = last_step - steps
        self.profiler = None
        self.started = 0.0

    def after_step(self, step: int) -> None:
        if step == self.first_step:
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.started = time.perf_counter()
        elif step == self.last_step and self.profiler is not None:
            torch.cuda.synchronize()
            window_us = (time.perf_counter() - self.started) * 1e6
            self.profiler.stop()
            with tempfile.TemporaryDirectory() as tmp:
                trace = Path(tmp) / "trace.json"
                self.profiler.export_chrome_trace(str(trace))
                events = json.loads(trace.read_text())["traceEvents"]
                with gzip.open(self.run_dir / "profile-trace.json.gz", "wb") as f:
                    f.write(trace.read_bytes())
            summary = summarize_trace(events, window_us, self.steps)
            (self.run_dir / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.profiler = None
