"""The layer stack as CUDA graphs (`run.cuda_graphs`): one forward and one backward graph per
micro-batch shape, replayed each micro-batch.

Why: a Transformer Engine projection is a graph break for `torch.compile`, so an FP8 step launches
its layers piece by piece from Python: four TE projections per block, each with its own casts,
between compiled regions. At `yxanul-197m` (28 thin layers) the GPU waited on those launches for
27% of its FP8 step (docs/benchmarks.md). Captured once, the whole stack replays as two graph
launches, forward and backward, whatever the number of layers.

How: Transformer Engine's `make_graphed_callables`, which captures its modules with their FP8
state; delayed scaling's amax and scale updates run outside the graph on the tensors the graph
reads, as they do eagerly. The torch code between projections stays compiled inside the graph.
Only training with grad runs the graph: evaluation (model.eval()) and generation run the blocks
as before. Not for document masking (its attention takes a new document layout every batch) nor
DDP (not measured); the trainer keeps the blocks eager there and says so at start.

The graphs cast the FP8 weights on every micro-batch (TE's per-step weight caching is not
captured): about 1% of base's step, per `just bench-linear`'s "cast each pass" column.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from train.config import TE_MODES

# (stack module, sample args) -> the same module, its forward now replaying graphs
MakeGraphed = Callable[[nn.Module, tuple[torch.Tensor, ...]], nn.Module]


class LayerStack(nn.Module):
    """The model's blocks without document layout or KV cache: what the graphs capture. Holds the
    model's own blocks (the model's state dict does not change)."""

    def __init__(self, blocks: nn.ModuleList, compiled: bool):
        super().__init__()
        self.blocks = blocks
        self.run = torch.compile(self.loop) if compiled else self.loop

    def loop(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cos, sin, None)
        return x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.run(x, cos, sin)


class GraphedLayers:
    """Callable in place of the block loop (Transformer.graphed_blocks): captures the stack at the
    first micro-batch of each shape (a curriculum stage), releasing the previous shape's graphs.

    `after_capture` runs after each capture; the trainer resets the allocator's peak there: while
    capturing, the graph pool's blocks count as allocated, and from then on peak_memory_bytes
    (train/devices.py) counts the pool itself, so the capture's peak would count it twice."""

    def __init__(self, blocks: nn.ModuleList, compiled: bool, make_graphed: MakeGraphed,
                 after_capture: Callable[[], None] = lambda: None):
        self.stack = LayerStack(blocks, compiled)
        self.make_graphed = make_graphed
        self.after_capture = after_capture
        self.shape: tuple | None = None

    @torch.compiler.disable
    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = (tuple(x.shape), x.dtype, tuple(cos.shape))
        if shape != self.shape:
            self.release()
            sample = (torch.randn_like(x).requires_grad_(x.requires_grad), cos.detach().clone(), sin.detach().clone())
            self.make_graphed(self.stack, sample)
            self.after_capture()
            self.shape = shape
        return self.stack(x, cos, sin)

    def release(self) -> None:
        """Free the captured graphs and their memory pool; the stack runs its own forward again."""
        if self.shape is None:
            return
        self.stack.reset()
        for name in ("forward", "reset", "backward_dw"):  # set on the instance by make_graphed_callables
            self.stack.__dict__.pop(name, None)
        self.shape = None


def transformer_engine_graphs(precision) -> MakeGraphed:
    """Capture with Transformer Engine's `make_graphed_callables` under the run's recipe. TE refuses
    torch autocast's weight-cast cache during capture, so the capture runs in a BF16 autocast without
    it; the weights are cast once per micro-batch anyway (`first_microbatch` None while capturing)."""

    def make_graphed(stack: nn.Module, sample: tuple[torch.Tensor, ...]) -> nn.Module:
        fp8 = precision.mode == "fp8"
        first, precision.first_microbatch = precision.first_microbatch, None
        try:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False):
                return precision.te.make_graphed_callables(stack, sample, enabled=fp8,
                                                           recipe=precision.recipe() if fp8 else None)
        finally:
            precision.first_microbatch = first

    return make_graphed


def graphs_unused_because(cuda_graphs: bool, device: torch.device, mode: str, doc_mask: bool,
                          world_size: int) -> str | None:
    """Why the run keeps its blocks eager, or None when it captures them."""
    if not cuda_graphs:
        return "run.cuda_graphs = false"
    if device.type != "cuda":
        return "no GPU"
    if mode not in TE_MODES:
        return f"precision {mode}: compiled whole, no graph breaks to remove"
    if doc_mask:
        return "attention.doc_mask: a new document layout every batch"
    if world_size > 1:
        return "DDP: not measured with graphs"
    return None
