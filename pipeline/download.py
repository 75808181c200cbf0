"""Fetch the frwiki Structured-Contents JSONL from Kaggle (or take a local copy with --from).

Uses the official `kaggle` package's Python API. The dataset version is pinned (the JSONL files
exist only in version 1). The client writes into a hidden staging folder, where it resumes an
interrupted transfer itself; only a complete file (unzipped if Kaggle served it zipped) is renamed
to its final path under data/raw/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import zipfile
from pathlib import Path

from pipeline import layout
from pipeline.errors import StageError
from pipeline.manifest import StageRun, atomic_path, file_record

STAGE = "download"
DEFAULT_DATASET = "wikimedia-foundation/wikipedia-structured-contents"
DEFAULT_VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"
CREDENTIAL_SOURCES = ("KAGGLE_API_TOKEN (a token or a file path), ~/.kaggle/access_token, "
                      "KAGGLE_USERNAME + KAGGLE_KEY, or ~/.kaggle/kaggle.json (folder moved by KAGGLE_CONFIG_DIR)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="Kaggle dataset owner/slug")
    parser.add_argument("--version", type=int, default=DEFAULT_VERSION,
                        help="dataset version (the JSONL files exist only in version 1)")
    parser.add_argument("--file", default=layout.DEFAULT_FILE, help="file inside the dataset")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: DATA_DIR/raw)")
    parser.add_argument("--from", dest="from_path", type=Path, default=None, metavar="PATH",
                        help="take this local file (JSONL, or a zip holding it) instead of downloading")


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def materialize(source: Path, final: Path) -> None:
    """Copy `source` to `final` atomically, extracting the JSONL member when it is a zip."""
    with atomic_path(final) as tmp:
        if is_zip(source):
            with zipfile.ZipFile(source) as archive:
                members = [m for m in archive.infolist() if m.filename.endswith(".jsonl")]
                if len(members) != 1:
                    raise StageError(f"{source} is a zip without exactly one .jsonl inside "
                                     f"({[m.filename for m in archive.infolist()]})")
                with archive.open(members[0]) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
        else:
            shutil.copyfile(source, tmp)


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
                             f"Or pass --from PATH with a file you already have") from None
    return api


def explain_http_error(err, dataset: str, version: int, file: str) -> StageError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    page = f"https://www.kaggle.com/datasets/{dataset}"
    if status in (401, 403):
        return StageError(f"Kaggle refused the download (HTTP {status}): the API key is wrong or expired, or the "
                          f"dataset terms are not accepted; check them at {page}")
    if status == 404:
        return StageError(f"Kaggle has no file {file!r} in {dataset} version {version} (HTTP 404); list the files "
                          f"with `kaggle datasets files {dataset}/{version} --page-size 100 --csv`")
    return StageError(f"Kaggle download failed (HTTP {status}): {str(err).splitlines()[0][:200]}")


def fetch_from_kaggle(dataset: str, version: int, file: str, staging: Path) -> Path:
    """Download one dataset file into `staging` (resumable there) and return the downloaded path."""
    import requests

    api = kaggle_api()
    staging.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            api.dataset_download_file(f"{dataset}/{version}", file, path=str(staging), force=False, quiet=True)
    except requests.exceptions.HTTPError as err:
        raise explain_http_error(err, dataset, version, file) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError) as err:
        raise StageError(f"network unreachable or transfer cut ({type(err).__name__}); check the connection and "
                         f"rerun: the partial download in {staging} is resumed") from None
    except ValueError as err:
        raise StageError(f"download incomplete ({err}); rerun to resume") from None
    downloaded = [p for p in staging.iterdir() if p.is_file() and not p.name.endswith(".kaggle-partial")]
    if len(downloaded) != 1:
        raise StageError(f"expected one downloaded file in {staging}, found {[p.name for p in downloaded]}")
    return downloaded[0]


def run(args: argparse.Namespace) -> int:
    out_dir = args.out or layout.raw_dir(args.data_dir)
    final = out_dir / Path(args.file).name
    if args.from_path is not None:
        if not args.from_path.is_file():
            raise StageError(f"--from {args.from_path}: no such file")
        parameters = {"from": True, "file": Path(args.file).name}
        inputs = [file_record(args.from_path)]
    else:
        parameters = {"dataset": args.dataset, "version": args.version, "file": args.file}
        inputs = []
    with StageRun(STAGE, args.manifests, parameters, inputs, force=args.force) as stage:
        if not stage.start(final, [out_dir]):
            return 0
        if args.from_path is not None:
            materialize(args.from_path, final)
        else:
            staging = out_dir / ".download"
            if args.force and staging.exists():
                shutil.rmtree(staging)
            downloaded = fetch_from_kaggle(args.dataset, args.version, args.file, staging)
            if is_zip(downloaded):
                materialize(downloaded, final)
                downloaded.unlink()
            else:
                with atomic_path(final) as tmp:  # renamed through a temporary: a failed run takes it back
                    os.replace(downloaded, tmp)
            shutil.rmtree(staging, ignore_errors=True)
        stage.add_output(final)
        manifest = stage.finish()
    print(f"{STAGE}: {final} ({manifest['outputs'][0]['bytes']:,} bytes, sha256 {manifest['outputs'][0]['sha256'][:12]}…)")
    return 0
