"""Checkpoints: weights anyone can load without pickle, training state kept apart for exact resume.

    checkpoints/step_0000120/model.safetensors  the weights; metadata: format, step, vocabulary size,
                                                 tokenizer sha256 and the resolved config (JSON)
    checkpoints/step_0000120/train_state.pt     optimizer, loader positions, counters, RNG states and
                                                 Transformer Engine's FP8 scaling state: exact resume
    checkpoints/best/model.safetensors          the weights of the best validation loss

A checkpoint folder is written under a temporary name and renamed whole, so a folder that exists
was complete when written; the last K are kept. One damaged afterwards (truncated by a copy, a
zero-byte file) is skipped on resume for the newest intact one, saying so. Checkpoints of the
earlier single-pickle format (`step_N.pt`, `best.pt`) still load: `load` converts them in memory,
so resume, sampling and export all read both formats through one path.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FORMAT = "frlm-checkpoint-2"
WEIGHTS, TRAIN_STATE, BEST = "model.safetensors", "train_state.pt", "best"
STEP_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
EXTRA_STATE_SUFFIX = "_extra_state"  # Transformer Engine's FP8 scaling metadata: resume state, not weights


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message names the file."""


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]  # the model's state dict without Transformer Engine's extra state
    step: int
    vocab_size: int
    tokenizer_sha256: str
    config: dict[str, Any]  # the run's resolved config (TrainConfig.to_dict())
    train_state: dict[str, Any] | None  # None for weights-only checkpoints (best/)
    path: Path


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


def split_state_dict(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, Transformer Engine extra state) of a model's state dict."""
    weights = {k: v for k, v in state.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    return weights, {k: v for k, v in state.items() if k.endswith(EXTRA_STATE_SUFFIX)}


def write_weights(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Weights to safetensors. Tensors sharing storage (tied embeddings) are stored once; the
    metadata says which name is an alias of which, and `read_weights` restores both names."""
    from safetensors.torch import save_file

    stored, tied, seen = {}, {}, {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            stored[name] = tensor.detach().to("cpu").contiguous()
    save_file(stored, str(path), metadata={**metadata, "tied": json.dumps(tied)})


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0][:120]})") from None
    for alias, name in json.loads(metadata.get("tied", "{}")).items():
        weights[alias] = weights[name]
    return weights, metadata


def save(directory: Path, step: int, model_state: dict[str, Any], meta: dict[str, Any], train_state: dict[str, Any],
         keep_last: int, is_best: bool) -> Path:
    """Write step_N/ (weights + train state) atomically, refresh best/ when asked, keep the last K."""
    directory.mkdir(parents=True, exist_ok=True)
    weights, extra_state = split_state_dict(model_state)
    metadata = {"format": FORMAT, "step": str(step), "vocab_size": str(meta["vocab_size"]),
                "tokenizer_sha256": meta["tokenizer_sha256"], "config": json.dumps(meta["config"])}
    final = directory / f"step_{step:07d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_weights(tmp / WEIGHTS, weights, metadata)
        torch.save({**train_state, "extra_state": extra_state}, tmp / TRAIN_STATE)
        replace_dir(tmp, final)
        if is_best:
            best_tmp = directory / f".{BEST}.tmp-{os.getpid()}"
            shutil.rmtree(best_tmp, ignore_errors=True)
            best_tmp.mkdir()
            shutil.copyfile(final / WEIGHTS, best_tmp / WEIGHTS)
            replace_dir(best_tmp, directory / BEST)
    finally:
        for leftover in directory.glob(f".*.tmp-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    steps = all_steps(directory)
    for old in sorted(steps)[:-keep_last] if keep_last > 0 else []:
        remove(steps[old])
    return final


def replace_dir(source: Path, target: Path) -> None:
    """Rename a folder over another: the old one is moved aside first, then removed."""
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(source, target)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def all_steps(directory: Path) -> dict[int, Path]:
    """Step -> checkpoint (a step_N folder, or a step_N.pt file of the earlier format)."""
    found = {}
    for path in directory.iterdir() if directory.is_dir() else []:
        match = STEP_PATTERN.match(path.name)
        if match and (path.is_dir() or match.group(2)):
            found[int(match.group(1))] = path
    return found


def latest(directory: Path) -> Path | None:
    steps = all_steps(directory)
    return steps[max(steps)] if steps else None


def best(directory: Path) -> Path:
    """The best checkpoint: best/ (or best.pt of the earlier format)."""
    legacy = directory / "best.pt"
    return legacy if legacy.is_file() and not (directory / BEST).exists() else directory / BEST


def load(path: Path, with_train_state: bool = False) -> Checkpoint:
    """Any checkpoint: a step_N or best folder, its model.safetensors, or an earlier-format .pt file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        return convert_legacy(path)
    folder = path.parent if path.name == WEIGHTS else path
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a folder holding {WEIGHTS})")
    weights, metadata = read_weights(folder / WEIGHTS)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{folder / WEIGHTS} is not an frlm checkpoint (format {metadata.get('format')!r})")
    train_state = None
    if with_train_state:
        state_file = folder / TRAIN_STATE
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing: this checkpoint holds weights only")
        train_state = _torch_load(state_file)
    return Checkpoint(weights=weights, step=int(metadata["step"]), vocab_size=int(metadata["vocab_size"]),
                      tokenizer_sha256=metadata["tokenizer_sha256"], config=json.loads(metadata["config"]),
                      train_state=train_state, path=folder)


def convert_legacy(path: Path) -> Checkpoint:
    """An earlier-format checkpoint (one pickle of everything) as a Checkpoint."""
    state = _torch_load(path)
    try:
        weights, extra_state = split_state_dict(state["model"])
        train_state = {key: state[key] for key in ("optimizer", "step", "positions", "bad_steps", "skipped_steps",
                                                   "best_val", "rng", "stage")}
        return Checkpoint(weights=weights, step=state["step"], vocab_size=state["vocab_size"],
                          tokenizer_sha256=state["tokenizer_sha256"], config=state["config"],
                          train_state={**train_state, "extra_state": extra_state}, path=path)
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} is not an frlm checkpoint (keys missing); retrain or pass another "
                              f"checkpoint") from None


def _torch_load(path: Path) -> Any:
    # This run's own files: trusted like any pickle torch.load reads. Transformer Engine >= 2.20 also
    # asks before unpickling its FP8 scaling metadata, which an exact resume needs.
    os.environ.setdefault("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "1")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay CPU tensors
    except Exception as err:  # a truncated pickle raises EOFError, UnpicklingError, RuntimeError...
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:100]}); it is truncated "
                              f"or damaged") from None


def latest_intact(directory: Path, say: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint that loads whole, weights and train state; damaged newer ones are
    skipped, saying so. None when there is no checkpoint at all; an error when none is intact."""
    steps = all_steps(directory)
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            found = load(steps[step], with_train_state=True)
        except CheckpointError as err:
            damaged.append(str(err))
            say(f"skipping damaged checkpoint: {err}")
            continue
        return found
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {directory}: {damaged[0]}")
    return None
