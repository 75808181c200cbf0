from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from train.config import ConfigError, apply_settings, load
from train.model import KVCache, Transformer, cross_entropy
from train.precision import Precision


def tiny_model(kernel: str, device=torch.device("cpu")) -> Transformer:
    config = load("configs/tiny.toml")
    config.model.n_layers = 2
    torch.manual_seed(0)
    return Transformer(config.model, 300, Precision(config.precision, device), 64, attention_kernel=kernel).to(device)


def first_backend_seen(monkeypatch, model: Transformer, run) -> list[int]:
    """The SDPA backend of highest priority at each attention call while `run(model)` runs."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    run(model)
    return seen


def test_cudnn_kernel_puts_cudnn_first_in_training_and_evaluation_and_restores_the_order(monkeypatch):
    before = torch._C._get_sdp_priority_order()
    idx = torch.randint(0, 300, (2, 16))
    cudnn = int(SDPBackend.CUDNN_ATTENTION)

    def train_and_eval(model):
        cross_entropy(model(idx), idx).backward()
        with torch.no_grad():
            model.eval()(idx)

    assert first_backend_seen(monkeypatch, tiny_model("cudnn"), train_and_eval) == [cudnn] * 4
    assert torch._C._get_sdp_priority_order() == before
    assert cudnn not in first_backend_seen(monkeypatch, tiny_model("torch"), train_and_eval)


def test_generation_keeps_torchs_order(monkeypatch):
    model = tiny_model("cudnn").eval()
    cfg = model.cfg
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, 32, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        seen = first_backend_seen(monkeypatch, model, lambda m: m(torch.randint(0, 300, (1, 8)), cache=cache))
    assert seen and int(SDPBackend.CUDNN_ATTENTION) not in seen


def test_an_unknown_kernel_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="attention.kernel 'flash3' must be one of"):
        apply_settings(load("configs/tiny.toml"), ['attention.kernel="flash3"'])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_cudnn_kernel_runs_cudnn_on_the_gpu_and_trains_as_flash_does(compiled):
    """On the GPU, eager and compiled: cuDNN's kernels run, and logits and gradients match torch's order
    (flash-attention) within BF16 rounding."""
    device = torch.device("cuda", 0)
    idx = torch.randint(0, 300, (4, 64), device=device)
    results = {}
    for kernel in ("torch", "cudnn"):
        model = tiny_model(kernel, device)
        forward = torch.compile(model) if compiled else model
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = forward(idx)
            cross_entropy(logits, idx).backward()
        names = " ".join(event.name for event in prof.events()).lower()
        results[kernel] = (logits.float(), [p.grad.float() for p in model.parameters()], "cudnn" in names)
    (flash, flash_grads, flash_used_cudnn), (cudnn, cudnn_grads, cudnn_used_cudnn) = results["torch"], results["cudnn"]
    assert cudnn_used_cudnn and not flash_used_cudnn
    assert (cudnn - flash).abs().mean() < 0.01 * flash.abs().mean()
    for a, b in zip(cudnn_grads, flash_grads):
        assert (a - b).abs().mean() <= 0.05 * b.abs().mean() + 1e-8
