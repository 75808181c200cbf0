from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from train.config import ConfigError, apply_settings, load
from train.model import Transformer, cross_entropy
from train.precision import Precision

CUDNN = int(SDPBackend.CUDNN_ATTENTION)


def record_first_backend(monkeypatch) -> list[int]:
    """The SDPA backend of highest priority at each attention call from now on."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_the_forward_context_puts_cudnn_first_and_restores_torchs_order(monkeypatch, mode):
    config = load("configs/tiny.toml")
    config.model.n_layers, config.precision.mode = 2, mode
    before = torch._C._get_sdp_priority_order()
    seen = record_first_backend(monkeypatch)
    for kernel in ("cudnn", "torch"):
        precision = Precision(config.precision, torch.device("cpu"), attention_kernel=kernel)
        model = Transformer(config.model, 300, precision, 32)
        with precision.autocast():
            model(torch.randint(0, 300, (2, 16)))
        assert torch._C._get_sdp_priority_order() == before
    assert seen == [CUDNN] * 2 + [before[0]] * 2


def test_an_unknown_kernel_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="attention.kernel 'flash3' must be one of"):
        apply_settings(load("configs/tiny.toml"), ['attention.kernel="flash3"'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_kernel_runs_cudnn_in_the_compiled_model_and_trains_as_flash_does():
    """Compiled as the trainer compiles it: with cudnn no flash-attention kernel runs, with torch's order
    one does; logits and gradients agree within BF16 rounding."""
    config = load("configs/tiny.toml")
    config.model.n_layers = 2
    device = torch.device("cuda", 0)
    idx = torch.randint(0, 300, (4, 64), device=device)
    results = {}
    for kernel in ("torch", "cudnn"):
        torch.manual_seed(0)
        precision = Precision(config.precision, device, attention_kernel=kernel)
        model = Transformer(config.model, 300, precision, 64).to(device)
        forward = torch.compile(model)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with precision.autocast():
                logits = forward(idx)
            cross_entropy(logits, idx).backward()
            torch.cuda.synchronize()
        flash = sorted({e.name for e in prof.events() if "flash" in e.name.lower()})
        results[kernel] = (logits.float(), [p.grad.float() for p in model.parameters()], flash)
    (plain, plain_grads, plain_flash), (cudnn, cudnn_grads, cudnn_flash) = results["torch"], results["cudnn"]
    assert plain_flash and not cudnn_flash, (plain_flash, cudnn_flash)
    assert (cudnn - plain).abs().mean() < 0.01 * plain.abs().mean()
    for a, b in zip(cudnn_grads, plain_grads):
        assert (a - b).abs().mean() <= 0.05 * b.abs().mean() + 1e-8
