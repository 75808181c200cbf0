"""Checkpoints: safetensors weights loadable without pickle, exact-resume state apart, damage handled."""

from __future__ import annotations

import json

import pytest
import torch

from train import checkpoint
from train.config import load
from train.model import Transformer
from train.precision import Precision


def tiny_model(tie: bool = False) -> Transformer:
    config = load("configs/tiny.toml")
    config.model.tie_embeddings = tie
    torch.manual_seed(0)
    return Transformer(config.model, 300, Precision(config.precision, torch.device("cpu")), 64)


META = {"vocab_size": 300, "tokenizer_sha256": "ab" * 32, "config": {"model": {"d_model": 128}}}
TRAIN_STATE = {"optimizer": {}, "step": 0, "positions": {}, "bad_steps": 0, "skipped_steps": 0, "best_val": 1.0,
               "rng": checkpoint.rng_state(), "stage": 0}


@pytest.mark.parametrize("tie", [False, True])
def test_weights_load_without_pickle_and_round_trip(tmp_path, tie):
    from safetensors.torch import load_file

    model = tiny_model(tie)
    folder = checkpoint.save(tmp_path, 7, model.state_dict(), META, {**TRAIN_STATE, "step": 7}, 3, is_best=True)
    plain = load_file(folder / "model.safetensors")  # no pickle involved
    assert plain and all(isinstance(v, torch.Tensor) for v in plain.values())
    found = checkpoint.load(tmp_path / "best")
    assert found.step == 7 and found.vocab_size == 300 and found.config == META["config"]
    fresh = tiny_model(tie)
    fresh.load_state_dict(found.weights)  # strict: every weight, tied names restored
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    assert found.train_state is None and checkpoint.load(folder, with_train_state=True).train_state["step"] == 7


def test_last_k_kept_and_written_whole(tmp_path):
    model = tiny_model()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, model.state_dict(), META, {**TRAIN_STATE, "step": step}, 2, is_best=False)
    assert sorted(checkpoint.all_steps(tmp_path)) == [3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damage", ["truncate", "empty", "state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    model = tiny_model()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model.state_dict(), META, {**TRAIN_STATE, "step": step}, 3, is_best=False)
    newest = tmp_path / "step_0000002"
    target = newest / ("train_state.pt" if damage == "state" else "model.safetensors")
    data = target.read_bytes()
    target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    said = []
    found = checkpoint.latest_intact(tmp_path, said.append)
    assert found.step == 1 and found.train_state["step"] == 1
    assert said and "step_0000002" in said[0]


def test_no_intact_checkpoint_is_one_error_naming_the_file(tmp_path):
    model = tiny_model()
    checkpoint.save(tmp_path, 1, model.state_dict(), META, TRAIN_STATE, 3, is_best=False)
    (tmp_path / "step_0000001/model.safetensors").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="step_0000001"):
        checkpoint.latest_intact(tmp_path, lambda _: None)


def test_earlier_single_pickle_checkpoints_still_load(tmp_path):
    model = tiny_model()
    legacy = {"model": model.state_dict(), **TRAIN_STATE, "step": 5, "config": META["config"],
              "tokenizer_sha256": META["tokenizer_sha256"], "vocab_size": 300}
    torch.save(legacy, tmp_path / "step_0000005.pt")
    found = checkpoint.latest_intact(tmp_path, lambda _: None)
    assert found.step == 5 and found.train_state["best_val"] == 1.0
    fresh = tiny_model()
    fresh.load_state_dict(found.weights)
    assert checkpoint.load(tmp_path / "step_0000005.pt").vocab_size == 300
    assert json.dumps(found.config)
