"""Stage manifests and atomic outputs: what makes every stage reproducible.

Each stage run writes `manifests/<stage>.json` *last*, recording its inputs (path, bytes, sha256),
parameters, outputs (path, bytes, sha256, counts), code version and timings. A rerun whose inputs
and parameters match the manifest (and whose outputs are still intact) is skipped; an input that no
longer matches the manifest of the stage that wrote it is refused, naming the stage to rerun.

Every output is written under a temporary name and renamed into place, so an interrupted stage
never leaves a file at its final path that looks complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from pipeline import layout
from pipeline.errors import StageError

HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def display_path(path: Path) -> str:
    """Path as recorded in a manifest: relative to the working directory when inside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def file_record(path: Path, counts: dict[str, Any] | None = None, sha256: str | None = None) -> dict:
    record = {"path": display_path(path), "bytes": Path(path).stat().st_size,
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
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(directory: Path) -> None:
    """Delete leftovers of runs killed before their rename (`.NAME.tmp-PID`)."""
    if directory.is_dir():
        for leftover in directory.glob(".*.tmp-*"):
            if leftover.is_file():
                leftover.unlink()


def write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def load_manifest(path: Path) -> dict | None:
    """A stage manifest as written by `StageRun.finish`, or None when there is none.

    Checked as it is read: a manifest that is not a JSON object with the records every stage
    writes is refused with the stage to rerun, never half-used.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StageError(f"manifest {path} is not valid JSON ({err}); delete it and rerun `just {path.stem}`") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise StageError(f"manifest {path} is damaged ({problem}); delete it and rerun `just {path.stem}`")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if not isinstance(manifest.get("parameters"), dict):
        return "no parameters object"
    for key in ("inputs", "outputs"):
        records = manifest.get(key)
        if not isinstance(records, list):
            return f"no {key} list"
        for record in records:
            if not (isinstance(record, dict) and isinstance(record.get("path"), str)
                    and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str)):
                return f"an entry of {key} lacks path, bytes or sha256"
    return None


def _section(manifest: dict, name: str, where: Path, schema: dict[str, type]) -> dict:
    """The stage-specific section of a manifest, with the keys and types a reader relies on."""
    section = manifest.get(name)
    missing = [key for key, kind in schema.items()
               if not isinstance(section, dict) or not isinstance(section.get(key), kind)
               or (kind is int and isinstance(section.get(key), bool))]
    if missing:
        raise StageError(f"manifest {where} is damaged (its {name!r} section lacks {', '.join(missing)}); "
                         f"delete it and rerun `just {where.stem}`")
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


def tokens_info(manifests_dir: Path) -> TokensInfo:
    path = Path(manifests_dir) / "tokenize.json"
    manifest = load_manifest(path)
    if manifest is None:
        raise StageError(f"{path} is missing; run `just tokenize`")
    info = _section(manifest, "tokens", path, {"dtype": str, "vocab_size": int, "special_ids": dict,
                                              "tokenizer_sha256": str, "splits": dict})
    special, splits = info["special_ids"], info["splits"]
    if not all(isinstance(special.get(k), int) for k in ("eot", "pad")) or not all(
            isinstance(splits.get(s), dict) and isinstance(splits[s].get("utf8_bytes"), int) for s in layout.SPLITS):
        raise StageError(f"manifest {path} is damaged (special ids or splits); delete it and rerun `just tokenize`")
    tokenizer = next((Path(o["path"]) for o in manifest["outputs"] if o["path"].endswith("tokenizer.json")), None)
    return TokensInfo(dtype=info["dtype"], vocab_size=info["vocab_size"], eot_id=special["eot"],
                      pad_id=special["pad"], tokenizer_sha256=info["tokenizer_sha256"], tokenizer_path=tokenizer,
                      splits=splits)


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
    if manifest is None:
        return None
    info = _section(manifest, "pack", path, {"seq_len": int, "dtype": str, "pad_id": int, "eot_id": int,
                                            "vocab_size": int, "tokenizer_sha256": str, "splits": dict})
    for split in layout.SPLITS:
        recorded = info["splits"].get(split)
        if not (isinstance(recorded, dict) and all(isinstance(recorded.get(k), int)
                                                   for k in ("rows", "utf8_bytes", "documents"))):
            raise StageError(f"manifest {path} is damaged (split {split!r}); delete it and rerun "
                             f"`just pack --seq-len {seq_len}`")
    if info["seq_len"] != seq_len:
        raise StageError(f"manifest {path} describes length {info['seq_len']}, not {seq_len}; rerun "
                         f"`just pack --seq-len {seq_len} --force`")
    return PackInfo(seq_len=seq_len, dtype=info["dtype"], pad_id=info["pad_id"], eot_id=info["eot_id"],
                    vocab_size=info["vocab_size"], tokenizer_sha256=info["tokenizer_sha256"], splits=info["splits"],
                    outputs={Path(o["path"]).resolve(): o for o in manifest["outputs"]}, manifest_path=path)


def find_producer(path: Path, manifests_dir: Path) -> tuple[str, dict] | None:
    """The manifest (stage name, output record) that lists `path` among its outputs, if any."""
    target = Path(path).resolve()
    if not Path(manifests_dir).is_dir():
        return None
    for manifest_file in sorted(Path(manifests_dir).glob("*.json")):
        manifest = load_manifest(manifest_file)
        for output in (manifest or {}).get("outputs", []):
            if Path(output["path"]).resolve() == target:
                return manifest.get("stage", manifest_file.stem), output
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
        hint = f"; run `just {stage}` first" if stage else ""
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
                         f"rerun `just {stage}`")
    return {"path": display_path(path), "bytes": size, "sha256": digest}


@dataclass
class StageRun:
    """One run of a stage: decides up-to-date or not, then collects outputs and writes the manifest."""

    stage: str
    manifests_dir: Path
    parameters: dict[str, Any]
    inputs: list[dict]
    force: bool = False
    outputs: list[dict] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifests_dir) / f"{self.stage}.json"

    def previous(self) -> dict | None:
        """The last run's manifest; a damaged one counts as none (this run rewrites it)."""
        try:
            return load_manifest(self.manifest_path)
        except StageError as err:
            print(f"{self.stage}: {err}; running again")
            return None

    def up_to_date(self) -> bool:
        """True when the last run had these inputs and parameters and its outputs are intact."""
        if self.force:
            return False
        previous = self.previous()
        if not previous or previous.get("parameters") != self.parameters:
            return False
        key = lambda records: [(r["path"], r["sha256"]) for r in records]  # noqa: E731
        if key(previous.get("inputs", [])) != key(self.inputs):
            return False
        for output in previous.get("outputs", []):
            path = Path(output["path"])
            if not path.is_file() or path.stat().st_size != output["bytes"] or sha256_file(path) != output["sha256"]:
                return False
        return True

    def start(self, where: Path | str, output_dirs: list[Path]) -> bool:
        """The opening every stage shares: False (saying so) when the outputs are up to date;
        otherwise drop the old manifest, so old records never describe new files, and clear what
        killed runs left in the output folders, then True: the stage writes, and `finish` last."""
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
            "code": code_version(),
            "started_at": self.started_at,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self._t0, 3),
            "parameters": self.parameters,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "counters": counters or {},
            **(extra or {}),
        }
        write_json_atomic(self.manifest_path, manifest)
        return manifest
