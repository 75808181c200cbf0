"""Extract every paragraph of the frwiki JSONL into one Parquet file (zstd).

The file is cut into byte ranges aligned to line starts; workers parse ranges in parallel (orjson)
and the main process writes their tables in file order, so the output is identical for any worker
count. Memory stays bounded: at most two ranges per worker are in flight. A gzip-compressed input
(`.jsonl.gz`, told by its first bytes) is decompressed by the main process as it goes, cut where the
plain file would be cut, so its output is the plain file's, without a decompressed copy on disk
(zlib then bounds the speed, to about one core's worth of decompression).

Bad lines are skipped and counted by reason, the first ones recorded with their cause; a last line
cut short (an interrupted download) is reported as such and not counted against
--max-bad-fraction. Duplicate article identifiers keep one copy (the latest `date_modified`, else
the first) and are removed in a second pass over the Parquet only when there are any.
"""

from __future__ import annotations

import argparse
import functools
import gc
import gzip
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterator

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import StageRun, atomic_path, verify_input
from pipeline.workers import ordered_map

STAGE = "extract-paragraphs"
SCHEMA = pa.schema([
    ("article_id", pa.int64()),
    ("title", pa.string()),
    ("section_path", pa.string()),
    ("paragraph_index", pa.int32()),
    ("text", pa.string()),
])
BAD_REASONS = ("invalid_json", "not_utf8", "not_object", "identifier_out_of_range", "truncated")
FIRST_LINES_KEPT = 10  # bad lines recorded with their cause, in file order
FIRST_LINES_SHOWN = 3  # of those, in the error message
INT64 = range(-(1 << 63), 1 << 63)
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_CHUNK_BYTES = 16 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, default=None,
                        help="JSONL input, plain or gzip-compressed (default: the file `just download` wrote, "
                             "DATA_DIR/raw/...)")
    parser.add_argument("--output", type=Path, default=None,
                        help="Parquet output (default: DATA_DIR/paragraphs/paragraphs.parquet)")
    parser.add_argument("--lists", action="store_true",
                        help="also emit list items (nested items, repeated by the dump, are emitted once)")
    parser.add_argument("--min-chars", type=int, default=1, help="skip paragraphs shorter than this many characters")
    parser.add_argument("--max-bad-fraction", type=float, default=0.001,
                        help="fail, writing nothing, when more than this fraction of lines is malformed (a last "
                             "line cut short is reported and skipped, not counted)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parser processes (output is identical for any count)")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                        help="bytes of input per work unit; bounds memory (about 3x this per worker)")


@dataclass(frozen=True)
class ExtractOptions:
    lists: bool = False
    min_chars: int = 1


@dataclass
class ChunkResult:
    """What one worker returns for one byte range."""

    table: pa.Table
    articles: list[tuple[int, str | None, int]]  # (article_id, date_modified, rows), in order
    input_bytes: int = 0
    lines: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # reason -> lines
    first_bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line in chunk, 1-based; reason; cause)
    characters: int = 0
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
    result = ChunkResult(table=None, articles=[], input_bytes=len(data))  # type: ignore[arg-type]
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
        modified = article.get("date_modified")
        result.articles.append((article_id, modified if isinstance(modified, str) else None, count))
    result.table = pa.table([ids, titles, section_paths, indices, texts], schema=SCHEMA)
    result.characters = pc.sum(pc.utf8_length(result.table.column("text"))).as_py() or 0
    return result


def process_range(path: str, options: ExtractOptions, byte_range: tuple[int, int]) -> ChunkResult:
    start, end = byte_range
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return parse_lines(data, options)


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
class Totals:
    lines: int = 0
    articles: int = 0
    rows: int = 0
    characters: int = 0
    no_identifier: int = 0
    without_paragraphs: int = 0
    short_skipped: int = 0
    duplicates: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    first_bad: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, cause), file order


def extract(path: Path, output: Path, options: ExtractOptions, workers: int, chunk_bytes: int,
            max_bad_fraction: float, progress: bool = True) -> Totals:
    """Write the Parquet at `output` (atomically) and return the totals; raise StageError on bad input."""
    compressed = check_input_kind(path)
    totals = Totals()
    kept: dict[int, tuple[str | None, int, int]] = {}  # article_id -> (date_modified, first row, end row)
    dropped_ranges: list[tuple[int, int]] = []
    if compressed:  # the main process decompresses; workers get the lines themselves
        parse, units = functools.partial(parse_lines, options=options), gzip_chunks(path, chunk_bytes)
    else:  # workers read their own range: no data through the pipes
        parse, units = functools.partial(process_range, str(path), options), line_aligned_ranges(path, chunk_bytes)
    with atomic_path(output) as tmp:
        # Parquet encoding and compression release the GIL: they run on a thread, overlapped with parsing.
        with ExitStack() as stack:
            bar = stack.enter_context(tqdm(total=None if compressed else path.stat().st_size, unit="B",
                                           unit_scale=True, desc=STAGE, disable=not progress))
            writer = stack.enter_context(pq.ParquetWriter(tmp, SCHEMA, compression="zstd"))
            write_thread = stack.enter_context(ThreadPoolExecutor(1))
            last_write = None
            chunks = stack.enter_context(closing(ordered_map(parse, units, workers)))
            for chunk in chunks:
                for reason, count in chunk.bad.items():
                    totals.bad[reason] += count
                room = FIRST_LINES_KEPT - len(totals.first_bad)
                totals.first_bad += [(totals.lines + n, reason, cause) for n, reason, cause in chunk.first_bad[:room]]
                row = totals.rows
                for article_id, modified, n_rows in chunk.articles:
                    previous = kept.get(article_id)
                    if previous is None:
                        kept[article_id] = (modified, row, row + n_rows)
                    else:
                        totals.duplicates += 1
                        old_modified, old_start, old_end = previous
                        if modified is not None and old_modified is not None and modified > old_modified:
                            dropped_ranges.append((old_start, old_end))
                            kept[article_id] = (modified, row, row + n_rows)
                        else:
                            dropped_ranges.append((row, row + n_rows))
                    row += n_rows
                totals.lines += chunk.lines
                totals.articles += len(chunk.articles)
                totals.no_identifier += chunk.no_identifier
                totals.without_paragraphs += chunk.without_paragraphs
                totals.short_skipped += chunk.short_skipped
                totals.rows += chunk.table.num_rows
                totals.characters += chunk.characters
                if chunk.table.num_rows:
                    if last_write is not None:
                        last_write.result()  # at most one table waits to be written
                    last_write = write_thread.submit(writer.write_table, chunk.table)
                bar.update(chunk.input_bytes)
            if last_write is not None:
                last_write.result()
        bad_lines = sum(totals.bad.values()) - totals.bad["truncated"]  # a cut last line is reported apart
        if totals.lines and bad_lines / totals.lines > max_bad_fraction:
            first = "; ".join(f"line {line}: {cause}" for line, _, cause in totals.first_bad[:FIRST_LINES_SHOWN])
            raise StageError(f"{bad_lines:,} of {totals.lines:,} lines are malformed ({_bad_summary(totals)}; {first}), "
                             f"more than --max-bad-fraction {max_bad_fraction}; nothing written. Check the input file")
        if totals.articles == 0:
            raise StageError(f"{path} holds no frwiki article (no line is a JSON object with an integer "
                             f"`identifier`); is it the Structured-Contents JSONL?")
        if dropped_ranges:
            totals.rows -= drop_rows(tmp, dropped_ranges)
            totals.characters = count_characters(tmp)
        totals.articles -= totals.duplicates
    return totals


def _bad_summary(totals: Totals) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in totals.bad.items() if count)


def drop_rows(path: Path, dropped: list[tuple[int, int]]) -> int:
    """Rewrite the Parquet at `path` without the given row ranges (duplicate articles); return rows dropped."""
    import numpy as np

    source = pq.ParquetFile(path)
    keep = np.ones(source.metadata.num_rows, dtype=bool)
    for start, end in dropped:
        keep[start:end] = False
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            offset = 0
            for index in range(source.num_row_groups):
                group = source.read_row_group(index)
                mask = keep[offset:offset + group.num_rows]
                offset += group.num_rows
                if mask.any():
                    writer.write_table(group.filter(pa.array(mask)))
    return int((~keep).sum())


def count_characters(path: Path) -> int:
    source = pq.ParquetFile(path)
    total = 0
    for index in range(source.num_row_groups):
        lengths = pc.utf8_length(source.read_row_group(index, columns=["text"]).column("text"))
        total += pc.sum(lengths).as_py() or 0
    return total


def run(args: argparse.Namespace) -> int:
    source = args.input or layout.raw_file(args.data_dir)
    output = args.output or layout.paragraphs_file(args.data_dir)
    if args.min_chars < 1:
        raise StageError(f"--min-chars must be at least 1, got {args.min_chars}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise StageError(f"--max-bad-fraction must be within [0, 1], got {args.max_bad_fraction}")
    if args.workers < 1 or args.chunk_bytes < 1:
        raise StageError("--workers and --chunk-bytes must be positive")
    inputs = [verify_input(source, args.manifests, producer_required=None if args.input else "download")]
    options = ExtractOptions(lists=args.lists, min_chars=args.min_chars)
    # Worker count and chunk size do not change the output, so they are not parameters.
    parameters = {"lists": options.lists, "min_chars": options.min_chars, "max_bad_fraction": args.max_bad_fraction,
                  "output": Path(output)}
    with StageRun(STAGE, args.manifests, parameters, inputs, force=args.force) as stage:
        if not stage.start(output, [output.parent]):
            return 0
        totals = extract(Path(source), output, options, args.workers, args.chunk_bytes, args.max_bad_fraction)
        stage.add_output(output, counts={"rows": totals.rows, "articles": totals.articles,
                                         "characters": totals.characters})
        stage.finish(counters={
            "lines": totals.lines, "articles": totals.articles, "paragraphs": totals.rows,
            "characters": totals.characters, "articles_without_paragraphs": totals.without_paragraphs,
            "duplicate_articles": totals.duplicates, "lines_without_identifier": totals.no_identifier,
            "short_paragraphs_skipped": totals.short_skipped,
            "bad_lines": totals.bad,
            "first_bad_lines": [{"line": line, "reason": reason, "cause": cause}
                                for line, reason, cause in totals.first_bad],
        })
    cut = next(((line, cause) for line, reason, cause in totals.first_bad if reason == "truncated"), None)
    if cut:
        print(f"{STAGE}: warning: skipped the last line (line {cut[0]:,}): {cut[1]}; is the input an interrupted "
              f"download? (`just download` resumes one)", file=sys.stderr)
    print(f"{STAGE}: {totals.articles:,} articles, {totals.rows:,} paragraphs, {totals.characters:,} characters "
          f"-> {output}" + (f" (bad lines: {_bad_summary(totals)})" if sum(totals.bad.values()) else ""))
    return 0
