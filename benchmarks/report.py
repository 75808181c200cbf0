"""Benchmark tables: every bench prints its table; with --write-docs it also replaces its section of
docs/benchmarks.md (one section per benchmark)."""

from __future__ import annotations

import datetime as dt
import platform
import re
import resource
from pathlib import Path

BENCHMARKS_DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"  # whatever the cwd


def machine_line() -> str:
    import os

    return (f"{dt.date.today().isoformat()}, {platform.node() or 'host'}: {os.cpu_count()} cores, "
            f"{platform.python_implementation()} {platform.python_version()}")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size in MB of this process, or of the largest finished child."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024


def update_section(name: str, body: str, doc: Path | None = None) -> None:
    """Replace (or append) the section `## name` of the benchmarks document (default: BENCHMARKS_DOC)."""
    doc = doc or BENCHMARKS_DOC
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    doc.write_text(text.rstrip() + "\n")
