"""The chunked loss computes the plain loss and its gradients, without the full logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import build_packed_corpus
from train import checkpoint
from train.__main__ import main as train_main
from train.config import ConfigError, RunConfig, from_dict, load
from train.loss import ChunkedLinearCrossEntropy, Loss, chunk_loss_and_gradient
from train.model import Transformer, cross_entropy
from train.precision import Precision


def test_chunked_linear_cross_entropy_matches_the_plain_loss_and_gradients():
    """37 tokens in chunks of 8 (the last one short), some targets ignored, the loss scaled as the trainer does."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[[3, 20, 36]] = -100
    plain = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    (plain / 34).backward()
    expected = plain.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8, chunk_loss_and_gradient)
    (chunked / 34).backward()
    assert torch.allclose(chunked.double(), expected[0], atol=1e-5)
    assert torch.allclose(hidden.grad, expected[1], atol=1e-5)
    assert torch.allclose(weight.grad, expected[2], atol=1e-5)


@pytest.mark.parametrize("shape", [{}, {"tie_embeddings": True}, {"embed_rank": 16}])
def test_chunked_loss_through_the_model_matches_the_plain_loss(shape):
    """Every parameter's gradient, the head's included (tied to the embedding, or factorized), and the
    evaluation loss (no gradients) match the plain loss in FP32."""
    config = load("configs/tiny.toml")
    for key, value in {"n_layers": 2, **shape}.items():
        setattr(config.model, key, value)
    precision = Precision(config.precision, torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(config.model, 300, precision, 32)
    inputs, targets = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    targets[0, :5] = -100
    results = []
    for kind in ("plain", "chunked"):
        loss = Loss(RunConfig(loss=kind, loss_chunk_tokens=40), model, compiled=False)
        model.zero_grad()
        value = loss(model(inputs, **loss.forward_kwargs), targets)
        (value / 91).backward()
        with torch.no_grad():
            evaluated = loss(model(inputs, **loss.forward_kwargs), targets)
        results.append((value.detach(), evaluated, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_eval, plain_grads), (chunked, chunked_eval, chunked_grads) = results
    assert torch.allclose(chunked, plain, atol=1e-5) and torch.allclose(chunked_eval, plain_eval, atol=1e-5)
    assert torch.allclose(plain, cross_entropy(model(inputs), targets, reduction="sum"), atol=1e-5)
    assert all(torch.allclose(c, p, atol=1e-5) for c, p in zip(chunked_grads, plain_grads))


@pytest.mark.parametrize("mode, head, error", [("fp8", "fp8", True), ("te-bf16", "fp8", True), ("fp8", "bf16", False),
                                               ("bf16", "fp8", False)])
def test_chunked_loss_refuses_a_transformer_engine_head(mode, head, error):
    raw = {"curriculum": [{"seq_len": 64, "tokens": 1000, "micro_batch": 2}], "run": {"loss": "chunked"},
           "precision": {"mode": mode, "map": {"lm_head": head}}}
    if error:
        with pytest.raises(ConfigError, match='precision.map.lm_head = "bf16"'):
            from_dict(raw)
    else:
        assert from_dict(raw).run.loss == "chunked"


@pytest.mark.parametrize("run, message", [({"loss": "fused"}, "run.loss 'fused'"),
                                          ({"loss_chunk_tokens": 0}, "run.loss_chunk_tokens must be > 0")])
def test_loss_settings_are_checked(run, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"curriculum": [{"seq_len": 64, "tokens": 1000, "micro_batch": 2}], "run": run})


def write_tiny_config(path, micro_batch: int | str = 8):
    """A two-layer model, one stage of 32-token rows, optimizer steps of 512 tokens at a learning rate
    large enough for a wrong gradient to show within a few steps."""
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"
    micro_batch = f'"{micro_batch}"' if isinstance(micro_batch, str) else micro_batch
    path.write_text(f'extends = "{tiny}"\n[model]\nn_layers = 2\nd_model = 32\nn_heads = 2\nn_kv_heads = 1\n'
                    f'ffn_dim = 64\n[optim]\ntokens_per_step = 512\nwarmup_tokens = 512\nlr = 1e-2\n[run]\nlog_every = 1\n'
                    f'eval_rows = 16\n'
                    f'[[curriculum]]\nseq_len = 32\ntokens = 2048\nmicro_batch = {micro_batch}\n')
    return path


def train_tiny(packed, config, run: str, *settings: str) -> int:
    return train_main(["--config", str(config), "--data-dir", str(packed / "data"), "--manifests",
                       str(packed / "manifests"), "--out-dir", str(packed / "runs"), "--device", "cpu", "--run", run,
                       *[f"--set={s}" for s in settings]])


def test_training_with_the_chunked_loss_matches_the_plain_loss(tmp_path):
    """The trainer's step and validation with run.loss = "chunked": the same losses as the plain loss."""
    packed = build_packed_corpus(tmp_path, 400_000, 31, 384, "32")
    config = write_tiny_config(tmp_path / "tiny2.toml")
    curves = {}
    for kind in ("plain", "chunked"):
        assert train_tiny(packed, config, kind, f'run.loss="{kind}"', "run.loss_chunk_tokens=100") == 0
        lines = (packed / "runs" / kind / "metrics.jsonl").read_text().splitlines()
        curves[kind] = [(m["loss"], m.get("val_loss")) for m in map(json.loads, lines)]
    assert len(curves["plain"]) == 4 and curves["plain"][-1][1] is not None
    for (plain, plain_val), (chunked, chunked_val) in zip(curves["plain"], curves["chunked"]):
        assert chunked == pytest.approx(plain, abs=1e-4)
        assert (chunked_val is None) == (plain_val is None) and chunked_val == pytest.approx(plain_val, abs=1e-4)


def test_chunked_loss_under_two_process_ddp_matches_one_process(tmp_path):
    """The head's weight is used outside the DDP module's forward: its gradient is still averaged."""
    import os
    import subprocess
    import sys

    packed = build_packed_corpus(tmp_path, 400_000, 31, 384, "32")
    config = write_tiny_config(tmp_path / "tiny2.toml")
    settings = ['--set=run.loss="chunked"', "--set=run.eval_every=1000"]
    assert train_tiny(packed, config, "one", *[s.removeprefix("--set=") for s in settings]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "train",
               "--config", str(config), "--data-dir", str(packed / "data"), "--manifests", str(packed / "manifests"),
               "--out-dir", str(packed / "runs"), "--device", "cpu", "--run-name", "two", *settings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = ([json.loads(line)["loss"] for line in (packed / "runs" / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert len(two) == 4 and two == pytest.approx(one, rel=2e-3)
    heads = [checkpoint.load(packed / "runs" / run / "checkpoints" / "step_0000004").weights["lm_head.weight"]
             for run in ("one", "two")]
    assert torch.allclose(heads[0], heads[1], atol=1e-5)  # rank 0 applied the same averaged gradient
