"""Pack the token stream into fixed-length rows, one packed dataset per curriculum length.

Documents are placed whole with best-fit decreasing bin packing (Ding et al. 2024, "Fewer
Truncations Improve Language Modeling"): a document longer than a row is cut into row-sized pieces,
every other document lands whole in the fullest row that still has room, and what is left at a
row's end is padding (ignored by the loss). Each row holds N + 1 ids so it yields N predictions.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import (StageRun, TokensInfo, atomic_path, pack_manifest_name, pack_section, tokens_info,
                               verify_input)
from pipeline.packed import best_fit_decreasing, check_seq_len, cut_documents

COPY_CHUNK_TOKENS = 1 << 24
NPY_HEADER_BYTES = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", required=True,
                        help="one or more lengths N, comma separated (multiples of 8 from 8 to 8192); rows hold N+1 ids")
    parser.add_argument("--input", type=Path, default=None, help="tokens folder (default: DATA_DIR/tokens)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="root of the packed output; each length goes to OUT_DIR/seqN (default: DATA_DIR/packed)")


def parse_seq_lens(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise StageError(f"--seq-len {text!r} must be integers separated by commas, e.g. 128,2048") from None
    if not lengths:
        raise StageError("--seq-len needs at least one length")
    for length in lengths:
        try:
            check_seq_len(length)
        except ValueError as err:
            raise StageError(f"--seq-len: {err}") from None
    return sorted(set(lengths))


def pack_split(tokens: np.memmap, index: np.ndarray, seq_len: int, pad_id: int, out_files: dict[str, Path],
               progress: bool = True) -> dict:
    """Write one split's rows, doc_lens and row_offsets atomically; return its counts."""
    row_len = seq_len + 1
    starts, lengths, cut = cut_documents(index["start"].astype(np.int64), index["tokens"].astype(np.int64), row_len)
    item_bin, item_offset, n_rows = best_fit_decreasing(lengths, row_len)
    # Rows in bin order; inside a row, pieces in placement order (offset order).
    order = np.lexsort((item_offset, item_bin))
    starts, lengths, item_bin, item_offset = starts[order], lengths[order], item_bin[order], item_offset[order]
    row_offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(row_offsets, item_bin + 1, 1)
    arrays = {"doc_lens": lengths.astype(np.int32), "row_offsets": np.cumsum(row_offsets)}
    rows_bytes = n_rows * row_len * tokens.dtype.itemsize
    check_free_space(out_files["tokens"].parent, rows_bytes + sum(a.nbytes + NPY_HEADER_BYTES for a in arrays.values()))
    with atomic_path(out_files["tokens"]) as tmp:
        reserve(tmp, rows_bytes)
        if n_rows:
            rows = np.memmap(tmp, dtype=tokens.dtype, mode="r+", shape=(n_rows, row_len))
            flat = rows.reshape(-1)
            flat[:] = pad_id
            with tqdm(total=int(lengths.sum()), unit="tok", unit_scale=True, desc=f"pack seq{seq_len}",
                      disable=not progress) as bar:
                begin = 0
                while begin < lengths.size:  # copy in chunks of pieces so memory stays bounded
                    end = int(np.searchsorted(np.cumsum(lengths[begin:]), COPY_CHUNK_TOKENS)) + begin + 1
                    seg_lengths = lengths[begin:end]
                    seg = np.repeat(np.arange(seg_lengths.size), seg_lengths)
                    within = np.arange(seg.size) - np.repeat(np.cumsum(seg_lengths) - seg_lengths, seg_lengths)
                    destination = item_bin[begin:end][seg] * row_len + item_offset[begin:end][seg] + within
                    flat[destination] = tokens[starts[begin:end][seg] + within]
                    bar.update(seg.size)
                    begin = end
            rows.flush()
            del rows, flat
    for name, array in arrays.items():
        with atomic_path(out_files[name]) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    total = n_rows * row_len
    real = int(lengths.sum())
    return {"rows": n_rows, "tokens": real, "padding_tokens": total - real,
            "padding_fraction": round((total - real) / total, 6) if total else 0.0,
            "documents": int(index.size), "documents_cut": cut, "pieces": int(lengths.size)}


def check_free_space(directory: Path, needed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise StageError(f"{directory} needs {needed / 1e6:,.1f} MB free for these rows and the disk has "
                         f"{free / 1e6:,.1f} MB; free some space or choose another --out-dir")


def reserve(path: Path, size: int) -> None:
    """Create `path` with `size` bytes allocated on the disk. Rows are written through a memory map,
    and a page of a sparse file that a full disk cannot hold kills the process with SIGBUS, without
    a word: allocating first turns a full disk into an ENOSPC error here."""
    with open(path, "wb") as f:
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, size)
        else:  # macOS has no posix_fallocate: a sparse file there
            f.truncate(size)


def run(args: argparse.Namespace) -> int:
    seq_lens = parse_seq_lens(args.seq_len)
    tokens_dir = args.input or layout.tokens_dir(args.data_dir)
    out_root = args.out_dir or layout.packed_root(args.data_dir)
    files = {split: layout.token_files(tokens_dir, split) for split in layout.SPLITS}
    inputs = [verify_input(path, args.manifests, producer_required="tokenize")
              for pair in files.values() for path in pair]
    info = tokens_info(args.manifests)
    if info.tokenizer_path is not None and info.tokenizer_path.is_file():  # a tokenizer changed under its tokens is refused
        verify_input(info.tokenizer_path, args.manifests, producer_required="tokenize")
    for seq_len in seq_lens:
        out_dir = out_root / f"seq{seq_len}"
        parameters = {"seq_len": seq_len, "out_dir": Path(out_dir)}
        with StageRun(pack_manifest_name(seq_len), args.manifests, parameters, inputs, force=args.force,
                      section=functools.partial(pack_section, seq_len=seq_len)) as stage:
            if stage.start(out_dir, [out_dir]):
                pack_length(stage, files, info, seq_len, out_dir)
    return 0


def pack_length(stage: StageRun, files: dict[str, tuple[Path, Path]], info: TokensInfo, seq_len: int,
                out_dir: Path) -> None:
    """Pack both splits at one length and write that length's manifest."""
    started = time.perf_counter()
    splits = {}
    for split, (bin_path, index_path) in files.items():
        index = np.load(index_path)
        dtype = np.dtype(info.dtype)
        # An empty split (a corpus too small for a val article) has an empty stream, which cannot be mapped.
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if bin_path.stat().st_size else np.zeros(0, dtype)
        out_files = layout.packed_files(out_dir, split)
        counts = pack_split(tokens, index, seq_len, info.pad_id, out_files)
        counts["utf8_bytes"] = info.splits[split]["utf8_bytes"]
        splits[split] = counts
        for name, path in out_files.items():
            stage.add_output(path, counts=counts if name == "tokens" else None)
    seconds = time.perf_counter() - started
    total_tokens = sum(s["tokens"] for s in splits.values())
    stage.finish(counters={"seconds": round(seconds, 3), "tokens_per_second": round(total_tokens / max(seconds, 1e-9))},
                 extra={"pack": {"seq_len": seq_len, "row_len": seq_len + 1, "dtype": info.dtype,
                                 "pad_id": info.pad_id, "eot_id": info.eot_id,
                                 "vocab_size": info.vocab_size, "tokenizer_sha256": info.tokenizer_sha256,
                                 "splits": splits}})
    train = splits["train"]
    print(f"pack: seq{seq_len}: {train['rows']:,} train rows, padding {train['padding_fraction']:.2%}, "
          f"{train['documents_cut']:,} documents cut, {total_tokens / max(seconds, 1e-9) / 1e6:.1f}M tokens/s "
          f"-> {out_dir}" + ("" if splits["val"]["rows"] else " (no val rows: the val split is empty)"))
