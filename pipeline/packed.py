"""The packed-data format: written by the pack stage, read by the trainer. NumPy only.

`packed/seqN/{split}.bin` holds rows of N + 1 token ids (inputs are row[:-1], targets row[1:]).
`{split}.doc_lens.npy` (int32) lists the lengths of the documents (or document pieces) in each
row, in order, padding excluded; `{split}.row_offsets.npy` (int64, rows + 1) indexes it per row.
The manifest `manifests/pack-seqN.json` records dtype, shape, pad id and sizes; a file that does not
match it (truncated, tampered) is refused.
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
        return cls(seq_len=seq_len, rows=rows, doc_lens=np.load(files["doc_lens"], mmap_mode="r"),
                   row_offsets=np.load(files["row_offsets"]), pad_id=info.pad_id, eot_id=info.eot_id,
                   vocab_size=info.vocab_size, utf8_bytes=split_info["utf8_bytes"],
                   documents=split_info["documents"], tokenizer_sha256=info.tokenizer_sha256)

    def row_doc_lens(self, row: int) -> np.ndarray:
        return np.asarray(self.doc_lens[self.row_offsets[row]:self.row_offsets[row + 1]])
