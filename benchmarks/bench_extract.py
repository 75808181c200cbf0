"""Benchmark the extract stage against bare orjson parsing, side by side in one run.

Generates a realistic frwiki-format file (or takes --input), then measures: bare `orjson.loads`
over its lines on one core, our extraction with 1 worker, and with all workers; MB/s, ratios to
the bare rate, and peak RSS. Each measurement runs in a fresh process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megabytes", type=float, default=1000.0, help="size of the generated file")
    parser.add_argument("--input", type=Path, default=None, help="benchmark this JSONL instead of a generated one")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker count of the all-workers run")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the table into docs/benchmarks.md, section \"Extract\"")


def _bare_parse(path: str, queue) -> None:
    import orjson

    from benchmarks.report import peak_rss_mb

    start = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            orjson.loads(line)
    queue.put((time.perf_counter() - start, peak_rss_mb(), 0.0))


def _extract(path: str, output: str, workers: int, queue) -> None:
    from benchmarks.report import peak_rss_mb
    from pipeline.extract import DEFAULT_CHUNK_BYTES, ExtractOptions, extract

    start = time.perf_counter()
    extract(Path(path), Path(output), ExtractOptions(), workers, DEFAULT_CHUNK_BYTES, 1.0, progress=False)
    queue.put((time.perf_counter() - start, peak_rss_mb(), peak_rss_mb(children=True)))


def measure(target, *args) -> tuple[float, float, float]:
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import machine_line, markdown_table, publish
    from benchmarks.synthetic_corpus import write_corpus

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        path = args.input
        if path is None:
            path = Path(tmp) / "corpus.jsonl"
            print(f"bench-extract: generating {args.megabytes:.0f} MB of frwiki-format JSONL ...")
            write_corpus(path, int(args.megabytes * 1e6), seed=1)
        size_mb = path.stat().st_size / 1e6
        output = str(Path(tmp) / "paragraphs")
        runs = [("bare `orjson.loads` per line, 1 core", measure(_bare_parse, str(path))),
                ("extract-paragraphs, 1 worker", measure(_extract, str(path), output, 1)),
                (f"extract-paragraphs, {args.workers} workers", measure(_extract, str(path), output, args.workers))]
    bare_seconds = runs[0][1][0]
    rows = [[name, f"{size_mb / seconds:.1f}", f"{bare_seconds / seconds:.2f}", f"{rss:.0f}",
             f"{child_rss:.0f}" if child_rss else "-"] for name, (seconds, rss, child_rss) in runs]
    table = markdown_table(["run", "MB/s", "x bare", "peak RSS MB (main)", "peak RSS MB (largest worker)"], rows)
    body = (f"`just bench-extract --megabytes {args.megabytes:.0f}`" + (f" on {args.input}" if args.input else "") +
            f" ({size_mb:.0f} MB; {machine_line()}).\n\n{table}\n\n"
            "Targets: 1 worker >= 0.50x bare, all workers > 1.00x bare, peak RSS < 1 GB.")
    return publish("Extract", body, args.write_docs)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import command_line

    return command_line("just bench-extract", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
