"""Faults and bad input in `just train`: no hang, no traceback, no silent change of a run.

Each test makes one fault happen (a dying loader thread, a damaged pack, a full disk, a second
trainer, a kill mid-write, SIGTERM, a value out of range) and checks that the run ends with one
line saying what to do, leaves its last checkpoint intact, and leaves nothing that blocks the
corrected rerun. Hangs are caught by running the trainer in a child process with a timeout.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build_packed_corpus, run_stage
from tests.test_train import losses, train, write_config
from train import checkpoint
from train.config import ConfigError, apply_settings, from_dict, load

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 240  # seconds: a trainer that has not ended by then hangs


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return build_packed_corpus(tmp_path_factory.mktemp("faults"), 400_000, 31, 384, "32,64")


def copy_corpus(packed: Path, copy: Path) -> Path:
    """A copy to damage, its manifests pointed at the copy's files."""
    shutil.copytree(packed / "data", copy / "data")
    shutil.copytree(packed / "manifests", copy / "manifests")
    for manifest in (copy / "manifests").glob("*.json"):
        manifest.write_text(manifest.read_text().replace(str(packed), str(copy)))
    return copy


def one_line_error(stderr: str, *needles: str) -> str:
    """The run's single `error: train:` line (tqdm also writes to stderr), checked for each needle."""
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error: train:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def child_command(packed: Path, config: Path, *extra: str, prelude: str = "") -> list[str]:
    """`just train` in a child process, `prelude` (a fault to inject) run first."""
    code = f"import sys\n{prelude}\nfrom train.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, "--config", str(config), "--data-dir", str(packed / "data"), "--manifests",
            str(packed / "manifests"), "--out-dir", str(packed / "runs"), "--device", "cpu", *extra]


def train_child(packed: Path, config: Path, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(child_command(packed, config, *extra, prelude=prelude), capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def metrics_lines(packed: Path, run: str) -> list[dict]:
    def no_nan(constant):
        raise ValueError(f"{constant} is not JSON")

    text = (packed / "runs" / run / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=no_nan) for line in text.splitlines()]


def resume(packed: Path, run: str, *extra: str) -> int:
    """`just train --run RUN --resume` as a user types it: no --config, no data flags."""
    return train_main_cli("--run", run, "--resume", "--out-dir", str(packed / "runs"), "--device", "cpu", *extra)


def train_main_cli(*argv: str) -> int:
    from train.__main__ import main

    return main(list(argv))


def test_a_negative_data_seed_is_refused_before_any_thread_starts(packed, tmp_path):
    result = train_child(packed, write_config(tmp_path / "c.toml"), "--run", "seed", "--set", "data.seed=-1")
    assert result.returncode == 2
    one_line_error(result.stderr, "data.seed must be >= 0, got -1")
    assert not (packed / "runs/seed").exists()


@pytest.mark.parametrize("where", ["offsets", "header"])
def test_row_offsets_damaged_in_place_are_refused_at_start(packed, tmp_path, where):
    """Same size, so the manifest's byte count passes and data.verify is off: the offsets themselves
    are checked when the pack opens."""
    import numpy as np

    copy = copy_corpus(packed, tmp_path / "copy")
    offsets = copy / "data/packed/seq32/train.row_offsets.npy"
    size = offsets.stat().st_size
    if where == "header":
        data = bytearray(offsets.read_bytes())
        data[10:74] = b"\xff" * 64
        offsets.write_bytes(bytes(data))
    else:  # every offset still in range, in the wrong order: rows of negative length
        np.save(offsets, np.random.default_rng(0).permutation(np.load(offsets)))
    assert offsets.stat().st_size == size
    result = train_child(copy, write_config(tmp_path / "c.toml"), "--run", "offsets")
    assert result.returncode == 2
    one_line_error(result.stderr, str(offsets), "just pack --seq-len 32 --force")


def test_a_dying_loader_thread_ends_the_run_with_one_line(packed, tmp_path):
    prelude = ("import train.trainer, train.loader as loader\n"
               "real, calls = loader.make_batch, []\n"
               "def failing(*args, **kwargs):\n"
               "    calls.append(1)\n"
               "    if len(calls) > 3:\n"
               "        raise IndexError('index 123456 is out of bounds for axis 0 with size 99')\n"
               "    return real(*args, **kwargs)\n"
               "loader.make_batch = failing\n")
    result = train_child(packed, write_config(tmp_path / "c.toml"), "--run", "dying-loader", prelude=prelude)
    assert result.returncode == 2
    one_line_error(result.stderr, "preparing a batch of seq32 failed", "IndexError: index 123456 is out of bounds")


def test_the_loader_raises_its_threads_error_in_the_consumer(packed, monkeypatch):
    import threading

    from pipeline.packed import PackedSplit
    from train import loader as loader_module

    def failing(*args, **kwargs):
        raise ValueError("bad rows")

    monkeypatch.setattr(loader_module, "make_batch", failing)
    split = PackedSplit.open(packed / "data", 32, "train", packed / "manifests")
    loader = loader_module.PackedLoader(split, batch_rows=8)
    raised = []

    def consume():
        for _ in range(2):  # the second call raises the same, it does not wait on the dead thread
            try:
                next(loader)
            except loader_module.LoaderError as err:
                raised.append(err)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=30)
    loader.close()
    assert not consumer.is_alive(), "next() waits forever on a dead loader thread"
    assert len(raised) == 2 and "ValueError: bad rows" in str(raised[0])


@pytest.fixture
def stopped_run(packed, tmp_path):
    """A run stopped after 2 of its 4 steps; its name."""
    name = f"stopped-{tmp_path.name}"
    config = write_config(tmp_path / "c.toml", steps=(4, 4))
    assert train(packed, config, "--run", name, "--max-steps", "4", "--stop-at-step", "2") == 0
    return name


def test_packs_of_a_replaced_tokenizer_are_refused(packed, tmp_path, capsys):
    copy = copy_corpus(packed, tmp_path / "copy")
    common = ("--data-dir", copy / "data", "--manifests", copy / "manifests")
    assert run_stage("tokenize", "--plain-bpe", "--vocab-size", "320", "--force", *common) == 0
    capsys.readouterr()
    assert train(copy, write_config(tmp_path / "c.toml"), "--run", "stale") == 2
    one_line_error(capsys.readouterr().err, "another tokenizer than the current `tokenize` output",
                   f"just pack --seq-len 32,64 --data-dir {copy / 'data'}")


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_on_call(n: int, real, error: Exception):
    """`real`, except that its n-th call raises `error` (a disk that fills up during the run)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("section, key, value, wanted", [
    ("optim", "lr", -1e-3, ">= 0"), ("optim", "beta1", 1.0, "in [0, 1)"), ("optim", "beta2", -0.1, "in [0, 1)"),
    ("optim", "eps", 0.0, "> 0"), ("optim", "weight_decay", -0.1, ">= 0"), ("optim", "min_lr_ratio", 1.5, "in [0, 1]"),
    ("optim", "grad_clip", -1.0, ">= 0"), ("optim", "warmup_tokens", -1, ">= 0"),
    ("optim", "decay_fraction", 1.2, "in [0, 1]"), ("optim", "tokens_per_step", 0, "> 0"),
    ("model", "n_heads", 0, "> 0"), ("model", "n_kv_heads", 0, "> 0"), ("model", "d_model", -768, "> 0"),
    ("model", "n_layers", 0, "> 0"), ("model", "ffn_dim", 0, "> 0"), ("model", "embed_rank", -1, ">= 0"),
    ("model", "norm_eps", 0.0, "> 0"), ("model", "rope_theta", 0.0, "> 0"), ("model", "init_std", 0.0, "> 0"),
    ("run", "log_every", 0, "> 0"), ("run", "eval_every", 0, "> 0"), ("run", "checkpoint_every", -5, "> 0"),
    ("run", "keep_last", -1, ">= 0"), ("run", "max_bad_steps", 0, "> 0"), ("run", "eval_rows", -1, ">= 0"),
    ("data", "seed", -1, ">= 0"), ("precision", "amax_history", 0, "> 0"),
])
def test_a_value_out_of_range_is_refused_with_its_key(section, key, value, wanted):
    base = {"curriculum": [{"seq_len": 64, "tokens": 1000, "micro_batch": 2}]}
    with pytest.raises(ConfigError) as err:
        from_dict({**base, section: {key: value}})
    assert str(err.value) == f"{section}.{key} must be {wanted}, got {value!r}"


def test_every_numeric_key_has_a_range():
    """A key added later without a range would take any value again."""
    import dataclasses

    from train.config import RANGES, TrainConfig

    for section in dataclasses.fields(TrainConfig):
        if section.name == "curriculum":  # its stages are checked as a whole: every value positive
            continue
        numeric = {f.name for f in dataclasses.fields(getattr(TrainConfig(), section.name)) if f.type in ("int", "float")}
        assert numeric == set(RANGES.get(section.name, {})), section.name


@pytest.mark.parametrize("setting, message", [
    ("curriculum.5.seq_len=64", "the curriculum has stages 0 to 1"),
    ("curriculum.first.seq_len=64", "the curriculum has stages 0 to 1"),
    ("model.d_model.x=3", "model.d_model is not a table of keys"),
    ("curriculum.seq_len=64", "curriculum is not a table of keys"),
])
def test_a_set_outside_the_config_is_one_line(setting, message):
    with pytest.raises(ConfigError, match=message):
        apply_settings(load("configs/tiny.toml"), [setting])


def poison_steps(monkeypatch, first: int, last: int = 10**9) -> None:
    """Steps first..last (1-based) get a non-finite gradient norm, so they are skipped."""
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):
        calls.append(1)
        norm = real_clip(params, max_norm)
        return norm * math.nan if first <= len(calls) <= last else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
