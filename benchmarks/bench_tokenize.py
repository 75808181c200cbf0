"""Benchmark SuperBPE tokenizer training and compression on real French, and the stage's encode rate.

Parts (--parts, all by default):
  scaling      time of each training phase and peak RSS of SuperBPE training (default transition)
               on --sizes MB of text. --corpus (fr_mixed_corpus, 32 MB of real French) is smaller
               than the larger sizes, so they are built from it: the first copy is the corpus'
               paragraphs as they are; each further copy takes all of its sentences in a new random
               order, cuts them into paragraphs of the original sentence counts, and replaces each
               word, with chance --substitution, by a word drawn from the corpus. Repeating the
               corpus would understate memory: stage 2 keeps each distinct pretoken once, and its
               pretokens are sentence fragments. Reshuffling alone still repeats every pretoken inside
               a sentence (135k distinct stage-2 tokens per MB at 100 MB against the corpus' 188k);
               substitutions at 0.15 bring that to 189k. The table shows the figure for each size.
  compression  plain BPE and SuperBPE at transitions 20k, 40k and the default, at --vocab-size,
               trained on the whole corpus, measured on --heldout articles (never trained or tuned
               on): characters per token, % fewer tokens than plain BPE, exact round trip, next to
               published French tokenizers.
  encode       the tokenize stage (all workers) against a bare `encode_batch_fast` loop using all
               cores, on the corpus' documents with the default SuperBPE tokenizer.
Each training runs in a fresh process, so each peak RSS is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import re
import resource
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.superbpe import default_transition

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
PARTS = ("scaling", "compression", "encode")
# As reported by their authors, each on its own French Wikipedia text (not the held-out articles here).
PUBLISHED = [("Lucie-7B (65k)", "3.26"), ("CroissantLLM", "3.23")]
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", type=Path, default=SHARED / "fr_mixed_corpus.jsonl.gz",
                        help="frwiki-format JSONL (plain or .gz) of real French to train on")
    parser.add_argument("--heldout", type=Path, default=SHARED / "frwiki_heldout.jsonl",
                        help="frwiki-format JSONL of articles to measure compression on, never trained on")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    parser.add_argument("--sizes", default="64,256,512", help="scaling: MB (10^6 bytes) of training text, comma-separated")
    parser.add_argument("--substitution", type=float, default=0.15,
                        help="scaling: chance that a word of a reshuffled copy is replaced by a corpus word")
    parser.add_argument("--vocab-size", type=int, default=65536, help="vocabulary of every tokenizer")
    parser.add_argument("--transitions", default="20000,40000",
                        help="compression: SuperBPE transitions measured besides the default (80%% of the merges)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encode: tokenize stage processes")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write each part's table into docs/benchmarks.md (sections \"Tokenize training "
                             "(N cores)\", \"Tokenize compression\", \"Tokenize encode\")")


# ------------------------------------------------------------------------------------------ texts

class TextFile:
    """Paragraphs stored NUL-separated, read in blocks on each pass (the trainer reads them twice),
    so that the training process holds none of them: the measured memory is the trainer's."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8", newline="") as f:
            rest = ""
            while block := f.read(1 << 22):
                parts = (rest + block).split("\x00")
                rest = parts.pop()
                yield from parts
            if rest:
                yield rest


def paragraphs(corpus: Path, tmp: Path, workers: int) -> Path:
    """The corpus' paragraphs as the pipeline extracts them (Parquet). The tokenizer trains on
    paragraphs, not documents: a superword never crosses a paragraph."""
    from pipeline.extract import ExtractOptions, extract

    parquet = tmp / f"{corpus.name}.parquet"
    if not parquet.exists():
        extract(corpus, parquet, ExtractOptions(), workers, 16 << 20, 1.0, progress=False)
    return parquet


def write_scaled(texts: list[str], target_bytes: int, path: Path, substitution: float) -> None:
    """`target_bytes` of paragraphs: the texts, then reshuffled copies of them (docstring)."""
    sentences = [SENTENCE_END.split(text) for text in texts]
    pool = [sentence for split in sentences for sentence in split]
    words = [word for text in texts for word in text.split(" ")]
    cuts = np.cumsum([0] + [len(split) for split in sentences]).tolist()
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        while written < target_bytes:
            if copy == 0:
                batch = texts
            else:
                rng = random.Random(copy)
                rng.shuffle(pool)
                batch = (" ".join(rng.choice(words) if rng.random() < substitution else word
                                  for word in " ".join(pool[a:b]).split(" ")) for a, b in zip(cuts, cuts[1:]))
            for text in batch:
                size = len(text.encode("utf-8")) + 1
                if written + size > target_bytes:
                    return
                f.write(text + "\x00")
                written += size
            copy += 1


# ----------------------------------------------------------------------------------------- memory

class PeakRss:
    """Peak resident memory of this process, sampled every 20 ms (Linux) so each phase gets its own."""

    def __init__(self):
        self.peak = 0.0
        threading.Thread(target=self.sample, daemon=True).start()

    @staticmethod
    def now_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.now_mb())
            time.sleep(0.02)

    def phase(self) -> float:
        """The peak since the last call; starts the next phase."""
        peak, self.peak = max(self.peak, self.now_mb()), self.now_mb()
        return peak


@dataclass
class Training:
    seconds: dict[str, float]
    peak_mb: dict[str, float]
    stage2_words: int
    stage2_tokens: int


def _train_superbpe(texts_file: str, vocab: int, transition: int, out: str, queue) -> None:
    from pipeline import superbpe

    rss = PeakRss()
    texts = TextFile(Path(texts_file))
    seconds, peak = {}, {}
    start = time.perf_counter()
    stage1 = superbpe.train_stage1(texts, vocab, show_progress=False)
    seconds["stage 1"], peak["stage 1"] = time.perf_counter() - start, rss.phase()
    start = time.perf_counter()
    words, vocabulary = superbpe.stage2_words(texts, stage1, transition)
    seconds["stage-2 count"], peak["stage-2 count"] = time.perf_counter() - start, rss.phase()
    n_words, n_tokens = int(words.lengths.size), int(words.ids.size)
    start = time.perf_counter()
    stage2 = superbpe.train_stage2(words, vocabulary, superbpe.stage2_merges(stage1, vocab, transition),
                                   show_progress=True)
    seconds["stage 2"], peak["stage 2"] = time.perf_counter() - start, rss.phase()
    superbpe.superbpe_tokenizer(stage1, transition, stage2).save(out)
    queue.put(Training(seconds, peak, n_words, n_tokens))


def in_process(target, *args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def scaling(args: argparse.Namespace, texts: list[str], tmp: Path) -> str:
    from benchmarks.report import machine_line, markdown_table

    transition = default_transition(args.vocab_size)
    corpus_mb = sum(len(t.encode("utf-8")) + 1 for t in texts) / 1e6
    rows, real_density = [], None
    sizes = [float(s) for s in args.sizes.split(",")]
    for size in sorted(set(sizes + [corpus_mb])) if corpus_mb < max(sizes) else sizes:
        path = tmp / f"train-{size:g}MB.txt"
        write_scaled(texts, int(size * 1e6), path, args.substitution)
        print(f"bench-tokenize: training SuperBPE (vocab {args.vocab_size:,}, t={transition:,}) on {size:.1f} MB ...")
        run = in_process(_train_superbpe, str(path), args.vocab_size, transition, str(tmp / "scaled.json"))
        density = run.stage2_tokens / size
        if size == corpus_mb:
            real_density = density
        rows.append([f"{size:.1f} (the corpus)" if size == corpus_mb else f"{size:g}", f"{run.stage2_words:,}",
                     f"{density / 1e3:,.0f}k", *(f"{run.seconds[p]:.0f}" for p in run.seconds),
                     f"{sum(run.seconds.values()) / 60:.1f}", *(f"{run.peak_mb[p] / 1e3:.2f}" for p in run.peak_mb)])
        path.unlink()
    table = markdown_table(["MB of text", "stage-2 words", "stage-2 tokens per MB", "stage 1 s", "stage-2 count s",
                            "stage 2 s", "total min", "stage 1 peak GB", "stage-2 count peak GB", "stage 2 peak GB"], rows)
    density_note = "" if real_density is None else (
        f" Stage-2 memory follows the distinct stage-2 tokens: the real corpus has {real_density / 1e3:,.0f}k per MB.")
    return (f"`just bench-tokenize --parts scaling --sizes {args.sizes} --corpus {args.corpus.name}"
            + (f" --substitution {args.substitution}" if args.substitution != 0.15 else "") + "` "
            f"(vocab {args.vocab_size:,}, t={transition:,}; {machine_line()}).\n\n"
            f"Text beyond the corpus' {corpus_mb:.1f} MB is the corpus' sentences reshuffled into new paragraphs, "
            f"{args.substitution:.0%} of their words replaced by corpus words (see the bench's docstring); peak RSS is "
            f"the training process', per phase, texts streamed from a file."
            f"{density_note}\n\n{table}")


# ------------------------------------------------------------------------------------ compression

def _train_compression(texts_file: str, vocab: int, transitions: list[int], out_dir: str, queue) -> None:
    from pipeline import superbpe

    texts = TextFile(Path(texts_file))
    start = time.perf_counter()
    stage1 = superbpe.train_stage1(texts, vocab, show_progress=False)
    stage1_seconds = time.perf_counter() - start
    superbpe.plain_bpe(stage1).save(str(Path(out_dir) / "plain.json"))
    seconds = {"plain": stage1_seconds}
    for transition in transitions:
        print(f"bench-tokenize: SuperBPE t={transition:,} ...")
        start = time.perf_counter()
        tokenizer = superbpe.superbpe_from_stage1(texts, stage1, vocab, transition, show_progress=True)
        seconds[f"t{transition}"] = stage1_seconds + time.perf_counter() - start
        tokenizer.save(str(Path(out_dir) / f"t{transition}.json"))
    queue.put(seconds)


def heldout_documents(heldout: Path, tmp: Path, workers: int) -> list[str]:
    from pipeline.paragraphs import iter_documents

    return [text for _, text in iter_documents(paragraphs(heldout, tmp, workers))]


def compression(args: argparse.Namespace, texts: list[str], tmp: Path) -> str:
    from tokenizers import Tokenizer

    from benchmarks.report import machine_line, markdown_table

    default = default_transition(args.vocab_size)
    transitions = sorted({int(t) for t in args.transitions.split(",") if t} | {default})
    path = tmp / "corpus.txt"
    path.write_text("\x00".join(texts), encoding="utf-8")
    corpus_mb = path.stat().st_size / 1e6
    print(f"bench-tokenize: training plain BPE and SuperBPE at t={transitions} on {corpus_mb:.1f} MB ...")
    seconds = in_process(_train_compression, str(path), args.vocab_size, transitions, str(tmp))
    docs = heldout_documents(args.heldout, tmp, args.workers)
    chars, utf8 = sum(map(len, docs)), sum(len(d.encode("utf-8")) for d in docs)
    measured = {}
    for name in ["plain"] + [f"t{t}" for t in transitions]:
        tokenizer = Tokenizer.from_file(str(tmp / f"{name}.json"))
        encodings = tokenizer.encode_batch(docs, add_special_tokens=False)
        exact = all(tokenizer.decode(e.ids) == doc for e, doc in zip(encodings, docs))
        measured[name] = (sum(len(e.ids) for e in encodings), tokenizer.get_vocab_size(), exact)
    plain_tokens = measured["plain"][0]
    rows = []
    for name, (tokens, vocab, exact) in measured.items():
        label = "plain BPE" if name == "plain" else f"SuperBPE t={int(name[1:]):,}" + \
            (" (default)" if int(name[1:]) == default else "")
        fewer = "" if name == "plain" else f"{1 - tokens / plain_tokens:.1%}"
        rows.append([label, f"{vocab:,}", f"{chars / tokens:.3f}", f"{utf8 / tokens:.3f}", f"{tokens:,}", fewer,
                     "yes" if exact else "NO", f"{seconds[name] / 60:.1f}"])
    rows += [[f"{name}, published", "", figure, "", "", "", "", ""] for name, figure in PUBLISHED]
    table = markdown_table(["tokenizer", "vocab", "chars/token", "bytes/token", "held-out tokens",
                            "fewer tokens than BPE", "round trip exact", "train min"], rows)
    return (f"`just bench-tokenize --parts compression --corpus {args.corpus.name} --heldout {args.heldout.name}` "
            f"(trained on {corpus_mb:.1f} MB; measured on {len(docs)} held-out articles, {chars:,} characters; "
            f"{machine_line()}).\n\n{table}\n\nTarget: SuperBPE at the default transition at least 22% fewer tokens "
            f"than plain BPE. Published figures are their authors' own measurements on French Wikipedia text, "
            f"not on these articles.")


# ----------------------------------------------------------------------------------------- encode

def _bare_encode(tokenizer_path: str, docs_file: str, queue) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    from pipeline.tokenize_stage import BATCH_CHARS

    tokenizer = Tokenizer.from_file(tokenizer_path)
    docs = list(TextFile(Path(docs_file)))
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


def encode(args: argparse.Namespace, parquet: Path, tmp: Path) -> str:
    from benchmarks.report import machine_line, markdown_table
    from pipeline.paragraphs import iter_documents

    tokenizer = tmp / f"t{default_transition(args.vocab_size)}.json"
    if not tokenizer.exists():
        print("bench-tokenize: training the default SuperBPE tokenizer for the encode part ...")
        texts = tmp / "corpus.txt"
        texts.write_text("\x00".join(all_paragraphs(parquet)), encoding="utf-8")
        in_process(_train_superbpe, str(texts), args.vocab_size, default_transition(args.vocab_size),
                   str(tokenizer))
    docs = tmp / "docs.txt"
    docs.write_text("\x00".join(text for _, text in iter_documents(parquet)), encoding="utf-8")
    corpus_mb = docs.stat().st_size / 1e6
    bare_seconds, bare_tokens = in_process(_bare_encode, str(tokenizer), str(docs))
    stage_seconds, stage_tokens = in_process(_stage_encode, str(parquet), str(tokenizer), str(tmp / "tokens"),
                                             args.workers)
    table = markdown_table(
        ["encoder (SuperBPE tokenizer)", "MB/s", "Mtokens/s", "x bare"],
        [["bare `encode_batch_fast`, all cores (TOKENIZERS_PARALLELISM=true)", f"{corpus_mb / bare_seconds:.2f}",
          f"{bare_tokens / bare_seconds / 1e6:.3f}", "1.00"],
         [f"tokenize stage, {args.workers} workers", f"{corpus_mb / stage_seconds:.2f}",
          f"{stage_tokens / stage_seconds / 1e6:.3f}", f"{bare_seconds / stage_seconds:.2f}"]])
    return (f"`just bench-tokenize --parts encode --corpus {args.corpus.name}` ({corpus_mb:.1f} MB encoded; "
            f"{machine_line()}).\n\n{table}\n\nTarget: the stage at least 0.90x the bare rate.")


def all_paragraphs(parquet: Path) -> list[str]:
    from pipeline.tokenize_stage import training_texts

    return training_texts(parquet, np.zeros(0, dtype=np.int64), 1 << 62)


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import publish

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"bench-tokenize: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    for option, path, needed in (("--corpus", args.corpus, True), ("--heldout", args.heldout, "compression" in parts)):
        if needed and not path.is_file():
            raise SystemExit(f"bench-tokenize: {option} {path}: no such file; copy it into the repository "
                             f"(e.g. data/bench/) and pass {option} PATH")
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        tmp = Path(tmp)
        parquet = paragraphs(args.corpus, tmp, args.workers)
        texts = all_paragraphs(parquet)
        if "scaling" in parts:
            publish(f"Tokenize training ({os.cpu_count()} cores)", scaling(args, texts, tmp), args.write_docs)
        if "compression" in parts:
            publish("Tokenize compression", compression(args, texts, tmp), args.write_docs)
        del texts
        if "encode" in parts:
            publish("Tokenize encode", encode(args, parquet, tmp), args.write_docs)
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import command_line

    return command_line("just bench-tokenize", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
