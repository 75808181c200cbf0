"""Fetch the frwiki JSONL shards into data/raw/: from Kaggle, the Hugging Face Hub, or local copies.

Which shards: the one file the mission names (default), `--files 0-3,7` (shard indices N of
frwiki_namespace_0_N.jsonl) or `--all` (every shard of the dataset version, listed through the Kaggle
API; with --source hf, every shard of the Hub's zip).

Where from:
- Kaggle (default), through the official `kaggle` package. The dataset version is pinned (the JSONL
  files exist only in version 1). Each file is fetched into a hidden staging folder, where the client
  resumes an interrupted transfer itself; a file Kaggle serves zipped is unzipped.
- `--source hf`: the same 2024-09-16 snapshot as one zip in the Hub dataset
  wikimedia/structured-wikipedia (20240916.fr/frwiki_namespace_0.zip, about 7 GB), no credentials
  needed. `huggingface_hub` downloads it into its cache (HF_HOME), resuming there; its sha256 is checked
  against the Hub's record before the wanted shards are unzipped.
- `--from PATH`: a JSONL file (plain or gzip), a folder of them, a glob, or a zip holding one or
  several JSONL files (unzipped as a stream, in bounded memory; zip checks each member's CRC).

Every file is checked before it is renamed to its final path (Kaggle's transfer complete and its size
the listed one, the Hub zip's sha256, zip CRCs), then its bytes and sha256 are recorded in
data/raw/.verified.json. A rerun skips a file whose bytes still match its record and fetches only the
others, so an interrupted `--all` goes on where it stopped. One manifest lists every file of the
request, written once they are all complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import io
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from tqdm import tqdm

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import HASH_CHUNK, StageRun, atomic_path, file_record, sha256_file

STAGE = "download"
DEFAULT_DATASET = "wikimedia-foundation/wikipedia-structured-contents"
DEFAULT_VERSION = 1
HF_REPO = "wikimedia/structured-wikipedia"
HF_FILE = "20240916.fr/frwiki_namespace_0.zip"
SHARD = re.compile(r"(?:^|/)frwiki_namespace_0_(\d+)\.jsonl$")
ZIP_MAGIC = b"PK\x03\x04"
LIST_PAGE_SIZE = 200  # the most the Kaggle API returns per page
LEDGER = ".verified.json"  # in the output folder: name -> bytes, sha256, origin of every complete file
CREDENTIAL_SOURCES = ("KAGGLE_API_TOKEN (a token or a file path), ~/.kaggle/access_token, "
                      "KAGGLE_USERNAME + KAGGLE_KEY, or ~/.kaggle/kaggle.json (folder moved by KAGGLE_CONFIG_DIR)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("kaggle", "hf"), default="kaggle",
                        help="kaggle: the Kaggle dataset (credentials needed); hf: the same snapshot from the Hugging "
                             f"Face Hub dataset {HF_REPO} ({HF_FILE}, one zip of every shard)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--file", default=None,
                       help=f"one file inside the dataset (default: {layout.DEFAULT_FILE}); with --from, the name "
                            f"a single JSONL is stored under")
    which.add_argument("--files", default=None, metavar="SPEC",
                       help="shard indices N of frwiki_namespace_0_N.jsonl: numbers and ranges, e.g. 0-3,7")
    which.add_argument("--all", action="store_true", help="every frwiki_namespace_0_N.jsonl shard of the source")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="Kaggle dataset owner/slug")
    parser.add_argument("--version", type=int, default=DEFAULT_VERSION,
                        help="dataset version (the JSONL files exist only in version 1)")
    parser.add_argument("--revision", default="main", help="--source hf: the Hub dataset's revision")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DATA_DIR/raw)")
    parser.add_argument("--from", dest="from_path", default=None, metavar="PATH",
                        help="take local copies instead of downloading: a JSONL file (plain or gzip), a folder of "
                             "them (*.jsonl, *.jsonl.gz, *.zip), a glob (quote it), or a zip of JSONL files. A single "
                             "JSONL is stored under --file's name, several under their own")


# --------------------------------------------------------------------------------------------- shards

def parse_shards(spec: str) -> list[int]:
    """`0-3,7` -> [0, 1, 2, 3, 7]: numbers and inclusive ranges, comma separated, sorted, once each."""
    indices: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise StageError(f"--files {spec!r}: expected shard indices and ranges such as 0-3,7 "
                             f"(at {part.strip()!r})")
        low = int(match[1])
        indices.update(range(low, int(match[2] or low) + 1))
    return sorted(indices)


def shard_index(name: str) -> int | None:
    match = SHARD.search(name)
    return int(match[1]) if match else None


def select(available: dict[int, str], wanted: list[int] | None, where: str) -> list[str]:
    """The names of the wanted shard indices (all when None), in index order; StageError naming the
    missing ones."""
    if not available:
        raise StageError(f"{where} holds no frwiki_namespace_0_N.jsonl file")
    if wanted is None:
        return [available[i] for i in sorted(available)]
    missing = [i for i in wanted if i not in available]
    if missing:
        raise StageError(f"{where} has no shard {', '.join(map(str, missing))} (it holds {len(available)}, "
                         f"indices {min(available)} to {max(available)})")
    return [available[i] for i in wanted]


# ----------------------------------------------------------------------------------------- the ledger

@dataclass
class Item:
    """One file to make: its final name, where it comes from, and how to write it to a path."""

    name: str
    origin: str  # recorded in the ledger: a file is skipped only when it came from the same place
    fetch: Callable[[Path], None]
    expected_bytes: int | None = None


def load_ledger(path: Path) -> dict[str, dict]:
    try:
        ledger = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet, or damaged: every file is checked again by fetching
        return {}
    return ledger if isinstance(ledger, dict) else {}


def is_complete(final: Path, record: dict | None, origin: str) -> bool:
    """True when `final` is the file the ledger recorded, from the same origin, byte for byte."""
    return (record is not None and record.get("origin") == origin and final.is_file()
            and final.stat().st_size == record.get("bytes") and sha256_file(final) == record.get("sha256"))


def make(items: list[Item], out_dir: Path, force: bool) -> dict[str, str]:
    """Write every item that is not already complete; return name -> sha256 of them all.

    A complete file stays in place even when a later one fails (it is recorded in the ledger), so
    a rerun resumes; a file never reaches its final path before it is checked."""
    ledger_path = out_dir / LEDGER
    ledger = {} if force else load_ledger(ledger_path)
    digests = {}
    for number, item in enumerate(items, start=1):
        final = out_dir / item.name
        where = f"{STAGE}: [{number}/{len(items)}] {item.name}"
        if is_complete(final, ledger.get(item.name), item.origin):
            print(f"{where}: complete, skipped")
            digests[item.name] = ledger[item.name]["sha256"]
            continue
        print(f"{where} ...", flush=True)
        with atomic_path(final, undo_on_failure=False) as tmp:
            item.fetch(tmp)
            size = tmp.stat().st_size
            if item.expected_bytes and size != item.expected_bytes:
                raise StageError(f"{item.name} arrived with {size:,} bytes where the listing says "
                                 f"{item.expected_bytes:,}; rerun with --force to fetch it again")
            digests[item.name] = sha256_file(tmp)
        ledger[item.name] = {"bytes": size, "sha256": digests[item.name], "origin": item.origin}
        with atomic_path(ledger_path, undo_on_failure=False) as tmp:
            tmp.write_text(json.dumps(ledger, indent=2) + "\n")
    return digests


# ----------------------------------------------------------------------------------------------- zips

def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def jsonl_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    return [m for m in archive.infolist() if not m.is_dir() and m.filename.endswith((".jsonl", ".jsonl.gz"))]


def copy_stream(source: BinaryIO, tmp: Path, total: int | None, what: str) -> None:
    """Copy a stream to `tmp` in bounded memory, with a progress bar."""
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False) as bar:
        while block := source.read(HASH_CHUNK):
            out.write(block)
            bar.update(len(block))


def unzip_member(archive_path: Path, member: str) -> Callable[[Path], None]:
    """A fetcher writing one member of a zip (its CRC checked by zipfile as it is read)."""
    def fetch(tmp: Path) -> None:
        try:
            with zipfile.ZipFile(archive_path) as archive, archive.open(member) as source:
                copy_stream(source, tmp, archive.getinfo(member).file_size, Path(member).name)
        except (zipfile.BadZipFile, EOFError) as err:
            raise StageError(f"{archive_path} is damaged ({err}, in {member}); fetch it again") from None
    return fetch


# ---------------------------------------------------------------------------------------------- local

def local_files(spec: str) -> list[Path]:
    """The files --from names: a file, a folder's JSONL/zip files, or a glob's matches, sorted."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz", ".zip")))
        if not files:
            raise StageError(f"--from {spec}: the folder holds no .jsonl, .jsonl.gz or .zip file")
        return files
    files = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file()) if glob.has_magic(spec) else []
    if not files:
        raise StageError(f"--from {spec}: no such file or folder, and no file matches it as a glob")
    return files


def local_items(files: list[Path], records: list[dict], single_name: str) -> list[Item]:
    """One item per JSONL: each plain or gzip file as it is, each JSONL member of each zip."""
    found: list[tuple[str, str, Callable[[Path], None]]] = []  # (name, origin, fetch)
    for path, record in zip(files, records):
        if is_zip(path):
            with zipfile.ZipFile(path) as archive:
                members = [m.filename for m in jsonl_members(archive)]
            if not members:
                raise StageError(f"--from {path}: the zip holds no .jsonl file")
            found += [(Path(m).name, f"{record['sha256']}:{m}", unzip_member(path, m)) for m in members]
        else:
            found.append((path.name, record["sha256"], lambda tmp, path=path: shutil.copyfile(path, tmp)))
    if len(found) == 1:
        found = [(single_name, *found[0][1:])]
    names = [name for name, _, _ in found]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise StageError(f"--from gives several files named {twice[0]}; each output keeps its own name, so give "
                         f"them once")
    return [Item(name, origin, fetch) for name, origin, fetch in found]


# --------------------------------------------------------------------------------------------- kaggle

def kaggle_api():
    """An authenticated KaggleApi, or a one-line error naming where credentials are read from."""
    # `import kaggle` authenticates at import time and prints help when it cannot; keep that quiet.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
        api = KaggleApi()
        try:
            api.authenticate()
        except SystemExit:
            raise StageError(f"no Kaggle credentials found; the client reads {CREDENTIAL_SOURCES}. "
                             f"Or use --source hf (no credentials), or --from PATH with files you already have") from None
    return api


def explain_http_error(err, dataset: str, version: int, file: str | None) -> StageError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    page = f"https://www.kaggle.com/datasets/{dataset}"
    if status in (401, 403):
        return StageError(f"Kaggle refused the request (HTTP {status}): the API key is wrong or expired, or the "
                          f"dataset terms are not accepted; check them at {page}")
    if status == 404:
        what = f"no file {file!r} in" if file else "no"
        return StageError(f"Kaggle has {what} {dataset} version {version} (HTTP 404); list the files "
                          f"with `kaggle datasets files {dataset}/{version} --page-size 100 --csv`")
    return StageError(f"Kaggle request failed (HTTP {status}): {str(err).splitlines()[0][:200]}")


@contextlib.contextmanager
def kaggle_errors(dataset: str, version: int, file: str | None, staging: Path | None = None):
    """The Kaggle client's failures as one-line errors."""
    import requests

    try:
        yield
    except requests.exceptions.HTTPError as err:
        raise explain_http_error(err, dataset, version, file) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError) as err:
        resume = f": the partial download in {staging} is resumed" if staging else ""
        raise StageError(f"network unreachable or transfer cut ({type(err).__name__}); check the connection and "
                         f"rerun{resume}") from None
    except ValueError as err:
        raise StageError(f"download incomplete ({err}); rerun to resume") from None


def list_kaggle_shards(api, dataset: str, version: int) -> dict[int, tuple[str, int]]:
    """Shard index -> (file name in the dataset, bytes), read page by page from the Kaggle API."""
    shards, token = {}, None
    with kaggle_errors(dataset, version, None):
        while True:
            page = api.dataset_list_files(f"{dataset}/{version}", page_token=token, page_size=LIST_PAGE_SIZE)
            if page is None or getattr(page, "error_message", None):
                raise StageError(f"Kaggle could not list {dataset} version {version}: "
                                 f"{getattr(page, 'error_message', None) or 'no answer'}")
            for entry in page.files or ():
                index = shard_index(entry.name)
                if index is not None:
                    shards[index] = (entry.name, int(entry.total_bytes or 0))
            token = page.next_page_token
            if not token:
                return shards


def kaggle_fetcher(api, dataset: str, version: int, file: str, staging: Path) -> Callable[[Path], None]:
    """A fetcher downloading one dataset file into `staging` (resumable there), unzipped if it came zipped."""
    def fetch(tmp: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        with kaggle_errors(dataset, version, file, staging), contextlib.redirect_stdout(io.StringIO()):
            # not quiet: the client's progress bar goes to stderr, its chatter to the silenced stdout
            api.dataset_download_file(f"{dataset}/{version}", file, path=str(staging), force=False, quiet=False)
        downloaded = [p for p in staging.iterdir() if p.is_file() and not p.name.endswith(".kaggle-partial")]
        if len(downloaded) != 1:
            raise StageError(f"expected one downloaded file in {staging}, found {[p.name for p in downloaded]}")
        if is_zip(downloaded[0]):
            with zipfile.ZipFile(downloaded[0]) as archive:
                members = [m.filename for m in jsonl_members(archive)]
            if len(members) != 1:
                raise StageError(f"Kaggle served {file} as a zip without exactly one .jsonl inside ({members})")
            unzip_member(downloaded[0], members[0])(tmp)
        else:
            os.replace(downloaded[0], tmp)
        shutil.rmtree(staging)
    return fetch


def kaggle_items(args: argparse.Namespace, out_dir: Path) -> list[Item]:
    api = kaggle_api()
    if args.all or args.files:
        listed = list_kaggle_shards(api, args.dataset, args.version)
        names = select({i: name for i, (name, _) in listed.items()}, None if args.all else parse_shards(args.files),
                       f"Kaggle dataset {args.dataset} version {args.version}")
        sizes = {name: size for name, size in listed.values()}
    else:
        names, sizes = [args.file or layout.DEFAULT_FILE], {}
    return [Item(Path(file).name, f"kaggle:{args.dataset}/{args.version}/{file}",
                 kaggle_fetcher(api, args.dataset, args.version, file, out_dir / ".download" / Path(file).name),
                 expected_bytes=sizes.get(file))
            for file in names]


# ------------------------------------------------------------------------------------------------ hub

def fetch_hub_zip(revision: str, force: bool) -> Path:
    """The Hub's zip in the huggingface_hub cache (downloaded, or resumed, there), its sha256 checked
    against the Hub's record of the file."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi().get_paths_info(HF_REPO, [HF_FILE], repo_type="dataset", revision=revision)
        if not info:
            raise StageError(f"the Hub dataset {HF_REPO} has no {HF_FILE} at revision {revision!r}")
        expected = info[0].lfs.sha256 if getattr(info[0], "lfs", None) else None
        path = Path(hf_hub_download(HF_REPO, HF_FILE, repo_type="dataset", revision=revision, force_download=force))
    except StageError:
        raise
    except Exception as err:  # huggingface_hub's HTTP errors, or its HTTP client's network errors
        status = getattr(getattr(err, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status else type(err).__name__
        raise StageError(f"the Hugging Face Hub did not give {HF_REPO}/{HF_FILE} ({reason}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else 'no detail'}); check the connection "
                         f"(or HF_ENDPOINT) and rerun: a partial download is resumed") from None
    print(f"{STAGE}: checking the sha256 of {path.name} ({path.stat().st_size:,} bytes) ...", flush=True)
    if expected is not None and sha256_file(path) != expected:
        raise StageError(f"{path} does not have the sha256 the Hub records for {HF_FILE}; rerun with --force to "
                         f"download it again")
    return path


class HubZip:
    """The Hub's zip, fetched (and checked) the first time a member is needed, and its shards."""

    def __init__(self, revision: str, force: bool):
        self.revision, self.force = revision, force

    @functools.cached_property
    def path(self) -> Path:
        return fetch_hub_zip(self.revision, self.force)

    @functools.cached_property
    def shards(self) -> dict[int, str]:
        """Shard index -> member name."""
        with zipfile.ZipFile(self.path) as archive:
            return {shard_index(m.filename): m.filename for m in jsonl_members(archive)
                    if shard_index(m.filename) is not None}

    def fetcher(self, index: int) -> Callable[[Path], None]:
        return lambda tmp: unzip_member(self.path, select(self.shards, [index], f"{HF_REPO}/{HF_FILE}")[0])(tmp)


def hub_items(args: argparse.Namespace) -> list[Item]:
    """The wanted shards of the Hub's zip. The zip is fetched only when a shard is not complete yet,
    or for --all, whose shards are the zip's members."""
    hub = HubZip(args.revision, args.force)
    wanted = parse_shards(args.files) if args.files else [shard_index(layout.DEFAULT_FILE)]
    indices = sorted(hub.shards) if args.all else wanted
    return [Item(f"frwiki_namespace_0_{index}.jsonl", f"hf:{HF_REPO}@{args.revision}/{HF_FILE}", hub.fetcher(index))
            for index in indices]


# ------------------------------------------------------------------------------------------------ run

def run(args: argparse.Namespace) -> int:
    out_dir = args.out or layout.raw_dir(args.data_dir)
    if args.from_path is not None:
        if args.files or args.all or args.source != "kaggle":
            raise StageError("--from takes every JSONL it is given: --files, --all and --source choose what is "
                             "downloaded, not what is copied")
        files = local_files(args.from_path)
        inputs = [file_record(path) for path in files]
        items = local_items(files, inputs, Path(args.file or layout.DEFAULT_FILE).name)
        parameters = {"from": True, "files": [item.name for item in items]}
    else:
        if args.source == "hf" and args.file:
            raise StageError("--source hf takes shard indices (--files) or --all, not --file")
        inputs, items = [], None
        parameters = ({"source": "hf", "repo": HF_REPO, "file": HF_FILE, "revision": args.revision}
                      if args.source == "hf" else {"dataset": args.dataset, "version": args.version})
        parameters["files"] = "all" if args.all else parse_shards(args.files) if args.files else (
            args.file or layout.DEFAULT_FILE)
    with StageRun(STAGE, args.manifests, parameters, inputs, force=args.force) as stage:
        if not stage.start(out_dir, [out_dir]):
            return 0
        if args.force:
            shutil.rmtree(out_dir / ".download", ignore_errors=True)
        if items is None:
            items = hub_items(args) if args.source == "hf" else kaggle_items(args, out_dir)
        digests = make(items, out_dir, args.force)
        shutil.rmtree(out_dir / ".download", ignore_errors=True)  # every file is complete: no partial to resume
        for item in items:
            stage.add_output(out_dir / item.name, sha256=digests[item.name])
        manifest = stage.finish()
    total = sum(output["bytes"] for output in manifest["outputs"])
    print(f"{STAGE}: {len(items)} file(s) in {out_dir}, {total:,} bytes"
          + (f" (sha256 {manifest['outputs'][0]['sha256'][:12]}…)" if len(items) == 1 else ""))
    return 0
