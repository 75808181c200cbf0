"""One projection, forward + backward, in each precision path: what an FP8 GEMM costs at a given shape.

`python -m train.bench_linear --tokens 16384 --fan-in 768 --fan-out 2048` (GPU with Transformer
Engine). Times torch BF16 `nn.Linear`, `te.Linear` without FP8, and `te.Linear` in FP8 (delayed
scaling) with BF16 and with FP32 parameters (the trainer's master weights).
"""

from __future__ import annotations

import argparse
import time

import torch


def time_step(module, x, fp8: bool, te, recipe, repeats: int) -> float:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if te is not None:
                with te.autocast(enabled=fp8, recipe=recipe):
                    y = module(x)
            else:
                y = module(x)
        y.sum().backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench_linear", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--fan-in", type=int, default=768)
    parser.add_argument("--fan-out", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    delayed = recipe.DelayedScaling()
    x = torch.randn(args.tokens, args.fan_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shape = (args.fan_in, args.fan_out)
    runs = [("torch nn.Linear bf16", torch.nn.Linear(*shape, bias=False, device="cuda", dtype=torch.bfloat16), None, False),
            ("te.Linear fp32 params, no fp8", te.Linear(*shape, bias=False, params_dtype=torch.float32), te, False),
            ("te.Linear bf16 params, fp8", te.Linear(*shape, bias=False, params_dtype=torch.bfloat16), te, True),
            ("te.Linear fp32 params, fp8", te.Linear(*shape, bias=False, params_dtype=torch.float32), te, True)]
    for name, module, engine, fp8 in runs:
        print(f"{name}: {time_step(module, x, fp8, engine, delayed, args.repeats):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
