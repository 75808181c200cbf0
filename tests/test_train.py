from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import build_packed_corpus
from train.__main__ import main as train_main
from train.config import PROJECTIONS, ConfigError, from_dict, load
from train.loss import Loss
from pipeline.packed import PackedSplit
from train.precision import Precision


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return build_packed_corpus(tmp_path_factory.mktemp("train"), 400_000, 31, 384, "32,64")


def write_config(path, steps=(6, 6), **run):
    """A very small model; stage budgets in optimizer steps of 512 tokens."""
    raw = load("configs/tiny.toml").to_dict()
    raw["model"].update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64)
    raw["optim"].update(tokens_per_step=512, warmup_tokens=1024, lr=1e-2)
    raw["curriculum"] = [{"seq_len": 32, "tokens": 512 * steps[0], "micro_batch": 8},
                         {"seq_len": 64, "tokens": 512 * steps[1], "micro_batch": 4}]
    raw["run"].update({"log_every": 1, "eval_every": 1000, "eval_rows": 32, "checkpoint_every": 1000, **run})
    lines = []
    for section, values in raw.items():
        if section == "curriculum":
            continue
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        if section == "precision":
            lines.append("[precision.map]")
            lines += [f'{k} = "{v}"' for k, v in values["map"].items()]
    for stage in raw["curriculum"]:
        lines += ["[[curriculum]]"] + [f"{k} = {v}" for k, v in stage.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def train(packed, config, *extra):
    return train_main(["--config", str(config), "--data-dir", str(packed / "data"), "--manifests",
                       str(packed / "manifests"), "--out-dir", str(packed / "runs"), "--device", "cpu", *extra])


def losses(packed, run):
    return [json.loads(line)["loss"] for line in (packed / "runs" / run / "metrics.jsonl").read_text().splitlines()]


def test_resolved_config_of_an_extending_file_is_complete(packed, tmp_path):
    """config.resolved.json is the whole config the run used, not the file's diff."""
    parent = write_config(tmp_path / "parent.toml", steps=(1, 1))
    child = tmp_path / "child.toml"
    child.write_text('extends = "parent.toml"\n[optim]\nlr = 2e-2\n')
    assert train(packed, child, "--run", "extended", "--max-steps", "2") == 0
    resolved = json.loads((packed / "runs/extended/config.resolved.json").read_text())
    expected = load(parent).to_dict()
    expected["optim"]["lr"] = 2e-2
    expected["data"].update(data_dir=str(packed / "data"), manifests=str(packed / "manifests"))
    expected["run"].update(name="extended", out_dir=str(packed / "runs"))
    assert resolved == expected


def test_loss_falls(packed, tmp_path):
    config = write_config(tmp_path / "c.toml", steps=(25, 5))
    assert train(packed, config, "--run", "falls") == 0
    curve = losses(packed, "falls")
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < curve[0] - 1.0
    run = packed / "runs/falls"
    assert {"config.resolved.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= {p.name for p in run.iterdir()}
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "val_bpb"} <= set(last)
    assert (run / "checkpoints/best/model.safetensors").exists()


def test_exact_resume_across_a_stage_boundary(packed, tmp_path):
    config = write_config(tmp_path / "c.toml", steps=(5, 5))
    assert train(packed, config, "--run", "straight") == 0
    assert train(packed, config, "--run", "split", "--stop-at-step", "3") == 0
    assert len(losses(packed, "split")) == 3
    assert train(packed, config, "--run", "split", "--resume") == 0
    assert losses(packed, "split") == losses(packed, "straight")  # bit-identical, through stage 0 -> 1


def test_max_steps_reaches_every_stage(packed, tmp_path):
    config = write_config(tmp_path / "c.toml", steps=(40, 40))
    assert train(packed, config, "--run", "short", "--max-steps", "4") == 0
    stages = [json.loads(l)["seq_len"] for l in (packed / "runs/short/metrics.jsonl").read_text().splitlines()]
    assert stages == [32, 32, 64, 64]


def test_missing_packs_are_listed_before_step_one(packed, tmp_path, capsys):
    raw = tmp_path / "c.toml"
    write_config(raw)
    raw.write_text(raw.read_text().replace("seq_len = 64", "seq_len = 128"))
    assert train(packed, raw, "--run", "missing") == 2
    assert "just pack --seq-len 128" in capsys.readouterr().err


@pytest.mark.parametrize("mode, message", [("fp8", "FP8 needs a CUDA GPU"), ("te-bf16", "te-bf16 needs a CUDA GPU")])
def test_transformer_engine_modes_without_gpu_are_an_error_not_bf16(packed, tmp_path, capsys, mode, message):
    assert train(packed, write_config(tmp_path / "c.toml"), "--run", mode, "--precision", mode) == 2
    assert message in capsys.readouterr().err


def test_existing_run_is_not_overwritten(packed, tmp_path, capsys):
    config = write_config(tmp_path / "c.toml", steps=(1, 1))
    assert train(packed, config, "--run", "twice") == 0
    assert train(packed, config, "--run", "twice") == 2
    assert "--resume" in capsys.readouterr().err


def test_set_overrides(tmp_path):
    from train.config import apply_settings

    config = apply_settings(load("configs/tiny.toml"), ["optim.tokens_per_step=65536", "curriculum.1.micro_batch=4",
                                                        "precision.map.q=\"bf16\"", "run.name=other"])
    assert (config.optim.tokens_per_step, config.curriculum[1].micro_batch) == (65536, 4)
    assert (config.precision.map["q"], config.run.name) == ("bf16", "other")
    with pytest.raises(ConfigError, match="unknown key"):
        apply_settings(load("configs/tiny.toml"), ["optim.learning_rate=1"])


@pytest.mark.parametrize("raw,message", [
    ({"model": {"d_modle": 64}}, "unknown key(s) ['d_modle'] in [model]"),
    ({"modle": {}}, "unknown section(s) ['modle']"),
    ({"model": {"n_heads": 3, "n_kv_heads": 2}}, "multiple of n_kv_heads"),
    ({"precision": {"map": {"q": "fp4"}}}, "fp8 or bf16"),
    ({"precision": {"map": {"qq": "fp8"}}}, "unknown projection"),
    ({"optim": {"lr": "fast"}}, "must be a number"),
    ({"curriculum": []}, "at least one [[curriculum]]"),
])
def test_config_errors(raw, message):
    base = {"curriculum": [{"seq_len": 64, "tokens": 1000, "micro_batch": 2}]}
    with pytest.raises(ConfigError) as err:
        from_dict({**base, **raw})
    assert message in str(err.value)


class FakeTE(types.SimpleNamespace):
    """Stands in for transformer_engine.pytorch where it cannot import (no GPU): marks TE modules."""

    class Linear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, device=device)
            self.seen_first_microbatch = []
            self.traced = []

        def forward(self, inp, is_first_microbatch=None):
            self.seen_first_microbatch.append(is_first_microbatch)
            self.traced.append(torch.compiler.is_compiling())
            return super().forward(inp)

    # TE's fused modules as its documentation defines them, with TE's parameter names
    class LayerNormLinear(nn.Module):
        def __init__(self, in_features, out_features, eps, bias, normalization, params_dtype, device):
            super().__init__()
            assert normalization == "RMSNorm" and not bias
            self.eps = eps
            self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
            self.weight = nn.Parameter(torch.randn(out_features, in_features))

        def forward(self, inp, is_first_microbatch=None):
            return F.linear(F.rms_norm(inp, (inp.shape[-1],), self.layer_norm_weight, self.eps), self.weight)

    class LayerNormMLP(nn.Module):
        def __init__(self, hidden_size, ffn_hidden_size, eps, bias, normalization, activation, params_dtype, device):
            super().__init__()
            assert normalization == "RMSNorm" and activation == "swiglu" and not bias
            self.eps = eps
            self.layer_norm_weight = nn.Parameter(torch.ones(hidden_size))
            self.fc1_weight = nn.Parameter(torch.randn(2 * ffn_hidden_size, hidden_size))
            self.fc2_weight = nn.Parameter(torch.randn(hidden_size, ffn_hidden_size))

        def forward(self, inp, is_first_microbatch=None):
            h = F.rms_norm(inp, (inp.shape[-1],), self.layer_norm_weight, self.eps)
            gate, up = F.linear(h, self.fc1_weight).chunk(2, dim=-1)  # TE's swiglu: silu(first half) * second
            return F.linear(F.silu(gate) * up, self.fc2_weight)


@pytest.mark.parametrize("mode", ["fp8", "te-bf16"])
@pytest.mark.parametrize("preset", ["configs/small.toml", "configs/small-q-bf16.toml"])
def test_precision_map_decides_each_module(monkeypatch, preset, mode):
    """fp8 and te-bf16 build the same modules (TE where the map says fp8); only the GEMM format differs."""
    from train import precision as precision_module
    from train.model import Transformer

    config = load(preset)
    config.model.n_layers = 1
    config.precision.mode = mode
    try:
        import transformer_engine.pytorch as te  # noqa: F401  (a GPU machine checks the real modules)
        device = torch.device("cuda")
        te_linear = te.Linear
    except ImportError:
        monkeypatch.setattr(precision_module, "require_transformer_engine", lambda device, fp8: FakeTE())
        device, te_linear = torch.device("cpu"), FakeTE.Linear
    model = Transformer(config.model, 1000, Precision(config.precision, device), 64)
    block = model.blocks[0]
    expected_fused = config.precision.map["q"] == config.precision.map["k"] == config.precision.map["v"]
    assert hasattr(block.attn, "qkv") == expected_fused
    projections = {"o": block.attn.o, "down": block.ffn.down, "lm_head": model.lm_head, "gate": block.ffn.gate_up}
    projections.update({"q": block.attn.qkv} if expected_fused else
                       {"q": block.attn.q, "k": block.attn.k, "v": block.attn.v})
    for name, module in projections.items():
        assert isinstance(module, te_linear) == (config.precision.map[name] == "fp8"), name
    assert not isinstance(model.embed, te_linear) and type(block.attn_norm).__name__ == "RMSNorm"
    table = Precision(config.precision, device).table()
    for name in PROJECTIONS:
        marked = config.precision.map[name] == "fp8"
        fmt = "fp8 " if marked and mode == "fp8" else "bf16"
        assert f"  {name:<8} {fmt}  {'te.Linear' if marked else 'torch.nn.Linear'}" in table, name


def test_bits_per_byte_by_hand(packed):
    from train.trainer import Distributed, evaluate

    split = PackedSplit.open(packed / "data", 32, "val", packed / "manifests")

    class Uniform(nn.Module):
        def forward(self, idx, doc_lens=None):
            return torch.zeros(*idx.shape, 512)

    config = load("configs/tiny.toml")
    precision = Precision(config.precision, torch.device("cpu"))
    loss = Loss(config.run, Uniform(), compiled=False)
    result = evaluate(Uniform(), loss, split, precision, 8, 0, False, torch.device("cpu"), Distributed())
    rows = split.rows[:, 1:]
    targets = int((rows != split.pad_id).sum())
    assert result["val_tokens"] == targets
    assert result["val_loss"] == pytest.approx(math.log(512))
    manifest = json.loads((packed / "manifests/tokenize.json").read_text())
    assert result["val_bpb"] == pytest.approx(targets * math.log(512) / math.log(2) /
                                              manifest["tokens"]["splits"]["val"]["utf8_bytes"])


def test_document_mask_matches_separate_documents():
    """With doc_mask, a row of two documents gives each the logits it gets alone."""
    from train.model import Transformer

    config = load("configs/tiny.toml")
    config.model.n_layers = 2
    torch.manual_seed(0)
    model = Transformer(config.model, 300, Precision(config.precision, torch.device("cpu")), 64)
    a, b = torch.randint(0, 300, (1, 10)), torch.randint(0, 300, (1, 6))
    both = model(torch.cat([a, b], dim=1), doc_lens=torch.tensor([10, 6], dtype=torch.int32))
    assert torch.allclose(both[:, :10], model(a), atol=1e-5)
    assert torch.allclose(both[:, 10:], model(b), atol=1e-5)


def torchrun(packed, config, nproc, *extra, timeout=300):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               "-m", "train", "--config", str(config), "--data-dir", str(packed / "data"), "--manifests",
               str(packed / "manifests"), "--out-dir", str(packed / "runs"), "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_process_gloo_matches_one_process_and_resumes_across_world_sizes(packed, tmp_path):
    config = write_config(tmp_path / "c.toml", steps=(4, 4))
    assert train(packed, config, "--run", "one") == 0
    result = torchrun(packed, config, 2, "--run-name", "two")
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = losses(packed, "one"), losses(packed, "two")
    assert len(two) == 8 and two == pytest.approx(one, rel=2e-3)  # same rows per step, split across ranks
    # a 2-process checkpoint resumes on 1 process, and the other way round
    assert torchrun(packed, config, 2, "--run-name", "two-then-one", "--stop-at-step", "3").returncode == 0
    assert train(packed, config, "--run-name", "two-then-one", "--resume") == 0
    assert losses(packed, "two-then-one") == pytest.approx(one, rel=2e-3)
    assert train(packed, config, "--run", "one-then-two", "--stop-at-step", "5") == 0
    result = torchrun(packed, config, 2, "--run-name", "one-then-two", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(packed, "one-then-two") == pytest.approx(one, rel=2e-3)


def test_fp8_linears_learn_the_micro_batch_position(monkeypatch):
    """FP8 weights are cast once per optimizer step: TE modules get is_first_microbatch from the run."""
    from train import precision as precision_module

    monkeypatch.setattr(precision_module, "require_transformer_engine", lambda device, fp8: FakeTE())
    config = load("configs/small.toml")
    precision = Precision(config.precision, torch.device("cpu"))
    layer = precision.linear("gate", 16, 16)
    x = torch.randn(2, 16)
    for position in (True, False, None):
        precision.first_microbatch = position
        layer(x)
    assert layer.seen_first_microbatch == [True, False, None]


def test_compiled_model_runs_te_projections_eagerly_between_graphs(monkeypatch):
    """Under torch.compile the TE projections are graph breaks: never traced, still told the micro-batch
    position, and the compiled model computes what the eager one does."""
    from train import precision as precision_module
    from train.model import Transformer, cross_entropy

    monkeypatch.setattr(precision_module, "require_transformer_engine", lambda device, fp8: FakeTE())
    config = load("configs/tiny.toml")
    config.precision.mode = "fp8"
    config.model.n_layers = 2
    precision = Precision(config.precision, torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(config.model, 300, precision, 32)
    idx = torch.randint(0, 300, (2, 16))
    eager_loss = cross_entropy(model(idx), idx)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    te_layer = model.blocks[0].ffn.down
    te_layer.seen_first_microbatch.clear()
    te_layer.traced.clear()
    for position in (True, False):
        precision.first_microbatch = position
        loss = cross_entropy(compiled(idx), idx)
    loss.backward()
    assert te_layer.traced == [False, False] and te_layer.seen_first_microbatch == [True, False]
    assert torch.allclose(loss, eager_loss, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), eager_grads))


def test_evaluation_time_is_not_counted_as_training_time(packed, tmp_path, monkeypatch):
    """A window's tokens/s covers its training steps only: a slow evaluation before it does not count."""
    from train import trainer as trainer_module

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    real_evaluate = trainer_module.evaluate

    def slow_evaluate(*args, **kwargs):
        clock.now += 1000.0  # a thousand seconds of validation
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", slow_evaluate)
    assert train(packed, write_config(tmp_path / "c.toml", steps=(4, 2), eval_every=1), "--run", "eval-time") == 0
    lines = [json.loads(line) for line in (packed / "runs/eval-time/metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all("val_loss" in m for m in lines)
    assert all(m["tokens_per_s"] > 512 for m in lines)  # no window took a second, let alone 1000


def test_profiling_needs_a_gpu(packed, tmp_path, capsys):
    assert train(packed, write_config(tmp_path / "c.toml"), "--run", "prof", "--profile-steps", "2") == 2
    assert "--profile-steps profiles GPU kernels" in capsys.readouterr().err


def test_norm_hands_the_next_gemm_the_autocast_dtype():
    """Under BF16 autocast the norm's output is BF16 (so a TE projection gets no FP32 input to cast
    and no FP32 gradient to convert); without autocast it stays the exact FP32 norm."""
    from train.model import RMSNorm

    norm = RMSNorm(16, 1e-5)
    x = torch.randn(3, 16, requires_grad=True)
    exact = torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5)
    assert torch.equal(norm(x), exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, exact.to(torch.bfloat16))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_transformer_engine_is_pointed_at_torchs_cudnn(tmp_path, monkeypatch):
    """TE would load the first libcudnn under CUDA_HOME or /usr/local/cuda; we name torch's copy,
    found in the process's mappings, unless the user already named one."""
    from train.precision import use_torchs_cudnn

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 00:00 0 \n"
                    "7f01-7f02 r-xp 00000000 08:01 42 /site/nvidia/cudnn/lib/libcudnn_graph.so.9\n"
                    "7f02-7f03 r-xp 00000000 08:01 43 /site/nvidia/cudnn/lib/libcudnn.so.9\n")
    monkeypatch.delenv("CUDNN_HOME", raising=False)
    monkeypatch.delenv("CUDNN_PATH", raising=False)
    use_torchs_cudnn(maps)
    assert os.environ["CUDNN_PATH"] == "/site/nvidia/cudnn/lib"
    monkeypatch.setenv("CUDNN_PATH", "/mine")
    use_torchs_cudnn(maps)
    assert os.environ["CUDNN_PATH"] == "/mine"


def test_torchs_cudnn_libraries_are_loaded_before_transformer_engine(monkeypatch):
    """The fix itself: every cuDNN sub-library beside torch's libcudnn is mapped into the process,
    so TE's links by name resolve to torch's build rather than a system copy."""
    from pathlib import Path

    from train.precision import use_torchs_cudnn

    torch.backends.cudnn.version()
    loaded = [Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()]
    lib = next((path for path in loaded if path.name.startswith("libcudnn.so")), None)
    if lib is None:
        pytest.skip("this torch build loads no cuDNN")
    monkeypatch.delenv("CUDNN_HOME", raising=False)
    monkeypatch.delenv("CUDNN_PATH", raising=False)
    use_torchs_cudnn()
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    wanted = {str(path) for path in lib.parent.glob("libcudnn_*.so*")}
    assert wanted and wanted <= mapped
    assert os.environ["CUDNN_PATH"] == str(lib.parent)


def make_trainer(packed, run_dir, steps=(5, 4), stop_at_step=None, **run):
    """A Trainer built directly (not through `just train`), so a test can call its parts."""
    from train.trainer import Trainer

    config = load(write_config(run_dir.parent / f"{run_dir.name}.toml", steps=steps, **run))
    config.data.data_dir, config.data.manifests = str(packed / "data"), str(packed / "manifests")
    run_dir.mkdir(parents=True)
    return Trainer(config, run_dir, torch.device("cpu"), stop_at_step=stop_at_step)


def test_when_the_loop_logs_evaluates_and_checkpoints(packed, tmp_path, capsys):
    """Stages of 5 and 4 steps, stopped after step 7: the decisions step by step, then what a run does
    with them (an evaluation at 3 although log_every is 2: it writes its own metrics line; a checkpoint at
    the stop, for --resume)."""
    trainer = make_trainer(packed, tmp_path / "run", stop_at_step=7, log_every=2, eval_every=3, checkpoint_every=4,
                           keep_last=10)
    stage_end = {step: 5 if step <= 5 else 9 for step in range(1, 10)}

    def firing(decision):
        return [step for step, end in stage_end.items() if decision(step, end)]

    assert firing(trainer.should_log) == [2, 3, 4, 5, 6, 8, 9]
    assert firing(trainer.should_eval) == [3, 5, 6, 9]
    assert firing(trainer.should_checkpoint) == [4, 5, 7, 8, 9]

    hooked = []
    trainer.after_step_hooks.append(hooked.append)
    trainer.run()
    assert hooked == [1, 2, 3, 4, 5, 6, 7]
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 3, 4, 5, 6]
    assert [m["step"] for m in lines if "val_loss" in m] == [3, 5, 6]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [
        "best", "step_0000004", "step_0000005", "step_0000007"]
    assert "MFU not reported" in capsys.readouterr().out and all(m["mfu"] == 0.0 for m in lines)


def test_a_non_finite_step_is_skipped_and_too_many_in_a_row_stop_the_run(packed, tmp_path, monkeypatch):
    from train.trainer import TrainError

    trainer = make_trainer(packed, tmp_path / "run", max_bad_steps=2)
    stage = trainer.stages[0]
    loader = trainer.stage_loader(stage)
    real_clip, poisoned = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: real_clip(params, max_norm) * (math.nan if poisoned else 1.0))

    def step():
        weights = [p.detach().clone() for p in trainer.model.parameters()]
        result = trainer.train_step([next(loader) for _ in range(stage.grad_accum)])
        updated = not all(torch.equal(p, w) for p, w in zip(trainer.model.parameters(), weights))
        assert all(p.grad is None for p in trainer.model.parameters())
        return result, updated

    try:
        poisoned.append(True)
        result, updated = step()
        assert result.skipped and not updated and (trainer.bad_steps, trainer.skipped_steps) == (1, 1)
        poisoned.clear()
        result, updated = step()
        assert not result.skipped and updated and (trainer.bad_steps, trainer.skipped_steps) == (0, 1)
        poisoned.append(True)
        step()
        with pytest.raises(TrainError, match="2 non-finite steps in a row"):
            step()
        assert trainer.skipped_steps == 3
    finally:
        loader.close()
