"""bench-train on the CPU: presets by name or path, the packs passed through, the micro-batch run."""

from __future__ import annotations

import pytest

from benchmarks import bench_train
from tests.conftest import build_packed_corpus
from tests.test_loss import write_tiny_config


def test_presets_are_names_of_configs_or_paths():
    assert bench_train.config_path("yxanul-197m") == "configs/yxanul-197m.toml"
    assert bench_train.config_path("/tmp/mine.toml") == "/tmp/mine.toml"


def test_bench_runs_a_preset_on_the_given_packs(tmp_path, capsys):
    """The packs of --data-dir/--manifests reach every run; the table says which micro-batch ran
    ("auto" resolved) and the header which vocabulary."""
    packed = build_packed_corpus(tmp_path, 400_000, 31, 384, "32")
    config = write_tiny_config(tmp_path / "tiny2.toml", "auto")
    assert bench_train.main(["--presets", str(config), "--modes", "bf16-compiled", "--steps", "3",
                             "--data-dir", str(packed / "data"), "--manifests", str(packed / "manifests"),
                             "--out-dir", str(tmp_path / "runs"), "--set", "run.eval_every=1000"]) == 0
    out = capsys.readouterr().out
    assert f"--presets {config} --modes bf16-compiled --steps 3 --data-dir {packed / 'data'}" in out
    assert "packs of a 384-token vocabulary" in out
    row = next(line for line in out.splitlines() if line.startswith("| tiny2 | bf16-compiled |"))
    assert row.split(" | ")[6] == "16"  # 512 tokens per step of 32-token rows: all 16 rows at once on the CPU


def test_an_unknown_preset_fails_before_any_run(capsys):
    with pytest.raises(SystemExit, match="no config configs/smol.toml"):
        bench_train.main(["--presets", "smol", "--modes", "bf16-compiled"])
