"""A decoder-only transformer: RoPE, SwiGLU, grouped-query attention, pre-norm RMSNorm.

Optional factorized embeddings (V x r, then r -> d; the head d -> r -> V) and tied embeddings.
Every projection is built by the run's `Precision`, which decides torch or Transformer Engine per
projection name (q, k, v, o, gate, up, down, lm_head). Q, K and V are one fused projection when
they share a precision, separate otherwise; gate and up likewise.

Attention: PyTorch SDPA (flash / cuDNN kernels) by default. With document masking, a varlen
kernel on the GPU (flash-attn when installed, else Transformer Engine's thd attention) and a
block-diagonal causal mask on the CPU. Generation uses a static KV cache (`KVCache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ConfigError, ModelConfig

VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises in the residual's FP32 and hands the next GEMM the autocast dtype. The cast
        then fuses into the compiled norm, forward and backward; left to a Transformer Engine
        projection (a graph break) it would be two extra eager passes over the activations."""
        y = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return y.to(torch.get_autocast_dtype(y.device.type)) if torch.is_autocast_enabled(y.device.type) else y


def rope_tables(head_dim: int, max_positions: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos/sin: (B, T, D/2), rotating the two halves of each head."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class DocLayout:
    """Where documents start inside a batch of packed rows (from the loader's doc_lens)."""

    doc_lens: torch.Tensor  # (D,) int32, each row's segments summing to T
    batch: int
    seq_len: int

    def positions(self) -> torch.Tensor:
        """Position of every token inside its own document, restarting at 0: (B, T)."""
        lens = self.doc_lens.long()
        starts = torch.cumsum(lens, 0) - lens
        flat = torch.arange(self.batch * self.seq_len, device=lens.device) - torch.repeat_interleave(starts, lens)
        return flat.view(self.batch, self.seq_len)

    def cu_seqlens(self) -> torch.Tensor:
        return F.pad(torch.cumsum(self.doc_lens, 0, dtype=torch.int32), (1, 0))

    def block_causal_mask(self) -> torch.Tensor:
        """(B, 1, T, T) boolean: True where a query may attend (same document, not in the future)."""
        doc_of = torch.repeat_interleave(torch.arange(self.doc_lens.numel(), device=self.doc_lens.device),
                                         self.doc_lens.long()).view(self.batch, self.seq_len)
        same = doc_of.unsqueeze(2) == doc_of.unsqueeze(1)
        causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=same.device).tril()
        return (same & causal).unsqueeze(1)


class KVCache:
    """Keys and values of every layer for generation, preallocated once to `max_len` slots for a
    batch: shapes never change, so a decode step can be captured as a CUDA graph.

    The token at position p of a row is stored in slot p of that row and sees slots 0..p, so rows
    at different positions (prompts of different lengths) share one batch. Slots beyond a row's
    position may hold anything (padding, an earlier generation): they are masked, and slot p is
    written before anything reads it."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)  # (B, H, L, D): SDPA's layout, no transpose
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.rows = torch.arange(batch, device=device)[:, None]
        self.slots = torch.arange(max_len, device=device)

    def visible(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, L) boolean: slot j is visible to the token at position p when j <= p."""
        return (self.slots <= positions[..., None]).unsqueeze(1)


class CacheStep(NamedTuple):
    """One forward through a KVCache: where each token stands (its slot) and the slots it sees."""

    cache: KVCache
    positions: torch.Tensor  # (B, T)
    visible: torch.Tensor  # (B, 1, T, L), from KVCache.visible

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, T, H_kv, D) at their positions' slots, then attend q (B, T, H, D) to the
        visible slots: (B, H, T, D)."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[self.cache.rows, :, self.positions] = k
        values[self.cache.rows, :, self.positions] = v
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.visible, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, precision, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.layer = layer
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.fused = len({precision.plan(n).kind for n in ("q", "k", "v")}) == 1
        if precision.fuses_norms:  # the block's attn_norm is this module's: x arrives un-normalised
            self.qkv = precision.norm_linear(cfg.d_model, q_out + 2 * kv_out, cfg.norm_eps)
        elif self.fused:
            self.qkv = precision.linear("q", cfg.d_model, q_out + 2 * kv_out)
        else:
            self.q = precision.linear("q", cfg.d_model, q_out)
            self.k = precision.linear("k", cfg.d_model, kv_out)
            self.v = precision.linear("v", cfg.d_model, kv_out)
        self.o = precision.linear("o", q_out, cfg.d_model)
        self.varlen = None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        if self.fused:
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv(x).split([q_out, kv_out, kv_out], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return (q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim),
                v.view(B, T, self.n_kv_heads, self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: DocLayout | None,
                cache: CacheStep | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v)
        elif layout is not None and x.is_cuda:
            y = self.varlen_attention(q, k, v, layout).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        else:
            mask = layout.block_causal_mask() if layout is not None else None
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))

    def varlen_attention(self, q, k, v, layout: DocLayout) -> torch.Tensor:
        """Causal attention within documents on the GPU: flash-attn if installed, else TE (thd)."""
        cu = layout.cu_seqlens()
        max_len = int(layout.doc_lens.max())
        flat = lambda t: t.reshape(-1, t.shape[2], t.shape[3])  # noqa: E731  (B*T, heads, dim)
        dtype = torch.bfloat16
        q, k, v = flat(q).to(dtype), flat(k).to(dtype), flat(v).to(dtype)
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        if self.varlen is None:
            from train.precision import import_transformer_engine

            try:
                te = import_transformer_engine()
            except ImportError:
                raise ConfigError("attention.doc_mask on the GPU needs flash-attn or Transformer Engine; install one "
                                  "or set attention.doc_mask = false") from None
            self.varlen = te.DotProductAttention(self.n_heads, self.head_dim, num_gqa_groups=self.n_kv_heads,
                                                 qkv_format="thd", attn_mask_type="padding_causal")
        return self.varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, precision):
        super().__init__()
        self.hidden = cfg.ffn_dim
        self.fused = precision.plan("gate").kind == precision.plan("up").kind
        self.mlp = None
        if precision.fuses_norms:  # norm, gate and up, SwiGLU and down in one TE module
            self.mlp = precision.norm_mlp(cfg.d_model, cfg.ffn_dim, cfg.norm_eps)
            return
        if self.fused:
            self.gate_up = precision.linear("gate", cfg.d_model, 2 * cfg.ffn_dim)
        else:
            self.gate = precision.linear("gate", cfg.d_model, cfg.ffn_dim)
            self.up = precision.linear("up", cfg.d_model, cfg.ffn_dim)
        self.down = precision.linear("down", cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp(x)
        gate, up = self.gate_up(x).chunk(2, dim=-1) if self.fused else (self.gate(x), self.up(x))
        return self.down(F.silu(gate) * up)


# precision.fused_norms: Transformer Engine's parameter names inside a block -> the unfused model's, which
# checkpoints, export and sampling use
FUSED_NORM_NAMES = {"attn.qkv.layer_norm_weight": "attn_norm.weight", "ffn.mlp.layer_norm_weight": "ffn_norm.weight",
                    "ffn.mlp.fc1_weight": "ffn.gate_up.weight", "ffn.mlp.fc2_weight": "ffn.down.weight"}


def to_unfused_names(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for fused, plain in FUSED_NORM_NAMES.items():
        if prefix + fused in state_dict:
            state_dict[prefix + plain] = state_dict.pop(prefix + fused)


def to_fused_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for fused, plain in FUSED_NORM_NAMES.items():
        if prefix + plain in state_dict:
            state_dict[prefix + fused] = state_dict.pop(prefix + plain)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, precision, layer: int):
        super().__init__()
        fused = precision.fuses_norms  # the norms live inside the TE projections
        self.attn_norm = nn.Identity() if fused else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, precision, layer)
        self.ffn_norm = nn.Identity() if fused else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg, precision)
        if fused:
            self.register_state_dict_post_hook(to_unfused_names)
            self.register_load_state_dict_pre_hook(to_fused_names)

    def forward(self, x, cos, sin, layout, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, layout, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, precision, max_positions: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = padded_vocab(vocab_size)
        rank = cfg.embed_rank
        if cfg.tie_embeddings and precision.plan("lm_head").is_te:
            raise ConfigError("tied embeddings cannot run the head in FP8: set precision.map.lm_head = \"bf16\" "
                              "or model.tie_embeddings = false")
        self.embed = nn.Embedding(self.vocab_size, rank or cfg.d_model)
        self.embed_proj = nn.Linear(rank, cfg.d_model, bias=False) if rank else None
        self.blocks = nn.ModuleList(Block(cfg, precision, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head_proj = nn.Linear(cfg.d_model, rank, bias=False) if rank else None
        self.lm_head = None if cfg.tie_embeddings else precision.linear("lm_head", rank or cfg.d_model, self.vocab_size)
        self.max_positions = max_positions
        # Set by the trainer to replay the blocks as CUDA graphs in training (train/graphs.py); not a module.
        self.graphed_blocks: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, max_positions, cfg.rope_theta, self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if param.dim() == 2:
                residual_out = name.endswith(("o.weight", "down.weight", "fc2_weight"))
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if residual_out else 1.0
                nn.init.normal_(param, mean=0.0, std=std * scale)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (and the factorized head's d -> r projection): what the head multiplies."""
        h = self.norm(h)
        return self.head_proj(h) if self.head_proj is not None else h

    def head_weight(self) -> torch.Tensor:
        """The head's V x d (or V x r) weight: the input embedding's when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.head_input(h)
        return F.linear(h, self.head_weight()) if self.lm_head is None else self.lm_head(h)

    def forward(self, idx: torch.Tensor, doc_lens: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); doc_lens restarts positions and masks per document.
        With a cache, `positions` (B, T) say where each token stands in its row (default 0..T-1,
        a prefill), which is also its slot in the cache. head=False stops before the head, for a
        loss that applies it itself (train/loss.py)."""
        x = self.hidden(idx, doc_lens, cache, positions)
        return self.logits(x) if head else self.head_input(x)

    def hidden(self, idx: torch.Tensor, doc_lens: torch.Tensor | None = None, cache: KVCache | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output (B, T, d), before the final norm and the head: generation takes
        the head of one position per row only."""
        B, T = idx.shape
        layout = DocLayout(doc_lens, B, T) if doc_lens is not None else None
        if layout is not None:
            positions = layout.positions()
        elif positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        step = CacheStep(cache, positions, cache.visible(positions)) if cache is not None else None
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(idx)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        if self.graphed_blocks is not None and layout is None and step is None and self.training \
                and torch.is_grad_enabled():
            return self.graphed_blocks(x, cos, sin)
        for block in self.blocks:
            x = block(x, cos, sin, layout, step)
        return x

    def matmul_params(self) -> int:
        """Parameters that do matrix multiplies per token (for FLOPs): all but the input embedding."""
        embed = self.embed.weight.numel()
        total = sum(p.numel() for p in self.parameters())
        return total - embed + (embed if self.lm_head is None else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul parameter plus attention (PaLM's accounting)."""
        cfg = self.cfg
        return 6 * self.matmul_params() + 12 * cfg.n_layers * cfg.d_model * seq_len


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss in FP32, padding targets (-100) ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)
