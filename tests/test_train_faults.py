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


# ------------------------------------------------------------------------------- the loader thread


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


# ---------------------------------------------------------------------------------------- resume


def test_resume_continues_the_run_as_it_was_started(packed, tmp_path):
    """Not configs/small.toml (the default --config) and not the whole curriculum: the run's own config
    and its --max-steps, with the same data flags, without being told again."""
    config = write_config(tmp_path / "c.toml", steps=(4, 4))
    assert train(packed, config, "--run", "as-started-straight", "--max-steps", "4") == 0
    assert train(packed, config, "--run", "as-started", "--max-steps", "4", "--stop-at-step", "2") == 0
    assert resume(packed, "as-started") == 0
    assert losses(packed, "as-started") == losses(packed, "as-started-straight")  # 4 steps, bit-identical


@pytest.fixture
def stopped_run(packed, tmp_path):
    """A run stopped after 2 of its 4 steps; its name."""
    name = f"stopped-{tmp_path.name}"
    config = write_config(tmp_path / "c.toml", steps=(4, 4))
    assert train(packed, config, "--run", name, "--max-steps", "4", "--stop-at-step", "2") == 0
    return name


@pytest.mark.parametrize("flags, change", [
    (["--set", "optim.lr=0.5"], "optim.lr 0.01 -> 0.5"),
    (["--precision", "bf16"], "precision.mode 'fp32' -> 'bf16'"),
    (["--set", "curriculum.0.micro_batch=4"], "curriculum.0.micro_batch 8 -> 4"),
    (["--config", "{shape}"], "model.d_model 32 -> 64"),
], ids=["lr", "precision", "micro-batch", "model-shape"])
def test_resume_refuses_a_change_of_the_run(packed, tmp_path, stopped_run, capsys, flags, change):
    other = write_config(tmp_path / "shape.toml", steps=(4, 4))
    other.write_text(other.read_text().replace("d_model = 32", "d_model = 64"))
    flags = [flag.format(shape=other) for flag in flags]
    before = (packed / "runs" / stopped_run / "metrics.jsonl").read_text()
    assert resume(packed, stopped_run, *flags) == 2
    one_line_error(capsys.readouterr().err, "--resume continues the run as configured", change)
    assert (packed / "runs" / stopped_run / "metrics.jsonl").read_text() == before


def test_resume_may_extend_the_budget_and_says_what_it_does_to_the_schedule(packed, tmp_path, capsys):
    from train.trainer import learning_rate

    config = write_config(tmp_path / "c.toml", steps=(4, 4))
    assert train(packed, config, "--run", "extended", "--max-steps", "4") == 0
    capsys.readouterr()
    assert resume(packed, "extended", "--max-steps", "6", "--set", "run.log_every=2") == 0
    out = capsys.readouterr().out
    assert "resume: run.log_every 1 -> 2" in out
    assert "the step budget goes from 4 to 6 steps; the learning-rate schedule follows the new total" in out
    lines = metrics_lines(packed, "extended")
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 6]  # every step, then every other one
    saved = load(config)
    assert lines[-1]["lr"] == pytest.approx(learning_rate(saved, 5, 6))
    run = packed / "runs/extended"
    assert json.loads((run / "run.json").read_text()) == {"max_steps": 6, "total_steps": 6}
    assert json.loads((run / "config.resolved.json").read_text())["run"]["log_every"] == 2
    assert resume(packed, "extended") == 0  # the extended budget is the run's own now
    assert "the run is complete at step 6 of 6" in capsys.readouterr().out


def test_resume_of_a_run_that_does_not_exist_creates_nothing(packed, capsys):
    assert resume(packed, "ghost") == 2
    one_line_error(capsys.readouterr().err, "there is no run", "start it without --resume")
    assert not (packed / "runs/ghost").exists()


def test_a_checkpoint_of_another_shape_than_the_runs_config_is_one_line(packed, stopped_run, capsys):
    resolved = packed / "runs" / stopped_run / "config.resolved.json"
    raw = json.loads(resolved.read_text())
    raw["model"]["d_model"] = 64
    resolved.write_text(json.dumps(raw))
    assert resume(packed, stopped_run) == 2
    one_line_error(capsys.readouterr().err, "holds another model than the run's config (d_model 32 vs 64)")


def test_packs_of_a_replaced_tokenizer_are_refused(packed, tmp_path, capsys):
    copy = copy_corpus(packed, tmp_path / "copy")
    common = ("--data-dir", copy / "data", "--manifests", copy / "manifests")
    assert run_stage("tokenize", "--plain-bpe", "--vocab-size", "320", "--force", *common) == 0
    capsys.readouterr()
    assert train(copy, write_config(tmp_path / "c.toml"), "--run", "stale") == 2
    one_line_error(capsys.readouterr().err, "another tokenizer than the current `tokenize` output",
                   f"just pack --seq-len 32,64 --data-dir {copy / 'data'}")


def test_a_second_trainer_on_a_live_run_is_refused(packed, stopped_run, capsys):
    run = packed / "runs" / stopped_run
    code = ("import sys, time\nfrom pipeline.locks import exclusive\n"
            "with exclusive(sys.argv[1], 'run'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run / "metrics.jsonl").read_text()
        assert resume(packed, stopped_run) == 2
        one_line_error(capsys.readouterr().err, f"is in use by another process (pid {holder.pid})")
        assert (run / "metrics.jsonl").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    assert resume(packed, stopped_run) == 0  # a dead holder's lock is gone with it
    assert [m["step"] for m in metrics_lines(packed, stopped_run)] == [1, 2, 3, 4]


def test_a_metrics_line_cut_short_is_dropped_on_resume(packed, stopped_run, capsys):
    metrics = packed / "runs" / stopped_run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "stage": 1, "seq_len": 64, "tok')  # killed mid-append
    assert resume(packed, stopped_run) == 0
    assert "dropped line(s) 3 (not whole JSON records" in capsys.readouterr().out
    assert [m["step"] for m in metrics_lines(packed, stopped_run)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------ write errors


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


@pytest.mark.parametrize("layer", ["weights", "train_state"])
def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(packed, tmp_path, monkeypatch, capsys,
                                                                        layer):
    """What each library raises when its write fails: safetensors its own error, torch.save a RuntimeError."""
    import safetensors.torch
    from safetensors import SafetensorError

    if layer == "weights":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(safetensors.torch, "save_file", failing_on_call(2, safetensors.torch.save_file, error))
    else:
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", failing_on_call(2, torch.save, error))
    config = write_config(tmp_path / "c.toml", steps=(4, 4), checkpoint_every=2)
    assert train(packed, config, "--run", f"full-{layer}") == 2
    checkpoints = packed / "runs" / f"full-{layer}" / "checkpoints"
    one_line_error(capsys.readouterr().err, f"cannot write checkpoint step 4 in {checkpoints}",
                   f"the last checkpoint, {checkpoints / 'step_0000002'}, is intact")
    assert [p.name for p in checkpoints.iterdir()] == ["step_0000002"]  # no half-written folder
    monkeypatch.undo()
    assert resume(packed, f"full-{layer}") == 0
    assert [m["step"] for m in metrics_lines(packed, f"full-{layer}")] == list(range(1, 9))


def test_a_full_disk_while_appending_metrics_is_one_line(packed, tmp_path, monkeypatch, capsys):
    from train import trainer as trainer_module

    appends = []

    def open_metrics(path, *args, **kwargs):
        appends.append(Path(path).name == "metrics.jsonl")
        if sum(appends) == 4:
            no_space()
        return open(path, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "open", open_metrics, raising=False)
    config = write_config(tmp_path / "c.toml", steps=(4, 4), checkpoint_every=2)
    assert train(packed, config, "--run", "full-metrics") == 2
    one_line_error(capsys.readouterr().err, "metrics.jsonl: No space left on device", "step_0000002, is intact")


def test_a_full_disk_under_tensorboard_is_one_line(packed, tmp_path, monkeypatch, capsys):
    """TensorBoard writes from its own thread: its error reaches the run, its thread's traceback is not printed."""
    from tensorboard.summary.writer import record_writer

    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    assert train(packed, write_config(tmp_path / "c.toml"), "--run", "full-tensorboard") == 2
    err = capsys.readouterr().err
    one_line_error(err, "tensorboard: No space left on device", "no checkpoint was written yet")
    assert "Exception in thread" not in err
    assert not (packed / "runs/full-tensorboard").exists()


def test_an_out_dir_that_cannot_be_created_is_one_line(packed, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "runs"
    assert train_main_cli("--config", str(write_config(tmp_path / "c.toml")), "--data-dir", str(packed / "data"),
                          "--manifests", str(packed / "manifests"), "--out-dir", str(out), "--device", "cpu") == 2
    one_line_error(capsys.readouterr().err, f"cannot write {out}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the injected errors cover it")
def test_a_read_only_out_dir_is_one_line(packed, tmp_path, capsys):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert train_main_cli("--config", str(write_config(tmp_path / "c.toml")), "--data-dir", str(packed / "data"),
                              "--manifests", str(packed / "manifests"), "--out-dir", str(out), "--device", "cpu") == 2
    finally:
        out.chmod(0o700)
    one_line_error(capsys.readouterr().err, "Permission denied")


# ------------------------------------------------------------------------------ values out of range


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


@pytest.mark.parametrize("key", ["log_every", "eval_every", "checkpoint_every"])
def test_a_bad_config_leaves_no_run_directory(packed, tmp_path, capsys, key):
    assert train(packed, write_config(tmp_path / "c.toml"), "--run", "zero", "--set", f"run.{key}=0") == 2
    one_line_error(capsys.readouterr().err, f"run.{key} must be > 0")
    assert not (packed / "runs/zero").exists()


@pytest.mark.parametrize("device, message", [("gpu0", "--device gpu0: expected cpu, cuda or cuda:N"),
                                             ("cuda", "--device cuda: no CUDA GPU is available here"),
                                             ("cuda:1", "--device cuda:1: no CUDA GPU is available here")])
def test_a_device_that_is_not_there_is_one_line(packed, tmp_path, monkeypatch, capsys, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path / "c.toml")
    assert train_main_cli("--config", str(config), "--data-dir", str(packed / "data"), "--manifests",
                          str(packed / "manifests"), "--out-dir", str(packed / "runs"), "--run", "device",
                          "--device", device) == 2
    one_line_error(capsys.readouterr().err, message)
    assert not (packed / "runs/device").exists()


# ----------------------------------------------------------------------- bad steps, early failures


def poison_steps(monkeypatch, first: int, last: int = 10**9) -> None:
    """Steps first..last (1-based) get a non-finite gradient norm, so they are skipped."""
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):
        calls.append(1)
        norm = real_clip(params, max_norm)
        return norm * math.nan if first <= len(calls) <= last else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_a_skipped_step_is_written_as_null_not_nan(packed, tmp_path, monkeypatch):
    poison_steps(monkeypatch, 2, 2)
    assert train(packed, write_config(tmp_path / "c.toml", steps=(2, 1)), "--run", "null-step") == 0
    lines = metrics_lines(packed, "null-step")  # strict JSON: a bare NaN fails here
    assert [(m["loss"] is None, m["grad_norm"] is None, m["skipped_steps"]) for m in lines] == [
        (False, False, 0), (True, True, 1), (False, False, 1)]


@pytest.mark.parametrize("first_bad, named", [(3, "the last checkpoint, {checkpoints}/step_0000002, is intact"),
                                              (1, "no checkpoint was written yet")])
def test_too_many_bad_steps_name_a_checkpoint_that_exists(packed, tmp_path, monkeypatch, capsys, first_bad, named):
    poison_steps(monkeypatch, first_bad)
    run = f"bad-from-{first_bad}"
    config = write_config(tmp_path / "c.toml", steps=(4, 4), checkpoint_every=2, max_bad_steps=2)
    assert train(packed, config, "--run", run) == 2
    checkpoints = packed / "runs" / run / "checkpoints"
    one_line_error(capsys.readouterr().err, "2 non-finite steps in a row", named.format(checkpoints=checkpoints))
    assert (checkpoints / "step_0000002").is_dir() if first_bad == 3 else not checkpoints.parent.exists()


def test_out_of_memory_at_step_one_leaves_no_run_directory(packed, tmp_path, monkeypatch, capsys):
    from train.model import Transformer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Transformer, "forward", out_of_memory)
    config = write_config(tmp_path / "c.toml", steps=(2, 2))
    assert train(packed, config, "--run", "oom") == 2
    one_line_error(capsys.readouterr().err, "CUDA out of memory at stage 0", "lower curriculum[0].micro_batch")
    assert not (packed / "runs/oom").exists()
    monkeypatch.undo()
    assert train(packed, config, "--run", "oom") == 0  # the corrected rerun, without --force


def test_sigterm_stops_a_single_process_run_like_ctrl_c(packed, tmp_path):
    config = write_config(tmp_path / "c.toml", steps=(400, 400), checkpoint_every=2)
    child = subprocess.Popen(child_command(packed, config, "--run", "sigterm"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = packed / "runs/sigterm/checkpoints"
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not checkpoint.all_steps(checkpoints) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)
        assert checkpoint.all_steps(checkpoints), "no checkpoint before the deadline"
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 143
    line = one_line_error(stderr, "error: train: interrupted; the last checkpoint, ")
    named = Path(line.split("the last checkpoint, ")[1].split(", is intact")[0])
    assert checkpoint.load(named, with_train_state=True).step >= 2
