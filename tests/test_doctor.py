"""`just doctor`: which checks each precision needs, and what a failing one tells to do."""

from __future__ import annotations

import pytest
import torch

from train import doctor, precision
from train.config import ConfigError, PrecisionConfig
from train.doctor import Facts, checks

GB = 2**30
CPU = Facts(torch="2.11.0", cuda="13.0", cudnn=91900, transformer_engine_error="ModuleNotFoundError: no TE")
H100 = Facts(torch="2.11.0", cuda="13.0", cudnn=91900, gpus=[("NVIDIA H100 80GB HBM3", (9, 0))],
             memory=(78 * GB, 79 * GB), transformer_engine="2.20.2", cudnn_path="/torch/lib", fp8_gemm="")


def failed(facts: Facts, mode: str) -> list[str]:
    return [c.name for c in checks(facts, mode) if c.needed and not c.ok]


def test_a_cpu_machine_is_ready_for_fp32_only(capsys):
    assert failed(CPU, "fp32") == []
    assert failed(CPU, "bf16") == ["GPU"]
    assert failed(CPU, "fp8") == ["GPU", "Transformer Engine", "FP8 GEMM"]
    lines = [c.line() for c in checks(CPU, "fp8")]
    assert "FAIL  GPU: no GPU: fp8 needs an NVIDIA GPU" in lines[1]
    assert any(line.startswith("FAIL  Transformer Engine") and "README.md, section GPU" in line for line in lines)
    assert "cuDNN 9.19.0" in lines[0]


def test_an_h100_with_transformer_engine_is_ready_for_everything():
    for mode in ("fp8", "te-bf16", "bf16", "fp32"):
        assert failed(H100, mode) == []
    lines = "\n".join(c.line() for c in checks(H100, "fp8"))
    assert "OK    GPU: 1 x NVIDIA H100 80GB HBM3, compute capability 9.0" in lines
    assert "OK    peak FLOP/s for MFU: 989 TFLOP/s" in lines and "78.0 of 79.0 GB" in lines
    assert "OK    Transformer Engine: 2.20.2, cuDNN from /torch/lib" in lines
    assert "--    flash-attn: not installed" in lines  # optional: never a failure


def test_fp8_needs_compute_capability_8_9_and_a_gemm_that_runs():
    ampere = Facts(**{**H100.__dict__, "gpus": [("NVIDIA A100-SXM4-80GB", (8, 0))], "fp8_gemm": None})
    assert failed(ampere, "fp8") == ["GPU", "FP8 GEMM"] and failed(ampere, "bf16") == []
    assert "fp8 needs 8.9+: use --precision bf16" in checks(ampere, "fp8")[1].line()
    broken = Facts(**{**H100.__dict__, "fp8_gemm": "RuntimeError: cuBLAS failed"})
    assert failed(broken, "fp8") == ["FP8 GEMM"] and failed(broken, "te-bf16") == []
    unknown = Facts(**{**H100.__dict__, "gpus": [("NVIDIA GB300", (10, 3))]})
    assert any(c.line().startswith("--    peak FLOP/s for MFU: NVIDIA GB300 is not in train/flops.py") for c in checks(unknown, "fp8"))


@pytest.mark.parametrize("mode, code", [("fp32", 0), ("fp8", 1)])
def test_doctor_runs_here_and_exits_by_what_the_precision_needs(mode, code, capsys):
    """On this CPU machine: fp32 is ready, fp8 is not (no GPU), and the last line says so."""
    if torch.cuda.is_available():
        pytest.skip("checks a machine without a GPU")
    assert doctor.main(["--precision", mode]) == code
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(("FAIL  GPU: no GPU", "--    GPU: no GPU")) for line in out)
    assert out[-1] == ("ready for --precision fp32" if code == 0 else
                       "not ready for --precision fp8: GPU, Transformer Engine, FP8 GEMM")


def test_a_missing_transformer_engine_names_the_readme_section_and_doctor(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))

    def no_te():
        raise ImportError("No module named 'transformer_engine'")

    monkeypatch.setattr(precision, "import_transformer_engine", no_te)
    with pytest.raises(ConfigError) as err:
        precision.Precision(PrecisionConfig(mode="fp8"), torch.device("cuda"))
    assert "see README.md, section GPU, then check with `just doctor`" in str(err.value)
