"""Where each stage writes by default, under one data directory (`data/`, or `--data-dir`)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_FILE = "frwiki_namespace_0/frwiki_namespace_0_0.jsonl"


def raw_file(data_dir: Path, file: str = DEFAULT_FILE) -> Path:
    return Path(data_dir) / "raw" / Path(file).name


def paragraphs_file(data_dir: Path) -> Path:
    return Path(data_dir) / "paragraphs" / "paragraphs.parquet"


def tokenizer_file(data_dir: Path) -> Path:
    return Path(data_dir) / "tokenizer" / "tokenizer.json"


def tokens_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "tokens"


def packed_dir(data_dir: Path, seq_len: int) -> Path:
    return Path(data_dir) / "packed" / f"seq{seq_len}"
