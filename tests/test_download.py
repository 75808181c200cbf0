"""`just download` through the real kaggle client, against a loopback server that answers as Kaggle does.

The client reads its endpoint from kagglesdk's endpoint table (KaggleApi always builds a PROD
client); the tests point that entry at the server. Nothing of our own is replaced.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.download import LEDGER, parse_shards
from pipeline.locks import LOCK_FILE
from tests.conftest import run_stage

FILE = "frwiki_namespace_0/frwiki_namespace_0_0.jsonl"
BODY = b"".join(json.dumps({"identifier": i, "name": f"Article {i}"}).encode() + b"\n" for i in range(20000))


class KaggleLike(http.server.BaseHTTPRequestHandler):
    """POST to the API answers with a redirect to storage (or an error); GET serves the file, with Range."""

    mode = "plain"
    storage_gets = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        errors = {"401": 401, "403": 403, "404": 404}
        if self.mode in errors:
            payload = json.dumps({"code": errors[self.mode], "message": "nope"}).encode()
            self.send_response(errors[self.mode])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        name = "frwiki_namespace_0_0.jsonl" + (".zip" if self.mode == "zip" else "")
        self.send_response(302)
        self.send_header("Location", f"/storage/{name}?token=abc")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        type(self).storage_gets += 1
        body = BODY
        if self.mode == "zip":
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("frwiki_namespace_0_0.jsonl", BODY)
            body = buffer.getvalue()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"v1"')
        self.send_header("Last-Modified", "Mon, 16 Sep 2024 00:00:00 GMT")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.mode == "cut" and type(self).storage_gets == 1:
            self.wfile.write(body[: len(body) // 2])  # the connection drops half-way
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def kaggle_server(workdir, monkeypatch):
    from kagglesdk import kaggle_env

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KaggleLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD,
                        f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(workdir / "kaggle-config"))
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key-123")
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    KaggleLike.storage_gets = 0
    yield KaggleLike
    server.shutdown()


RAW = "data/raw/frwiki_namespace_0_0.jsonl"


@pytest.mark.parametrize("mode", ["plain", "zip", "cut"])
def test_download_modes_give_the_same_file(workdir, kaggle_server, mode, capsys):
    kaggle_server.mode = mode
    assert run_stage("download") == 0
    assert (workdir / RAW).read_bytes() == BODY
    assert sorted(p.name for p in (workdir / "data/raw").iterdir()) == [LOCK_FILE, LEDGER, "frwiki_namespace_0_0.jsonl"]
    manifest = json.loads((workdir / "manifests/download.json").read_text())
    assert manifest["parameters"] == {"dataset": "wikimedia-foundation/wikipedia-structured-contents",
                                      "version": 1, "files": FILE}
    assert manifest["outputs"][0]["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert manifest["outputs"][0]["bytes"] == len(BODY)
    if mode == "cut":
        assert kaggle_server.storage_gets == 2  # resumed, not restarted
    gets = kaggle_server.storage_gets
    assert run_stage("download") == 0
    assert "up to date" in capsys.readouterr().out
    assert kaggle_server.storage_gets == gets


@pytest.mark.parametrize("mode,words", [("401", "API key is wrong"), ("403", "terms"),
                                        ("404", "kaggle datasets files")])
def test_http_errors_are_one_line_without_credentials(workdir, kaggle_server, capsys, mode, words):
    kaggle_server.mode = mode
    assert run_stage("download") == 2
    captured = capsys.readouterr()
    message = captured.err.split("error: download: ")[-1]
    assert words in message and message.count("\n") == 1
    assert "secret-key-123" not in captured.err + captured.out
    assert not (workdir / RAW).exists()
    if mode in ("401", "403"):
        assert "https://www.kaggle.com/datasets/wikimedia-foundation/wikipedia-structured-contents" in message


def test_no_credentials(workdir, monkeypatch, capsys):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(workdir / "empty"))
    monkeypatch.setenv("HOME", str(workdir))
    assert run_stage("download") == 2
    message = capsys.readouterr().err
    assert "no Kaggle credentials" in message and "KAGGLE_API_TOKEN" in message and "kaggle.json" in message


def test_network_unreachable(workdir, kaggle_server, monkeypatch, capsys):
    from kagglesdk import kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, "http://127.0.0.1:9")
    assert run_stage("download") == 2
    assert "network unreachable" in capsys.readouterr().err


def test_from_local_zip(workdir):
    with zipfile.ZipFile(workdir / "mine.zip", "w") as archive:
        archive.writestr("x/frwiki_namespace_0_0.jsonl", BODY)
    assert run_stage("download", "--from", "mine.zip") == 0
    assert (workdir / RAW).read_bytes() == BODY
    manifest = json.loads((workdir / "manifests/download.json").read_text())
    assert manifest["inputs"][0]["path"] == "mine.zip"


# ------------------------------------------------------------------------------------- several shards

def shard_body(index: int) -> bytes:
    return b"".join(json.dumps({"identifier": index * 1000 + i, "name": f"A{i}"}).encode() + b"\n" for i in range(50))


class FakeKaggle:
    """The KaggleApi calls the stage makes: a paged file listing and one-file downloads (one served zipped)."""

    def __init__(self, shards=(0, 1, 2, 10), page_size=2, zipped=(1,), fail_on=None, wrong_size=()):
        entries = [(f"frwiki_namespace_0/frwiki_namespace_0_{i}.jsonl", len(shard_body(i)) + (i in wrong_size))
                   for i in shards]
        entries.insert(1, ("frwiki/data/frwiki_namespace_0_00000.parquet", 5))  # not a JSONL shard
        self.pages = [entries[i:i + page_size] for i in range(0, len(entries), page_size)]
        self.zipped, self.fail_on = set(zipped), fail_on
        self.listed, self.downloads = [], []

    def dataset_list_files(self, dataset, page_token=None, page_size=20):
        number = int(page_token or 0)
        self.listed.append((dataset, page_token, page_size))
        files = [SimpleNamespace(name=name, total_bytes=size) for name, size in self.pages[number]]
        return SimpleNamespace(files=files, error_message="",
                               next_page_token=str(number + 1) if number + 1 < len(self.pages) else "")

    def dataset_download_file(self, dataset, file_name, path=None, force=False, quiet=True):
        import requests

        index = int(file_name.rsplit("_", 1)[1].split(".")[0])
        self.downloads.append(index)
        if index == self.fail_on:
            raise requests.exceptions.ConnectionError("cut")
        name = file_name.rsplit("/", 1)[1]
        if index in self.zipped:
            with zipfile.ZipFile(f"{path}/{name}.zip", "w") as archive:
                archive.writestr(name, shard_body(index))
        else:
            with open(f"{path}/{name}", "wb") as f:
                f.write(shard_body(index))
        return True


@pytest.fixture
def fake_kaggle(workdir, monkeypatch):
    import pipeline.download as download

    api = FakeKaggle()
    monkeypatch.setattr(download, "kaggle_api", lambda: api)
    return api


def raw_names(workdir):
    return sorted(p.name for p in (workdir / "data/raw").iterdir() if not p.name.startswith("."))


def test_all_lists_every_shard_page_by_page(workdir, fake_kaggle, capsys):
    assert run_stage("download", "--all") == 0
    assert fake_kaggle.listed == [("wikimedia-foundation/wikipedia-structured-contents/1", token, 200)
                                  for token in (None, "1", "2")]
    assert fake_kaggle.downloads == [0, 1, 2, 10]
    names = [f"frwiki_namespace_0_{i}.jsonl" for i in (0, 1, 2, 10)]
    manifest = json.loads((workdir / "manifests/download.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == [f"data/raw/{name}" for name in names]
    assert [o["sha256"] for o in manifest["outputs"]] == [hashlib.sha256(shard_body(i)).hexdigest()
                                                          for i in (0, 1, 2, 10)]
    assert manifest["parameters"]["files"] == "all"
    assert raw_names(workdir) == sorted(names) and not (workdir / "data/raw/.download").exists()
    assert (workdir / "data/raw/frwiki_namespace_0_1.jsonl").read_bytes() == shard_body(1)  # served zipped
    capsys.readouterr()
    assert run_stage("download", "--all") == 0
    assert "up to date" in capsys.readouterr().out and fake_kaggle.downloads == [0, 1, 2, 10]


def test_an_interrupted_all_resumes_with_the_missing_files(workdir, fake_kaggle, capsys):
    fake_kaggle.fail_on = 2
    assert run_stage("download", "--all") == 2
    assert "network unreachable" in capsys.readouterr().err
    assert raw_names(workdir) == ["frwiki_namespace_0_0.jsonl", "frwiki_namespace_0_1.jsonl"]  # checked, kept
    assert not (workdir / "manifests/download.json").exists()
    fake_kaggle.fail_on, fake_kaggle.downloads = None, []
    (workdir / "data/raw/frwiki_namespace_0_1.jsonl").write_bytes(b"damaged\n")  # no longer its recorded bytes
    assert run_stage("download", "--all") == 0
    out = capsys.readouterr().out
    assert "[1/4] frwiki_namespace_0_0.jsonl: complete, skipped" in out
    assert fake_kaggle.downloads == [1, 2, 10]
    assert (workdir / "data/raw/frwiki_namespace_0_1.jsonl").read_bytes() == shard_body(1)
    ledger = json.loads((workdir / f"data/raw/{LEDGER}").read_text())
    assert ledger["frwiki_namespace_0_10.jsonl"]["sha256"] == hashlib.sha256(shard_body(10)).hexdigest()


def test_files_selects_shards_and_checks_them(workdir, fake_kaggle, capsys):
    assert run_stage("download", "--files", "2,0-1") == 0
    assert fake_kaggle.downloads == [0, 1, 2]
    assert json.loads((workdir / "manifests/download.json").read_text())["parameters"]["files"] == [0, 1, 2]
    assert run_stage("download", "--files", "0,5-6") == 2
    assert "has no shard 5, 6 (it holds 4, indices 0 to 10)" in capsys.readouterr().err
    fake_kaggle.pages[0][0] = (fake_kaggle.pages[0][0][0], 7)  # the listing says 7 bytes for shard 0
    assert run_stage("download", "--files", "0", "--force") == 2
    assert "where the listing says 7" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["3-1", "a", "1,,2", "-1", "0-"])
def test_bad_files_spec_is_one_line(workdir, capsys, spec):
    assert run_stage("download", "--files", spec) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected shard indices and ranges such as 0-3,7" in err


def test_parse_shards():
    assert parse_shards("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_shards(" 7 , 2-2,0-1,1") == [0, 1, 2, 7]


# --------------------------------------------------------------------------------------------- the Hub

def hub_zip(path, shards=(0, 1, 10)) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt", "not a shard")
        for index in shards:
            archive.writestr(f"frwiki_namespace_0/frwiki_namespace_0_{index}.jsonl", shard_body(index))
    return path.read_bytes()


@pytest.fixture
def fake_hub(workdir, monkeypatch):
    """huggingface_hub's download and file info, answering from a zip the test wrote."""
    import huggingface_hub

    cached = workdir / "hub-cache/frwiki_namespace_0.zip"
    cached.parent.mkdir()
    state = SimpleNamespace(calls=[], sha256=hashlib.sha256(hub_zip(cached)).hexdigest(), error=None)

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None, force_download=False):
        state.calls.append((repo_id, filename, repo_type, revision))
        if state.error:
            raise state.error
        return str(cached)

    class HfApi:
        def get_paths_info(self, repo_id, paths, *, repo_type=None, revision=None):
            return [SimpleNamespace(path=paths[0], size=cached.stat().st_size, lfs=SimpleNamespace(sha256=state.sha256))]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
    return state


def test_hub_source_unzips_the_wanted_shards(workdir, fake_hub, capsys):
    assert run_stage("download", "--source", "hf") == 0
    assert fake_hub.calls == [("wikimedia/structured-wikipedia", "20240916.fr/frwiki_namespace_0.zip", "dataset",
                               "main")]
    assert raw_names(workdir) == ["frwiki_namespace_0_0.jsonl"]
    assert run_stage("download", "--source", "hf", "--all") == 0
    assert raw_names(workdir) == [f"frwiki_namespace_0_{i}.jsonl" for i in (0, 1, 10)]
    assert "[1/3] frwiki_namespace_0_0.jsonl: complete, skipped" in capsys.readouterr().out
    manifest = json.loads((workdir / "manifests/download.json").read_text())
    assert [Path(o["path"]).name for o in manifest["outputs"]] == [f"frwiki_namespace_0_{i}.jsonl" for i in (0, 1, 10)]
    assert manifest["parameters"]["source"] == "hf"
    assert (workdir / "data/raw/frwiki_namespace_0_10.jsonl").read_bytes() == shard_body(10)
    assert run_stage("download", "--source", "hf", "--files", "1-2") == 2
    assert "has no shard 2" in capsys.readouterr().err


def test_hub_zip_checked_and_errors_are_one_line(workdir, fake_hub, capsys):
    fake_hub.sha256 = "0" * 64
    assert run_stage("download", "--source", "hf") == 2
    assert "does not have the sha256 the Hub records" in capsys.readouterr().err
    assert raw_names(workdir) == []
    fake_hub.error = ConnectionError("Name or service not known")
    assert run_stage("download", "--source", "hf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not give wikimedia/structured-wikipedia" in err and "ConnectionError" in err


# ------------------------------------------------------------------------------------------ local copies

def test_from_a_zip_of_several_a_folder_and_a_glob(workdir, capsys):
    with zipfile.ZipFile(workdir / "dump.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for index in (0, 1):
            archive.writestr(f"d/frwiki_namespace_0_{index}.jsonl", shard_body(index))
    assert run_stage("download", "--from", "dump.zip") == 0
    assert raw_names(workdir) == ["frwiki_namespace_0_0.jsonl", "frwiki_namespace_0_1.jsonl"]
    assert (workdir / "data/raw/frwiki_namespace_0_1.jsonl").read_bytes() == shard_body(1)
    (workdir / "folder").mkdir()
    for index in (3, 4):
        (workdir / f"folder/frwiki_namespace_0_{index}.jsonl").write_bytes(shard_body(index))
    (workdir / "folder/notes.txt").write_text("ignored")
    assert run_stage("download", "--from", "folder") == 0
    outputs = json.loads((workdir / "manifests/download.json").read_text())["outputs"]
    assert [Path(o["path"]).name for o in outputs] == ["frwiki_namespace_0_3.jsonl", "frwiki_namespace_0_4.jsonl"]
    assert run_stage("download", "--from", "folder/*_4.jsonl", "--file", "mine.jsonl") == 0
    outputs = json.loads((workdir / "manifests/download.json").read_text())["outputs"]
    assert [Path(o["path"]).name for o in outputs] == ["mine.jsonl"]  # a single JSONL takes --file's name
    capsys.readouterr()
    assert run_stage("download", "--from", "folder/*.none") == 2
    assert "no file matches it as a glob" in capsys.readouterr().err
    assert run_stage("download", "--from", "dump.zip", "--all") == 2
    assert "--from takes every JSONL" in capsys.readouterr().err
