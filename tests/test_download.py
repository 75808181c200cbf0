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

import pytest

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
    assert sorted(p.name for p in (workdir / "data/raw").iterdir()) == [LOCK_FILE, "frwiki_namespace_0_0.jsonl"]
    manifest = json.loads((workdir / "manifests/download.json").read_text())
    assert manifest["parameters"] == {"dataset": "wikimedia-foundation/wikipedia-structured-contents",
                                      "version": 1, "file": FILE}
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
