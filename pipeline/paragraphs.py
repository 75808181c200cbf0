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

import pyarrow as pa
import pyarrow.dataset as ds

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
