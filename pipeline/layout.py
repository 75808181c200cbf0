"""The data layout: where every stage writes under one data directory (`data/`, or `--data-dir`).

The one place that spells out folder and file names. Stages write through these functions and
`train/` reads through them, so a change of layout is a change here.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_FILE = "frwiki_namespace_0/frwiki_namespace_0_0.jsonl"
SPLITS = ("train", "val")


def raw_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "raw"


def raw_file(data_dir: Path, file: str = DEFAULT_FILE) -> Path:
    return raw_dir(data_dir) / Path(file).name


def paragraphs_dir(data_dir: Path) -> Path:
    """The Wikipedia paragraphs: one Parquet part per downloaded shard (see pipeline/paragraphs.py)."""
    return Path(data_dir) / "paragraphs"


def corpora_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "corpora"


def corpus_dir(data_dir: Path, name: str) -> Path:
    """An added corpus (`add-corpus NAME`): Parquet parts in the paragraphs format."""
    return corpora_dir(data_dir) / name


def stats_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "stats"


def tokenizer_file(data_dir: Path) -> Path:
    return Path(data_dir) / "tokenizer" / "tokenizer.json"


def tokens_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tokens"


def token_files(tokens: Path, split: str) -> tuple[Path, Path]:
    """A split's flat token stream and its per-document index, in a tokens folder."""
    return Path(tokens) / f"{split}.bin", Path(tokens) / f"{split}.docs.npy"


def packed_root(data_dir: Path) -> Path:
    return Path(data_dir) / "packed"


def packed_dir(data_dir: Path, seq_len: int) -> Path:
    return packed_root(data_dir) / f"seq{seq_len}"


def packed_files(packed: Path, split: str) -> dict[str, Path]:
    """A split's rows, document lengths and row offsets, in one packed length's folder."""
    packed = Path(packed)
    return {"tokens": packed / f"{split}.bin", "doc_lens": packed / f"{split}.doc_lens.npy",
            "row_offsets": packed / f"{split}.row_offsets.npy"}
