"""precision.fused_norms: the pre-norms inside Transformer Engine's LayerNormLinear and LayerNormMLP, with
checkpoints that keep the unfused names."""

from __future__ import annotations

import pytest
import torch

from tests.test_graphs import te_available
from tests.test_train import FakeTE
from train.config import ConfigError, from_dict, load
from train.model import Transformer
from train.precision import Precision


def models(monkeypatch, fused: bool):
    from train import precision as precision_module

    monkeypatch.setattr(precision_module, "require_transformer_engine", lambda device, fp8: FakeTE())
    config = load("configs/tiny.toml")
    config.model.n_layers = 2
    config.precision.mode, config.precision.fused_norms = "fp8", fused
    torch.manual_seed(0)
    precision = Precision(config.precision, torch.device("cpu"))
    return Transformer(config.model, 300, precision, 32), precision


def test_fused_norms_compute_the_unfused_model_from_the_same_checkpoint(monkeypatch):
    plain, _ = models(monkeypatch, fused=False)
    with torch.no_grad():  # norm weights other than ones, so a norm applied twice or not at all would show
        for name, param in plain.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    fused, precision = models(monkeypatch, fused=True)
    assert isinstance(fused.blocks[0].ffn.mlp, FakeTE.LayerNormMLP)
    assert not any(isinstance(m, type(plain.blocks[0].attn_norm)) for m in fused.blocks[0].children())
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep the unfused names
    fused.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 300, (2, 16))
    assert torch.allclose(fused(idx), plain(idx), atol=1e-5)
    assert torch.equal(fused.state_dict()["blocks.1.ffn.gate_up.weight"], plain.state_dict()["blocks.1.ffn.gate_up.weight"])
    assert "fused into te.LayerNormLinear (q, k, v) and te.LayerNormMLP" in precision.table()


def test_fused_init_scales_the_residual_outputs_as_the_unfused_one(monkeypatch):
    fused, _ = models(monkeypatch, fused=True)
    std = fused.cfg.init_std
    down, gate_up = fused.blocks[0].ffn.mlp.fc2_weight, fused.blocks[0].ffn.mlp.fc1_weight
    assert down.std().item() == pytest.approx(std / (2 * fused.cfg.n_layers) ** 0.5, rel=0.1)
    assert gate_up.std().item() == pytest.approx(std, rel=0.1)


def test_fused_norms_need_te_projections_throughout_and_torch_modes_ignore_them():
    curriculum = [{"seq_len": 64, "tokens": 1000, "micro_batch": 2}]
    with pytest.raises(ConfigError, match="precision.fused_norms builds q, k, v, gate, up, down as Transformer"):
        from_dict({"curriculum": curriculum, "precision": {"mode": "fp8", "fused_norms": True, "map": {"down": "bf16"}}})
    config = from_dict({"curriculum": curriculum, "precision": {"mode": "bf16", "fused_norms": True,
                                                                "map": {"down": "bf16"}}})
    model = Transformer(config.model, 300, Precision(config.precision, torch.device("cpu")), 32)
    assert type(model.blocks[0].attn_norm).__name__ == "RMSNorm"  # --precision bf16 on a fused preset


@pytest.mark.skipif(not te_available(), reason="needs a GPU with Transformer Engine")
def test_transformer_engines_fused_modules_compute_the_unfused_block():
    """The real LayerNormLinear and LayerNormMLP (BF16 GEMMs, te-bf16) against torch's norms and TE Linears
    with the same weights: BF16 rounding apart, the same logits."""
    config = load("configs/tiny.toml")
    config.model.n_layers, config.precision.mode = 2, "te-bf16"
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    plain = Transformer(config.model, 512, Precision(config.precision, device), 64).to(device)
    config.precision.fused_norms = True
    fused = Transformer(config.model, 512, Precision(config.precision, device), 64).to(device)
    weights = {k: v for k, v in plain.state_dict().items() if not k.endswith("_extra_state")}  # TE's FP8 meta
    missing, unexpected = fused.load_state_dict(weights, strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    idx = torch.randint(0, 512, (2, 64), device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = plain(idx).float(), fused(idx).float()
    assert (got - expected).abs().mean() < 0.02 * expected.abs().mean()
