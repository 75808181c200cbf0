"""Train a SuperBPE tokenizer (or load one) and encode the paragraphs into a flat token stream.

A document is one article: its paragraphs in order joined with "\\n", preceded by <|endoftext|>.
The input is a whole paragraphs dataset (every part of DATA_DIR/paragraphs), or with --mix a mixture
of sources: the Wikipedia paragraphs and corpora added with `just add-corpus` (DATA_DIR/corpora/NAME).

The validation split is decided first, in each source apart: its documents with the smallest
splitmix64(article_id), a stable hash (identifiers of different sources may collide, so a document is
known by its source and identifier). Each source's validation documents stay tagged with their
source in the index, so bits per byte can be reported per source (`just eval --val`).

--mix weights the training stream by UTF-8 bytes of text. No document is repeated: the source with
the fewest training bytes for its weight is used whole and sets the stream's size, and every other
source contributes its weight's share of that size, its documents taken in hash order (the
smallest hashes after the validation ones), so the share is a spread sample of the source. The
manifest records, per source, the bytes available and used, documents and tokens. The tokenizer
trains on each source's weight's share of --train-bytes. Planning reads the text once before
encoding (each document's bytes), a small cost next to the encoding itself.

Encoding runs in worker processes (one tokenizer each) over batches of documents cut independently
of the worker count, and the main process writes them in order, so the output is byte-identical for
any worker count.
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

from pipeline import layout, paragraphs
from pipeline.errors import StageError
from pipeline.manifest import StageRun, atomic_path, sha256_file, tokens_section, verify_input
from pipeline.workers import ordered_map

STAGE = "tokenize"
# One row per document; `source` indexes the manifest's tokens.sources.
DOC_INDEX_DTYPE = np.dtype([("start", "<i8"), ("tokens", "<i8"), ("bytes", "<i8"), ("article_id", "<i8"),
                            ("source", "<u2")])
DEFAULT_VOCAB = 65536
# Stage 2 holds every distinct superword of the training text: bench-tokenize measured 5.1 GB peak
# RSS and 13 minutes on 2 cores for 512 MB at the density of real French (docs/benchmarks.md), plus
# about 2 bytes per character for the training texts this stage holds: within 16 GB with margin.
DEFAULT_TRAIN_BYTES = 512_000_000
BATCH_CHARS = 1 << 20  # small enough that workers stay evenly loaded on short inputs
REQUIRED_COLUMNS = ("article_id", "text")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, default=None,
                        help="paragraphs folder (every part) or one Parquet file (default: DATA_DIR/paragraphs); "
                             "with --mix, the source named frwiki")
    parser.add_argument("--mix", default=None, metavar="NAME=W,...",
                        help="a mixture weighted by training bytes, e.g. frwiki=0.7,oscar=0.3: frwiki is the "
                             "paragraphs (--input), any other NAME the corpus DATA_DIR/corpora/NAME of `just "
                             "add-corpus`; weights are normalized. No document is repeated: the scarcest source "
                             "for its weight bounds the total (see the manifest's tokens.mixture)")
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
    parser.add_argument("--val-fraction", type=float, default=0.005,
                        help="fraction of each source's articles held out for validation")
    parser.add_argument("--val-min-articles", type=int, default=50,
                        help="at least this many validation articles per source (at most 10%% of the source)")
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

SKIP, TRAIN, VAL = 0, 1, 2  # what a document becomes


@dataclass
class SourcePlan:
    """One source of the token stream: its parts, and what each of its documents becomes."""

    name: str
    files: list[Path]
    weight: float
    doc_ids: np.ndarray  # article_id of each document, in order
    doc_bytes: np.ndarray  # its UTF-8 bytes
    destination: np.ndarray  # SKIP, TRAIN or VAL per document
    val_ids: np.ndarray  # sorted

    def bytes_of(self, destination: int) -> int:
        return int(self.doc_bytes[self.destination == destination].sum())


def plan_sources(sources: dict[str, list[Path]], weights: dict[str, float], val_fraction: float,
                 val_min_articles: int) -> list[SourcePlan]:
    """Each source's validation documents, then the training documents the mixture takes from it."""
    plans = []
    for name, files in sources.items():
        doc_ids, doc_bytes = paragraphs.document_sizes(files)
        val_ids = choose_val_articles(doc_ids, val_fraction, val_min_articles)
        destination = np.where(np.isin(doc_ids, val_ids), VAL, SKIP).astype(np.int8)
        plans.append(SourcePlan(name, files, weights[name], doc_ids, doc_bytes, destination, val_ids))
    available = {plan.name: plan.bytes_of(SKIP) for plan in plans}
    empty = [name for name, size in available.items() if size == 0]
    if empty:
        raise StageError(f"source {empty[0]} has no training text (all of it is validation or empty); lower "
                         f"--val-fraction or give it more text")
    scarcest = min(plans, key=lambda plan: available[plan.name] / plan.weight)
    for plan in plans:
        candidates = plan.destination == SKIP
        if plan is scarcest:  # used whole
            plan.destination[candidates] = TRAIN
            continue
        share = plan.weight * available[scarcest.name] / scarcest.weight
        ids, inverse = np.unique(plan.doc_ids[candidates], return_inverse=True)
        id_bytes = np.bincount(inverse, weights=plan.doc_bytes[candidates])
        order = np.argsort(split_hash(ids), kind="stable")
        taken = min(int(np.searchsorted(np.cumsum(id_bytes[order]), share)), ids.size - 1)
        plan.destination[candidates & np.isin(plan.doc_ids, ids[order[:taken + 1]])] = TRAIN
    return plans


def training_texts(files: list[Path] | Path, val_ids: np.ndarray, max_bytes: int) -> list[str]:
    """Paragraphs of training-split articles of one source, in order, up to `max_bytes` of UTF-8."""
    texts, total = [], 0
    for path in paragraphs.resolve(files):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=list(REQUIRED_COLUMNS)):
            keep = ~np.isin(batch.column("article_id").to_numpy(), val_ids)
            for text, kept in zip(batch.column("text").to_pylist(), keep):
                if kept:
                    texts.append(text)
                    total += len(text.encode("utf-8"))
                    if total >= max_bytes:
                        return texts
    return texts


def mixture_texts(plans: list[SourcePlan], max_bytes: int) -> list[str]:
    """Tokenizer training text: each source's weight's share of `max_bytes`, from its training split."""
    return [text for plan in plans for text in training_texts(plan.files, plan.val_ids, round(plan.weight * max_bytes))]


def document_batches(plans: list[SourcePlan]) -> Iterator[list[tuple[int, int, str, bool]]]:
    """(source, article_id, text, is_val) of every document kept, source after source, in batches of
    about BATCH_CHARS characters (independent of the worker count)."""
    batch, size = [], 0
    for source, plan in enumerate(plans):
        documents = paragraphs.iter_documents(plan.files)
        changed = StageError(f"the paragraphs of {plan.name} changed while this stage read them; rerun")
        for destination in plan.destination:  # the documents the plan counted, no fewer and no more
            document = next(documents, None)
            if document is None:
                raise changed
            if destination == SKIP:
                continue
            article_id, text = document
            batch.append((source, article_id, text, destination == VAL))
            size += len(text)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
        if next(documents, None) is not None:
            raise changed
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------- encode

@dataclass
class EncodedBatch:
    """Token ids of a batch, split by destination, with one index row per document (start in the batch)."""

    tokens: dict[bool, np.ndarray]  # is_val -> flat ids
    index: dict[bool, np.ndarray]  # is_val -> DOC_INDEX_DTYPE rows
    chars: int = 0


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tokenizer
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def encode_batch(eot_id: int, dtype: str, batch: list[tuple[int, int, str, bool]]) -> EncodedBatch:
    encodings = _worker_tokenizer.encode_batch_fast([text for _, _, text, _ in batch], add_special_tokens=False)
    eot = np.array([eot_id], dtype=dtype)
    tokens: dict[bool, list] = {False: [eot[:0]], True: [eot[:0]]}
    rows: dict[bool, list] = {False: [], True: []}
    chars = 0
    for (source, article_id, text, is_val), encoding in zip(batch, encodings):
        ids = np.array(encoding.ids, dtype=dtype)
        tokens[is_val] += (eot, ids)
        rows[is_val].append((0, ids.size + 1, len(text.encode("utf-8")), article_id, source))
        chars += len(text)
    index = {key: np.array(value, dtype=DOC_INDEX_DTYPE) for key, value in rows.items()}
    for key in index:
        index[key]["start"] = np.cumsum(index[key]["tokens"]) - index[key]["tokens"]
    return EncodedBatch(tokens={key: np.concatenate(parts) for key, parts in tokens.items()}, index=index,
                        chars=chars)


@dataclass
class SplitTotals:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    index: list[np.ndarray] = field(default_factory=list)

    def add(self, rows: np.ndarray) -> None:
        rows["start"] += self.tokens
        self.index.append(rows)
        self.documents += rows.size
        self.tokens += int(rows["tokens"].sum())
        self.bytes += int(rows["bytes"].sum())

    def rows(self) -> np.ndarray:
        return np.concatenate([np.zeros(0, DOC_INDEX_DTYPE), *self.index])


def encode_corpus(plans: list[SourcePlan], tokenizer_path: Path, out_dir: Path, eot_id: int, dtype: str,
                  workers: int, progress: bool = True) -> dict[str, SplitTotals]:
    """Write {train,val}.bin and their document indexes atomically; return per-split totals."""
    totals = {"train": SplitTotals(), "val": SplitTotals()}
    start = time.perf_counter()
    chars = 0
    (train_bin, train_index), (val_bin, val_index) = (layout.token_files(out_dir, s) for s in ("train", "val"))
    encode = functools.partial(encode_batch, eot_id, dtype)
    batches = ordered_map(encode, document_batches(plans), workers, initializer=_init_worker,
                          initargs=(str(tokenizer_path),))
    n_documents = sum(int((plan.destination != SKIP).sum()) for plan in plans)
    with atomic_path(train_bin) as train_tmp, atomic_path(val_bin) as val_tmp:
        with open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file, closing(batches), \
                tqdm(total=n_documents, unit="doc", desc=STAGE, disable=not progress) as bar:
            files = {"train": train_file, "val": val_file}
            for encoded in batches:
                for is_val, name in ((False, "train"), (True, "val")):
                    totals[name].add(encoded.index[is_val])
                    files[name].write(encoded.tokens[is_val].tobytes())
                chars += encoded.chars
                elapsed = max(time.perf_counter() - start, 1e-9)
                done_tokens = totals["train"].tokens + totals["val"].tokens
                bar.update(sum(rows.size for rows in encoded.index.values()))
                bar.set_postfix_str(f"{chars / elapsed / 1e6:.1f} MB/s, {done_tokens / elapsed / 1e6:.2f} Mtok/s")
        for index_path, split in ((train_index, totals["train"]), (val_index, totals["val"])):
            with atomic_path(index_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, split.rows())
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


def parse_mix(text: str) -> dict[str, float]:
    """`frwiki=0.7,oscar=0.3` -> normalized weights, in the order given."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, equals, value = (piece.strip() for piece in part.partition("="))
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not equals or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in weights or not 0 < weight < float("inf"):
            raise StageError(f"--mix {text!r}: expected NAME=WEIGHT pairs, distinct names and positive weights, "
                             f"e.g. frwiki=0.7,oscar=0.3 (at {part.strip()!r})")
        weights[name] = weight
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def parts_of(path: Path, make: str) -> list[Path]:
    """The parts of a paragraphs folder (or the one file given); StageError naming the command that makes them."""
    if not path.exists():
        raise StageError(f"input {path} does not exist; run `{make}` first")
    files = paragraphs.resolve(path)
    if not files:
        raise StageError(f"{path} holds no paragraphs part ({paragraphs.PART_GLOB}); run `{make}`")
    return files


def source_label(files: list[Path]) -> str:
    """The name a single source is recorded under: its first row's `source`, else frwiki."""
    first = pq.ParquetFile(files[0])
    if "source" in first.schema_arrow.names and first.metadata.num_rows:
        value = next(first.iter_batches(batch_size=1, columns=["source"])).column(0)[0].as_py()
        if value:
            return value
    return paragraphs.WIKIPEDIA_SOURCE


def source_files(args: argparse.Namespace, weights: dict[str, float] | None) -> dict[str, list[Path]]:
    """Source name -> its parts: the paragraphs alone (named frwiki until `source_label` reads them),
    or each source of the mixture."""
    wikipedia = args.input or layout.paragraphs_dir(args.data_dir)
    if weights is None:
        return {paragraphs.WIKIPEDIA_SOURCE: parts_of(Path(wikipedia), "just extract-paragraphs")}
    return {name: parts_of(Path(wikipedia), "just extract-paragraphs") if name == paragraphs.WIKIPEDIA_SOURCE
            else parts_of(layout.corpus_dir(args.data_dir, name), f"just add-corpus {name} ...")
            for name in weights}


def run(args: argparse.Namespace) -> int:
    from pipeline.superbpe import SPECIAL_TOKENS, default_transition, max_transition

    out_dir = args.out_dir or layout.tokens_dir(args.data_dir)
    tokenizer_out = layout.tokenizer_file(args.data_dir) if args.out_dir is None else out_dir / "tokenizer.json"
    min_vocab = 256 + len(SPECIAL_TOKENS) + 1
    transition = None
    if args.tokenizer is None:
        if args.vocab_size < min_vocab:
            raise StageError(f"--vocab-size {args.vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special "
                             f"tokens + 1 merge = {min_vocab}")
        most = max_transition(args.vocab_size)
        transition = default_transition(args.vocab_size) if args.transition is None else args.transition
        if not 0 <= transition <= most:
            raise StageError(f"--transition {transition} must be within [0, {most}] for --vocab-size "
                             f"{args.vocab_size} (the merges the vocabulary has room for)")
    if not 0 <= args.val_fraction < 1 or args.val_min_articles < 0:
        raise StageError("--val-fraction must be in [0, 1) and --val-min-articles non-negative")
    weights = parse_mix(args.mix) if args.mix is not None else None
    sources = source_files(args, weights)
    inputs = [verify_input(path, args.manifests, producer_required="extract-paragraphs"
                           if name == paragraphs.WIKIPEDIA_SOURCE and args.input is None else None)
              for name, files in sources.items() for path in files]
    for name, files in sources.items():
        if paragraphs.check_parts(files, REQUIRED_COLUMNS) == 0:
            raise StageError(f"source {name} ({files[0].parent}) holds no paragraph: the corpus is empty")
    if weights is None:
        sources = {source_label(files): files for files in sources.values()}
    if args.tokenizer is not None:
        if not args.tokenizer.is_file():
            raise StageError(f"--tokenizer {args.tokenizer}: no such file")
        inputs.append(verify_input(args.tokenizer, args.manifests))
        parameters = {"tokenizer": "loaded"}
    else:
        parameters = {"tokenizer": "plain-bpe" if args.plain_bpe else "superbpe", "vocab_size": args.vocab_size,
                      "transition": None if args.plain_bpe else transition, "train_bytes": args.train_bytes}
    parameters.update(mix=weights, val_fraction=args.val_fraction, val_min_articles=args.val_min_articles,
                      out_dir=Path(out_dir), tokenizer_out=Path(tokenizer_out))
    with StageRun(STAGE, args.manifests, parameters, inputs, force=args.force, section=tokens_section) as stage:
        if not stage.start(out_dir, [out_dir, tokenizer_out.parent]):
            return 0
        weights = weights or dict.fromkeys(sources, 1.0)
        return tokenize(args, stage, sources, weights, out_dir, tokenizer_out, transition)


def tokenize(args: argparse.Namespace, stage: StageRun, sources: dict[str, list[Path]], weights: dict[str, float],
             out_dir: Path, tokenizer_out: Path, transition: int | None) -> int:
    """Plan the splits and the mixture, train or load the tokenizer, encode, and record it all in the
    stage's manifest."""
    from pipeline.superbpe import EOT, PAD

    plans = plan_sources(sources, weights, args.val_fraction, args.val_min_articles)
    train_started = time.perf_counter()
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        texts = mixture_texts(plans, args.train_bytes)
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
    totals = encode_corpus(plans, tokenizer_out, out_dir, eot_id, dtype, args.workers)
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
                          "sources": [plan.name for plan in plans],
                          "mixture": mixture_record(plans, totals),
                          "val_split": {"rule": "in each source, its articles with the smallest splitmix64(article_id)",
                                        "val_fraction": args.val_fraction, "val_min_articles": args.val_min_articles,
                                        "articles": sum(int(plan.val_ids.size) for plan in plans),
                                        "by_source": {plan.name: {"articles": int(plan.val_ids.size),
                                                                  "article_ids": plan.val_ids.tolist()}
                                                      for plan in plans}}}})
    print(f"{STAGE}: vocab {vocab_size:,} ({np.dtype(dtype).name}); train {totals['train'].tokens:,} tokens in "
          f"{totals['train'].documents:,} documents, val {totals['val'].tokens:,} tokens in "
          f"{totals['val'].documents:,} documents -> {out_dir}")
    if len(plans) > 1:
        for plan in plans:
            used, available = plan.bytes_of(TRAIN), plan.bytes_of(TRAIN) + plan.bytes_of(SKIP)
            print(f"{STAGE}: {plan.name}: weight {plan.weight:.3f}, {used:,} of {available:,} training bytes used "
                  f"({used / available:.0%})")
    return 0


def mixture_record(plans: list[SourcePlan], totals: dict[str, SplitTotals]) -> dict:
    """What the manifest says of the mixture: its rule, and per source what was available and used."""
    index = {name: split.rows() for name, split in totals.items()}
    used_total = sum(plan.bytes_of(TRAIN) for plan in plans)
    by_source = {}
    for source, plan in enumerate(plans):
        mine = {name: rows[rows["source"] == source] for name, rows in index.items()}
        by_source[plan.name] = {
            "weight": plan.weight, "parts": len(plan.files),
            "documents_available": int((plan.destination != VAL).sum()),
            "bytes_available": plan.bytes_of(TRAIN) + plan.bytes_of(SKIP),
            "documents": int(mine["train"].size), "bytes_used": int(mine["train"]["bytes"].sum()),
            "tokens": int(mine["train"]["tokens"].sum()),
            "share_of_bytes": round(int(mine["train"]["bytes"].sum()) / max(used_total, 1), 6),
            "val_documents": int(mine["val"].size), "val_bytes": int(mine["val"]["bytes"].sum()),
            "val_tokens": int(mine["val"]["tokens"].sum())}
    return {"rule": "weights by UTF-8 bytes of the training stream; no document repeated: the source with the fewest "
                    "training bytes for its weight is used whole and sets the total, every other source gives its "
                    "share of it, its documents taken in splitmix64(article_id) order",
            "by_source": by_source}
