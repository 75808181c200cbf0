"""Explicit precision, DeepSeek-V3 style: which projection runs in FP8, and how.

`--precision fp8` builds every projection the map marks `fp8` as a Transformer Engine `te.Linear`
(FP32 master weights) run under `te.autocast` with the chosen recipe; projections marked `bf16`,
and embeddings, norms, softmax and the loss, stay torch modules under BF16 autocast (the loss in
FP32). `--precision te-bf16` builds the same TE modules but runs their GEMMs in BF16: it measures
what Transformer Engine itself costs, apart from FP8. Transformer Engine is imported only here and
only for those two modes. Anything that keeps FP8 from running is an error, never a silent
fallback to BF16.

TE projections run eagerly: under `torch.compile` they are graph breaks, and the torch code
between them (norms, RoPE, attention, SwiGLU, the loss) is compiled around them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from train.config import PROJECTIONS, TE_MODES, ConfigError, PrecisionConfig


@dataclass(frozen=True)
class LinearPlan:
    """What one projection will be built as."""

    name: str
    fmt: str  # the GEMM's format: "fp8", "bf16" or "fp32"
    is_te: bool  # a Transformer Engine module (else torch.nn.Linear)

    @property
    def kind(self) -> tuple[str, bool]:
        """Projections of one kind can share a fused GEMM (q, k, v; gate, up)."""
        return self.fmt, self.is_te

    @property
    def module(self) -> str:
        return "te.Linear" if self.is_te else "torch.nn.Linear"


class Precision:
    """The run's precision: module factory, autocast context and the table printed at start."""

    def __init__(self, config: PrecisionConfig, device: torch.device, torch_modules_only: bool = False):
        """`torch_modules_only` keeps the structure the map implies (which projections are fused)
        but builds torch modules: for sampling from an FP8-trained checkpoint without TE."""
        self.config = config
        self.mode = config.mode
        self.device = device
        self.te = None
        self.te_classes: dict[str, type] = {}  # TE module name -> its class with the cached-cast forward
        # Set by the trainer: True on a step's first micro-batch, False on the others, None outside
        # training. FP8 weight casts then happen once per optimizer step (the weights do not change
        # between micro-batches), TE's `is_first_microbatch` caching.
        self.first_microbatch: bool | None = None
        self._recipe = None
        if self.mode in TE_MODES and not torch_modules_only:
            self.te = require_transformer_engine(device, fp8=self.mode == "fp8")
            self.te_classes = {name: cached_cast(getattr(self.te, name), self)
                               for name in ("Linear", "LayerNormLinear", "LayerNormMLP")}

    def plan(self, name: str) -> LinearPlan:
        marked = self.config.map[name] == "fp8"
        if self.mode == "fp8":
            return LinearPlan(name, "fp8" if marked else "bf16", marked)
        if self.mode == "te-bf16":
            return LinearPlan(name, "bf16", marked)
        return LinearPlan(name, self.mode, False)

    def linear(self, name: str, in_features: int, out_features: int) -> nn.Module:
        if self.plan(name).is_te and self.te is not None:
            return self.te_classes["Linear"](in_features, out_features, bias=False, params_dtype=torch.float32,
                                  device=self.device)
        return nn.Linear(in_features, out_features, bias=False, device=self.device)

    @property
    def fuses_norms(self) -> bool:
        """Norms built into Transformer Engine projections (precision.fused_norms), not torch RMSNorms."""
        return self.config.fused_norms and self.te is not None

    def norm_linear(self, in_features: int, out_features: int, eps: float) -> nn.Module:
        """RMSNorm then the fused q, k, v projection, as one TE LayerNormLinear (precision.fused_norms)."""
        return self.te_classes["LayerNormLinear"](in_features, out_features, eps=eps, bias=False,
                                                  normalization="RMSNorm", params_dtype=torch.float32,
                                                  device=self.device)

    def norm_mlp(self, d_model: int, ffn_dim: int, eps: float) -> nn.Module:
        """RMSNorm, gate and up, SwiGLU (silu of the first half times the second, as FeedForward) and down,
        as one TE LayerNormMLP (precision.fused_norms)."""
        return self.te_classes["LayerNormMLP"](d_model, ffn_dim, eps=eps, bias=False, normalization="RMSNorm",
                                               activation="swiglu", params_dtype=torch.float32, device=self.device)

    def recipe(self):
        """One recipe object per run: the CUDA graphs capture under the one the steps run under."""
        if self._recipe is None:
            self._recipe = self.make_recipe()
        return self._recipe

    def make_recipe(self):
        from transformer_engine.common import recipe

        if self.config.recipe == "delayed":
            return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_history_len=self.config.amax_history,
                                         amax_compute_algo="max")
        if self.config.recipe == "current":
            return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
        return recipe.Float8BlockScaling()

    def autocast(self, group=None):
        """The forward context of one micro-batch."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        bf16 = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        if self.mode != "fp8":
            return bf16
        stack = contextlib.ExitStack()
        stack.enter_context(bf16)
        if hasattr(self.te, "autocast"):  # TE >= 2.9
            stack.enter_context(self.te.autocast(enabled=True, recipe=self.recipe(), amax_reduction_group=group))
        else:
            stack.enter_context(self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe(), fp8_group=group))
        return stack

    def table(self) -> str:
        rows = [f"  {name:<8} {self.plan(name).fmt:<5} {self.plan(name).module}" for name in PROJECTIONS]
        recipe = f", recipe {self.config.recipe}" if self.mode == "fp8" else ""
        fused = (["  norms    fused into te.LayerNormLinear (q, k, v) and te.LayerNormMLP (gate, up, down)"]
                 if self.fuses_norms else [])
        return "\n".join([f"precision {self.mode}{recipe}:", *rows, *fused,
                          "  embeddings, norms, softmax, loss: never FP8 (loss in fp32)"])

    def check_shapes(self, shapes: dict[str, tuple[int, int]], tokens_per_micro_batch: int, where: str) -> None:
        """FP8 GEMMs need dims divisible by 16 and token counts divisible by 8 (128 for block scaling)."""
        if self.mode != "fp8":
            return
        multiple = token_multiple(self.config)
        if tokens_per_micro_batch % multiple:
            raise ConfigError(f"{where}: FP8 ({self.config.recipe}) needs micro_batch x seq_len divisible by {multiple}, "
                              f"got {tokens_per_micro_batch}; change micro_batch or seq_len")
        block = 128 if self.config.recipe == "block" else 16
        for name, (fan_in, fan_out) in shapes.items():
            if self.plan(name).is_te and (fan_in % block or fan_out % block):
                raise ConfigError(f"FP8 ({self.config.recipe}) needs the dims of `{name}` ({fan_in}x{fan_out}) divisible "
                                  f"by {block}; change the model width or set precision.map.{name} = \"bf16\"")


def token_multiple(config: PrecisionConfig) -> int:
    """What micro_batch x seq_len must be a multiple of: 8 tokens for FP8 GEMMs, 128 with block scaling."""
    if config.mode != "fp8":
        return 1
    return 128 if config.recipe == "block" else 8


def import_transformer_engine():
    """transformer_engine.pytorch, sharing torch's cuDNN; ImportError where it is not installed."""
    use_torchs_cudnn()
    import transformer_engine.pytorch as te

    return te


def use_torchs_cudnn(maps: Path = Path("/proc/self/maps")) -> None:
    """Make Transformer Engine share the cuDNN that torch loaded, unless the user chose one
    ($CUDNN_HOME or $CUDNN_PATH).

    TE's core library links cuDNN's sub-libraries by name, and the loader would find the system's
    copies (cuDNN 9.14 on our H100 image; torch ships 9.19). With two builds mixed in one process,
    torch's attention stops choosing cuDNN and runs flash-attention 2, about 40% slower on an H100
    (docs/log.md, "TE on torch's cuDNN"). Loading torch's own sub-libraries first, globally, makes every later lookup by name
    resolve to them, and $CUDNN_PATH makes TE's own search for libcudnn find torch's first."""
    if "CUDNN_HOME" in os.environ or "CUDNN_PATH" in os.environ or not maps.exists():
        return
    torch.backends.cudnn.version()  # loads torch's libcudnn if nothing has yet
    paths = (Path(line.split()[-1]) for line in maps.read_text().splitlines())
    lib = next((path for path in paths if path.name.startswith("libcudnn.so")), None)
    if lib is None:
        return
    os.environ["CUDNN_PATH"] = str(lib.parent)
    for sub in sorted(lib.parent.glob("libcudnn_*.so*"), key=lambda path: "_graph." not in path.name):
        ctypes.CDLL(str(sub), mode=ctypes.RTLD_GLOBAL)  # the graph library first: the others link it


def cached_cast(te_module: type, precision: "Precision") -> type:
    """The TE module class whose forward passes the run's micro-batch position as `is_first_microbatch`,
    kept out of `torch.compile` graphs (TE manages its own FP8 state and kernels)."""

    class CachedCast(te_module):
        @torch.compiler.disable
        def forward(self, inp, *args, **kwargs):
            return super().forward(inp, *args, is_first_microbatch=precision.first_microbatch, **kwargs)

    CachedCast.__name__ = f"CachedCast{te_module.__name__}"
    return CachedCast


def require_transformer_engine(device: torch.device, fp8: bool):
    if device.type != "cuda":
        raise ConfigError("FP8 needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); none is "
                          "available here: use --precision bf16 (or fp32 on the CPU)" if fp8 else
                          "te-bf16 needs a CUDA GPU (Transformer Engine); use --precision bf16 (or fp32 on the CPU)")
    major, minor = torch.cuda.get_device_capability(device)
    if fp8 and (major, minor) < (8, 9):
        raise ConfigError(f"FP8 needs compute capability 8.9+, this GPU has {major}.{minor}: use --precision bf16")
    try:
        te = import_transformer_engine()
    except ImportError as err:
        raise ConfigError(f"{'FP8' if fp8 else 'te-bf16'} needs NVIDIA Transformer Engine, which does not import here "
                          f"({err}): see README.md, section GPU, then check with `just doctor`; or use --precision "
                          f"bf16") from None
    return te
