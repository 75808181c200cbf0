"""`just sample`: generate French text from a checkpoint, at GPU speed on a GPU.

One prompt (`--prompt`) streams its continuation as it is generated. A file of prompts (`--prompts
FILE`, one per line) is generated in batches of `--batch-size` and printed as JSON lines, one per
prompt. Each row stops at its own `<|endoftext|>`. The report gives tokens/s (after the one-time
compilation, whose seconds it also gives) and, per sample, the mean token entropy and the repeated
4-gram rate (signals of degeneration).

How, on a GPU (gpt-fast's recipe): the weights of every projection are cast to BF16 once at load
(autocast then has nothing to re-cast on each call); the KV cache is allocated once for the batch;
the prompts are prefilled in one forward; then every new token is one decode step of fixed shapes
(the compiled forward of the previous token, temperature, top-k, top-p and the draw) captured as
one CUDA graph and replayed, drawing from a torch.Generator on the device. The host reads the
sampled ids every few tokens, a window behind the device, to stream them and to see which rows
have ended. On the CPU the same steps run eagerly in FP32. A checkpoint trained in FP8 loads
its FP32 master weights into plain torch modules.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline import HelpFormatter, layout
from pipeline.manifest import sha256_file
from train import checkpoint, devices
from train.config import ConfigError, TrainConfig, from_dict
from train.model import KVCache, Transformer
from train.precision import Precision


class SampleError(ValueError):
    """Input generation cannot run with; the message says what to change."""


@dataclass(frozen=True)
class SampleSettings:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 0.95  # 1: off
    seed: int = 0

    def check(self) -> None:
        """A SampleError for a setting without meaning, rather than silently doing something else."""
        if self.max_new_tokens < 1:
            raise SampleError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise SampleError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise SampleError(f"--top-k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SampleError(f"--top-p must be above 0 and at most 1 (1: off), got {self.top_p}")


@dataclass
class Generation:
    tokens: list[int]
    text: str
    tokens_per_s: float
    mean_entropy: float  # nats, of the model's next-token distribution at each generated step
    repeated_4gram_rate: float  # share of generated 4-grams that already occurred earlier in the sample


@dataclass
class Batch:
    """What one `Decoder.generate` call produced, per prompt."""

    tokens: list[list[int]]  # the new ids, without the end-of-text token
    entropies: list[list[float]]  # nats, at each step that chose a kept token or the end-of-text token
    seconds: float  # prefill and decoding, the host's last read included

    @property
    def tokens_per_s(self) -> float:
        return sum(map(len, self.tokens)) / max(self.seconds, 1e-9)


def build_model(config: TrainConfig, vocab_size: int, device: torch.device,
                weights: dict[str, torch.Tensor] | None = None) -> Transformer:
    """A model for generation on `device`, as plain torch modules (FP8-trained projections too).

    On a GPU the projections' weights become BF16 once, here: the forward runs under BF16 autocast
    as in training, which re-cast every FP32 weight on every call; with BF16 weights it has nothing
    to cast and computes the same GEMMs. Embeddings and norms stay FP32 as in training (a tied head
    is the embedding, so it keeps being cast per call)."""
    precision = Precision(config.precision, device, torch_modules_only=True)
    model = Transformer(config.model, vocab_size, precision, max(stage.seq_len for stage in config.curriculum))
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise checkpoint.CheckpointError(f"the weights do not fit the model of their config "
                                             f"({str(err).splitlines()[0][:150]})") from None
    model.to(device).eval()
    if device.type == "cuda":
        cast_projections(model, torch.bfloat16)
    return model


def cast_projections(model: Transformer, dtype: torch.dtype) -> None:
    """The weights of every projection in `dtype`, once: what autocast to `dtype` computes with."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = module.weight.data.to(dtype)


def load_model(path: Path, device: torch.device) -> tuple[Transformer, checkpoint.Checkpoint]:
    """The model of any checkpoint (a run's best/ or step_N/ folder, or an earlier-format .pt file),
    ready for generation (see build_model); CheckpointError when it cannot be read."""
    found = checkpoint.load(path)
    try:
        config = from_dict(found.config)
    except ConfigError as err:
        raise checkpoint.CheckpointError(f"{found.path} holds a config this version cannot read: {err}") from None
    return build_model(config, found.vocab_size, device, found.weights), found


def choose(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_k: int,
           top_p: float) -> torch.Tensor:
    """The next token of each row from FP32 logits (B, V): the argmax at temperature 0, else a draw
    after temperature, top-k and top-p (the smallest set of tokens whose mass reaches top_p).

    The draw is argmax(p / E) with E ~ Exp(1) drawn per token (`noise`, B x V): it picks token i
    with probability p_i, like torch.multinomial, without a host sync. It is computed as
    argmax(logit - log E), the same argmax without the softmax (its normaliser is common to a row)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        outside = mass_before(probs) >= top_p  # the mass before a token already reaches p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, -math.inf))
    return (logits - noise.clamp_min(torch.finfo(noise.dtype).tiny).log()).argmax(-1)


@torch.compiler.disable
def mass_before(probs: torch.Tensor) -> torch.Tensor:
    """The probability mass before each token of rows sorted by probability (B, V). Left out of
    the compiled sampling: torch 2.11's Inductor fails to compile this cumulative sum over a batch
    of 65,536-token rows (a split scan); eager, it is one library kernel."""
    return probs.cumsum(-1) - probs


def next_tokens(logits: torch.Tensor, noise: torch.Tensor | None, vocab_size: int, temperature: float, top_k: int,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the chosen ids (B,), the entropy (B,) in nats of the model's own distribution) from the logits
    (B, V) of the padded vocabulary: ids beyond the tokenizer's `vocab_size` are never chosen."""
    logits = logits[:, :vocab_size].float()
    log_probs = torch.log_softmax(logits, -1)
    return choose(logits, noise, temperature, top_k, top_p), -(log_probs.exp() * log_probs).sum(-1)


def decode_logits(model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) of each row's last token (B, 1) at its position (B,), through the cache.
    Shapes never change from step to step: one compilation serves every step. Runs under the
    caller's autocast, as the trainer's compiled forward does."""
    return model(tokens, cache=cache, positions=positions[:, None])[:, -1]


PREFILL_MULTIPLE = 32  # prompts are right-padded to a multiple of this many tokens (Decoder.prefill_width)


class Decoder:
    """Generation for one model and batch size: the static KV cache, the buffers a decode step
    reads and advances, and on a GPU the step captured as a CUDA graph, kept from call to call so
    each sampling setting is captured once.

    Prompts of different lengths share a batch right-padded, exactly: row b's prompt of n_b tokens
    is prefilled at positions 0..n_b-1 (causal attention: no prompt token sees the padding after
    it) and its first new token comes from position n_b-1. Each decode step then puts row b's
    token at its own position n_b+s, in its own cache slot, seeing slots 0..n_b+s only; a padding
    slot is overwritten by the row's own token before the row can see it. Each row thus computes
    what it would alone. Rows that ended keep stepping (the shapes stay fixed) and are ignored;
    a batch smaller than `batch_size` is filled with one-token dummy rows.

    Why a CUDA graph of our own rather than `torch.compile(mode="reduce-overhead")`: that mode
    checks the guards and the cudagraph tree's bookkeeping of ~100 inputs on every call, about as
    long as the step's GPU work at batch 1 (H100, `small`: 1.06 ms per step for 0.55 ms on the
    GPU). Here the forward and the sampling are compiled (Inductor fuses their small kernels) and
    all of it, the advance of the tokens and positions included, is one graph that a step replays
    with a single launch."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int | None = None, vocab_size: int | None = None,
                 compile: bool | None = None):
        """max_len: the cache's slots, at least the longest prompt plus the new tokens (default:
        the model's context). vocab_size: the tokenizer's (default: the model's padded one).
        compile: compile the forward and capture the step as a CUDA graph (default and only on a GPU)."""
        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.max_len = max_len or model.max_positions
        if self.max_len > model.max_positions:
            raise SampleError(f"a cache of {self.max_len} slots exceeds the model's context ({model.max_positions})")
        self.compiled = self.device.type == "cuda" if compile is None else compile
        if self.compiled and self.device.type != "cuda":
            raise SampleError("--compile captures the decode step as a CUDA graph: it needs a GPU (--device cuda)")
        self.vocab_size = vocab_size or model.vocab_size
        cfg = model.cfg
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # what autocast hands k and v
        self.cache = KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, self.max_len,
                             self.device, dtype)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.noise = torch.empty(batch_size, self.vocab_size, device=self.device)
        self.forward = torch.compile(decode_logits, fullgraph=True, dynamic=False) if self.compiled else decode_logits
        self.next_tokens = torch.compile(next_tokens, dynamic=False) if self.compiled else next_tokens
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # The host reads the sampled ids every this many tokens (see IdReader): on the CPU token by token.
        self.read_every = 16 if self.device.type == "cuda" else 1

    def step(self, noise: torch.Tensor | None, sampling: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row from `self.tokens` at `self.positions` (its id (B,) and entropy (B,)),
        which then become the new token and the next position."""
        logits = self.forward(self.model, self.cache, self.tokens, self.positions)
        token, entropy = self.next_tokens(logits, noise, *sampling)
        self.tokens.copy_(token[:, None])
        self.positions.add_(1)
        return token, entropy

    def graphed_step(self, noise: torch.Tensor | None, sampling: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` as a replay of its CUDA graph, captured on first use for these sampling settings.

        The capture follows torch.cuda.graph's rules: one warm-up step on a side stream first
        (compilation, autotuning, library handles), autocast without its weight cache. The warm-up
        computes the real step (same token, same slot written), then its advance is undone."""
        if sampling not in self.graphs:
            tokens, positions = self.tokens.clone(), self.positions.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                with torch.cuda.stream(side):
                    self.step(noise, sampling)
                torch.cuda.current_stream(self.device).wait_stream(side)
                self.tokens.copy_(tokens)
                self.positions.copy_(positions)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    token, entropy = self.step(noise, sampling)
            self.graphs[sampling] = graph, token, entropy
        graph, token, entropy = self.graphs[sampling]
        graph.replay()
        return token, entropy

    def warm_up(self, settings: SampleSettings, prompt_tokens: int = 1) -> float:
        """Compile and capture the decode step for these settings, and run a prefill of prompts of
        `prompt_tokens` tokens, before anything is timed; seconds. The first prefill of a shape
        costs far more than the next ones (H100, `small`: 45-800 ms against 10 ms: library plans
        and kernel choices made once per shape), so the warm-up takes the prompts' own."""
        start = time.perf_counter()
        steps = min(4, self.max_len - prompt_tokens)
        self.generate([[0] * prompt_tokens], replace(settings, max_new_tokens=steps))
        return time.perf_counter() - start

    def prefill_width(self, longest: int) -> int:
        """The prefill's length for prompts of at most `longest` tokens: rounded up to a multiple of
        PREFILL_MULTIPLE (within the cache), so that batches of prompts of different lengths share a
        few shapes, each paying its first-time cost once. Right padding is exact (see the class)."""
        return min(self.max_len, -(-longest // PREFILL_MULTIPLE) * PREFILL_MULTIPLE)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: SampleSettings, eot_id: int | None = None,
                 on_tokens: Callable[[list[list[int]]], None] | None = None) -> Batch:
        """Continue each prompt (token ids; at most `batch_size` prompts) by settings.max_new_tokens
        tokens, a row ending early at its first `eot_id` (None: never). `on_tokens(rows)` is called
        with every row's ids so far each time the host reads them."""
        settings.check()
        count, longest, steps = len(prompts), max(map(len, prompts), default=0), settings.max_new_tokens
        if not 1 <= count <= self.batch_size or min(map(len, prompts)) < 1:
            raise SampleError(f"generate takes 1 to {self.batch_size} prompts of at least one token each")
        if longest + steps > self.max_len:
            raise SampleError(f"a prompt of {longest} tokens and {steps} new ones exceed the cache's {self.max_len} "
                              "slots")
        B, device = self.batch_size, self.device
        width = self.prefill_width(longest)
        rows = [p + [0] * (width - len(p)) for p in prompts] + [[0] * width] * (B - count)
        lengths = torch.tensor([len(p) for p in prompts] + [1] * (B - count), device=device)
        sampling = (self.vocab_size, settings.temperature, settings.top_k, settings.top_p)
        noise = self.noise if settings.temperature > 0 else None
        generator = torch.Generator(device).manual_seed(settings.seed)
        out = torch.empty(B, steps, dtype=torch.long, device=device)
        entropy = torch.empty(B, steps, device=device)
        reader = IdReader(out, count, eot_id, on_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = self.model.hidden(torch.tensor(rows, device=device), cache=self.cache)
            logits = self.model.logits(hidden[torch.arange(B, device=device), lengths - 1])
            if noise is not None:
                noise.exponential_(generator=generator)
            out[:, 0], entropy[:, 0] = next_tokens(logits, noise, *sampling)
            self.tokens.copy_(out[:, :1])
            self.positions.copy_(lengths)
            stop = steps
            for s in range(1, steps):
                if s % self.read_every == 0:
                    reader.fetch(s)
                    if all(reader.ended):
                        stop = s
                        break
                if noise is not None:
                    noise.exponential_(generator=generator)
                token, step_entropy = (self.graphed_step if self.compiled else self.step)(noise, sampling)
                out[:, s], entropy[:, s] = token, step_entropy
        reader.fetch(stop)
        reader.finish()
        seconds = time.perf_counter() - start
        entropies = [row[:len(ids) + done]
                     for row, ids, done in zip(entropy[:count, :stop].tolist(), reader.kept, reader.ended)]
        return Batch(reader.kept, entropies, seconds)


class IdReader:
    """The sampled ids brought to the host window by window, one window behind the device.

    A window's copy starts when its last step has been launched (into pinned memory, with an
    event, on a GPU) and is read when the next window is launched, by which time the GPU has
    finished it: the host neither waits for the device nor leaves it idle while it decodes and
    streams text. A row ended by `eot_id` is thus seen one window late; its extra steps are dropped."""

    def __init__(self, out: torch.Tensor, count: int, eot_id: int | None,
                 on_tokens: Callable[[list[list[int]]], None] | None):
        self.out, self.count, self.eot_id, self.on_tokens = out, count, eot_id, on_tokens
        self.kept: list[list[int]] = [[] for _ in range(count)]
        self.ended = [False] * count
        self.fetched = 0
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def fetch(self, stop: int) -> None:
        """Start bringing the steps fetched..stop to the host; read the window fetched before."""
        ids = self.out[:self.count, self.fetched:stop]
        event = None
        if ids.is_cuda:
            ids, event = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True).copy_(ids, non_blocking=True), \
                torch.cuda.Event()
            event.record()
        previous, self.pending, self.fetched = self.pending, (ids, event), stop
        if previous is not None:
            self.take(*previous)

    def finish(self) -> None:
        """Read the last window (a wait for the device)."""
        if self.pending is not None:
            self.take(*self.pending)
            self.pending = None

    def take(self, ids: torch.Tensor, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.synchronize()
        for row, row_ids in enumerate(ids.tolist()):
            for token in row_ids:
                if self.ended[row]:
                    break
                if token == self.eot_id:
                    self.ended[row] = True
                else:
                    self.kept[row].append(token)
        if self.on_tokens is not None:
            self.on_tokens(self.kept)


def repeated_4gram_rate(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def prompt_ids(tokenizer, prompt: str, eot_id: int) -> list[int]:
    return [eot_id] + tokenizer.encode(prompt, add_special_tokens=False).ids  # documents start with EOT


def generation(tokenizer, tokens: list[int], entropies: list[float], tokens_per_s: float) -> Generation:
    return Generation(tokens, tokenizer.decode(tokens), tokens_per_s, sum(entropies) / max(len(entropies), 1),
                      repeated_4gram_rate(tokens))


def sample_text(decoder: Decoder, tokenizer, prompt: str, settings: SampleSettings, eot_id: int,
                stream=None) -> Generation:
    """One prompt's continuation, written to `stream` as it is generated."""
    shown = [0]

    def on_tokens(rows: list[list[int]]) -> None:
        text = tokenizer.decode(rows[0])
        if stream is not None and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            stream.write(text[shown[0]:])
            stream.flush()
            shown[0] = len(text)

    batch = decoder.generate([prompt_ids(tokenizer, prompt, eot_id)], settings, eot_id, on_tokens)
    result = generation(tokenizer, batch.tokens[0], batch.entropies[0], batch.tokens_per_s)
    if stream is not None:
        stream.write(result.text[shown[0]:] + "\n")
    return result


def run_tokenizer(found: checkpoint.Checkpoint) -> Path:
    """The tokenizer of the run's data folder. A relative data_dir was relative to where the run was
    trained, which the checkpoint's place tells: it lies in OUT_DIR/NAME/checkpoints/, so sampling
    from another directory finds the same file."""
    data_dir = Path(found.config["data"]["data_dir"])
    here = layout.tokenizer_file(data_dir)
    out_dir = Path(found.config["run"]["out_dir"])
    if here.is_file() or data_dir.is_absolute() or out_dir.is_absolute():
        return here
    root = Path(found.path).resolve().parent.parent.parent  # OUT_DIR, from OUT_DIR/NAME/checkpoints/CHECKPOINT
    for _ in out_dir.parts:
        root = root.parent
    trained_there = layout.tokenizer_file(root / data_dir)
    return trained_there if trained_there.is_file() else here


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch device this machine has: cpu, cuda or cuda:N (default: cuda when available)."""
    try:
        return devices.resolve_device(name)
    except ValueError as err:
        raise SampleError(str(err)) from None


def read_prompts(path: Path) -> list[str]:
    try:
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise SampleError(f"--prompts {path} cannot be read ({err.__class__.__name__}: {err})") from None
    if not prompts:
        raise SampleError(f"--prompts {path} holds no prompt (one per line, blank lines skipped)")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just sample", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder or file (default: OUT_DIR/RUN/checkpoints/best)")
    parser.add_argument("--run", default="small", help="run name: the default checkpoint is the run's best")
    parser.add_argument("--out-dir", default="runs", help="where runs live")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (default: DATA_DIR/tokenizer/tokenizer.json of the run's config)")
    parser.add_argument("--prompt", default="La ville de", help="text to continue, streamed as it is generated")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="a UTF-8 file of prompts, one per line (blank lines skipped), instead of --prompt: "
                             "generated in batches, one JSON line per prompt")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts generated together with --prompts")
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="tokens to generate at most per prompt (capped, saying so, where the context ends)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="nucleus sampling: keep the most likely tokens up to this mass, above 0 (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the forward and capture the decode step as a CUDA graph (GPU only): tens of "
                             "seconds once, then far faster steps (default: on a GPU)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (SampleError, checkpoint.CheckpointError) as err:
        print(f"error: sample: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Everything is checked before the first line is printed."""
    from tokenizers import Tokenizer

    settings = SampleSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    settings.check()
    if args.batch_size < 1:
        raise SampleError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    texts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt]
    path = args.checkpoint or checkpoint.best(Path(args.out_dir) / args.run / "checkpoints")
    if not path.exists():
        raise SampleError(f"no checkpoint at {path}; train first (`just train --run {args.run}`) or pass --checkpoint")
    model, found = load_model(path, device)
    tokenizer_path = args.tokenizer or run_tokenizer(found)
    if not tokenizer_path.is_file():
        raise SampleError(f"tokenizer {tokenizer_path} not found; pass --tokenizer")
    if sha256_file(tokenizer_path) != found.tokenizer_sha256:
        raise SampleError(f"{tokenizer_path} is not the tokenizer this checkpoint was trained with")
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot_id = tokenizer.token_to_id("<|endoftext|>")
    prompts = [prompt_ids(tokenizer, text, eot_id) for text in texts]
    context = model.max_positions
    for line, ids in enumerate(prompts, 1):
        if len(ids) >= context:
            where = f"line {line} of {args.prompts}" if args.prompts is not None else "the prompt"
            raise SampleError(f"{where} is {len(ids)} tokens (with the leading <|endoftext|>), the model's context is "
                              f"{context}: shorten it below {context}")
    longest = max(map(len, prompts))
    if longest + settings.max_new_tokens > context:
        settings = replace(settings, max_new_tokens=context - longest)
        print(f"note: sample: --max-new-tokens {args.max_new_tokens} capped at {settings.max_new_tokens}: the "
              f"{'longest ' if len(prompts) > 1 else ''}prompt ({longest} tokens) and its continuation must fit the "
              f"model's {context}-token context", file=sys.stderr)
    decoder = Decoder(model, min(args.batch_size, len(prompts)), longest + settings.max_new_tokens,
                      found.vocab_size, args.compile)
    warm_up = None
    if decoder.compiled:
        print("sample: compiling the decode step into a CUDA graph (once per run)...", file=sys.stderr, flush=True)
        warm_up = round(decoder.warm_up(settings, max(map(len, prompts[:decoder.batch_size]))), 1)
    if args.prompts is None:
        sys.stdout.write(texts[0])
        result = sample_text(decoder, tokenizer, texts[0], settings, eot_id, sys.stdout)
        report = {"tokens": len(result.tokens), "tokens_per_s": round(result.tokens_per_s, 1),
                  "mean_entropy_nats": round(result.mean_entropy, 3),
                  "repeated_4gram_rate": round(result.repeated_4gram_rate, 3)}
    else:
        results, seconds = [], 0.0
        for first in range(0, len(prompts), decoder.batch_size):
            batch = decoder.generate(prompts[first:first + decoder.batch_size],
                                     replace(settings, seed=settings.seed + first), eot_id)
            seconds += batch.seconds
            for text, tokens, entropies in zip(texts[first:], batch.tokens, batch.entropies):
                result = generation(tokenizer, tokens, entropies, batch.tokens_per_s)
                results.append(result)
                print(json.dumps({"prompt": text, "text": result.text, "tokens": len(tokens),
                                  "mean_entropy_nats": round(result.mean_entropy, 3),
                                  "repeated_4gram_rate": round(result.repeated_4gram_rate, 3)}, ensure_ascii=False),
                      flush=True)
        total = sum(len(r.tokens) for r in results)
        report = {"prompts": len(results), "batch_size": decoder.batch_size, "tokens": total,
                  "tokens_per_s": round(total / max(seconds, 1e-9), 1),
                  "mean_entropy_nats": round(sum(r.mean_entropy for r in results) / len(results), 3),
                  "repeated_4gram_rate": round(sum(r.repeated_4gram_rate for r in results) / len(results), 3)}
    if warm_up is not None:
        report["compile_s"] = warm_up
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
