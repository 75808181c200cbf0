"""Deterministic, resumable batches from a packed split (torch and numpy only).

The row order of epoch e is a permutation seeded by `seed + e`. A global batch is `batch_rows`
consecutive entries of that order; rank r of W takes entries r, r + W, ... (disjoint strided
slices). The loader's whole state is `position`: the number of rows the job has consumed, which a
checkpoint stores and a resume restores exactly. A background thread prepares the next batches in
pinned host memory so the copy to the GPU is asynchronous; an error there is handed to the consumer,
which raises it, instead of leaving it waiting on an empty queue.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.packed import PackedDataError, PackedSplit

IGNORE_INDEX = -100


class LoaderError(PackedDataError):
    """The background thread could not prepare a batch; raised by the consumer, with the cause."""


@dataclass
class _Failed:
    """What the background thread queues instead of a batch when preparing one raised."""
    error: BaseException
    position: int


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, N) int64
    targets: torch.Tensor  # (B, N) int64, IGNORE_INDEX where the target is padding
    doc_lens: torch.Tensor  # (D,) int32: segment lengths of every row in order; each row's sum to N

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        return Batch(self.inputs.to(device, non_blocking=non_blocking),
                     self.targets.to(device, non_blocking=non_blocking),
                     self.doc_lens.to(device, non_blocking=non_blocking))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(seed + epoch).permutation(n_rows)


def input_segments(split: PackedSplit, row_ids: np.ndarray) -> np.ndarray:
    """Segment lengths over each row's N inputs, rows in order: its documents, then its padding, the
    last segment shortened by one (inputs are row[:-1]). Each row's segments sum to N."""
    starts, ends = split.row_offsets[row_ids], split.row_offsets[row_ids + 1]
    counts = ends - starts
    per_row = counts + 1  # documents, then one padding segment (possibly empty)
    first = np.cumsum(per_row) - per_row
    doc_slot = np.repeat(first, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    doc_index = np.repeat(starts, counts) + (doc_slot - np.repeat(first, counts))
    segments = np.zeros(per_row.sum(), dtype=np.int64)
    segments[doc_slot] = split.doc_lens[doc_index]
    pad_slot = first + counts
    segments[pad_slot] = split.seq_len + 1 - np.add.reduceat(segments, first) if row_ids.size else 0
    last = np.where(segments[pad_slot] > 0, pad_slot, pad_slot - 1)
    segments[last] -= 1
    return segments[segments > 0].astype(np.int32)


def make_batch(split: PackedSplit, row_ids: np.ndarray, pin: bool) -> Batch:
    rows = torch.from_numpy(split.rows[row_ids].astype(np.int64))
    inputs, targets = rows[:, :-1], rows[:, 1:].clone()
    targets[targets == split.pad_id] = IGNORE_INDEX
    batch = Batch(inputs.contiguous(), targets, torch.from_numpy(input_segments(split, row_ids)))
    if pin:
        batch = Batch(batch.inputs.pin_memory(), batch.targets.pin_memory(), batch.doc_lens.pin_memory())
    return batch


class PackedLoader:
    """Iterates this rank's share of global batches of a packed split, from `position` on."""

    def __init__(self, split: PackedSplit, batch_rows: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 position: int = 0, device: torch.device | str = "cpu", prefetch: int = 4,
                 epoch_multiple: int | None = None):
        """`epoch_multiple`: an epoch holds a whole number of these rows (default batch_rows). The
        trainer passes the rows of one optimizer step, which do not depend on the GPU count, so a
        checkpoint resumes on any number of GPUs with the same data order."""
        if batch_rows % world_size:
            raise ValueError(f"global batch of {batch_rows} rows is not divisible by {world_size} ranks")
        if batch_rows > split.n_rows:
            raise ValueError(f"global batch of {batch_rows} rows exceeds the {split.n_rows} rows of seq{split.seq_len}; "
                             f"pack more data or lower the batch")
        self.split, self.batch_rows, self.seed = split, batch_rows, seed
        self.rank, self.world_size = rank, world_size
        self.position = position
        self.device = torch.device(device)
        multiple = epoch_multiple or batch_rows
        if multiple % batch_rows or multiple > split.n_rows:
            raise ValueError(f"an epoch must hold whole batches: {multiple} rows vs batches of {batch_rows} "
                             f"and {split.n_rows} rows in seq{split.seq_len}")
        self.rows_per_epoch = (split.n_rows // multiple) * multiple  # the last partial step is dropped
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cached_epoch: tuple[int, np.ndarray] | None = None
        self._failed: _Failed | None = None

    def rows_at(self, position: int) -> np.ndarray:
        """This rank's row ids of the global batch starting at `position`."""
        epoch, offset = divmod(position, self.rows_per_epoch)
        order = self._order(epoch)
        return order[offset:offset + self.batch_rows][self.rank::self.world_size]

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, epoch_order(self.split.n_rows, self.seed, epoch))
        return self._cached_epoch[1]

    def _produce(self, start: int) -> None:
        position = start
        pin = self.device.type == "cuda"
        try:
            while self._put(make_batch(self.split, self.rows_at(position), pin)):
                position += self.batch_rows
        except BaseException as err:  # the consumer raises it: a dead thread must not leave it waiting
            self._put(_Failed(err, position))

    def _put(self, item: Batch | _Failed) -> bool:
        """Queue `item` unless the loader is closed first (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, args=(self.position,), daemon=True)
            self._thread.start()
        batch = self._failed or self._queue.get()
        if isinstance(batch, _Failed):
            self._failed = batch  # the thread is gone: every later call raises the same
            cause = f"{type(batch.error).__name__}: {' '.join(str(batch.error).split())}"
            raise LoaderError(f"preparing a batch of seq{self.split.seq_len} failed at row position {batch.position} "
                              f"({cause}); check the pack with --set data.verify=true, or rerun `just pack --seq-len "
                              f"{self.split.seq_len} --force`") from batch.error
        self.position += self.batch_rows
        return batch.to(self.device)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __del__(self) -> None:
        self._stop.set()
