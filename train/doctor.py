"""`just doctor`: whether this machine can train at a given precision, one line per check.

Each line starts with OK, FAIL (needed at this precision and missing: the line says what to do) or --
(not needed at this precision, or for information). The exit status is 0 when no check the precision
needs failed, 1 otherwise. Transformer Engine is imported the way training imports it (train/precision.py,
torch's cuDNN loaded first) and FP8 is tried for real: a te.Linear forward and backward under the run's
FP8 autocast. Without a GPU it says so and still runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from pipeline import HelpFormatter
from train.config import PRECISIONS, TE_MODES

INSTALL = "see README.md, section GPU (NVIDIA's PyTorch container, or `uv sync --extra fp8`)"
FP8_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: FP8 tensor cores
BF16_CAPABILITY = (8, 0)  # Ampere and later: BF16 tensor cores


@dataclass
class Facts:
    """What the checks look at, gathered once (`gather`) or written by hand in tests."""

    torch: str
    cuda: str | None  # the CUDA torch was built with; None for a CPU build
    cudnn: int | None  # torch.backends.cudnn.version()
    gpus: list[tuple[str, tuple[int, int]]] = field(default_factory=list)  # name, compute capability
    memory: tuple[int, int] | None = None  # free, total bytes of GPU 0
    transformer_engine: str | None = None  # version, when it imports
    transformer_engine_error: str | None = None  # why it does not
    cudnn_path: str | None = None  # $CUDNN_PATH after the import: torch's cuDNN, unless the user chose one
    flash_attn: str | None = None  # version, when it imports
    fp8_gemm: str | None = None  # None: not tried; "" it ran; else why it failed


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    needed: bool  # at the chosen precision; a failing check that is not needed prints as --

    def line(self) -> str:
        status = "OK" if self.ok else "FAIL" if self.needed else "--"
        return f"{status:<5} {self.name}: {self.detail}"


def cudnn_text(version: int | None) -> str:
    if not version:
        return "no cuDNN"
    major, rest = (version // 10000, version % 10000) if version >= 90000 else (version // 1000, version % 1000)
    return f"cuDNN {major}.{rest // 100}.{rest % 100}"


def gather() -> Facts:
    import torch

    facts = Facts(torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        facts.gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                      for i in range(torch.cuda.device_count())]
        facts.memory = torch.cuda.mem_get_info(0)
    from train.precision import import_transformer_engine

    try:
        import_transformer_engine()
        import transformer_engine

        facts.transformer_engine = transformer_engine.__version__
        facts.cudnn_path = os.environ.get("CUDNN_PATH")
    except Exception as err:  # noqa: BLE001  (an ImportError, or a library that fails to load)
        facts.transformer_engine_error = f"{type(err).__name__}: {err}".splitlines()[0]
    try:
        import flash_attn

        facts.flash_attn = flash_attn.__version__
    except Exception:  # noqa: BLE001
        pass
    if facts.gpus and facts.transformer_engine and min(c for _, c in facts.gpus) >= FP8_CAPABILITY:
        facts.fp8_gemm = try_fp8_gemm()
    return facts


def try_fp8_gemm() -> str:
    """A 32-token te.Linear(64, 64) forward and backward under the trainer's FP8 autocast (delayed
    scaling): "" when it ran and gave finite numbers, else what went wrong."""
    import torch

    from train.config import PrecisionConfig
    from train.precision import Precision

    try:
        precision = Precision(PrecisionConfig(mode="fp8"), torch.device("cuda", 0))
        layer = precision.linear("gate", 64, 64)
        x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with precision.autocast():
            y = layer(x)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        if not (torch.isfinite(y).all() and torch.isfinite(x.grad).all()):
            return "non-finite output"
        return ""
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}".splitlines()[0]


def checks(facts: Facts, precision: str) -> list[Check]:
    """The checks of `facts` at `precision` (fp8, te-bf16, bf16 or fp32)."""
    from train.flops import peak_bf16_flops

    gpu_needed, te_needed = precision != "fp32", precision in TE_MODES
    capability = FP8_CAPABILITY if precision == "fp8" else BF16_CAPABILITY
    cuda = f"CUDA {facts.cuda}" if facts.cuda else "a CPU-only build"
    result = [Check("torch", True, f"{facts.torch} ({cuda}, {cudnn_text(facts.cudnn)})", True)]
    if not facts.gpus:
        result.append(Check("GPU", False, "no GPU" + (f": {precision} needs an NVIDIA GPU; check `nvidia-smi` and that "
                                                      "torch is a CUDA build (see README.md, section GPU)"
                                                      if gpu_needed else " (fp32 runs on the CPU)"), gpu_needed))
        result += [Check("free memory", False, "no GPU", False), Check("peak FLOP/s for MFU", False, "no GPU", False)]
    else:
        names = sorted({name for name, _ in facts.gpus})
        lowest = min(c for _, c in facts.gpus)
        detail = f"{len(facts.gpus)} x {', '.join(names)}, compute capability {lowest[0]}.{lowest[1]}"
        enough = lowest >= capability or not gpu_needed
        if not enough:
            fallback = "bf16" if precision == "fp8" else "fp32"
            detail += f" ({precision} needs {capability[0]}.{capability[1]}+: use --precision {fallback})"
        result.append(Check("GPU", enough, detail, gpu_needed))
        free, total = facts.memory
        result.append(Check("free memory", True, f"{free / 2**30:.1f} of {total / 2**30:.1f} GB on GPU 0", False))
        peak = peak_bf16_flops(names[0])
        result.append(Check("peak FLOP/s for MFU", peak is not None,
                            f"{peak / 1e12:.4g} TFLOP/s dense BF16 (train/flops.py)" if peak else
                            f"{names[0]} is not in train/flops.py: MFU is not reported; add its dense BF16 peak",
                            False))
    if facts.transformer_engine:
        shared = (f", cuDNN from {facts.cudnn_path}" if facts.cudnn_path else "")
        result.append(Check("Transformer Engine", True, f"{facts.transformer_engine}{shared}", te_needed))
    else:
        result.append(Check("Transformer Engine", False, f"does not import ({facts.transformer_engine_error})" +
                            (f": {INSTALL}" if te_needed else f" (needed only for --precision {' or '.join(TE_MODES)})"),
                            te_needed))
    result.append(Check("flash-attn", facts.flash_attn is not None, facts.flash_attn or
                        "not installed (optional: attention.doc_mask on the GPU uses Transformer Engine without it)",
                        False))
    if facts.fp8_gemm is None:
        result.append(Check("FP8 GEMM", False, "not tried (needs a GPU of compute capability 8.9+ and Transformer "
                            "Engine)", precision == "fp8"))
    else:
        result.append(Check("FP8 GEMM", not facts.fp8_gemm,
                            "te.Linear forward and backward under FP8 autocast (delayed scaling) ran" if not facts.fp8_gemm
                            else f"failed ({facts.fp8_gemm}): {INSTALL}", precision == "fp8"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just doctor", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp8",
                        help="the precision to check for (the trainer's --precision); fp8 needs the most")
    args = parser.parse_args(argv)
    found = checks(gather(), args.precision)
    for check in found:
        print(check.line())
    failed = [check.name for check in found if check.needed and not check.ok]
    print(f"not ready for --precision {args.precision}: {', '.join(failed)}" if failed else
          f"ready for --precision {args.precision}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
