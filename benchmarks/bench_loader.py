"""Benchmark the packed-data loader: rows/s and tokens/s against what the trainer consumes.

Builds real packed data from a generated corpus (extract, plain-BPE tokenize, pack) in a temporary
folder, or reads `--data-dir`/`--manifests`, then times the loader over many batches. The trainer's
need is the H100 throughput measured for the `small` model (compiled BF16, 532k tokens/s); the
target is at least 50x that.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline import HelpFormatter
from pipeline.packed import PackedSplit
from train.loader import PackedLoader

H100_SMALL_TOKENS_PER_S = 532_000


def build_demo_packs(root: Path, seq_lens: list[int]) -> None:
    from pipeline.cli import main as pipeline_main
    from benchmarks.synthetic_corpus import write_corpus

    write_corpus(root / "corpus.jsonl", 30_000_000, seed=4)
    common = ["--data-dir", str(root / "data"), "--manifests", str(root / "manifests")]
    for argv in (["extract-paragraphs", "--input", str(root / "corpus.jsonl")],
                 ["tokenize", "--plain-bpe", "--vocab-size", "2048"],
                 ["pack", "--seq-len", ",".join(map(str, seq_lens))]):
        if pipeline_main(argv + common) != 0:
            raise SystemExit(f"bench-loader: building packs failed at {argv[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just bench-loader", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="use these packs instead of generated ones")
    parser.add_argument("--manifests", type=Path, default=Path("manifests"), help="manifests of --data-dir")
    parser.add_argument("--seq-len", default="128,2048", help="lengths to measure, comma separated")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="tokens per batch (rows = this / N)")
    parser.add_argument("--batches", type=int, default=300, help="batches timed per length")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the table into docs/benchmarks.md, section \"Loader\"")
    args = parser.parse_args(argv)
    from benchmarks.report import machine_line, markdown_table, publish

    seq_lens = [int(s) for s in args.seq_len.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        data_dir, manifests = args.data_dir, args.manifests
        if data_dir is None:
            data_dir, manifests = Path(tmp) / "data", Path(tmp) / "manifests"
            build_demo_packs(Path(tmp), seq_lens)
        for seq_len in seq_lens:
            split = PackedSplit.open(data_dir, seq_len, "train", manifests)
            batch_rows = max(1, min(args.batch_tokens // seq_len, split.n_rows))
            loader = PackedLoader(split, batch_rows=batch_rows, seed=0, device=device)
            next(loader)  # start the prefetch thread
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(loader)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            loader.close()
            tokens_per_s = args.batches * batch_rows * seq_len / seconds
            rows.append([seq_len, batch_rows, f"{args.batches * batch_rows / seconds:,.0f}", f"{tokens_per_s / 1e6:.1f}M",
                         f"{tokens_per_s / H100_SMALL_TOKENS_PER_S:.0f}x"])
            del batch
    table = markdown_table(["N", "rows/batch", "rows/s", "tokens/s", "x H100 `small` trainer (532k tok/s)"], rows)
    body = (f"`just bench-loader` (device {device.type}; {machine_line()}).\n\n{table}\n\n"
            "Target: at least 50x what the trainer consumes.")
    return publish("Loader", body, args.write_docs)


if __name__ == "__main__":
    raise SystemExit(main())
