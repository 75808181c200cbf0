"""Benchmark tables: every bench prints its table; with --write-docs it also replaces its section of
docs/benchmarks.md (one section per benchmark)."""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import resource
from pathlib import Path
from typing import Callable

from pipeline import HelpFormatter

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


def publish(section: str, body: str, write_docs: bool) -> int:
    """Print a bench's result; with --write-docs also make it the section of docs/benchmarks.md."""
    print(body)
    if write_docs:
        update_section(section, body)
    return 0


def command_line(prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """The `main` of a tool that declares its options apart (`add_arguments`) from its work (`run`)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
