"""Shared test helpers. Tests build their own fixtures; none needs ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main as pipeline_main


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run each test in its own folder, so default `data/` and `manifests/` land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(*argv: str) -> int:
    return pipeline_main([str(a) for a in argv])


def write_jsonl(path: Path, records: list) -> Path:
    """Write records as JSONL; a bytes record is written verbatim (for malformed lines)."""
    with open(path, "wb") as f:
        for record in records:
            f.write(record if isinstance(record, bytes) else json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return path


def article(identifier: int, *sections: dict, name: str = "Titre", **extra) -> dict:
    return {"name": name, "identifier": identifier, "sections": list(sections), **extra}


def section(name: str, *parts: dict) -> dict:
    return {"type": "section", "name": name, "has_parts": list(parts)}


def paragraph(value: str, **extra) -> dict:
    return {"type": "paragraph", "value": value, **extra}


def build_packed_corpus(root: Path, corpus_bytes: int, seed: int, vocab_size: int, seq_lens: str,
                        *tokenize_args: str) -> Path:
    """Real packed data from the whole pipeline on a generated corpus (plain BPE, for speed);
    `tokenize_args` go to the tokenize stage (e.g. a larger --val-fraction)."""
    from benchmarks.synthetic_corpus import write_corpus

    write_corpus(root / "in.jsonl", corpus_bytes, seed=seed)
    common = ("--data-dir", root / "data", "--manifests", root / "manifests")
    assert run_stage("extract-paragraphs", "--input", root / "in.jsonl", *common) == 0
    assert run_stage("tokenize", "--plain-bpe", "--vocab-size", str(vocab_size), *common, *tokenize_args) == 0
    assert run_stage("pack", "--seq-len", seq_lens, *common) == 0
    return root
