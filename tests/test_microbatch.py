"""micro_batch = "auto": the choice among the divisors of a step, against a fake memory limit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import build_packed_corpus
from tests.test_loss import train_tiny, write_tiny_config
from train import microbatch
from train.config import ConfigError, from_dict, load
from train.microbatch import AutoMicroBatch, AutoStage, MemoryProbe, auto_stages, candidates, cpu_choice, largest_fitting

GB = 2**30


class FakeGpu:
    """Peak memory linear in the tokens of a micro-batch; past `capacity` the probe runs out of memory."""

    def __init__(self, fixed_gb: float, gb_per_k_tokens: float, capacity_gb: float):
        self.fixed, self.per_token, self.capacity = fixed_gb * GB, gb_per_k_tokens * GB / 1000, capacity_gb * GB
        self.probes: list[tuple[int, int, int | None]] = []  # micro-batch, seq_len, peak
        self.closed = 0

    def make_probe(self, vocab_size: int, max_seq_len: int):
        self.max_seq_len = max_seq_len
        return self

    def __call__(self, micro_batch: int, seq_len: int) -> int | None:
        peak = self.fixed + self.per_token * micro_batch * seq_len
        self.probes.append((micro_batch, seq_len, None if peak > self.capacity else int(peak)))
        return self.probes[-1][2]

    def close(self) -> None:
        self.closed += 1


def chooser(tmp_path, gpu: FakeGpu, limit_gb: float = 80, key: dict | None = None, **kwargs) -> AutoMicroBatch:
    return AutoMicroBatch(key or {"gpu": "fake"}, tmp_path / "micro_batch.json", int(limit_gb * GB), gpu.make_probe,
                          1, lambda line: None, **kwargs)


def test_candidates_divide_the_rows_of_a_step():
    assert candidates(AutoStage(0, 2048, 256)) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # 196,608 tokens per step at T=2048: 48 is a candidate, as measured faster at yxanul-197m
    assert candidates(AutoStage(0, 2048, 96)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]
    # FP8 block scaling needs micro_batch x seq_len to be a multiple of 128 tokens
    assert candidates(AutoStage(0, 64, 12), multiple=128) == [2, 4, 6, 12]


def test_auto_stages_need_whole_rows_per_step():
    raw = {"curriculum": [{"seq_len": 512, "tokens": 10**6}, {"seq_len": 2048, "tokens": 10**6, "micro_batch": 8}],
           "optim": {"tokens_per_step": 65536}}
    assert auto_stages(from_dict(raw), world_size=2) == [AutoStage(0, 512, 64)]
    with pytest.raises(ConfigError, match="multiple of seq_len x GPUs for stage 0"):
        auto_stages(from_dict(raw), world_size=3)


@pytest.mark.parametrize("capacity", [0.5, 3, 10, 17, 33, 64.5, 1000])
def test_binary_search_finds_the_largest_that_fits_in_few_probes(capacity):
    options = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    probed = []

    def fits(m):
        probed.append(m)
        return m <= capacity

    expected = max((m for m in options if m <= capacity), default=None)
    assert largest_fitting(options, fits) == expected
    assert len(probed) <= math.ceil(math.log2(len(options) + 1))


def test_the_largest_micro_batch_under_the_limit_less_headroom_is_chosen(tmp_path):
    """4 GB fixed + 0.4 GB per 1k tokens under 90% of 24 GB (21.6 GB): 44k tokens at most, so 16 x 2048
    (32k tokens, 17.1 GB) and 64 x 512; the probe runs at the largest stage length and is freed."""
    gpu = FakeGpu(4, 0.4, capacity_gb=24)
    stages = [AutoStage(0, 512, 128), AutoStage(1, 2048, 32)]
    assert chooser(tmp_path, gpu, limit_gb=24)(stages, 65536) == {0: 64, 1: 16}
    assert gpu.max_seq_len == 2048 and gpu.closed == 1
    cache = json.loads((tmp_path / "micro_batch.json").read_text())
    entry = next(e for e in cache.values() if e["seq_len"] == 2048)
    assert entry["micro_batch"] == 16 and entry["probed_gb"]["16"] == pytest.approx(4 + 0.4 * 32.768, abs=0.01)


def test_an_out_of_memory_probe_does_not_fit(tmp_path):
    """The probe's own out-of-memory error decides when it comes before the limit does."""
    gpu = FakeGpu(4, 0.4, capacity_gb=10)
    assert chooser(tmp_path, gpu, limit_gb=80)([AutoStage(0, 2048, 32)], 65536) == {0: 4}
    assert (8, 2048, None) in gpu.probes


def test_a_resumed_run_reads_its_choices_instead_of_probing(tmp_path):
    gpu = FakeGpu(4, 0.4, capacity_gb=80)
    stages = [AutoStage(0, 512, 128), AutoStage(1, 2048, 32)]
    first = chooser(tmp_path, gpu)(stages, 65536)
    gpu.probes.clear()
    assert chooser(tmp_path, gpu)(stages, 65536) == first and gpu.probes == []
    # another GPU, or another vocabulary, probes again
    assert chooser(tmp_path, gpu, key={"gpu": "other"})(stages, 65536) == first and gpu.probes
    gpu.probes.clear()
    chooser(tmp_path, gpu)(stages, 8192)
    assert gpu.probes


def test_all_ranks_take_the_smallest_choice(tmp_path):
    gpu = FakeGpu(4, 0.4, capacity_gb=80)
    other_rank = lambda values: [min(v, 8) for v in values]  # noqa: E731  (a rank whose GPU fits 8)
    assert chooser(tmp_path, gpu, agree=other_rank)([AutoStage(0, 2048, 32)], 65536) == {0: 8}
    assert [e["micro_batch"] for e in json.loads((tmp_path / "micro_batch.json").read_text()).values()] == [8]


def test_no_micro_batch_that_fits_is_an_error(tmp_path):
    gpu = FakeGpu(30, 0.4, capacity_gb=80)
    with pytest.raises(ConfigError, match=r"stage 0: no micro-batch fits in 24.0 GB \(micro-batch 1 x 2048"):
        chooser(tmp_path, gpu, limit_gb=24)([AutoStage(0, 2048, 32)], 65536)
    assert not (tmp_path / "micro_batch.json").exists()


def test_cpu_takes_the_largest_up_to_its_token_cap():
    stages = [AutoStage(0, 64, 128), AutoStage(1, 256, 32), AutoStage(2, 8192, 4)]
    assert cpu_choice(stages, 384, say=lambda line: None) == {0: 64, 1: 16, 2: 1}


def test_memory_limit_is_the_free_memory_or_the_fraction(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * GB, 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2 * GB)
    assert microbatch.memory_limit(torch.device("cuda"), 0.0) == 72 * GB
    assert microbatch.memory_limit(torch.device("cuda"), 0.3) == int(0.3 * 80 * GB)
    assert microbatch.memory_limit(torch.device("cuda"), 0.95) == 72 * GB


@pytest.mark.parametrize("settings", [{}, {"loss": "chunked"}, {"doc_mask": True}])
def test_probe_step_runs_what_the_trainer_runs(settings):
    """The probe's workload on the CPU: two accumulated micro-batches, an optimizer step, an evaluation."""
    config = load("configs/tiny.toml")
    config.model.n_layers = 1
    config.run.loss = settings.get("loss", "plain")
    config.attention.doc_mask = settings.get("doc_mask", False)
    probe = MemoryProbe(config, torch.device("cpu"), 300, 64, world_size=1)
    before = [p.detach().clone() for p in probe.model.parameters()]
    probe.step(3, 64)
    assert probe.optimizer.state and all(p.grad is None for p in probe.model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(probe.model.parameters(), before))


@pytest.mark.parametrize("value, error", [("auto", None), (None, None), (8, None), (0, "positive integer or \"auto\""),
                                          ("big", "positive integer or \"auto\""), (2.5, "positive integer or \"auto\"")])
def test_micro_batch_is_a_number_or_auto(value, error):
    stage = {"seq_len": 64, "tokens": 1000, **({} if value is None else {"micro_batch": value})}
    if error:
        with pytest.raises(ConfigError, match=error):
            from_dict({"curriculum": [stage]})
    else:
        assert from_dict({"curriculum": [stage]}).curriculum[0].micro_batch == (value or "auto")


def test_memory_fraction_is_a_share():
    with pytest.raises(ConfigError, match=r"run.memory_fraction must be in \[0, 1\]"):
        from_dict({"curriculum": [{"seq_len": 64, "tokens": 1000}], "run": {"memory_fraction": 1.5}})


def test_auto_trains_on_the_cpu(tmp_path):
    """A run with micro_batch = "auto" on the CPU: 512 tokens per step of 32-token rows gives 16 rows,
    all of them in one micro-batch (512 tokens, under the CPU cap); the metrics say so."""
    packed = build_packed_corpus(tmp_path, 400_000, 31, 384, "32")
    assert train_tiny(packed, write_tiny_config(tmp_path / "auto.toml", "auto"), "auto", "run.eval_every=1000") == 0
    lines = [json.loads(line) for line in (packed / "runs/auto/metrics.jsonl").read_text().splitlines()]
    assert {m["micro_batch"] for m in lines} == {16}
