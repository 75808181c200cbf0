"""`just bench-memory`: where a training step's GPU memory goes, for one config and precision.

Builds the run's trainer from a config as `just train` would,
trains two optimizer steps at the first stage's shape (compilation, the optimizer's states, TE's
FP8 weight copies), then measures one micro-batch of the third: what is held before it (weights,
gradients none, the optimizer's states, everything else that persists), what its forward adds
(the logits, and the activations saved for backward), and how far the loss and backward rise over
that. Allocated bytes from torch's caching allocator; with the layer stack as CUDA graphs, its
activations live in the graphs' pool, which the allocator counts as free: that pool is its own line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from train.devices import peak_memory_bytes

GB = 2**30  # as the trainer's memory_gb


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def where(frames: list[dict]) -> str:
    """The innermost frame of this project's code in an allocation's Python stack."""
    ours = [f for f in frames if "/train/" in f["filename"] or "/benchmarks/" in f["filename"]]
    frame = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{Path(frame['filename']).parent.name}/{Path(frame['filename']).name}:{frame['line']} {frame['name']}"


def largest_at_peak(events: list[dict], count: int) -> list[tuple[int, str]]:
    """The `count` largest allocations live when the recorded allocations peaked, as (bytes, where),
    from the allocator's trace (torch.cuda.memory._snapshot()["device_traces"])."""
    live: dict[int, dict] = {}
    total, best, at_peak = 0, -1, {}
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > best:
                best, at_peak = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    largest = sorted(at_peak.values(), key=lambda e: e["size"], reverse=True)[:count]
    return [(e["size"], where(e.get("frames", []))) for e in largest]


def breakdown(trainer, largest: int) -> tuple[dict[str, float], list[tuple[int, str]]]:
    """One measured micro-batch after two trained steps, in GB, and the `largest` allocations made
    during it that were live at its peak."""
    stage = trainer.stages[0]
    loader = trainer.stage_loader(stage)
    for _ in range(2):
        trainer.train_step([next(loader) for _ in range(stage.grad_accum)])
    batch = next(loader)
    loader.close()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    trainer.precision.first_microbatch = True
    with trainer.precision.autocast():
        output = trainer.forward_model(batch.inputs, batch.doc_lens if trainer.config.attention.doc_mask else None,
                                       **trainer.loss.forward_kwargs)
    after_forward = torch.cuda.memory_allocated()
    forward_peak = torch.cuda.max_memory_allocated()
    loss = trainer.loss(output, batch.targets)
    loss.backward()
    torch.cuda.synchronize()
    events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    graph_pools = peak_memory_bytes(trainer.device) - peak
    weights = tensor_bytes(trainer.model.parameters())
    optimizer = tensor_bytes(v for state in trainer.optimizer.state.values() for v in state.values())
    output_bytes = tensor_bytes([output])
    return {"weights": weights / GB, "optimizer states": optimizer / GB,
            "other held (FP8 weight copies, workspaces, graph outputs)": (held - weights - optimizer) / GB,
            "CUDA graph pools (saved activations, backward buffers)": graph_pools / GB,
            "forward output (logits, or the head's input)": output_bytes / GB,
            "saved for backward, outside graph pools": (after_forward - held - output_bytes) / GB,
            "forward transient": (forward_peak - after_forward) / GB,
            "loss and backward, over the forward's": (peak - after_forward) / GB,
            "peak, graph pools included": (peak + graph_pools) / GB}, largest_at_peak(events, largest)


def build_parser() -> argparse.ArgumentParser:
    from pipeline import HelpFormatter
    from train.config import PRECISIONS, RECIPES

    parser = argparse.ArgumentParser(prog="just bench-memory", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/small.toml", help="TOML config of the run to measure")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="override the config's precision.mode")
    parser.add_argument("--recipe", choices=RECIPES, default=None, help="override the config's FP8 recipe")
    parser.add_argument("--data-dir", default=None, help="where packed/ lives (default: the config's data.data_dir)")
    parser.add_argument("--manifests", default=None, help="manifests folder (default: the config's data.manifests)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, as `just train --set` (repeatable)")
    parser.add_argument("--largest", type=int, default=8, metavar="N",
                        help="list the N largest allocations live at the measured micro-batch's peak, each with the "
                             "line of this project's code that made it")
    parser.set_defaults(run=None, out_dir=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import StageError
    from train.__main__ import requested_config
    from train.config import ConfigError, load
    from train.trainer import Trainer, TrainError

    args = build_parser().parse_args(argv)
    try:
        if not torch.cuda.is_available():
            raise ConfigError("bench-memory measures GPU memory; it needs a CUDA device")
        config = requested_config(args, load(args.config))
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(config, Path(tmp) / config.run.name, device, max_steps=3)
            stage = trainer.stages[0]
            print(f"{config.run.name}, precision {config.precision.mode}, micro-batch {stage.micro_batch} x "
                  f"{stage.seq_len}, vocabulary {trainer.model.vocab_size}, "
                  f"layer stack {'graphed' if trainer.graphs_unused is None else 'eager'}, "
                  f"loss {config.run.loss}, {torch.cuda.get_device_name(device)}")
            parts, largest = breakdown(trainer, args.largest)
            for name, value in parts.items():
                print(f"  {name:<56} {value:7.2f} GB")
            print(f"the {len(largest)} largest allocations of the measured micro-batch live at its peak:")
            for size, place in largest:
                print(f"  {size / GB:7.2f} GB  {place}")
    except (ConfigError, StageError, TrainError) as err:
        print(f"error: bench-memory: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
