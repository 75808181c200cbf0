"""The packed-data format: written by the pack stage, read by the trainer. NumPy only.

`packed/seqN/{split}.bin` holds rows of N + 1 token ids (inputs are row[:-1], targets row[1:]).
`{split}.doc_lens.npy` (int32) lists the lengths of the documents (or document pieces) in each
row, in order, padding excluded; `{split}.row_offsets.npy` (int64, rows + 1) indexes it per row.
The manifest `manifests/pack-seqN.json` records dtype, shape, pad id and sizes; a file that does not
match it (truncated, tampered) is refused.

Where documents land in rows (`cut_documents`, `best_fit_decreasing`) is part of the format: the
pack stage places them with these, and `just eval` packs a user's text with the same ones, so
its bits per byte are counted on the rows training would have built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import pack_info, sha256_file

MIN_SEQ_LEN, MAX_SEQ_LEN, SEQ_LEN_MULTIPLE = 8, 8192, 8


class PackedDataError(StageError):
    """Packed data missing or not matching its manifest; the message names the command to run."""


class PackedDataMissing(PackedDataError):
    """No pack of this length exists yet."""


def check_seq_len(seq_len: int) -> None:
    if seq_len % SEQ_LEN_MULTIPLE or not MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"sequence length {seq_len} must be a multiple of {SEQ_LEN_MULTIPLE} from {MIN_SEQ_LEN} "
                         f"to {MAX_SEQ_LEN}")


def cut_documents(doc_starts: np.ndarray, doc_tokens: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pieces (start, length) in document order: documents longer than a row cut into row-sized pieces."""
    n_pieces = -(-doc_tokens // row_len)
    piece_doc = np.repeat(np.arange(doc_tokens.size), n_pieces)
    piece_rank = np.arange(piece_doc.size) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    starts = doc_starts[piece_doc] + piece_rank * row_len
    lengths = np.minimum(row_len, doc_tokens[piece_doc] - piece_rank * row_len)
    return starts, lengths, int((n_pieces > 1).sum())


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign each item to a bin of `capacity`: largest first, each into the bin with the least room
    that still fits it. Returns (bin of each item, offset of each item in its bin, number of bins)."""
    order = np.argsort(-lengths, kind="stable")
    item_bin = np.empty(lengths.size, dtype=np.int64)
    item_offset = np.empty(lengths.size, dtype=np.int64)
    full = lengths[order] == capacity  # whole rows need no search
    n_full = int(full.sum())
    item_bin[order[:n_full]] = np.arange(n_full)
    item_offset[order[:n_full]] = 0
    bins_with_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room -> bins (stack)
    has_room = np.zeros(capacity + 1, dtype=bool)
    used = [0] * n_full
    for item in order[n_full:].tolist():
        size = int(lengths[item])
        room = size + int(has_room[size:].argmax())
        if has_room[room]:
            bin_id = bins_with_room[room].pop()
            if not bins_with_room[room]:
                has_room[room] = False
        else:
            bin_id, room = len(used), capacity
            used.append(0)
        item_bin[item] = bin_id
        item_offset[item] = used[bin_id]
        used[bin_id] += size
        left = room - size
        if left:
            bins_with_room[left].append(bin_id)
            has_room[left] = True
    return item_bin, item_offset, len(used)


@dataclass
class PackedSplit:
    """One split of one packed length, memory-mapped read-only (no copy)."""

    seq_len: int
    rows: np.ndarray  # (n_rows, seq_len + 1) memmap
    doc_lens: np.ndarray
    row_offsets: np.ndarray
    pad_id: int
    eot_id: int
    vocab_size: int
    utf8_bytes: int  # bytes of the documents in this split (for bits per byte)
    documents: int
    tokenizer_sha256: str

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @classmethod
    def open(cls, data_dir: Path, seq_len: int, split: str, manifests_dir: Path,
             verify: bool = False) -> "PackedSplit":
        """Open `split` of the length-`seq_len` pack under `data_dir`, checked against its manifest
        (sizes always, sha256 with `verify`)."""
        make = f"just pack --seq-len {seq_len}"
        info = pack_info(manifests_dir, seq_len)
        if info is None:
            raise PackedDataMissing(f"no packed data for length {seq_len} (no manifest in {manifests_dir}); "
                                    f"run `{make}`")
        files = layout.packed_files(layout.packed_dir(data_dir, seq_len), split)
        for path in files.values():
            record = info.outputs.get(path.resolve())
            if record is None or not path.is_file():
                raise PackedDataError(f"{path} is missing or not in {info.manifest_path}; run `{make}`")
            if path.stat().st_size != record["bytes"]:
                raise PackedDataError(f"{path} has {path.stat().st_size:,} bytes but its manifest says "
                                      f"{record['bytes']:,} (truncated or tampered); run `{make} --force`")
            if verify and sha256_file(path) != record["sha256"]:
                raise PackedDataError(f"{path} does not match the sha256 in {info.manifest_path}; "
                                      f"run `{make} --force`")
        split_info = info.splits[split]
        shape = (split_info["rows"], seq_len + 1)  # no rows (an empty val split): an empty file, which cannot be mapped
        rows = np.memmap(files["tokens"], dtype=np.dtype(info.dtype), mode="r", shape=shape) if shape[0] \
            else np.zeros(shape, dtype=np.dtype(info.dtype))
        arrays = {}
        for name, mmap_mode in (("doc_lens", "r"), ("row_offsets", None)):
            try:
                arrays[name] = np.load(files[name], mmap_mode=mmap_mode)
            except (ValueError, OSError, EOFError) as err:
                raise PackedDataError(f"{files[name]} is not a readable .npy array ({err}); "
                                      f"run `{make} --force`") from None
        doc_lens, row_offsets = arrays["doc_lens"], arrays["row_offsets"]
        # The index every batch goes through, checked whole (one pass over rows + 1 integers): damage
        # here would otherwise surface mid-run, in the loader's thread.
        if not (row_offsets.shape == (rows.shape[0] + 1,) and np.issubdtype(row_offsets.dtype, np.integer)
                and row_offsets[0] == 0 and row_offsets[-1] == doc_lens.shape[0]
                and bool(np.all(np.diff(row_offsets) >= 0))):
            raise PackedDataError(f"{files['row_offsets']} is damaged (its {rows.shape[0] + 1:,} offsets must rise "
                                  f"from 0 to the {doc_lens.shape[0]:,} entries of {files['doc_lens'].name}); "
                                  f"run `{make} --force`")
        return cls(seq_len=seq_len, rows=rows, doc_lens=doc_lens, row_offsets=row_offsets, pad_id=info.pad_id,
                   eot_id=info.eot_id, vocab_size=info.vocab_size, utf8_bytes=split_info["utf8_bytes"],
                   documents=split_info["documents"], tokenizer_sha256=info.tokenizer_sha256)

    def row_doc_lens(self, row: int) -> np.ndarray:
        return np.asarray(self.doc_lens[self.row_offsets[row]:self.row_offsets[row + 1]])
