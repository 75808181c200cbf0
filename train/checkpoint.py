"""Checkpoints: atomic, the last K kept plus the best by validation loss.

A checkpoint holds everything an exact resume needs: model and optimizer state, the step, the
curriculum stage and every loader position, the RNG states, the resolved config and the
tokenizer fingerprint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PATTERN = re.compile(r"step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, step: int, state: dict[str, Any], keep_last: int, is_best: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:07d}.pt"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if is_best:
        best_tmp = directory / f".best.pt.tmp-{os.getpid()}"
        shutil.copyfile(final, best_tmp)
        os.replace(best_tmp, directory / "best.pt")
    for old in sorted(all_steps(directory))[:-keep_last] if keep_last > 0 else []:
        (directory / f"step_{old:07d}.pt").unlink(missing_ok=True)
    return final


def all_steps(directory: Path) -> list[int]:
    return [int(m.group(1)) for p in directory.glob("step_*.pt") if (m := PATTERN.search(p.name))]


def latest(directory: Path) -> Path | None:
    steps = all_steps(directory) if directory.is_dir() else []
    return directory / f"step_{max(steps):07d}.pt" if steps else None


def load(path: Path, map_location="cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)
