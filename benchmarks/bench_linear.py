"""`just bench-linear`: each projection of a preset at the shape the model runs it, forward + backward,
torch BF16 against Transformer Engine FP8: which GEMMs are large enough for FP8 to pay.

The answer is the per-projection policy to put in `[precision.map]`. Every projection of a block
(the fused q/k/v and gate/up GEMMs as the model builds them) and the head are timed, each as:
torch `nn.Linear` with BF16 weights; `te.Linear` without FP8 (TE's own overhead); `te.Linear` FP8
with FP32 weights (the trainer's master weights), the FP8 weight cast done once per step as the
trainer does (`is_first_microbatch`); the same with BF16 weights; FP32 weights cast on every pass, as
the CUDA-graphed layer stack does (train/graphs.py). The difference of the two FP32 timings is the weight
cast: what FP8 primary weights (TE's `quantized_model_init`) could save at most. Timings include the
host work of launching, as in training: a projection too small to keep the GPU busy shows it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline import HelpFormatter


def model_projections(config_path: Path, vocab_size: int) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of every GEMM of one block and of the head, as the preset's model builds them."""
    from train.config import load
    from train.model import Transformer
    from train.precision import Precision

    config = load(config_path)
    config.precision.mode = "bf16"
    with torch.device("meta"):
        model = Transformer(config.model, vocab_size, Precision(config.precision, torch.device("meta")), 16)
    modules = {**dict(model.blocks[0].named_modules()), "lm_head": model.lm_head}
    return {name: (m.in_features, m.out_features) for name, m in modules.items() if isinstance(m, torch.nn.Linear)}


def time_step(module, x, te, recipe, repeats: int, cached: bool) -> float:
    """Milliseconds per forward + backward, averaged over `repeats` after a warm-up."""
    def step(first: bool):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if te is None:
                y = module(x)
            else:
                with te.autocast(enabled=recipe is not None, recipe=recipe):
                    y = module(x, is_first_microbatch=first if cached else None)
        y.backward(grad)

    grad = torch.randn(x.shape[0], module.weight.shape[0], device="cuda", dtype=torch.bfloat16)
    for i in range(5):
        step(i == 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step(False)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def make_recipe(name: str):
    from transformer_engine.common import recipe

    return {"delayed": lambda: recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, amax_compute_algo="max"),
            "current": lambda: recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID),
            "block": recipe.Float8BlockScaling}[name]()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just bench-linear", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--configs", default="configs/small.toml,configs/base.toml",
                        help="config files whose projections are timed, comma separated")
    parser.add_argument("--tokens", default="16384,65536",
                        help="tokens per micro-batch (micro_batch x seq_len), comma separated")
    parser.add_argument("--vocab-size", type=int, default=8192, help="head width (the tokenizer's vocabulary)")
    parser.add_argument("--recipe", default="delayed", choices=("delayed", "current", "block"),
                        help="FP8 scaling recipe of the te.Linear FP8 timings")
    parser.add_argument("--repeats", type=int, default=30, help="timed forward + backward passes per measurement")
    parser.add_argument("--title", default="Projection GEMMs", help="section of docs/benchmarks.md that --write-docs replaces")
    parser.add_argument("--write-docs", action="store_true", help="also write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench-linear: needs a CUDA GPU with Transformer Engine")
    import transformer_engine
    import transformer_engine.pytorch as te

    from benchmarks.report import markdown_table, publish

    recipe = make_recipe(args.recipe)
    rows = []
    for config in args.configs.split(","):
        for name, (fan_in, fan_out) in model_projections(Path(config), args.vocab_size).items():
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                shape = (fan_in, fan_out)
                torch_ms = time_step(torch.nn.Linear(*shape, bias=False, device="cuda", dtype=torch.bfloat16), x,
                                     None, None, args.repeats, cached=False)
                te_bf16 = time_step(te.Linear(*shape, bias=False, params_dtype=torch.float32), x, te, None,
                                    args.repeats, cached=False)
                fp8_fp32 = time_step(te.Linear(*shape, bias=False, params_dtype=torch.float32), x, te, recipe,
                                     args.repeats, cached=True)
                fp8_bf16 = time_step(te.Linear(*shape, bias=False, params_dtype=torch.bfloat16), x, te, recipe,
                                     args.repeats, cached=True)
                fp8_recast = time_step(te.Linear(*shape, bias=False, params_dtype=torch.float32), x, te, recipe,
                                       args.repeats, cached=False)
                tflops = 6 * tokens * fan_in * fan_out / (torch_ms * 1e-3) / 1e12
                rows.append([Path(config).stem, name, f"{fan_in} x {fan_out}", f"{tokens:,}",
                             f"{torch_ms:.3f} ({tflops:.0f} TF/s)", f"{te_bf16:.3f}", f"{fp8_fp32:.3f}",
                             f"{fp8_bf16:.3f}", f"{fp8_recast:.3f}", f"{fp8_recast - fp8_fp32:.3f}",
                             f"{torch_ms / fp8_fp32:.2f}x", f"{torch_ms / fp8_bf16:.2f}x"])
                print(" | ".join(rows[-1]), flush=True)
                del x
    table = markdown_table(["preset", "projection", "shape", "tokens", "torch bf16 ms", "te no-fp8 ms",
                            "te fp8 ms (fp32 w)", "te fp8 ms (bf16 w)", "te fp8 ms (fp32 w, cast each pass)",
                            "weight cast ms", "fp8 speed-up (fp32 w)",
                            "fp8 speed-up (bf16 w)"], rows)
    body = (f"`python -m benchmarks.bench_linear --configs {args.configs} --tokens {args.tokens} --vocab-size "
            f"{args.vocab_size} --recipe {args.recipe} --repeats {args.repeats}` on {torch.cuda.get_device_name()} ({time.strftime('%Y-%m-%d')}, "
            f"torch {torch.__version__}, Transformer Engine {transformer_engine.__version__}).\n\n{table}\n\n"
            "Forward + backward of one projection, host launch work included; FP8 weight casts once per step, "
            "except in the 'cast each pass' column (the graphed layer stack's way), whose excess is the weight cast. "
            "A speed-up below 1 means FP8 loses at that shape: mark the projection `bf16` in `[precision.map]`.")
    return publish(args.title, body, args.write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
