"""Train a SuperBPE tokenizer (or load one) and encode the paragraphs into a flat token stream.

A document is one article: its paragraphs in order joined with "\\n", preceded by <|endoftext|>.
The validation split is decided first, by a stable hash of `article_id`. Encoding runs in worker
processes (one tokenizer each) over batches of documents cut independently of the worker count, and
the main process writes them in order, so the output is byte-identical for any worker count.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import StageRun, atomic_path, sha256_file, tokens_section, verify_input
from pipeline.workers import ordered_map

STAGE = "tokenize"
DOC_INDEX_DTYPE = np.dtype([("start", "<i8"), ("tokens", "<i8"), ("bytes", "<i8"), ("article_id", "<i8")])
DEFAULT_VOCAB = 65536
# Stage 2 holds every distinct superword of the training text: bench-tokenize measured 5.1 GB peak
# RSS and 13 minutes on 2 cores for 512 MB at the density of real French (docs/benchmarks.md), plus
# about 2 bytes per character for the training texts this stage holds: within 16 GB with margin.
DEFAULT_TRAIN_BYTES = 512_000_000
BATCH_CHARS = 1 << 20  # small enough that workers stay evenly loaded on short inputs
REQUIRED_COLUMNS = ("article_id", "text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, default=None,
                        help="paragraphs Parquet (default: DATA_DIR/paragraphs/paragraphs.parquet)")
    parser.add_argument("--out-dir", type=Path, default=None, help="token output folder (default: DATA_DIR/tokens)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="load this tokenizer.json instead of training one (e.g. a released SuperBPE tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                        help="vocabulary size including the 2 special tokens (<= 65536 stores ids as uint16)")
    parser.add_argument("--transition", type=int, default=None,
                        help="SuperBPE transition point t: stage-1 merges kept (default: 80%% of the vocabulary)")
    parser.add_argument("--train-bytes", type=int, default=DEFAULT_TRAIN_BYTES,
                        help="cap on the UTF-8 bytes of training-split text used to train the tokenizer")
    parser.add_argument("--plain-bpe", action="store_true", help="train plain byte-level BPE only (the baseline)")
    parser.add_argument("--strict-vocab", action="store_true",
                        help="stop with an error, writing nothing, when the training text is too small for "
                             "--vocab-size (otherwise the smaller vocabulary is kept, said and recorded)")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="fraction of articles held out for validation")
    parser.add_argument("--val-min-articles", type=int, default=50,
                        help="at least this many validation articles (at most 10%% of the corpus)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes (output is identical for any count)")


# ----------------------------------------------------------------------------------------------- split

def split_hash(article_ids: np.ndarray) -> np.ndarray:
    """splitmix64 of the article id: stable across runs, machines and numpy versions."""
    with np.errstate(over="ignore"):
        z = article_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def choose_val_articles(article_ids: np.ndarray, fraction: float, min_articles: int) -> np.ndarray:
    """The validation articles: those with the smallest hashes, `fraction` of them, at least
    `min_articles` (capped at 10% of the corpus so a small corpus keeps most of its text for training)."""
    unique = np.unique(article_ids)
    n_val = max(int(round(fraction * unique.size)), min(min_articles, unique.size // 10))
    order = np.argsort(split_hash(unique), kind="stable")
    return np.sort(unique[order[:n_val]])


# ------------------------------------------------------------------------------------------- documents

def iter_documents(parquet: Path) -> Iterator[tuple[int, str]]:
    """(article_id, text) per article: consecutive rows of one article joined with newlines."""
    source = pq.ParquetFile(parquet)
    current_id, parts = None, []
    for batch in source.iter_batches(batch_size=65536, columns=list(REQUIRED_COLUMNS)):
        ids = batch.column("article_id").to_numpy()
        texts = batch.column("text").to_pylist()
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], ids.size]
        for a, b in zip(starts, ends):
            if int(ids[a]) != current_id:
                if current_id is not None:
                    yield current_id, "\n".join(parts)
                current_id, parts = int(ids[a]), []
            parts.extend(texts[a:b])
    if current_id is not None:
        yield current_id, "\n".join(parts)


def training_texts(parquet: Path, val_ids: np.ndarray, max_bytes: int) -> list[str]:
    """Paragraphs of training-split articles, in file order, up to `max_bytes` of UTF-8."""
    texts, total = [], 0
    source = pq.ParquetFile(parquet)
    for batch in source.iter_batches(batch_size=65536, columns=list(REQUIRED_COLUMNS)):
        keep = ~np.isin(batch.column("article_id").to_numpy(), val_ids)
        for text, kept in zip(batch.column("text").to_pylist(), keep):
            if kept:
                texts.append(text)
                total += len(text.encode("utf-8"))
                if total >= max_bytes:
                    return texts
    return texts


def document_batches(parquet: Path, val_ids: np.ndarray) -> Iterator[list[tuple[int, str, bool]]]:
    """Documents grouped into batches of about BATCH_CHARS characters (independent of workers)."""
    val_set = set(val_ids.tolist())
    batch, size = [], 0
    for article_id, text in iter_documents(parquet):
        batch.append((article_id, text, article_id in val_set))
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------- encode

@dataclass
class EncodedBatch:
    """Token ids of a batch, split by destination, with one index row per document."""

    tokens: dict[bool, np.ndarray]  # is_val -> flat ids
    docs: dict[bool, list[tuple[int, int, int]]]  # is_val -> (tokens, bytes, article_id)
    chars: int = 0


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tokenizer
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def encode_batch(eot_id: int, dtype: str, batch: list[tuple[int, str, bool]]) -> EncodedBatch:
    encodings = _worker_tokenizer.encode_batch_fast([text for _, text, _ in batch], add_special_tokens=False)
    eot = np.array([eot_id], dtype=dtype)
    tokens: dict[bool, list] = {False: [eot[:0]], True: [eot[:0]]}
    docs: dict[bool, list] = {False: [], True: []}
    chars = 0
    for (article_id, text, is_val), encoding in zip(batch, encodings):
        ids = np.array(encoding.ids, dtype=dtype)
        tokens[is_val] += (eot, ids)
        docs[is_val].append((ids.size + 1, len(text.encode("utf-8")), article_id))
        chars += len(text)
    flat = {key: np.concatenate(parts) for key, parts in tokens.items()}
    return EncodedBatch(tokens=flat, docs=docs, chars=chars)


@dataclass
class SplitTotals:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    index: list[tuple[int, int, int, int]] = field(default_factory=list)


def encode_corpus(parquet: Path, tokenizer_path: Path, val_ids: np.ndarray, out_dir: Path, eot_id: int,
                  dtype: str, workers: int, n_documents: int | None = None,
                  progress: bool = True) -> dict[str, SplitTotals]:
    """Write {train,val}.bin and their document indexes atomically; return per-split totals."""
    totals = {"train": SplitTotals(), "val": SplitTotals()}
    start = time.perf_counter()
    chars = 0
    (train_bin, train_index), (val_bin, val_index) = (layout.token_files(out_dir, s) for s in ("train", "val"))
    encode = functools.partial(encode_batch, eot_id, dtype)
    batches = ordered_map(encode, document_batches(parquet, val_ids), workers, initializer=_init_worker,
                          initargs=(str(tokenizer_path),))
    with atomic_path(train_bin) as train_tmp, atomic_path(val_bin) as val_tmp:
        with open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file, closing(batches), \
                tqdm(total=n_documents, unit="doc", desc=STAGE, disable=not progress) as bar:
            files = {"train": train_file, "val": val_file}
            for encoded in batches:
                for is_val, name in ((False, "train"), (True, "val")):
                    split = totals[name]
                    for n_tokens, n_bytes, article_id in encoded.docs[is_val]:
                        split.index.append((split.tokens, n_tokens, n_bytes, article_id))
                        split.tokens += n_tokens
                        split.bytes += n_bytes
                        split.documents += 1
                    files[name].write(encoded.tokens[is_val].tobytes())
                chars += encoded.chars
                elapsed = max(time.perf_counter() - start, 1e-9)
                done_tokens = totals["train"].tokens + totals["val"].tokens
                bar.update(sum(len(d) for d in encoded.docs.values()))
                bar.set_postfix_str(f"{chars / elapsed / 1e6:.1f} MB/s, {done_tokens / elapsed / 1e6:.2f} Mtok/s")
        for index_path, split in ((train_index, totals["train"]), (val_index, totals["val"])):
            with atomic_path(index_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.array(split.index, dtype=DOC_INDEX_DTYPE).reshape(-1))
    return totals


# -------------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: Path):
    """Load any tokenizer.json; add <|endoftext|> and <|pad|> if it lacks them."""
    from tokenizers import Tokenizer

    from pipeline.superbpe import EOT, PAD

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception for malformed files
        raise StageError(f"--tokenizer {path} is not a tokenizer.json that `tokenizers` can load "
                         f"({str(err).splitlines()[0][:120]})") from None
    missing = [token for token in (EOT, PAD) if tokenizer.token_to_id(token) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


def save_tokenizer(tokenizer, path: Path) -> None:
    try:
        tokenizer.save(str(path))
    except Exception as err:  # tokenizers reports a failed write as a plain Exception "... (os error N)"
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, transition: int, plain: bool):
    """Train plain BPE or SuperBPE; `texts` is read twice (a list, or an iterable that starts over)."""
    from pipeline import superbpe

    stage1 = superbpe.train_stage1(texts, vocab_size, show_progress=True)
    if plain:
        return superbpe.plain_bpe(stage1)
    return superbpe.superbpe_from_stage1(texts, stage1, vocab_size, transition, show_progress=True)


def check_vocab_size(trained: int, requested: int, strict: bool, characters: int) -> None:
    """A corpus too small for the vocabulary: said in one line (the manifest records the real size),
    or an error with --strict-vocab."""
    if trained >= requested:
        return
    shortfall = (f"the training text ({characters:,} characters) yields {trained:,} tokens, fewer than "
                 f"--vocab-size {requested:,}")
    if strict:
        raise StageError(f"{shortfall}; nothing written (--strict-vocab). Train on more text or lower --vocab-size")
    print(f"{STAGE}: {shortfall}; keeping {trained:,} (--strict-vocab makes this an error)")


def check_parquet(path: Path) -> pq.ParquetFile:
    try:
        source = pq.ParquetFile(path)
    except Exception as err:
        raise StageError(f"{path} is not a readable Parquet file ({type(err).__name__}); "
                         f"rerun `just extract-paragraphs`") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in source.schema_arrow.names]
    if missing:
        raise StageError(f"{path} lacks the column(s) {missing}; expected the output of `just extract-paragraphs`")
    if source.metadata.num_rows == 0:
        raise StageError(f"{path} holds no paragraph: the corpus is empty")
    return source


def run(args: argparse.Namespace) -> int:
    from pipeline.superbpe import SPECIAL_TOKENS

    source = args.input or layout.paragraphs_file(args.data_dir)
    out_dir = args.out_dir or layout.tokens_dir(args.data_dir)
    tokenizer_out = layout.tokenizer_file(args.data_dir) if args.out_dir is None else out_dir / "tokenizer.json"
    min_vocab = 256 + len(SPECIAL_TOKENS) + 1
    transition = None
    if args.tokenizer is None:
        if args.vocab_size < min_vocab:
            raise StageError(f"--vocab-size {args.vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special "
                             f"tokens + 1 merge = {min_vocab}")
        max_transition = args.vocab_size - 256 - len(SPECIAL_TOKENS)
        transition = int(0.8 * max_transition) if args.transition is None else args.transition
        if not 0 <= transition <= max_transition:
            raise StageError(f"--transition {transition} must be within [0, {max_transition}] for --vocab-size "
                             f"{args.vocab_size} (the merges the vocabulary has room for)")
    if not 0 <= args.val_fraction < 1 or args.val_min_articles < 0:
        raise StageError("--val-fraction must be in [0, 1) and --val-min-articles non-negative")
    inputs = [verify_input(source, args.manifests, producer_required=None if args.input else "extract-paragraphs")]
    check_parquet(Path(source))
    if args.tokenizer is not None:
        if not args.tokenizer.is_file():
            raise StageError(f"--tokenizer {args.tokenizer}: no such file")
        inputs.append(verify_input(args.tokenizer, args.manifests))
        parameters = {"tokenizer": "loaded"}
    else:
        parameters = {"tokenizer": "plain-bpe" if args.plain_bpe else "superbpe", "vocab_size": args.vocab_size,
                      "transition": None if args.plain_bpe else transition, "train_bytes": args.train_bytes}
    parameters.update(val_fraction=args.val_fraction, val_min_articles=args.val_min_articles,
                      out_dir=Path(out_dir), tokenizer_out=Path(tokenizer_out))
    with StageRun(STAGE, args.manifests, parameters, inputs, force=args.force, section=tokens_section) as stage:
        if not stage.start(out_dir, [out_dir, tokenizer_out.parent]):
            return 0
        return tokenize(args, stage, Path(source), out_dir, tokenizer_out, transition)


def tokenize(args: argparse.Namespace, stage: StageRun, source: Path, out_dir: Path, tokenizer_out: Path,
             transition: int | None) -> int:
    """Train or load the tokenizer, encode, and record it all in the stage's manifest."""
    from pipeline.superbpe import EOT, PAD

    article_ids = pq.read_table(source, columns=["article_id"]).column("article_id").to_numpy()
    val_ids = choose_val_articles(article_ids, args.val_fraction, args.val_min_articles)
    train_started = time.perf_counter()
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = training_texts(Path(source), val_ids, args.train_bytes)
        if not texts:
            raise StageError("no training-split text to train the tokenizer on; lower --val-fraction")
        characters = sum(map(len, texts))
        print(f"{STAGE}: training {stage.parameters['tokenizer']} (vocab {args.vocab_size:,}) on "
              f"{characters:,} characters ...")
        tokenizer = train_tokenizer(texts, args.vocab_size, transition, args.plain_bpe)
        check_vocab_size(tokenizer.get_vocab_size(with_added_tokens=True), args.vocab_size, args.strict_vocab,
                         characters)
        del texts
    train_seconds = time.perf_counter() - train_started
    with atomic_path(tokenizer_out) as tmp:
        save_tokenizer(tokenizer, tmp)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = "<u2" if vocab_size <= 1 << 16 else "<u4"
    eot_id, pad_id = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)

    encode_started = time.perf_counter()
    totals = encode_corpus(Path(source), tokenizer_out, val_ids, out_dir, eot_id, dtype, args.workers,
                           n_documents=int(np.unique(article_ids).size))
    encode_seconds = time.perf_counter() - encode_started

    tokenizer_sha = sha256_file(tokenizer_out)
    stage.add_output(tokenizer_out, counts={"vocab_size": vocab_size}, sha256=tokenizer_sha)
    for name, split in totals.items():
        bin_path, index_path = layout.token_files(out_dir, name)
        stage.add_output(bin_path, counts={"tokens": split.tokens, "documents": split.documents,
                                           "utf8_bytes": split.bytes})
        stage.add_output(index_path, counts={"documents": split.documents})
    all_tokens = sum(s.tokens for s in totals.values())
    stage.finish(
        counters={"train_seconds": round(train_seconds, 2), "encode_seconds": round(encode_seconds, 2),
                  "tokens_per_second": round(all_tokens / max(encode_seconds, 1e-9)),
                  "bytes_per_token_val": round(totals["val"].bytes / max(totals["val"].tokens - totals["val"].documents, 1), 4)},
        extra={"tokens": {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
                          "requested_vocab_size": None if args.tokenizer is not None else args.vocab_size,
                          "special_ids": {"eot": eot_id, "pad": pad_id}, "tokenizer_sha256": tokenizer_sha,
                          "splits": {name: {"tokens": s.tokens, "documents": s.documents, "utf8_bytes": s.bytes}
                                     for name, s in totals.items()},
                          "val_split": {"rule": "articles with the smallest splitmix64(article_id)",
                                        "val_fraction": args.val_fraction, "val_min_articles": args.val_min_articles,
                                        "articles": int(val_ids.size), "article_ids": val_ids.tolist()}}})
    print(f"{STAGE}: vocab {vocab_size:,} ({np.dtype(dtype).name}); train {totals['train'].tokens:,} tokens in "
          f"{totals['train'].documents:,} documents, val {totals['val'].tokens:,} tokens in "
          f"{totals['val'].documents:,} documents -> {out_dir}")
    return 0
