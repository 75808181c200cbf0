"""Add a corpus read through Hugging Face `datasets` to the paragraphs format, in DATA_DIR/corpora/NAME/.

Three ways in, all the `datasets` library's own code path, and all read as a stream:
  --hf DATASET    a Hub dataset (what `load_dataset(DATASET, CONFIG, split=SPLIT, streaming=True)` does:
                  `load_dataset_builder` then `as_streaming_dataset`, so the commit the revision resolved
                  to can be recorded); only what is read is fetched, no Arrow cache is written
  --files F ...   local JSONL, Parquet or text files (compressed ones too) through the builders "json",
                  "parquet" or "text" (`data_files=...`), streamed as well, so no cached copy of them is
                  made; a text file is one document
  --from-disk DIR a dataset saved with `save_to_disk` (`load_from_disk`: memory-mapped Arrow)

A document (one row of the dataset) becomes paragraphs: its text is split on newlines, each line
stripped of surrounding spaces, blank lines dropped (web corpora put one paragraph per line). With
`--paragraphs blank-line` it is split on blank lines instead and single newlines stay inside a
paragraph (books whose lines are wrapped). `tokenize` joins a document's paragraphs with newlines,
so what is lost is blank lines and spaces at line ends.

Rows follow pipeline/paragraphs.py: `source` is NAME; `article_id` is the document's index in the
stream (every row counts, an empty one too) in the low 32 bits under a 31-bit tag hashed from NAME,
so ids are stable for the same data and distinct from Wikipedia's page ids and from other corpora's;
`title` comes from --title-column when the dataset has one, else empty; `section_path` is empty.
Parts of about --rows-per-part rows are written while the stream goes on (a document never spans
two parts), so memory holds a batch, not the corpus; --max-bytes stops after the document that
reaches that many bytes of UTF-8 text.

The manifest (manifests/corpus-NAME.json) records the dataset, its config and split, the Hub commit
that the revision resolved to (local files: their sha256; a saved dataset: its `datasets`
fingerprint and files), and the counts. A rerun with the same arguments is skipped while the parts
are intact, without asking the Hub whether the dataset has changed since: pin --revision, or use
--force to read it again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import StageRun, atomic_path, checked_section, file_record
from pipeline.paragraphs import SCHEMA, WIKIPEDIA_SOURCE, part_files, part_name

STAGE_PREFIX = "corpus-"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# how a file's name ends (after any compression suffix) -> the `datasets` builder that reads it
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
                 ".txt": "text", ".text": "text"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")  # what `datasets` decompresses as it streams
BLANK_LINE = re.compile(r"\n\s*\n")
DEFAULT_SPLIT = "train"
READ_BATCH = 1000  # documents per batch read from the dataset
WRITE_ROWS = 65536  # paragraph rows per Parquet row group
DEFAULT_ROWS_PER_PART = 1_000_000
INDEX_BITS = 32  # article_id = tag << 32 | index in the stream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME",
                        help="the corpus's name: its folder DATA_DIR/corpora/NAME and its rows' `source` "
                             "(lowercase letters, digits, - and _; not frwiki)")
    origin = parser.add_mutually_exclusive_group(required=True)
    origin.add_argument("--hf", metavar="DATASET",
                        help="a Hugging Face Hub dataset, streamed (e.g. uonlp/CulturaX with --config fr)")
    origin.add_argument("--files", type=Path, nargs="+", metavar="FILE",
                        help="local files of one format: JSONL (.jsonl/.json), Parquet or text (.txt: one "
                             "document per file), each possibly compressed (.gz, .bz2, .xz)")
    origin.add_argument("--from-disk", type=Path, metavar="DIR", help="a dataset saved with `save_to_disk`")
    parser.add_argument("--config", default=None, help="the Hub dataset's configuration (subset), e.g. fr")
    parser.add_argument("--revision", default=None,
                        help="the Hub dataset's branch, tag or commit (default: its main branch; the commit "
                             "read is recorded either way)")
    parser.add_argument("--split", default=None,
                        help=f"the split to read, for --hf and a saved DatasetDict (default: {DEFAULT_SPLIT})")
    parser.add_argument("--text-column", default="text", help="the column holding each document's text")
    parser.add_argument("--title-column", default="title",
                        help="the column of document titles, used when the dataset has it; without it titles are empty")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="stop after the document that brings the text to this many UTF-8 bytes, e.g. "
                             "2_000_000_000 (default: the whole split)")
    parser.add_argument("--paragraphs", choices=("newline", "blank-line"), default="newline",
                        help="where a document splits into paragraphs: every newline, or blank lines only")
    parser.add_argument("--rows-per-part", type=int, default=DEFAULT_ROWS_PER_PART,
                        help="paragraphs per Parquet part; a part ends after the document that reaches this many")


def stage_name(name: str) -> str:
    return f"{STAGE_PREFIX}{name}"


def check_name(name: str) -> None:
    if name == WIKIPEDIA_SOURCE:
        raise StageError(f"{name!r} names the Wikipedia paragraphs (`just extract-paragraphs`); give the corpus "
                         f"another name")
    if not NAME_PATTERN.fullmatch(name):
        raise StageError(f"corpus name {name!r} must be 1 to 64 lowercase letters, digits, - or _, starting with "
                         f"a letter or digit (it names a folder and a `--mix` entry)")


def corpus_tag(name: str) -> int:
    """The high bits of a corpus's article ids: a hash of its name, never 0 (Wikipedia's page ids)."""
    digest = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
    return (digest & 0x7FFF_FFFF) or 1


def split_paragraphs(text: str, on_blank_lines: bool) -> list[str]:
    parts = BLANK_LINE.split(text) if on_blank_lines else text.split("\n")
    return [stripped for part in parts if (stripped := part.strip())]


def file_builder(files: list[Path]) -> str:
    """The `datasets` builder for these files ("json", "parquet" or "text"); StageError when a file is
    missing, or their formats differ or are unknown."""
    builders = set()
    for path in files:
        if path.is_dir():
            raise StageError(f"{path} is a folder; give its files (e.g. {path}/*.jsonl), or --from-disk {path} "
                             f"for a dataset saved with save_to_disk")
        if not path.is_file():
            raise StageError(f"{path} does not exist; check the path")
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
            suffixes.pop()
        builder = FILE_BUILDERS.get(suffixes[-1] if suffixes else "")
        if builder is None:
            raise StageError(f"{path}: unknown format; --files takes {', '.join(FILE_BUILDERS)} files "
                             f"(optionally {', '.join(COMPRESSION_SUFFIXES)})")
        builders.add(builder)
    if len(builders) > 1:
        raise StageError(f"--files mixes formats ({', '.join(sorted(builders))}); add each format as its own corpus")
    return builders.pop()


class DatasetsLog(logging.Handler):
    """For a block: the errors that `datasets` logs are kept rather than printed (its builders name
    there the file they could not parse, which the exception they raise does not); its other
    records still go to its own handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []
        self._logger = logging.getLogger("datasets")
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> "DatasetsLog":
        self._handlers, self._logger.handlers = self._logger.handlers, [self]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._logger.handlers = self._handlers

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(record.getMessage())
        else:
            for handler in self._handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


@contextlib.contextmanager
def dataset_errors(what: str) -> Iterator[None]:
    """Turn what `datasets` raises about the data (a dataset not on the Hub, no network, a missing
    file, an unknown split or config, a file it cannot parse) into one line naming `what`."""
    from datasets.exceptions import DatasetNotFoundError, DatasetsError
    with DatasetsLog() as log:
        try:
            yield
        except DatasetNotFoundError as err:
            raise StageError(f"{what}: {first_line(err)} Check the name; a gated dataset needs `hf auth login` "
                             f"and access granted on its page") from None
        except ConnectionError as err:
            raise StageError(f"{what}: {first_line(err)}; check the network (and that HF_HUB_OFFLINE / "
                             f"HF_DATASETS_OFFLINE are unset)") from None
        except (OSError, ValueError, DatasetsError, pa.ArrowException) as err:
            cause = first_line(err) or type(err).__name__
            raise StageError(f"{what}: {log.errors[-1] if log.errors else cause}") from None


def first_line(err: BaseException) -> str:
    return str(err).strip().split("\n", 1)[0]


@dataclass
class Origin:
    """An opened dataset: a `datasets.Dataset` or `IterableDataset` (both have `column_names`,
    `features`, `select_columns` and `iter`), and what the manifest records of it."""

    dataset: Any
    record: dict[str, Any]
    what: str  # how errors name it


def hub_origin(dataset_id: str, config: str | None, revision: str | None, split: str) -> Origin:
    import datasets

    what = f"dataset {dataset_id}" + (f" ({config})" if config else "")
    with dataset_errors(what):
        builder = datasets.load_dataset_builder(dataset_id, config, revision=revision)
        dataset = builder.as_streaming_dataset(split=split)
    split_info = (builder.info.splits or {}).get(split)
    return Origin(dataset, {"kind": "hub", "dataset": dataset_id, "config": builder.config.name, "split": split,
                            "revision": revision or "main", "commit": builder.hash,
                            "dataset_version": str(builder.info.version) if builder.info.version else None,
                            "split_examples": split_info.num_examples if split_info else None,
                            "split_bytes": split_info.num_bytes if split_info else None}, what)


def files_origin(files: list[Path], builder_name: str) -> Origin:
    import datasets

    options = {"sample_by": "document"} if builder_name == "text" else {}
    what = f"--files ({builder_name})"
    with dataset_errors(what):
        builder = datasets.load_dataset_builder(builder_name, data_files=[str(p.resolve()) for p in files], **options)
        dataset = builder.as_streaming_dataset(split=DEFAULT_SPLIT)  # a list of data files is one "train" split
    return Origin(dataset, {"kind": "files", "builder": builder_name, "files": len(files)}, what)


def disk_origin(folder: Path, split: str | None) -> Origin:
    import datasets

    what = f"saved dataset {folder}"
    with dataset_errors(what):
        loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        split = split or DEFAULT_SPLIT
        if split not in loaded:
            raise StageError(f"{what} has no split {split!r} (its splits: {', '.join(loaded)}); give --split")
        loaded = loaded[split]
    elif split is not None:
        raise StageError(f"{what} is a single Dataset, without splits; leave out --split {split}")
    return Origin(loaded, {"kind": "disk", "split": split, "fingerprint": loaded._fingerprint,
                           "rows": loaded.num_rows}, what)


def saved_files(folder: Path) -> list[Path]:
    """The files of a `save_to_disk` folder (Arrow data, state and info), in name order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def check_options(args: argparse.Namespace) -> None:
    check_name(args.name)
    if args.hf is None and (args.config is not None or args.revision is not None):
        raise StageError("--config and --revision apply to a Hub dataset (--hf)")
    if args.files is not None and args.split is not None:
        raise StageError("--split does not apply to --files (their rows are one split)")
    if args.max_bytes is not None and args.max_bytes < 1:
        raise StageError(f"--max-bytes must be positive, got {args.max_bytes}")
    if args.rows_per_part < 1:
        raise StageError(f"--rows-per-part must be positive, got {args.rows_per_part}")
    if args.text_column == args.title_column:
        raise StageError(f"--text-column and --title-column are both {args.text_column!r}")
    if args.from_disk is not None and not args.from_disk.is_dir():
        raise StageError(f"{args.from_disk} is not a folder; --from-disk takes the folder `save_to_disk` wrote")


def open_origin(args: argparse.Namespace) -> Origin:
    if args.hf is not None:
        return hub_origin(args.hf, args.config, args.revision, args.split or DEFAULT_SPLIT)
    if args.files is not None:
        return files_origin(args.files, file_builder(args.files))
    return disk_origin(args.from_disk, args.split)


class Columns:
    """Which columns to read, checked against the dataset's columns once they are known (from its
    features, or else from its first batch): the text column must exist and hold strings."""

    def __init__(self, text: str, title: str) -> None:
        self.text, self.title, self.has_title = text, title, False

    def check(self, columns: list[str], features: Any, what: str) -> None:
        if self.text not in columns:
            raise StageError(f"{what} has no column {self.text!r} (its columns: {', '.join(columns)}); "
                             f"give --text-column")
        feature = (features or {}).get(self.text)
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise StageError(f"{what}: column {self.text!r} holds {feature}, not text; give --text-column")
        self.has_title = self.title in columns

    def kept(self) -> list[str]:
        return [self.text, self.title] if self.has_title else [self.text]


def read_batches(origin: Origin, columns: Columns) -> Iterator[dict[str, list]]:
    """The dataset's rows in batches of `READ_BATCH` as {column: values}, only the columns kept;
    reading errors (a file that does not parse, the network) become one line."""
    dataset = origin.dataset
    known = dataset.column_names is not None
    if known:
        columns.check(dataset.column_names, dataset.features, origin.what)
        dataset = dataset.select_columns(columns.kept())
    batches = iter(dataset.iter(batch_size=READ_BATCH))
    while True:
        with dataset_errors(origin.what):
            batch = next(batches, None)
        if batch is None:
            return
        if not known:
            columns.check(list(batch), None, origin.what)
            known = True
        yield batch


@dataclass
class Counts:
    documents: int = 0  # read from the stream, empty ones included
    documents_written: int = 0
    empty_documents: int = 0  # no text, or only blank lines
    paragraphs: int = 0
    bytes: int = 0  # UTF-8 bytes of the paragraphs written
    characters: int = 0
    stopped_at_max_bytes: bool = False


class PartWriter:
    """Paragraph rows into FOLDER/part-00000.parquet, part-00001.parquet, ...: row groups of
    `WRITE_ROWS` rows, a new part once one holds `rows_per_part` rows (after a whole document), each
    part renamed into place when complete and recorded as the stage's output. Leaving the block by
    an exception leaves no partial part."""

    def __init__(self, folder: Path, source: str, rows_per_part: int, stage: StageRun) -> None:
        self.folder, self.source, self.rows_per_part, self.stage = folder, source, rows_per_part, stage
        self.parts = 0
        self._buffer: dict[str, list] = {"article_id": [], "title": [], "paragraph_index": [], "text": []}
        self._part_rows = self._part_documents = 0
        self._writer: pq.ParquetWriter | None = None
        self._open = contextlib.ExitStack()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> None:
        if kind is None:
            with self._open:  # a failure while ending the last part reaches its atomic_path: no rename
                self._end_part()
            return
        try:  # the part under way is dropped: atomic_path, told of the error, removes its temporary file
            if self._writer is not None:
                self._writer.close()
        finally:
            self._open.__exit__(kind, error, traceback)

    def add(self, article_id: int, title: str, paragraphs: list[str]) -> None:
        buffer, n = self._buffer, len(paragraphs)
        buffer["article_id"].extend([article_id] * n)
        buffer["title"].extend([title] * n)
        buffer["paragraph_index"].extend(range(n))
        buffer["text"].extend(paragraphs)
        self._part_rows += n
        self._part_documents += 1
        if len(buffer["text"]) >= WRITE_ROWS:
            self._flush()
        if self._part_rows >= self.rows_per_part:
            self._end_part()

    def _flush(self) -> None:
        buffer = self._buffer
        n = len(buffer["text"])
        if not n:
            return
        if self._writer is None:
            tmp = self._open.enter_context(atomic_path(self.folder / part_name(self.parts)))
            self._writer = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
        self._writer.write_table(pa.table({
            "article_id": pa.array(buffer["article_id"], pa.int64()), "title": pa.array(buffer["title"], pa.string()),
            "section_path": pa.repeat(pa.scalar("", pa.string()), n),
            "paragraph_index": pa.array(buffer["paragraph_index"], pa.int32()),
            "text": pa.array(buffer["text"], pa.string()), "source": pa.repeat(pa.scalar(self.source, pa.string()), n),
        }, schema=SCHEMA))
        for values in buffer.values():
            values.clear()

    def _end_part(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        self._open.close()  # renames the part into place
        self.stage.add_output(self.folder / part_name(self.parts),
                              counts={"rows": self._part_rows, "documents": self._part_documents})
        self.parts += 1
        self._part_rows = self._part_documents = 0


def write_corpus(origin: Origin, columns: Columns, writer: PartWriter, on_blank_lines: bool,
                 max_bytes: int | None) -> Counts:
    """Stream the dataset's documents into `writer` until it ends or `max_bytes` of text are written."""
    counts, tag = Counts(), corpus_tag(writer.source) << INDEX_BITS
    with tqdm(total=max_bytes, unit="B", unit_scale=True, desc=f"add-corpus {writer.source}") as bar:
        for batch in read_batches(origin, columns):
            titles = batch[columns.title] if columns.has_title else None
            for row, text in enumerate(batch[columns.text]):
                index = counts.documents
                counts.documents += 1
                if index >> INDEX_BITS:
                    raise StageError(f"{origin.what} has more than {1 << INDEX_BITS:,} documents; "
                                     f"give --max-bytes, or split it into several corpora")
                if text is not None and not isinstance(text, str):
                    raise StageError(f"{origin.what}: column {columns.text!r} holds {type(text).__name__} values, "
                                     f"not text; give --text-column")
                paragraphs = split_paragraphs(text, on_blank_lines) if text else []
                if not paragraphs:
                    counts.empty_documents += 1
                    continue
                title = titles[row] if titles is not None else None
                writer.add(tag | index, title if isinstance(title, str) else "", paragraphs)
                size = sum(len(p.encode("utf-8")) for p in paragraphs)
                counts.documents_written += 1
                counts.paragraphs += len(paragraphs)
                counts.bytes += size
                counts.characters += sum(map(len, paragraphs))
                bar.update(size)
                if max_bytes is not None and counts.bytes >= max_bytes:
                    counts.stopped_at_max_bytes = True
                    return counts
            bar.set_postfix_str(f"{counts.documents_written:,} documents")
    return counts


def corpus_section(manifest: dict, path: Path) -> dict:
    """The `corpus` section of a loaded corpus-NAME manifest, checked."""
    return checked_section(manifest, "corpus", path, {"name": str, "origin": dict})


def run(args: argparse.Namespace) -> int:
    check_options(args)
    folder = layout.corpus_dir(args.data_dir, args.name)
    if args.files is not None:
        file_builder(args.files)  # a missing file or an unknown format is refused before anything is removed
        local = args.files
    else:
        local = saved_files(args.from_disk) if args.from_disk is not None else []
    inputs = [file_record(path) for path in local]  # --files: the files themselves, in their order
    parameters = {"name": args.name, "hf": args.hf,
                  "from_disk": Path(args.from_disk) if args.from_disk else None, "config": args.config,
                  "revision": args.revision, "split": args.split, "text_column": args.text_column,
                  "title_column": args.title_column, "max_bytes": args.max_bytes, "paragraphs": args.paragraphs,
                  "rows_per_part": args.rows_per_part, "output": Path(folder)}
    with StageRun(stage_name(args.name), args.manifests, parameters, inputs, force=args.force,
                  section=corpus_section) as stage:
        if not stage.start(folder, [folder]):
            return 0
        origin = open_origin(args)  # a source that cannot be opened leaves the previous corpus in place
        for old in part_files(folder):  # a previous run's parts: this run replaces them all
            old.unlink()
        columns = Columns(args.text_column, args.title_column)
        with PartWriter(folder, args.name, args.rows_per_part, stage) as writer:
            counts = write_corpus(origin, columns, writer, args.paragraphs == "blank-line", args.max_bytes)
        if not counts.paragraphs:
            raise StageError(f"{origin.what} holds no text: {counts.documents:,} documents, every one empty "
                             f"in column {args.text_column!r}; check --text-column and --split")
        totals = {"documents": counts.documents, "documents_written": counts.documents_written,
                  "empty_documents": counts.empty_documents, "paragraphs": counts.paragraphs,
                  "bytes": counts.bytes, "characters": counts.characters, "parts": writer.parts,
                  "stopped_at_max_bytes": counts.stopped_at_max_bytes}
        stage.finish(counters=totals, extra={"corpus": {
            "name": args.name, "origin": origin.record,
            "title_column": args.title_column if columns.has_title else None}})
    print(f"add-corpus: {args.name}: {counts.documents_written:,} documents, {counts.paragraphs:,} paragraphs, "
          f"{counts.bytes / 1e6:,.1f} MB of text in {writer.parts} part(s) -> {folder}"
          + (" (stopped at --max-bytes)" if counts.stopped_at_max_bytes else ""))
    return 0
