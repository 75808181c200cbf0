"""`just bench-sample`: generation speed, new tokens/s at batch 1 and batch 64, CPU and GPU.

The model is a checkpoint (--checkpoint) or, by default, a randomly initialised model of --config
at --vocab-size: random weights generate at the speed trained ones do. Every row gets a random
prompt of --prompt-tokens tokens and generates exactly --new-tokens tokens (no end-of-text stop),
sampling as `just sample` does by default (temperature 0.8, top-p 0.95). Each measurement follows
a warm-up call on the same decoder (compilation and CUDA graph capture on the GPU, and a first
prefill at the prompts' length; excluded, its seconds shown) and counts the prefill: tokens/s =
rows x new tokens / seconds. On the GPU the decode step runs both eagerly and compiled as a CUDA
graph (what `just sample` does there), to show what the graph buys; on the CPU eagerly (FP32).

Targets (H100, `small`, 65,536-token vocabulary, BF16): at least 1,500 new tokens/s at batch 1 and
30,000 summed over a batch of 64.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline import HelpFormatter


def measure(model, vocab_size: int, batch: int, prompt_tokens: int, new_tokens: int, compile: bool) -> list[str]:
    """One table row's cells after the device name: mode, batch, tokens/s, ms per step, warm-up s."""
    from train.sample import Decoder, SampleSettings

    decoder = Decoder(model, batch, prompt_tokens + new_tokens, vocab_size, compile)
    settings = SampleSettings(max_new_tokens=new_tokens)
    warm_up = decoder.warm_up(settings, prompt_tokens)
    prompts = torch.randint(0, vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(batch))
    result = decoder.generate(prompts.tolist(), settings)  # no end-of-text id: every row runs to the end
    return ["compiled, CUDA graph" if compile else "eager", str(batch), f"{result.tokens_per_s:,.0f}",
            f"{result.seconds / new_tokens * 1e3:.2f}", f"{warm_up:.1f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just bench-sample", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="measure this checkpoint (default: a random model of --config and --vocab-size)")
    parser.add_argument("--config", type=Path, default=Path("configs/small.toml"), help="preset of the random model")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary of the random model")
    parser.add_argument("--batch-sizes", default="1,64", help="rows generated together, comma separated")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of every row")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--devices", default=None,
                        help="comma separated, cpu and/or cuda (default: cuda when there is a GPU, then cpu)")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the table into docs/benchmarks.md, section \"Sample\"")
    args = parser.parse_args(argv)
    from benchmarks.report import machine_line, markdown_table, update_section
    from train.config import load
    from train.checkpoint import CheckpointError
    from train.sample import build_model, load_model

    devices = (args.devices or ("cuda,cpu" if torch.cuda.is_available() else "cpu")).split(",")
    if not set(devices) <= {"cpu", "cuda"}:
        raise SystemExit(f"error: bench-sample: --devices {args.devices}: each must be cpu or cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("error: bench-sample: --devices cuda, but no CUDA GPU is available here")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows, model_name = [], None
    for name in devices:
        device = torch.device(name)
        if args.checkpoint is not None:
            try:
                model, found = load_model(args.checkpoint, device)
            except CheckpointError as err:
                raise SystemExit(f"error: bench-sample: {err}") from None
            vocab_size, model_name = found.vocab_size, f"checkpoint {args.checkpoint}"
        else:
            torch.manual_seed(0)
            model = build_model(load(args.config), args.vocab_size, device)
            vocab_size = args.vocab_size
            model_name = f"random `{args.config.stem}` weights, vocabulary {vocab_size:,}"
        if args.prompt_tokens + args.new_tokens > model.max_positions:
            raise SystemExit(f"error: bench-sample: --prompt-tokens + --new-tokens exceed the model's "
                             f"{model.max_positions}-token context")
        label = torch.cuda.get_device_name(device) + ", BF16" if device.type == "cuda" else "CPU, FP32"
        for compile in ([False, True] if device.type == "cuda" else [False]):
            for batch in batches:
                rows.append([label, *measure(model, vocab_size, batch, args.prompt_tokens, args.new_tokens, compile)])
                print(f"bench-sample: {' | '.join(rows[-1])}", flush=True)
        del model
    table = markdown_table(["device", "decode step", "batch", "new tokens/s", "ms per step", "warm-up s"], rows)
    model_options = (f"--checkpoint {args.checkpoint}" if args.checkpoint is not None
                     else f"--config {args.config} --vocab-size {args.vocab_size}")
    invocation = (f"just bench-sample {model_options} --batch-sizes {args.batch_sizes} --prompt-tokens "
                  f"{args.prompt_tokens} --new-tokens {args.new_tokens} --devices {','.join(devices)}")
    body = (f"`{invocation}` ({model_name}; {machine_line()}, torch {torch.__version__}).\n\n{table}\n\n"
            f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per row, no end-of-text stop; "
            "tokens/s counts the prefill, not the warm-up (compilation and CUDA graph capture). Targets (H100, "
            "`small`, 65,536-token vocabulary, BF16, compiled): at least 1,500 new tokens/s at batch 1 and 30,000 "
            "summed over batch 64.")
    print(body)
    if args.write_docs:
        update_section("Sample", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
