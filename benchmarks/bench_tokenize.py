"""Benchmark the tokenize stage, side by side in one run.

On a realistic frwiki-format corpus (generated, or --input JSONL): tokenizer training time and peak
RSS for SuperBPE and plain BPE of the same vocabulary on the same text; chars/token and bytes/token
of each on the validation split; and the encode throughput of the stage (all workers) against a
bare `Tokenizer.encode_batch_fast` loop over the same documents using all cores. Each measurement
runs in a fresh process, so each peak RSS is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, default=None, help="frwiki JSONL to use instead of a generated corpus")
    parser.add_argument("--megabytes", type=float, default=100.0, help="size of the generated JSONL")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary of both tokenizers")
    parser.add_argument("--transition", type=int, default=None, help="SuperBPE transition point t: stage-1 merges kept (default: 80%% of the merges)")
    parser.add_argument("--train-bytes", type=int, default=10**12, help="cap on the UTF-8 bytes of training text (the default takes all of it)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="stage encoding processes")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write the tables into docs/benchmarks.md, section \"Tokenize\" (with --input: "
                             "\"Tokenize (FILE NAME)\")")


def _train(kind: str, texts_file: str, vocab: int, transition: int, out: str, queue) -> None:
    from benchmarks.report import peak_rss_mb
    from pipeline.tokenize_stage import train_tokenizer

    texts = Path(texts_file).read_text().split("\x00")
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts, vocab, transition, plain=kind == "plain")
    seconds = time.perf_counter() - start
    tokenizer.save(out)
    queue.put((seconds, peak_rss_mb()))


def _bare_encode(tokenizer_path: str, docs_file: str, queue) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    from pipeline.tokenize_stage import BATCH_CHARS

    tokenizer = Tokenizer.from_file(tokenizer_path)
    docs = Path(docs_file).read_text().split("\x00")
    start, batch, size, tokens = time.perf_counter(), [], 0, 0
    for doc in docs + [None]:
        if doc is not None:
            batch.append(doc)
            size += len(doc)
        if batch and (doc is None or size >= BATCH_CHARS):
            tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))
            batch, size = [], 0
    queue.put((time.perf_counter() - start, tokens))


def _stage_encode(parquet: str, tokenizer_path: str, out_dir: str, workers: int, queue) -> None:
    from tokenizers import Tokenizer

    from pipeline.paragraphs import WIKIPEDIA_SOURCE, resolve
    from pipeline.tokenize_stage import encode_corpus, plan_sources

    eot = Tokenizer.from_file(tokenizer_path).token_to_id("<|endoftext|>")
    plans = plan_sources({WIKIPEDIA_SOURCE: resolve(Path(parquet))}, {WIKIPEDIA_SOURCE: 1.0}, 0.005, 50)
    start = time.perf_counter()
    totals = encode_corpus(plans, Path(tokenizer_path), Path(out_dir), eot, "<u4", workers, progress=False)
    queue.put((time.perf_counter() - start, sum(t.tokens for t in totals.values())))


def in_process(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from benchmarks.report import machine_line, markdown_table, publish
    from benchmarks.synthetic_corpus import write_corpus
    from pipeline.extract import ExtractOptions, extract
    from pipeline.paragraphs import iter_documents
    from pipeline.tokenize_stage import choose_val_articles, training_texts

    max_merges = args.vocab_size - 258
    transition = int(0.8 * max_merges) if args.transition is None else args.transition
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        tmp = Path(tmp)
        source = args.input
        if source is None:
            source = tmp / "corpus.jsonl"
            write_corpus(source, int(args.megabytes * 1e6), seed=2)
        parquet = tmp / "paragraphs.parquet"
        extract(source, parquet, ExtractOptions(), args.workers, 16 << 20, 1.0, progress=False)
        import pyarrow.parquet as pq

        article_ids = pq.read_table(parquet, columns=["article_id"]).column("article_id").to_numpy()
        val_ids = choose_val_articles(article_ids, 0.005, 50)
        texts = training_texts(parquet, val_ids, args.train_bytes)
        (tmp / "train.txt").write_text("\x00".join(texts))
        train_mb = sum(len(t.encode()) for t in texts) / 1e6
        del texts
        trained = {}
        for kind in ("superbpe", "plain"):
            print(f"bench-tokenize: training {kind} (vocab {args.vocab_size:,}) on {train_mb:.1f} MB ...")
            trained[kind] = in_process(_train, kind, str(tmp / "train.txt"), args.vocab_size, transition,
                                       str(tmp / f"{kind}.json"))
        val_docs = [text for article_id, text in iter_documents(parquet) if article_id in set(val_ids.tolist())]
        val_chars = sum(map(len, val_docs))
        val_bytes = sum(len(d.encode()) for d in val_docs)
        compression = {}
        for kind in trained:
            tokenizer = Tokenizer.from_file(str(tmp / f"{kind}.json"))
            n = sum(len(e.ids) for e in tokenizer.encode_batch(val_docs, add_special_tokens=False))
            compression[kind] = (val_chars / n, val_bytes / n, n, tokenizer.get_vocab_size())
        all_docs = [text for _, text in iter_documents(parquet)]
        corpus_mb = sum(len(d.encode()) for d in all_docs) / 1e6
        (tmp / "docs.txt").write_text("\x00".join(all_docs))
        del all_docs
        bare_seconds, bare_tokens = in_process(_bare_encode, str(tmp / "superbpe.json"), str(tmp / "docs.txt"))
        stage_seconds, stage_tokens = in_process(_stage_encode, str(parquet), str(tmp / "superbpe.json"),
                                                 str(tmp / "tokens"), args.workers)
    fewer = 1 - compression["superbpe"][2] / compression["plain"][2]
    training = markdown_table(
        ["tokenizer", "vocab", "train s", "peak RSS MB", "val chars/token", "val bytes/token", "val tokens"],
        [[kind + (f" (t={transition:,})" if kind == "superbpe" else ""), f"{compression[kind][3]:,}",
          f"{trained[kind][0]:.1f}", f"{trained[kind][1]:.0f}", f"{compression[kind][0]:.3f}",
          f"{compression[kind][1]:.3f}", f"{compression[kind][2]:,}"] for kind in ("plain", "superbpe")])
    encode = markdown_table(
        ["encoder (SuperBPE tokenizer)", "MB/s", "Mtokens/s", "x bare"],
        [["bare `encode_batch_fast`, all cores (TOKENIZERS_PARALLELISM=true)", f"{corpus_mb / bare_seconds:.2f}",
          f"{bare_tokens / bare_seconds / 1e6:.3f}", "1.00"],
         [f"tokenize stage, {args.workers} workers", f"{corpus_mb / stage_seconds:.2f}",
          f"{stage_tokens / stage_seconds / 1e6:.3f}", f"{bare_seconds / stage_seconds:.2f}"]])
    body = ("`just bench-tokenize" + (f" --input {args.input}" if args.input else f" --megabytes {args.megabytes:.0f}") +
            (f" --vocab-size {args.vocab_size}" if args.vocab_size != 65536 else "") +
            f"` ({train_mb:.1f} MB of training text, {corpus_mb:.1f} MB encoded; {machine_line()}).\n\n"
            f"{training}\n\nSuperBPE uses {fewer:.1%} fewer tokens than plain BPE on the validation split "
            f"(target: at least 20% at 65,536).\n\n{encode}\n\nTarget: the stage at least 0.90x the bare rate.")
    return publish("Tokenize" + (f" ({Path(args.input).name})" if args.input else ""), body, args.write_docs)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import command_line

    return command_line("just bench-tokenize", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
