"""The packed-data format, shared by the pack stage (writer) and the trainer (reader). NumPy only.

`packed/seqN/{split}.bin` holds rows of N + 1 token ids (inputs are row[:-1], targets row[1:]).
`{split}.doc_lens.npy` (int32) lists the lengths of the documents (or document pieces) in each
row, in order, padding excluded; `{split}.row_offsets.npy` (int64, rows + 1) indexes it per row.
The manifest `manifests/pack-seqN.json` records dtype, shape, pad id and sizes; a file that does not
match it (truncated, tampered) is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_SEQ_LEN, MAX_SEQ_LEN, SEQ_LEN_MULTIPLE = 8, 8192, 8
SPLITS = ("train", "val")


class PackedDataError(Exception):
    """Packed data missing or not matching its manifest; the message names the command to run."""


class PackedDataMissing(PackedDataError):
    """No pack of this length exists yet."""


def check_seq_len(seq_len: int) -> None:
    if seq_len % SEQ_LEN_MULTIPLE or not MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"sequence length {seq_len} must be a multiple of {SEQ_LEN_MULTIPLE} from {MIN_SEQ_LEN} "
                         f"to {MAX_SEQ_LEN}")


def manifest_name(seq_len: int) -> str:
    return f"pack-seq{seq_len}"


def split_files(packed_dir: Path, split: str) -> dict[str, Path]:
    return {"tokens": packed_dir / f"{split}.bin", "doc_lens": packed_dir / f"{split}.doc_lens.npy",
            "row_offsets": packed_dir / f"{split}.row_offsets.npy"}


@dataclass
class PackedSplit:
    """One split of one packed length, memory-mapped read-only (no copy)."""

    seq_len: int
    rows: np.ndarray  # (n_rows, seq_len + 1) memmap
    doc_lens: np.ndarray
    row_offsets: np.ndarray
    pad_id: int
    eot_id: int
    utf8_bytes: int  # bytes of the documents in this split (for bits per byte)
    documents: int
    tokenizer_sha256: str

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @classmethod
    def open(cls, packed_dir: Path, split: str, manifests_dir: Path, verify: bool = False) -> "PackedSplit":
        packed_dir = Path(packed_dir)
        seq_len = int(packed_dir.name.removeprefix("seq"))
        make = f"just pack --seq-len {seq_len}"
        manifest_path = Path(manifests_dir) / f"{manifest_name(seq_len)}.json"
        if not manifest_path.is_file():
            raise PackedDataMissing(f"no packed data for length {seq_len} ({manifest_path} missing); run `{make}`")
        manifest = json.loads(manifest_path.read_text())
        info = manifest["pack"]
        files = split_files(packed_dir, split)
        recorded = {Path(o["path"]).resolve(): o for o in manifest["outputs"]}
        for path in files.values():
            record = recorded.get(path.resolve())
            if record is None or not path.is_file():
                raise PackedDataError(f"{path} is missing or not in {manifest_path}; run `{make}`")
            if path.stat().st_size != record["bytes"]:
                raise PackedDataError(f"{path} has {path.stat().st_size:,} bytes but its manifest says "
                                      f"{record['bytes']:,} (truncated or tampered); run `{make} --force`")
            if verify:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(8 << 20):
                        digest.update(chunk)
                if digest.hexdigest() != record["sha256"]:
                    raise PackedDataError(f"{path} does not match the sha256 in {manifest_path}; run `{make} --force`")
        split_info = info["splits"][split]
        dtype = np.dtype(info["dtype"])
        rows = np.memmap(files["tokens"], dtype=dtype, mode="r", shape=(split_info["rows"], seq_len + 1))
        return cls(seq_len=seq_len, rows=rows, doc_lens=np.load(files["doc_lens"], mmap_mode="r"),
                   row_offsets=np.load(files["row_offsets"]), pad_id=info["pad_id"], eot_id=info["eot_id"],
                   utf8_bytes=split_info["utf8_bytes"], documents=split_info["documents"],
                   tokenizer_sha256=info["tokenizer_sha256"])

    def row_doc_lens(self, row: int) -> np.ndarray:
        return np.asarray(self.doc_lens[self.row_offsets[row]:self.row_offsets[row + 1]])
