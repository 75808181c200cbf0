"""The paragraphs format: what `extract-paragraphs` and `add-corpus` write and `tokenize`/`stats` read.

One module owns the format's writer side (schema, part names) and its reader (a pyarrow dataset
over one or several folders), so every stage agrees on it. A paragraphs folder holds Parquet parts
`part-00000.parquet`, `part-00001.parquet`, ... (one per input shard, or per slice of a streamed
corpus), each sorted by document: the rows of one article are consecutive and in paragraph order.
pyarrow.dataset and polars read a folder as one table, parts in name order.

`source` names the corpus a row came from (`frwiki` for the Wikipedia dump, the NAME given to
`add-corpus` otherwise), so a mixture can be weighted and evaluated per source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import StageError

SCHEMA = pa.schema([
    ("article_id", pa.int64()),
    ("title", pa.string()),
    ("section_path", pa.string()),
    ("paragraph_index", pa.int32()),
    ("text", pa.string()),
    ("source", pa.string()),
])
WIKIPEDIA_SOURCE = "frwiki"
PART_GLOB = "part-*.parquet"


def check_parts(files: list[Path], required: tuple[str, ...]) -> int:
    """Refuse, naming the file, a part that is not readable Parquet or lacks a column the reader
    needs; return the parts' rows together."""
    rows = 0
    for path in files:
        try:
            part = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError or others for a damaged file
            raise StageError(f"{path} is not a readable Parquet file ({type(err).__name__}); rewrite it with the "
                             f"stage that made it") from None
        missing = [name for name in required if name not in part.schema_arrow.names]
        if missing:
            raise StageError(f"{path} lacks the column(s) {', '.join(missing)}: not a paragraphs part "
                             f"(pipeline/paragraphs.py); rerun the stage that wrote it")
        rows += part.metadata.num_rows
    return rows


def part_name(index: int) -> str:
    """The file name of a folder's `index`-th part; zero-padded so name order is part order."""
    return f"part-{index:05d}.parquet"


def part_files(folder: Path) -> list[Path]:
    """A paragraphs folder's parts, in order."""
    return sorted(Path(folder).glob(PART_GLOB))


def open_dataset(folders: list[Path] | Path) -> ds.Dataset:
    """Every part of one or several paragraphs folders as one dataset, folder by folder, parts in order."""
    folders = [folders] if isinstance(folders, (str, Path)) else folders
    files = [str(path) for folder in folders for path in part_files(folder)]
    return ds.dataset(files, schema=SCHEMA, format="parquet")


def resolve(paths: Path | list[Path]) -> list[Path]:
    """The parts a path names (a paragraphs folder's parts in order, or the one Parquet file given);
    a list of part files as it is."""
    if not isinstance(paths, (str, Path)):
        return list(paths)
    path = Path(paths)
    return part_files(path) if path.is_dir() else [path]


def _document_runs(files: list[Path]) -> Iterator[tuple[pa.RecordBatch, np.ndarray, bool]]:
    """Every batch of `files` (in order) with the start rows of its documents, and whether its first
    document continues the previous batch's last one. A document is a run of consecutive rows with
    one article_id, which may cross batch and part boundaries."""
    last_id = None
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["article_id", "text"]):
            if not batch.num_rows:
                continue
            ids = batch.column("article_id").to_numpy()
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            yield batch, starts, last_id is not None and int(ids[0]) == last_id
            last_id = int(ids[-1])


def iter_documents(files: list[Path] | Path) -> Iterator[tuple[int, str]]:
    """(article_id, text) of every document of a paragraphs folder or part files, in order: its
    paragraphs joined with "\\n"."""
    current_id, parts = None, []
    for batch, starts, continued in _document_runs(resolve(files)):
        ids, texts = batch.column("article_id").to_numpy(), batch.column("text").to_pylist()
        for number, (a, b) in enumerate(zip(starts, np.r_[starts[1:], ids.size])):
            if number or not continued:
                if current_id is not None:
                    yield current_id, "\n".join(parts)
                current_id, parts = int(ids[a]), []
            parts.extend(texts[a:b])
    if current_id is not None:
        yield current_id, "\n".join(parts)


def document_sizes(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The article_id and UTF-8 bytes of every document, in `iter_documents` order, without building
    the texts (the bytes of its paragraphs plus one per newline between them)."""
    ids, sizes = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    last_id, last_bytes = None, 0  # the last document seen: the next batch may continue it
    for batch, starts, continued in _document_runs(files):
        row_bytes = pc.binary_length(batch.column("text")).to_numpy(zero_copy_only=False).astype(np.int64)
        run_bytes = np.add.reduceat(row_bytes, starts) + np.diff(np.r_[starts, row_bytes.size]) - 1
        run_ids = batch.column("article_id").to_numpy()[starts].astype(np.int64)
        if continued:
            last_bytes += int(run_bytes[0]) + 1
            run_ids, run_bytes = run_ids[1:], run_bytes[1:]
        if run_ids.size:
            if last_id is not None:
                ids.append(np.array([last_id], np.int64))
                sizes.append(np.array([last_bytes], np.int64))
            ids.append(run_ids[:-1])
            sizes.append(run_bytes[:-1])
            last_id, last_bytes = int(run_ids[-1]), int(run_bytes[-1])
    if last_id is not None:
        ids.append(np.array([last_id], np.int64))
        sizes.append(np.array([last_bytes], np.int64))
    return np.concatenate(ids), np.concatenate(sizes)
