"""Benchmark packing: best-fit-decreasing over a synthetic 100M-token stream at several lengths.

Documents get lognormal lengths shaped like frwiki articles (median ~400 tokens, a long tail);
the rows are written to a temporary folder. Prints tokens/s, padding and cut documents.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=100_000_000, help="size of the synthetic token stream")
    parser.add_argument("--seq-len", default="128,2048", help="lengths to pack, comma separated")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the table into docs/benchmarks.md, section \"Pack\"")


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import machine_line, markdown_table, publish
    from pipeline.pack import pack_split
    from pipeline.tokenize_stage import DOC_INDEX_DTYPE
    from pipeline.layout import packed_files

    rng = np.random.default_rng(0)
    lengths = np.maximum(2, rng.lognormal(6.0, 1.1, size=args.tokens // 300).astype(np.int64))
    lengths = lengths[np.cumsum(lengths) <= args.tokens]
    index = np.zeros(lengths.size, dtype=DOC_INDEX_DTYPE)
    index["tokens"], index["start"] = lengths, np.cumsum(lengths) - lengths
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
        stream = np.lib.format.open_memmap(Path(tmp) / "tokens.npy", mode="w+", dtype=np.uint16,
                                           shape=(int(lengths.sum()),))
        stream[:] = rng.integers(2, 65535, size=stream.size, dtype=np.uint16)
        for seq_len in (int(n) for n in args.seq_len.split(",")):
            start = time.perf_counter()
            counts = pack_split(stream, index, seq_len, 1, packed_files(Path(tmp) / f"seq{seq_len}", "train"),
                                progress=False)
            seconds = time.perf_counter() - start
            rows.append([seq_len, f"{counts['tokens']:,}", f"{counts['documents']:,}", f"{seconds:.1f}",
                         f"{counts['tokens'] / seconds / 1e6:.1f}M", f"{counts['padding_fraction']:.3%}",
                         f"{counts['documents_cut']:,}"])
    body = (f"`just bench-pack --tokens {args.tokens}` ({machine_line()}).\n\n" +
            markdown_table(["N", "tokens", "documents", "seconds", "tokens/s", "padding", "documents cut"], rows))
    return publish("Pack", body, args.write_docs)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import command_line

    return command_line("just bench-pack", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
