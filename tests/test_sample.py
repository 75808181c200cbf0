from __future__ import annotations

import math

import pytest
import torch

from train.config import load
from train.model import Transformer
from train.precision import Precision
from train.sample import SampleSettings, choose, generate, repeated_4gram_rate


def tiny_model(preset="configs/tiny.toml", **precision_map):
    config = load(preset)
    config.model.d_model, config.model.n_layers, config.model.n_heads, config.model.n_kv_heads = 64, 2, 4, 2
    config.model.ffn_dim = 128
    config.precision.map.update(precision_map)
    torch.manual_seed(0)
    model = Transformer(config.model, 500, Precision(config.precision, torch.device("cpu"), torch_modules_only=True), 64)
    return model.eval()


def test_kv_cache_matches_full_forward_greedy():
    model = tiny_model()
    settings = SampleSettings(max_new_tokens=40, temperature=0)
    cached, _, _ = generate(model, [0, 5, 17, 42], settings, use_cache=True)
    full, _, _ = generate(model, [0, 5, 17, 42], settings, use_cache=False)
    assert cached == full and len(cached) == 40


def test_kv_cache_logits_match_step_by_step():
    from train.model import KVCache

    model = tiny_model()
    ids = torch.randint(0, 500, (1, 20))
    reference = model(ids)
    cache = KVCache(2, 1, 2, 16, 20, "cpu", torch.float32)
    prefill = model(ids[:, :12], cache=cache)
    steps = [model(ids[:, i:i + 1], cache=cache) for i in range(12, 20)]
    assert torch.allclose(torch.cat([prefill, *steps], dim=1), reference, atol=1e-5)


def test_split_q_structure_loads_without_transformer_engine():
    model = tiny_model("configs/small-q-bf16.toml", q="bf16")
    assert hasattr(model.blocks[0].attn, "q") and not hasattr(model.blocks[0].attn, "qkv")


def test_top_k_and_top_p():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    picks = {choose(logits, SampleSettings(temperature=1.0, top_k=2, top_p=1.0), generator) for _ in range(200)}
    assert picks == {0, 1}
    probs = torch.softmax(logits, -1)  # p0 ~ 0.71, p0 + p1 ~ 0.97
    nucleus = {choose(logits, SampleSettings(temperature=1.0, top_k=0, top_p=0.9), generator) for _ in range(300)}
    assert nucleus == {0, 1} and probs[0] < 0.9
    assert choose(logits, SampleSettings(temperature=0), generator) == 0


def test_same_seed_same_sample():
    model = tiny_model()
    settings = SampleSettings(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    assert generate(model, [0, 1], settings)[0] == generate(model, [0, 1], settings)[0]


def test_degeneration_signals():
    assert repeated_4gram_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repeated_4gram_rate(list(range(10))) == 0
    model = tiny_model()
    _, entropies, _ = generate(model, [0], SampleSettings(max_new_tokens=5, temperature=0))
    assert all(0 <= e <= math.log(512) + 1e-4 for e in entropies)
