"""Extract every paragraph of the frwiki JSONL shards into a Parquet dataset: one part per shard.

The inputs are every file the download manifest lists (or each --input), in order; shard i becomes
DATA_DIR/paragraphs/part-i.parquet (zstd) in the paragraphs format of pipeline/paragraphs.py, with
source "frwiki". Two passes:

1. Parse. Each file is cut into byte ranges aligned to line starts; workers parse the ranges of every
   file, one file after the other, in parallel (orjson), and the main process writes their tables in
   order to a temporary part per shard, so the output is identical for any worker count. A
   gzip-compressed input (`.jsonl.gz`, told by its first bytes) is decompressed by the main process
   as it goes, cut where the plain file would be cut, so its output is the plain file's. Bad lines
   are skipped and counted by reason, the first ones recorded with their cause; a last line cut short
   (an interrupted download) is reported as such and not counted against --max-bad-fraction, which
   applies to each file.
2. Deduplicate, part by part in order. An article identifier seen more than once (in one shard or
   across shards) keeps one copy: the latest `date_modified` (RFC 3339, compared as instants), else
   the first. Then a paragraph whose exact text was kept before (earlier in its article, in another
   article or another shard) is removed; `paragraph_index` keeps the paragraph's place in its
   article, so a gap marks a removed duplicate.

Memory stays bounded however many shards: at most two ranges per worker are in flight (about 3x
--chunk-bytes each), and the main process keeps 32 bytes per article (identifier, date, place) and an
exact set of the 8-byte digests (blake2b) of the distinct paragraphs kept, as sorted arrays: 8 bytes
per paragraph, twice that while its largest arrays merge. For all of frwiki (about 2.6 million
articles and, at an estimated ten paragraphs each, some 30 million paragraphs) that is about 0.1 GB
and 0.25 GB (0.5 GB during the last merge). Two different paragraphs share a 64-bit digest with
probability about n^2 / 2^65 (2e-5 for 30 million): the later one would then be dropped as a
duplicate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import gzip
import hashlib
import os
import sys
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import layout, paragraphs
from pipeline.errors import StageError
from pipeline.manifest import StageRun, atomic_path, load_manifest, verify_input
from pipeline.workers import ordered_map, signals_deferred

STAGE = "extract-paragraphs"
# What pass 1 writes: the paragraphs format without its constant source, with each text's digest.
PARSED_SCHEMA = pa.schema([*(f for f in paragraphs.SCHEMA if f.name != "source"), ("digest", pa.uint64())])
BAD_REASONS = ("invalid_json", "not_utf8", "not_object", "identifier_out_of_range", "truncated")
FIRST_LINES_KEPT = 10  # bad lines recorded with their cause, in file order
FIRST_LINES_SHOWN = 3  # of those, in the error message
INT64 = range(-(1 << 63), 1 << 63)
NO_DATE = -(1 << 63)  # an article without a readable date_modified: never "later" than another
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_CHUNK_BYTES = 16 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, action="append", default=None,
                        help="a JSONL input, plain or gzip-compressed; repeat it for several shards, each one "
                             "part in the order given (default: every file the download manifest lists)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="Parquet dataset folder (default: DATA_DIR/paragraphs)")
    parser.add_argument("--lists", action="store_true",
                        help="also emit list items (nested items, repeated by the dump, are emitted once)")
    parser.add_argument("--min-chars", type=int, default=1, help="skip paragraphs shorter than this many characters")
    parser.add_argument("--max-bad-fraction", type=float, default=0.001,
                        help="fail, writing nothing, when more than this fraction of a file's lines is malformed "
                             "(a last line cut short is reported and skipped, not counted)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parser processes, shared by all files (output is identical for any count)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                        help="bytes of input per work unit; bounds memory (about 3x this per worker)")


@dataclass(frozen=True)
class ExtractOptions:
    lists: bool = False
    min_chars: int = 1


@dataclass
class ChunkResult:
    """What one worker returns for one byte range of one shard."""

    table: pa.Table  # PARSED_SCHEMA
    article_ids: np.ndarray  # int64, one per article parsed, in order
    modified: np.ndarray  # int64 microseconds since the epoch, NO_DATE when absent or unreadable
    article_rows: np.ndarray  # int64 rows of each article
    shard: int = 0
    input_bytes: int = 0
    lines: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # reason -> lines
    first_bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line in chunk, 1-based; reason; cause)
    no_identifier: int = 0
    without_paragraphs: int = 0
    short_skipped: int = 0

    def add_bad(self, line: int, reason: str, cause: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        if len(self.first_bad) < FIRST_LINES_KEPT:
            self.first_bad.append((line, reason, cause))


def list_item_texts(part: dict) -> list[str]:
    """Values of every list item under a list, depth first, in document order."""
    texts = []
    for child in part.get("has_parts") or ():
        if not isinstance(child, dict):
            continue
        value = child.get("value")
        if child.get("type") == "list_item" and isinstance(value, str) and value.strip():
            texts.append(value)
        texts.extend(list_item_texts(child))
    return texts


def article_paragraphs(article: dict, options: ExtractOptions, section_paths: list[str], texts: list[str]) -> int:
    """Append (section_path, text) of every paragraph (and list item, with --lists) in document order.

    Returns the number of paragraphs skipped as shorter than --min-chars. This is the per-line hot
    loop: it appends straight into the column lists and joins a section's path once.
    """
    min_chars, lists = options.min_chars, options.lists
    short = 0

    def walk(parts: list, headings: tuple[str, ...], path: str) -> None:
        nonlocal short
        for part in parts:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "paragraph":
                value = part.get("value")
                if value.__class__ is str and value and not value.isspace():
                    if len(value) < min_chars:
                        short += 1
                    else:
                        section_paths.append(path)
                        texts.append(value)
            elif kind == "list":
                if lists:
                    # A parent item's value already holds its nested items, which the dump repeats as
                    # items of their own: skip an item contained in the last item emitted.
                    last = ""
                    for text in list_item_texts(part):
                        if last and text in last:
                            continue
                        last = text
                        if len(text) < min_chars:
                            short += 1
                        else:
                            section_paths.append(path)
                            texts.append(text)
            else:
                children = part.get("has_parts")
                if not isinstance(children, list):
                    continue
                name = part.get("name") if kind == "section" else None
                if isinstance(name, str) and name:
                    walk(children, headings + (name,), " > ".join(headings + (name,)))
                else:
                    walk(children, headings, path)

    sections = article.get("sections")
    if isinstance(sections, list):
        walk(sections, (), "")
    return short


def classify_bad_line(line: bytes, error: orjson.JSONDecodeError, cut: bool) -> tuple[str, str]:
    """(reason, cause) of a line that orjson refused; `cut`: it is the last line and has no newline."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as err:
        if cut and err.reason == "unexpected end of data":
            return "truncated", "the file ends inside a multi-byte character: it was cut short"
        if not cut:
            return "not_utf8", f"byte {line[err.start]:#04x} at column {err.start + 1} is not UTF-8"
    if cut:
        return "truncated", "the file ends inside this line (no final newline): it was cut short"
    message, _, where = str(error).rpartition(": line 1 column ")  # orjson: "<what>: line 1 column N (char M)"
    return "invalid_json", f"invalid JSON: {message} (column {where.split()[0]})" if message else str(error)


def parse_lines(data: bytes, options: ExtractOptions) -> ChunkResult:
    """Parse one range of lines. The cyclic GC is paused: parsed JSON holds no cycles, and its
    collections triggered by millions of short-lived dicts cost a third of the time. Ranges end at a
    line end, except the file's last: a range without a final newline ends the file."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse_lines(data, options)
    finally:
        if gc_was_enabled:
            gc.enable()


def _parse_lines(data: bytes, options: ExtractOptions) -> ChunkResult:
    ids, titles, section_paths, indices, texts = [], [], [], [], []
    article_ids, modified, article_rows = [], [], []
    result = ChunkResult(None, None, None, None, input_bytes=len(data))  # type: ignore[arg-type]
    lines = data.split(b"\n")
    last_unterminated = not data.endswith(b"\n")
    if not last_unterminated and lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        result.lines += 1
        if not line.strip():
            continue
        try:
            article = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            result.add_bad(number, *classify_bad_line(line, err, last_unterminated and number == len(lines)))
            continue
        if not isinstance(article, dict):
            result.add_bad(number, "not_object", f"not a JSON object but {JSON_TYPES[type(article)]}")
            continue
        article_id = article.get("identifier")
        if not isinstance(article_id, int) or isinstance(article_id, bool):
            result.no_identifier += 1
            continue
        if article_id not in INT64:
            result.add_bad(number, "identifier_out_of_range", f"identifier {article_id} does not fit in 64 bits")
            continue
        before = len(texts)
        result.short_skipped += article_paragraphs(article, options, section_paths, texts)
        count = len(texts) - before
        if not count:
            result.without_paragraphs += 1
        title = article.get("name")
        ids.extend(repeat(article_id, count))
        titles.extend(repeat(title if isinstance(title, str) else "", count))
        indices.extend(range(count))
        article_ids.append(article_id)
        modified.append(instant(article.get("date_modified")))
        article_rows.append(count)
    digests = np.frombuffer(b"".join(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
                                     for text in texts), dtype="<u8")
    result.table = pa.table([ids, titles, section_paths, indices, texts, digests], schema=PARSED_SCHEMA)
    result.article_ids = np.array(article_ids, dtype=np.int64)
    result.modified = np.array(modified, dtype=np.int64)
    result.article_rows = np.array(article_rows, dtype=np.int64)
    return result


def instant(value: object) -> int:
    """An RFC 3339 date as microseconds since the epoch (UTC when it names no offset), NO_DATE when
    it is absent or unreadable."""
    if not isinstance(value, str):
        return NO_DATE
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return NO_DATE
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return (moment - EPOCH) // dt.timedelta(microseconds=1)


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class Unit:
    """One work unit: a byte range a worker reads itself, or lines the main process decompressed."""

    shard: int
    path: str | None = None
    start: int = 0
    end: int = 0
    data: bytes | None = None


def parse_unit(options: ExtractOptions, unit: Unit) -> ChunkResult:
    data = unit.data
    if data is None:
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.end - unit.start)
    result = parse_lines(data, options)
    result.shard = unit.shard
    return result


def line_aligned_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about `chunk_bytes`, each starting at a line start, covering the file."""
    size = path.stat().st_size
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()  # move to the next line start (a huge line simply makes a bigger range)
            end = min(f.tell(), size) if start + chunk_bytes < size else size
            ranges.append((start, end))
            start = end
    return ranges


def gzip_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The decompressed stream of a gzip file cut exactly as `line_aligned_ranges` cuts the plain
    file: after the first line end at or past `chunk_bytes`, or at the end."""
    with gzip_errors(path), gzip.open(path, "rb") as f:
        rest = b""
        while True:
            parts, size = [rest], len(rest)
            cut = rest.find(b"\n", chunk_bytes) + 1 if size > chunk_bytes else 0
            while not cut and (block := f.read(max(chunk_bytes, 1 << 20))):
                parts.append(block)
                size += len(block)
                if size > chunk_bytes:  # search the new bytes only, from chunk_bytes on
                    at = block.find(b"\n", max(chunk_bytes - (size - len(block)), 0))
                    cut = size - len(block) + at + 1 if at >= 0 else 0
            data = b"".join(parts)
            if not cut:  # the end of the stream
                if data:
                    yield data
                return
            yield data[:cut]
            rest = data[cut:]


def work_units(inputs: list[tuple[Path, bool]], chunk_bytes: int) -> Iterator[Unit]:
    """The units of every input, file after file: (path, gzip-compressed) each."""
    for shard, (path, compressed) in enumerate(inputs):
        if compressed:  # the main process decompresses; workers get the lines themselves
            yield from (Unit(shard, data=data) for data in gzip_chunks(path, chunk_bytes))
        else:  # workers read their own range: no data through the pipes
            yield from (Unit(shard, str(path), start, end) for start, end in line_aligned_ranges(path, chunk_bytes))


@contextmanager
def gzip_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise StageError(f"{path} is a damaged or cut gzip file ({err}); download it again") from None


def check_input_kind(path: Path) -> bool:
    """Refuse what is not frwiki JSONL; True when it is gzip-compressed JSONL."""
    size = path.stat().st_size
    if size == 0:
        raise StageError(f"{path} is empty; expected the frwiki JSONL (`just download`)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        raise StageError(f"{path} is a zip archive; give the JSONL inside (`just download --from {path}` "
                         f"extracts it)")
    compressed = head.startswith(GZIP_MAGIC)
    if compressed:
        with gzip_errors(path), gzip.open(path, "rb") as f:
            head = f.read(4)
        if not head:
            raise StageError(f"{path} holds an empty gzip stream; expected the frwiki JSONL (`just download`)")
    if head == b"PAR1":
        raise StageError(f"{path} is a Parquet file, not JSONL: this stage reads the JSONL of dataset version 1 "
                         f"(`just download` pins it)")
    return compressed


@dataclass
class FileTotals:
    """The counts of one input shard (its part's, for rows, articles and characters)."""

    file: str
    lines: int = 0
    articles: int = 0  # distinct identifiers kept from this file
    rows: int = 0  # paragraphs written
    characters: int = 0
    no_identifier: int = 0
    without_paragraphs: int = 0
    short_skipped: int = 0
    duplicate_articles: int = 0  # copies of an identifier dropped from this file
    duplicate_paragraphs: int = 0  # paragraphs removed as exact copies of one kept before
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    first_bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, cause), file order

    def add(self, chunk: ChunkResult) -> None:
        for reason, count in chunk.bad.items():
            self.bad[reason] += count
        room = FIRST_LINES_KEPT - len(self.first_bad)
        self.first_bad += [(self.lines + n, reason, cause) for n, reason, cause in chunk.first_bad[:room]]
        self.lines += chunk.lines
        self.articles += chunk.article_ids.size
        self.no_identifier += chunk.no_identifier
        self.without_paragraphs += chunk.without_paragraphs
        self.short_skipped += chunk.short_skipped

    def check(self, path: Path, max_bad_fraction: float) -> None:
        bad_lines = sum(self.bad.values()) - self.bad["truncated"]  # a cut last line is reported apart
        if self.lines and bad_lines / self.lines > max_bad_fraction:
            first = "; ".join(f"line {line}: {cause}" for line, _, cause in self.first_bad[:FIRST_LINES_SHOWN])
            raise StageError(f"{path}: {bad_lines:,} of {self.lines:,} lines are malformed ({bad_summary(self.bad)}; "
                             f"{first}), more than --max-bad-fraction {max_bad_fraction}; nothing written. Check the "
                             f"input file")
        if self.articles == 0:
            raise StageError(f"{path} holds no frwiki article (no line is a JSON object with an integer "
                             f"`identifier`); is it the Structured-Contents JSONL?")


def bad_summary(bad: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in bad.items() if count)


class OverlappedWriter:
    """A ParquetWriter (zstd) whose writes run on a thread, overlapped with the caller's work: Parquet
    encoding and compression release the GIL. At most one table waits to be written.

    The thread starts here, with interrupts held: a Ctrl-C in the middle of a lazy start (on the
    first write) left a thread that `close` did not wait for, writing while the file was closed
    under it (a crash)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._thread = ThreadPoolExecutor(1)
        self._pending: Future | None = None
        try:
            with signals_deferred():
                self._thread.submit(int).result()
        except BaseException:  # the interrupt held meanwhile: nothing is left running
            self.close()
            raise

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._wait()
            self._pending = self._thread.submit(self._writer.write_table, table)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._thread.shutdown()
            self._writer.close()


class DigestSet:
    """An exact set of uint64 digests in sorted runs, each at least twice the size of the next (a
    log-structured merge): 8 bytes per member, lookups by binary search."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def first_seen(self, digests: np.ndarray) -> np.ndarray:
        """Which of `digests` are new: not in the set, nor earlier in `digests`; they join the set."""
        unique, first = np.unique(digests, return_index=True)
        new = np.ones(unique.size, dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, unique), run.size - 1)
            new &= run[at] != unique
        mask = np.zeros(digests.size, dtype=bool)
        mask[first[new]] = True
        run = unique[new]
        while self.runs and self.runs[-1].size <= 2 * run.size:
            run = np.concatenate([self.runs.pop(), run])
            run.sort()
        if run.size:
            self.runs.append(run)
        return mask


@dataclass
class Articles:
    """Every article parsed, in input order: 32 bytes each."""

    ids: list[np.ndarray] = field(default_factory=list)
    modified: list[np.ndarray] = field(default_factory=list)
    shard: list[np.ndarray] = field(default_factory=list)
    start: list[np.ndarray] = field(default_factory=list)  # first row in its shard's part
    rows: list[np.ndarray] = field(default_factory=list)

    def add(self, chunk: ChunkResult, first_row: int) -> None:
        self.ids.append(chunk.article_ids)
        self.modified.append(chunk.modified)
        self.shard.append(np.full(chunk.article_ids.size, chunk.shard, dtype=np.int32))
        self.start.append(first_row + np.cumsum(chunk.article_rows) - chunk.article_rows)
        self.rows.append(chunk.article_rows.astype(np.int32))

    def dropped(self, shards: int) -> list[list[tuple[int, int]]]:
        """Per shard, the row ranges of the copies of an identifier that are not kept: of each
        identifier the latest date_modified is kept, else (no date on the first copy, or no later
        one) the first."""
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")  # copies of one identifier together, in input order
        group_starts = np.flatnonzero(np.r_[True, ids[order][1:] != ids[order][:-1]])
        group_ends = np.r_[group_starts[1:], ids.size]
        repeated = np.flatnonzero(group_ends - group_starts > 1)  # only these groups loop in Python
        ranges: list[list[tuple[int, int]]] = [[] for _ in range(shards)]
        if not repeated.size:
            return ranges
        modified, shard, start, rows = (np.concatenate(a) for a in (self.modified, self.shard, self.start, self.rows))
        for begin, end in zip(group_starts[repeated], group_ends[repeated]):
            copies = order[begin:end]
            kept = copies[0] if modified[copies[0]] == NO_DATE else copies[np.argmax(modified[copies])]
            for copy in copies[copies != kept]:
                ranges[shard[copy]].append((int(start[copy]), int(start[copy] + rows[copy])))
        return ranges


def extract(sources: list[Path] | Path, out_dir: Path, options: ExtractOptions, workers: int, chunk_bytes: int,
            max_bad_fraction: float, progress: bool = True) -> list[FileTotals]:
    """Write one part per input shard into `out_dir` (atomically) and return each shard's totals;
    raise StageError on bad input."""
    sources = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(p) for p in sources]
    inputs = [(path, check_input_kind(path)) for path in sources]
    files = [FileTotals(path.name) for path in sources]
    temporaries = [out_dir / f".{paragraphs.part_name(i)}.parsed.tmp-{os.getpid()}" for i in range(len(sources))]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        articles = parse_all(inputs, temporaries, files, options, workers, chunk_bytes, progress)
        for (path, _), totals in zip(inputs, files):
            totals.check(path, max_bad_fraction)
        dropped = articles.dropped(len(sources))
        del articles
        seen = DigestSet()
        with tqdm(total=sum(pq.read_metadata(t).num_rows for t in temporaries), unit="row", unit_scale=True,
                  desc=f"{STAGE} dedup", disable=not progress) as bar:
            for shard, temporary in enumerate(temporaries):
                deduplicate(temporary, out_dir / paragraphs.part_name(shard), dropped[shard], seen, files[shard], bar)
                temporary.unlink()
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return files


def parse_all(inputs: list[tuple[Path, bool]], temporaries: list[Path], files: list[FileTotals],
              options: ExtractOptions, workers: int, chunk_bytes: int, progress: bool) -> Articles:
    """Pass 1: every shard parsed into its temporary part, in order; the articles, for pass 2."""
    articles = Articles()
    total_bytes = None if any(compressed for _, compressed in inputs) else sum(p.stat().st_size for p, _ in inputs)
    parse = functools.partial(parse_unit, options)
    writer, shard, rows = None, -1, 0
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total_bytes, unit="B", unit_scale=True, desc=STAGE,
                                       disable=not progress))
        chunks = stack.enter_context(closing(ordered_map(parse, work_units(inputs, chunk_bytes), workers)))
        try:
            for chunk in chunks:
                if chunk.shard != shard:  # units come file after file: this shard starts
                    if writer is not None:
                        writer.close()
                    shard, rows = chunk.shard, 0
                    writer = OverlappedWriter(temporaries[shard], PARSED_SCHEMA)
                files[shard].add(chunk)
                articles.add(chunk, rows)
                rows += chunk.table.num_rows
                writer.write(chunk.table)
                bar.update(chunk.input_bytes)
        finally:
            if writer is not None:
                writer.close()
    return articles


def deduplicate(temporary: Path, part: Path, dropped: list[tuple[int, int]], seen: DigestSet, totals: FileTotals,
                bar: tqdm) -> None:
    """Pass 2 for one shard: its part without the dropped copies of articles nor paragraphs seen before."""
    parsed = pq.ParquetFile(temporary)
    keep_article = np.ones(parsed.metadata.num_rows, dtype=bool)
    for start, end in dropped:
        keep_article[start:end] = False
    totals.duplicate_articles = len(dropped)
    totals.articles -= len(dropped)
    offset = 0
    with atomic_path(part) as tmp:
        writer = OverlappedWriter(tmp, paragraphs.SCHEMA)
        try:
            for index in range(parsed.num_row_groups):
                group = parsed.read_row_group(index)
                rows = keep_article[offset:offset + group.num_rows]
                offset += group.num_rows
                group = group.filter(pa.array(rows))
                new = seen.first_seen(group.column("digest").to_numpy())
                totals.duplicate_paragraphs += int((~new).sum())
                group = group.filter(pa.array(new)).drop_columns(["digest"])
                source = pa.repeat(pa.scalar(paragraphs.WIKIPEDIA_SOURCE, pa.string()), group.num_rows)
                group = group.append_column("source", source)
                totals.rows += group.num_rows
                totals.characters += pc.sum(pc.utf8_length(group.column("text"))).as_py() or 0
                writer.write(group)
                bar.update(rows.size)
        finally:
            writer.close()


def input_files(args: argparse.Namespace) -> list[Path]:
    """The shards to read: each --input, or every file of the download manifest."""
    if args.input:
        return args.input
    manifest = load_manifest(Path(args.manifests) / "download.json")
    if manifest is None or not manifest["outputs"]:
        raise StageError(f"no download manifest in {args.manifests}; run `just download` first (or pass --input)")
    return [Path(output["path"]) for output in manifest["outputs"]]


def run(args: argparse.Namespace) -> int:
    out_dir = args.out_dir or layout.paragraphs_dir(args.data_dir)
    if args.min_chars < 1:
        raise StageError(f"--min-chars must be at least 1, got {args.min_chars}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise StageError(f"--max-bad-fraction must be within [0, 1], got {args.max_bad_fraction}")
    if args.workers < 1 or args.chunk_bytes < 1:
        raise StageError("--workers and --chunk-bytes must be positive")
    sources = input_files(args)
    twice = sorted({str(p) for p in sources if sum(q.resolve() == p.resolve() for q in sources) > 1})
    if twice:
        raise StageError(f"--input {twice[0]} is given more than once; give each shard once")
    inputs = [verify_input(path, args.manifests, producer_required=None if args.input else "download")
              for path in sources]
    options = ExtractOptions(lists=args.lists, min_chars=args.min_chars)
    # Worker count and chunk size do not change the output, so they are not parameters.
    parameters = {"lists": options.lists, "min_chars": options.min_chars, "max_bad_fraction": args.max_bad_fraction,
                  "out_dir": Path(out_dir)}
    with StageRun(STAGE, args.manifests, parameters, inputs, force=args.force) as stage:
        if not stage.start(out_dir, [out_dir]):
            return 0
        for old in paragraphs.part_files(out_dir):  # a previous run's parts: some may not be rewritten
            old.unlink()
        files = extract(sources, out_dir, options, args.workers, args.chunk_bytes, args.max_bad_fraction)
        for shard, totals in enumerate(files):
            stage.add_output(out_dir / paragraphs.part_name(shard),
                             counts={"rows": totals.rows, "articles": totals.articles, "characters": totals.characters})
        total = {key: sum(getattr(f, key) for f in files)
                 for key in ("lines", "articles", "rows", "characters", "without_paragraphs", "duplicate_articles",
                             "duplicate_paragraphs", "no_identifier", "short_skipped")}
        bad = {reason: sum(f.bad[reason] for f in files) for reason in BAD_REASONS}
        first_bad = [{"file": f.file, "line": line, "reason": reason, "cause": cause}
                     for f in files for line, reason, cause in f.first_bad][:FIRST_LINES_KEPT]
        stage.finish(counters={
            "lines": total["lines"], "articles": total["articles"], "paragraphs": total["rows"],
            "characters": total["characters"], "articles_without_paragraphs": total["without_paragraphs"],
            "duplicate_articles": total["duplicate_articles"], "duplicate_paragraphs": total["duplicate_paragraphs"],
            "lines_without_identifier": total["no_identifier"], "short_paragraphs_skipped": total["short_skipped"],
            "bad_lines": bad, "first_bad_lines": first_bad,
            "files": [file_counters(shard, f) for shard, f in enumerate(files)],
        })
    for f in files:
        cut = next(((line, cause) for line, reason, cause in f.first_bad if reason == "truncated"), None)
        if cut:
            print(f"{STAGE}: warning: {f.file}: skipped the last line (line {cut[0]:,}): {cut[1]}; is the input an "
                  f"interrupted download? (`just download` resumes one)", file=sys.stderr)
    print(f"{STAGE}: {len(files)} shard(s), {total['articles']:,} articles, {total['rows']:,} paragraphs "
          f"({total['duplicate_paragraphs']:,} duplicates removed), {total['characters']:,} characters -> {out_dir}"
          + (f" (bad lines: {bad_summary(bad)})" if sum(bad.values()) else ""))
    return 0


def file_counters(shard: int, totals: FileTotals) -> dict:
    """One shard's counts as the manifest records them."""
    counters = {"part": paragraphs.part_name(shard), **asdict(totals)}
    counters["first_bad"] = [{"line": line, "reason": reason, "cause": cause}
                             for line, reason, cause in totals.first_bad]
    return counters
