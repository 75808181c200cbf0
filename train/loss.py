"""The training loss, summed over the targets: cross-entropy over the logits, or the head and the loss
fused per chunk of tokens (`run.loss`).

`plain`: the model writes the logits (B, T, V) in the autocast dtype and the loss upcasts them to FP32
(compiled on a GPU, so the FP32 copy is never written); backward writes their gradient (B, T, V) too.
At a 65,536-token vocabulary and 65,536 tokens per micro-batch each of the two is 8.6 GB in BF16, and
they grow with the vocabulary.

`chunked`: the model stops at the head's input and `ChunkedLinearCrossEntropy` runs the head's GEMM,
the loss and its gradient chunk by chunk over the tokens, keeping only the gradients of the head's
input and weight: the loss's memory is one chunk's logits (Liger-Kernel's fused linear cross-entropy;
the "cut cross-entropy" idea). It runs the same three GEMMs as the plain head, all in the forward
pass; backward only scales the two stored gradients. The head must be a torch weight: a Transformer
Engine FP8 head is not something this code can multiply by, so that combination is a config error
(train/config.py), never a silent BF16 head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from train.config import RunConfig
from train.loader import IGNORE_INDEX
from train.model import cross_entropy

ChunkGradient = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def chunk_loss_and_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: its summed cross-entropy (computed in FP32) and the gradient of that sum with respect
    to the logits (softmax minus one-hot, zero on ignored targets), in the logits' dtype."""
    logits32 = logits.float()
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits32, dim=-1)
    picked = logits32.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    grad = torch.exp(logits32 - lse.unsqueeze(1))
    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
    return loss, (grad * valid.unsqueeze(1)).to(logits.dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) without the full logits: (N, d) hidden, (V, d)
    weight, (N,) targets. The GEMMs run in the hidden's dtype (BF16 under autocast), the softmax in
    FP32, the weight's gradient accumulates in FP32 over the chunks."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                chunk_gradient: ChunkGradient) -> torch.Tensor:
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            chunk_loss, grad_logits = chunk_gradient(h @ w.t(), targets[start:start + chunk_tokens])
            loss += chunk_loss
            grad_hidden[start:start + chunk_tokens] = grad_logits @ w
            grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss, None, None, None


class Loss:
    """The run's loss on what its model returns (`forward_kwargs` says which), summed over the targets."""

    def __init__(self, run: RunConfig, model: torch.nn.Module, compiled: bool):
        """`model`: the Transformer itself (not a compiled or DDP wrapper), whose head the chunked loss
        applies. `compiled`: on a GPU the FP32 softmax and its gradient fuse into a few kernels."""
        self.chunked = run.loss == "chunked"
        self.chunk_tokens = run.loss_chunk_tokens
        self.model = model
        self.forward_kwargs = {"head": False} if self.chunked else {}
        self.cross_entropy = torch.compile(cross_entropy) if compiled else cross_entropy
        self.chunk_gradient = torch.compile(chunk_loss_and_gradient) if compiled else chunk_loss_and_gradient

    def __call__(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.chunked:
            return self.cross_entropy(output, targets, reduction="sum")
        hidden, targets = output.reshape(-1, output.shape[-1]), targets.reshape(-1)
        weight = self.model.head_weight()
        if torch.is_grad_enabled():
            return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, self.chunk_tokens, self.chunk_gradient)
        w = weight.to(hidden.dtype)  # evaluation: the loss alone, chunk by chunk
        return sum(self.cross_entropy(hidden[start:start + self.chunk_tokens] @ w.t(),
                                      targets[start:start + self.chunk_tokens], reduction="sum")
                   for start in range(0, hidden.shape[0], self.chunk_tokens))
