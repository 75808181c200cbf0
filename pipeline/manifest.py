"""Stage manifests and atomic outputs: what makes every stage reproducible.

Each stage run writes `manifests/<stage>.json` *last*, recording its inputs (path, bytes, sha256),
parameters, outputs (path, bytes, sha256, counts), code version and timings. A rerun whose inputs
and parameters match the manifest (and whose outputs are still intact) is skipped; an input that no
longer matches the manifest of the stage that wrote it is refused, naming the stage to rerun.

Every output is written under a temporary name and renamed into place, and a run that fails
before its manifest removes what it had renamed into place: an interrupted stage leaves nothing at a
final path. A stage's output folders are locked while it runs.

Paths are recorded relative to the manifests folder's parent (the project folder, for the default
`manifests/`), or absolute outside it, and read back against that same folder: the same files are
the same inputs wherever the command runs and however its paths are spelled. Manifests written
before that rule (no "format" key) recorded paths relative to the working directory of their run,
and are read that way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline import layout
from pipeline.errors import StageError
from pipeline.locks import exclusive

HASH_CHUNK = 8 << 20
FORMAT = 2  # paths relative to the manifests folder's parent; none: relative to the run's working directory
# Final paths that the running stage has renamed into place, so that a failed run can take them back.
_renamed: ContextVar[list[Path] | None] = ContextVar("renamed", default=None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_path(path: Path, manifests_dir: Path) -> str:
    """`path` as a manifest in `manifests_dir` records it: relative to that folder's parent when
    inside it, else absolute; symlinks and `..` resolved, so one file has one spelling."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path(manifests_dir).resolve().parent).as_posix()
    except ValueError:
        return resolved.as_posix()


def file_record(path: Path, counts: dict[str, Any] | None = None, sha256: str | None = None) -> dict:
    """A file as a stage sees it: its resolved path (recorded relative on writing), bytes and sha256."""
    record = {"path": str(Path(path).resolve()), "bytes": Path(path).stat().st_size,
              "sha256": sha256 or sha256_file(path)}
    if counts:
        record["counts"] = counts
    return record


def code_version() -> dict[str, str]:
    try:
        version = metadata.version("frlm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return {"package": version, "git_commit": commit + ("-dirty" if dirty else "")}


@contextlib.contextmanager
def atomic_path(final: Path, *, undo_on_failure: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds.

    Inside a `StageRun`, a file renamed into place is removed again when the run fails, unless
    `undo_on_failure` is False: a file complete and checked on its own (a downloaded shard) stays,
    so that a rerun resumes from it."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        renamed = _renamed.get()
        if renamed is not None and undo_on_failure:
            renamed.append(final)
        os.replace(tmp, final)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the one being written
            err.filename = str(final)
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete leftovers of runs killed before their rename (`.NAME.tmp-PID`)."""
    if directory.is_dir():
        for leftover in directory.glob(".*.tmp-*"):
            if leftover.is_file():
                leftover.unlink()


def write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def rerun_command(path: Path) -> str:
    """The command that rewrites the manifest at `path` (named after its stage)."""
    stage = Path(path).stem
    if stage.startswith("pack-seq"):
        return f"just pack --seq-len {stage.removeprefix('pack-seq')}"
    if stage.startswith("corpus-"):
        return f"just add-corpus {stage.removeprefix('corpus-')} --hf|--files|--from-disk ..."
    return f"just {stage}"


class DamagedManifest(StageError):
    """A manifest that cannot be used as it is; the message names the command that rewrites it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"manifest {path} {problem}; delete it and rerun `{rerun_command(path)}`")
        self.path, self.problem = path, problem


def load_manifest(path: Path) -> dict | None:
    """A stage manifest as written by `StageRun.finish`, or None when there is none; its records'
    paths come back resolved (absolute).

    Checked as it is read: a manifest that is not a JSON object with the records every stage
    writes is refused with the stage to rerun, never half-used.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:  # a folder, no permission
        raise DamagedManifest(path, f"cannot be read ({err.strerror})") from None
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSON or UTF-8 errors, nesting past the parser's depth
        raise DamagedManifest(path, f"is not valid JSON ({str(err)[:120] or type(err).__name__})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DamagedManifest(path, f"is damaged ({problem})")
    base = path.resolve().parent.parent if "format" in manifest else Path.cwd()
    for record in manifest["inputs"] + manifest["outputs"]:
        record["path"] = str((base / record["path"]).resolve())
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if "format" in manifest and manifest["format"] != FORMAT:
        return f"format {manifest['format']!r}, this code reads {FORMAT}"
    if not isinstance(manifest.get("parameters"), dict):
        return "no parameters object"
    for key in ("inputs", "outputs"):
        records = manifest.get(key)
        if not isinstance(records, list):
            return f"no {key} list"
        for record in records:
            if not (isinstance(record, dict) and isinstance(record.get("path"), str) and record["path"]
                    and _is_int(record.get("bytes")) and isinstance(record.get("sha256"), str)):
                return f"an entry of {key} lacks path, bytes or sha256"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_section(manifest: dict, name: str, where: Path, schema: dict[str, type]) -> dict:
    """The stage-specific section of a manifest, with the keys and types a reader relies on."""
    section = manifest.get(name)
    missing = [key for key, kind in schema.items()
               if not isinstance(section, dict) or not isinstance(section.get(key), kind)
               or (kind is int and isinstance(section.get(key), bool))]
    if missing:
        raise DamagedManifest(where, f"is damaged (its {name!r} section lacks {', '.join(missing)})")
    return section


@dataclass(frozen=True)
class TokensInfo:
    """What `tokenize` recorded about its token stream (manifests/tokenize.json)."""

    dtype: str
    vocab_size: int
    eot_id: int
    pad_id: int
    tokenizer_sha256: str
    tokenizer_path: Path | None  # where the tokenizer was written, when the manifest lists it
    splits: dict[str, dict[str, int]]  # split -> tokens, documents, utf8_bytes
    sources: tuple[str, ...] = ()  # the names the index's `source` field points to (none recorded: one source)


def tokens_info(manifests_dir: Path) -> TokensInfo:
    path = Path(manifests_dir) / "tokenize.json"
    manifest = load_manifest(path)
    if manifest is None:
        raise StageError(f"{path} is missing; run `just tokenize`")
    return tokens_section(manifest, path)


def tokens_section(manifest: dict, path: Path) -> TokensInfo:
    """The `tokens` section of a loaded tokenize manifest, checked."""
    info = checked_section(manifest, "tokens", path, {"dtype": str, "vocab_size": int, "special_ids": dict,
                                              "tokenizer_sha256": str, "splits": dict})
    special, splits = info["special_ids"], info["splits"]
    if not all(_is_int(special.get(k)) for k in ("eot", "pad")) or not all(
            isinstance(splits.get(s), dict) and _is_int(splits[s].get("utf8_bytes")) for s in layout.SPLITS):
        raise DamagedManifest(path, "is damaged (special ids or splits)")
    try:
        valid_dtype = np.dtype(info["dtype"]).kind == "u"
    except TypeError:
        valid_dtype = False
    if not valid_dtype:
        raise DamagedManifest(path, f"is damaged (dtype {info['dtype']!r})")
    sources = info.get("sources", [])
    if not (isinstance(sources, list) and all(isinstance(name, str) for name in sources)):
        raise DamagedManifest(path, "is damaged (sources)")
    tokenizer = next((Path(o["path"]) for o in manifest["outputs"] if o["path"].endswith("tokenizer.json")), None)
    return TokensInfo(dtype=info["dtype"], vocab_size=info["vocab_size"], eot_id=special["eot"],
                      pad_id=special["pad"], tokenizer_sha256=info["tokenizer_sha256"], tokenizer_path=tokenizer,
                      splits=splits, sources=tuple(sources))


def pack_manifest_name(seq_len: int) -> str:
    return f"pack-seq{seq_len}"


@dataclass(frozen=True)
class PackInfo:
    """What `pack` recorded about one packed length (manifests/pack-seqN.json)."""

    seq_len: int
    dtype: str
    pad_id: int
    eot_id: int
    vocab_size: int
    tokenizer_sha256: str
    splits: dict[str, dict[str, Any]]  # split -> rows, tokens, documents, utf8_bytes, ...
    outputs: dict[Path, dict]  # resolved path -> its output record (bytes, sha256)
    manifest_path: Path


def pack_info(manifests_dir: Path, seq_len: int) -> PackInfo | None:
    """The pack of this length, or None when it was never made."""
    path = Path(manifests_dir) / f"{pack_manifest_name(seq_len)}.json"
    manifest = load_manifest(path)
    return None if manifest is None else pack_section(manifest, path, seq_len)


def pack_section(manifest: dict, path: Path, seq_len: int) -> PackInfo:
    """The `pack` section of a loaded pack-seqN manifest, checked."""
    info = checked_section(manifest, "pack", path, {"seq_len": int, "dtype": str, "pad_id": int, "eot_id": int,
                                            "vocab_size": int, "tokenizer_sha256": str, "splits": dict})
    for split in layout.SPLITS:
        recorded = info["splits"].get(split)
        if not (isinstance(recorded, dict) and all(_is_int(recorded.get(k)) and recorded[k] >= 0
                                                   for k in ("rows", "utf8_bytes", "documents"))):
            raise DamagedManifest(path, f"is damaged (split {split!r})")
    if info["seq_len"] != seq_len:
        raise DamagedManifest(path, f"describes length {info['seq_len']}, not {seq_len}")
    return PackInfo(seq_len=seq_len, dtype=info["dtype"], pad_id=info["pad_id"], eot_id=info["eot_id"],
                    vocab_size=info["vocab_size"], tokenizer_sha256=info["tokenizer_sha256"], splits=info["splits"],
                    outputs={Path(o["path"]): o for o in manifest["outputs"]}, manifest_path=path)


def find_producer(path: Path, manifests_dir: Path) -> tuple[str, dict] | None:
    """The manifest (stage name, output record) that lists `path` among its outputs, if any."""
    target = str(Path(path).resolve())
    if not Path(manifests_dir).is_dir():
        return None
    for manifest_file in sorted(Path(manifests_dir).glob("*.json")):
        for output in (load_manifest(manifest_file) or {}).get("outputs", []):
            if output["path"] == target:
                return manifest_file.stem, output
    return None


def verify_input(path: Path, manifests_dir: Path, *, producer_required: str | None = None) -> dict:
    """Hash an input and check it against the manifest of the stage that wrote it.

    Returns the input's file record. Refuses (StageError) when the file is missing, or when it no
    longer matches what its producing stage recorded. With `producer_required`, a file that no
    manifest lists is refused too: the stage needs what that producer records beside the file.
    """
    path = Path(path)
    found = find_producer(path, manifests_dir)
    if not path.is_file():
        stage = found[0] if found else producer_required
        hint = f"; run `{rerun_command(Path(stage))}` first" if stage else ""
        raise StageError(f"input {path} does not exist{hint}")
    if found is None:
        if producer_required:
            raise StageError(f"input {path} has no manifest in {manifests_dir}; run `just {producer_required}` "
                             f"(with the same --manifests) to make it")
        return file_record(path)
    stage, recorded = found
    size = path.stat().st_size
    digest = sha256_file(path) if size == recorded["bytes"] else None
    if digest != recorded["sha256"]:
        raise StageError(f"input {path} changed since `{stage}` wrote it (manifest {manifests_dir}/{stage}.json); "
                         f"rerun `{rerun_command(Path(stage))}`")
    return {"path": str(path.resolve()), "bytes": size, "sha256": digest}


@dataclass
class StageRun:
    """One run of a stage, used as `with StageRun(...) as stage:` around everything the stage writes.

    `start` locks the output folders and decides up-to-date or not; the stage writes through
    `atomic_path` and `add_output`, then `finish` writes the manifest. Leaving the block before
    `finish` (an error, Ctrl-C, a full disk) removes the files this run renamed into place; leaving
    it in any way releases the locks. Paths in `parameters` are given as `Path` and recorded like
    every other path. `section` reads the stage's own section of a loaded manifest (raising
    StageError when it is damaged): a previous manifest it refuses is never "up to date".
    """

    stage: str
    manifests_dir: Path
    parameters: dict[str, Any]
    inputs: list[dict]
    force: bool = False
    section: Callable[[dict, Path], object] | None = None
    outputs: list[dict] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    _t0: float = field(default_factory=time.perf_counter)
    _locks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _renamed: list[Path] = field(default_factory=list)
    _renamed_token: Any = None
    _finished: bool = False

    def __enter__(self) -> "StageRun":
        self._renamed_token = _renamed.set(self._renamed)
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> None:
        _renamed.reset(self._renamed_token)
        with self._locks:
            if kind is not None and not self._finished:
                for path in self._renamed:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifests_dir) / f"{self.stage}.json"

    def recorded_parameters(self) -> dict[str, Any]:
        return {key: recorded_path(value, self.manifests_dir) if isinstance(value, Path) else value
                for key, value in self.parameters.items()}

    def previous(self) -> dict | None:
        """The last run's manifest; a damaged one counts as none (this run rewrites it)."""
        try:
            manifest = load_manifest(self.manifest_path)
            if manifest is not None and self.section is not None:
                self.section(manifest, self.manifest_path)
            return manifest
        except DamagedManifest as err:
            print(f"{self.stage}: manifest {err.path} {err.problem}; running again")
            return None

    def up_to_date(self) -> bool:
        """True when the last run had these inputs and parameters and its outputs are intact."""
        if self.force:
            return False
        previous = self.previous()
        if not previous or previous["parameters"] != self.recorded_parameters():
            return False
        key = lambda records: [(r["path"], r["sha256"]) for r in records]  # noqa: E731
        if key(previous["inputs"]) != key(self.inputs):
            return False
        for output in previous["outputs"]:
            path = Path(output["path"])
            if not path.is_file() or path.stat().st_size != output["bytes"] or sha256_file(path) != output["sha256"]:
                return False
        return True

    def start(self, where: Path | str, output_dirs: list[Path]) -> bool:
        """The opening every stage shares: lock the output folders (for the whole run), then False
        (saying so) when the outputs are up to date; otherwise drop the old manifest, so old records
        never describe new files, and clear what killed runs left in the output folders, then True:
        the stage writes, and `finish` last."""
        for directory in {Path(d).resolve(): Path(d) for d in output_dirs}.values():  # each folder once
            self._locks.enter_context(exclusive(directory, f"output folder {directory}"))
        if self.up_to_date():
            print(f"{self.stage}: up to date ({where}); use --force to rerun")
            return False
        self.manifest_path.unlink(missing_ok=True)
        for directory in output_dirs:
            remove_stale_temporaries(directory)
        return True

    def add_output(self, path: Path, counts: dict[str, Any] | None = None, sha256: str | None = None) -> None:
        self.outputs.append(file_record(path, counts, sha256))

    def finish(self, counters: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict:
        manifest = {
            "stage": self.stage,
            "format": FORMAT,
            "code": code_version(),
            "started_at": self.started_at,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self._t0, 3),
            "parameters": self.recorded_parameters(),
            "inputs": [self._recorded(record) for record in self.inputs],
            "outputs": [self._recorded(record) for record in self.outputs],
            "counters": counters or {},
            **(extra or {}),
        }
        write_json_atomic(self.manifest_path, manifest)
        self._finished = True
        return manifest

    def _recorded(self, record: dict) -> dict:
        return {**record, "path": recorded_path(Path(record["path"]), self.manifests_dir)}
