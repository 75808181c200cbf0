"""The `--device` every command line takes, checked against what this machine has."""

from __future__ import annotations

import torch


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """cpu, cuda or cuda:N (default: this rank's GPU when there is one, else the CPU). A typo or a
    GPU that is not there is a ValueError whose message the command prints as its one-line error."""
    if name is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """The most GPU memory the process has needed: the allocator's peak allocation, plus what CUDA graph
    pools hold beyond their live tensors. A captured graph's activations go back to its private pool once
    captured, so the allocator counts them as free, yet every replay writes them and nothing else may use
    them: left out, a graphed run would look about as much smaller as its activations weigh."""
    graph_pools = sum(segment["total_size"] - segment["allocated_size"] for segment in torch.cuda.memory_snapshot()
                      if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0))
    return torch.cuda.max_memory_allocated(device) + graph_pools
