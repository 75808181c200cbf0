"""`just sample`: generate French text from a checkpoint, streaming, with a KV cache.

The prompt is prefilled once, then one token at a time reuses the cached keys and values. Runs on
the CPU (fp32) or the GPU (bf16); a checkpoint trained in FP8 loads into plain torch modules.
Reports tokens/s and, per sample, the mean token entropy and the repeated 4-gram rate
(signals of degeneration).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import HelpFormatter, layout
from pipeline.manifest import sha256_file
from train import checkpoint
from train.config import from_dict
from train.model import KVCache, Transformer
from train.precision import Precision


@dataclass
class SampleSettings:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0


@dataclass
class Generation:
    tokens: list[int]
    text: str
    tokens_per_s: float
    mean_entropy: float  # nats, of the model's next-token distribution at each generated step
    repeated_4gram_rate: float  # share of generated 4-grams that already occurred earlier in the sample


def load_model(path: Path, device: torch.device) -> tuple[Transformer, checkpoint.Checkpoint]:
    """The model of any checkpoint (a run's best/ or step_N/ folder, or an earlier-format .pt file),
    as plain torch modules: a checkpoint trained in FP8 loads its FP32 master weights."""
    found = checkpoint.load(path)
    config = from_dict(found.config)
    precision = Precision(config.precision, device, torch_modules_only=True)
    max_positions = max(stage.seq_len for stage in config.curriculum)
    model = Transformer(config.model, found.vocab_size, precision, max_positions)
    model.load_state_dict(found.weights)
    model.to(device).eval()
    return model, found


def choose(logits: torch.Tensor, settings: SampleSettings, generator: torch.Generator) -> int:
    if settings.temperature <= 0:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if 0 < settings.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        outside = probs.cumsum(-1) - probs > settings.top_p  # keep the smallest set whose mass reaches p
        logits = torch.full_like(logits, -math.inf).scatter(0, order, sorted_logits.masked_fill(outside, -math.inf))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


def repeated_4gram_rate(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)]
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], settings: SampleSettings, eot_id: int | None = None,
             use_cache: bool = True, on_token=None) -> tuple[list[int], list[float], float]:
    """Generated ids, the entropy at each step, and tokens/s. Without the cache every step reruns
    the whole sequence (the reference the cache must match)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    limit = model.max_positions - len(prompt_ids)
    if limit <= 0:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) fills the model's context ({model.max_positions})")
    steps = min(settings.max_new_tokens, limit)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    ids = torch.tensor([prompt_ids], device=device)
    cache = None
    if use_cache:
        head_dim = model.cfg.d_model // model.cfg.n_heads
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        cache = KVCache(model.cfg.n_layers, 1, model.cfg.n_kv_heads, head_dim, len(prompt_ids) + steps, device, dtype)
    generated, entropies = [], []
    start = time.perf_counter()
    with autocast:
        logits = model(ids, cache=cache)[0, -1].float()
        for _ in range(steps):
            log_probs = torch.log_softmax(logits, -1)
            entropies.append(float(-(log_probs.exp() * log_probs).sum()))
            token = choose(logits.cpu(), settings, generator)
            if token == eot_id:
                break
            generated.append(token)
            if on_token is not None:
                on_token(generated)
            if use_cache:
                logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1].float()
            else:
                ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
                logits = model(ids)[0, -1].float()
    seconds = time.perf_counter() - start
    return generated, entropies, len(generated) / max(seconds, 1e-9)


def sample_text(model, tokenizer, prompt: str, settings: SampleSettings, eot_id: int, stream=None) -> Generation:
    prompt_ids = [eot_id] + tokenizer.encode(prompt, add_special_tokens=False).ids  # documents start with EOT
    shown = [0]

    def on_token(generated: list[int]) -> None:
        text = tokenizer.decode(generated)
        if stream is not None and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            stream.write(text[shown[0]:])
            stream.flush()
            shown[0] = len(text)

    tokens, entropies, rate = generate(model, prompt_ids, settings, eot_id, on_token=on_token)
    text = tokenizer.decode(tokens)
    if stream is not None:
        stream.write(text[shown[0]:] + "\n")
    return Generation(tokens, text, rate, sum(entropies) / max(len(entropies), 1), repeated_4gram_rate(tokens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just sample", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint folder or file (default: OUT_DIR/RUN/checkpoints/best)")
    parser.add_argument("--run", default="small", help="run name: the default checkpoint is the run's best")
    parser.add_argument("--out-dir", default="runs", help="where runs live")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (default: DATA_DIR/tokenizer/tokenizer.json of the run's config)")
    parser.add_argument("--prompt", default="La ville de", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    path = args.checkpoint or checkpoint.best(Path(args.out_dir) / args.run / "checkpoints")
    if not path.exists():
        print(f"error: sample: no checkpoint at {path}; train first (`just train --run {args.run}`) or pass "
              f"--checkpoint", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, found = load_model(path, device)
    except checkpoint.CheckpointError as err:
        print(f"error: sample: {err}", file=sys.stderr)
        return 2
    tokenizer_path = args.tokenizer or layout.tokenizer_file(found.config["data"]["data_dir"])
    if not tokenizer_path.is_file():
        print(f"error: sample: tokenizer {tokenizer_path} not found; pass --tokenizer", file=sys.stderr)
        return 2
    if sha256_file(tokenizer_path) != found.tokenizer_sha256:
        print(f"error: sample: {tokenizer_path} is not the tokenizer this checkpoint was trained with", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    settings = SampleSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sys.stdout.write(args.prompt)
    result = sample_text(model, tokenizer, args.prompt, settings, tokenizer.token_to_id("<|endoftext|>"), sys.stdout)
    print(json.dumps({"tokens": len(result.tokens), "tokens_per_s": round(result.tokens_per_s, 1),
                      "mean_entropy_nats": round(result.mean_entropy, 3),
                      "repeated_4gram_rate": round(result.repeated_4gram_rate, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
