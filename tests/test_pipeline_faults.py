"""Faults during the data stages: interrupts, concurrent runs, full or read-only disks, damaged
manifests, odd input. Each ends in a one-line error (or a clean stop) and nothing at a final path."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.synthetic_corpus import write_corpus
from pipeline.locks import LOCK_FILE
from pipeline.manifest import pack_info, tokens_info
from pipeline.packed import PackedSplit
from tests.conftest import article, paragraph, run_stage, section, write_jsonl

REPO = Path(__file__).resolve().parents[1]
INTERRUPTED = "interrupted; no output was left at its final path"


def start_stage(*argv: object) -> subprocess.Popen:
    """`python -m pipeline ...` in a session of its own, as a terminal's foreground job would be."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_workers(process: subprocess.Popen, count: int, timeout: float = 60) -> None:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if len(children.read_text().split()) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the stage never had {count} workers")


def group_is_gone(pgid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


ATTEMPTS = [(signal.SIGINT, True, delay) for delay in (0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3)] + [
    (signal.SIGINT, False, 0.05), (signal.SIGINT, False, 0.2), (signal.SIGTERM, True, 0.05), (signal.SIGTERM, False, 0.2)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from /proc")
def test_one_signal_stops_every_worker_at_any_point(tmp_path):
    """A Ctrl-C reaches the whole process group, a `kill` only the stage: either way one signal ends
    the run with the message (exit 130, 143 for SIGTERM), never a hang or a traceback, and leaves no
    worker behind. The signal lands at several points of the run, repeated to catch the race."""
    source = tmp_path / "in.jsonl"
    write_corpus(source, 10_000_000, seed=1)
    interrupted = 0
    for attempt, (signum, to_group, delay) in enumerate(ATTEMPTS):
        out = tmp_path / f"run{attempt}"
        process = start_stage("extract-paragraphs", "--input", source, "--workers", "2", "--chunk-bytes", "200000",
                              "--data-dir", out / "data", "--manifests", out / "manifests")
        try:
            wait_for_workers(process, 2)
            time.sleep(delay)
            (os.killpg if to_group else os.kill)(process.pid, signum)
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the stage hung after one {signal.Signals(signum).name} "
                            f"({delay} s after its workers started)")
            assert group_is_gone(process.pid), "a worker outlived the stage"
        finally:
            if not group_is_gone(process.pid, timeout=0):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        if (out / "manifests/extract-paragraphs.json").is_file():
            # The signal came once the manifest was written: the run is complete (exit 0), or was
            # interrupted in its last microseconds, after everything was recorded.
            assert process.returncode in (0, 130, 143) and "Traceback" not in err, err
            continue
        interrupted += 1
        assert process.returncode == (143 if signum == signal.SIGTERM else 130), err
        assert err.strip().splitlines()[-1] == f"error: extract-paragraphs: {INTERRUPTED}", err
        assert "Traceback" not in err
        assert not (out / "data/paragraphs/part-00000.parquet").exists()
    assert interrupted >= 3  # the early signals land mid-run, or the test proves little


def test_sigterm_ends_a_single_process_stage_like_ctrl_c(pipeline_root, tmp_path, monkeypatch, capsys):
    root = copy_of(pipeline_root, tmp_path)
    import pipeline.pack as pack_module

    def terminated_while_packing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    class Escaped(Exception):
        """The signal reached the test's own handler: the stage did not handle it."""

    def escaped(signum, frame):
        raise Escaped

    monkeypatch.setattr(pack_module, "pack_split", terminated_while_packing)
    previous = signal.signal(signal.SIGTERM, escaped)
    try:
        assert run_in(root, "pack", "--seq-len", "32") == 143
        assert signal.getsignal(signal.SIGTERM) is escaped  # the stage gave the handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.strip() == f"error: pack: {INTERRUPTED}"
    assert [path.name for path in (root / "data/packed/seq32").iterdir()] == [LOCK_FILE]


# ------------------------------------------------------------------------------------ shared fixture

STAGE_RUNS = {  # stage -> (its command in a copy of the fixture, its outputs, its manifest)
    "download": (("download", "--from", "in.jsonl"), ["data/raw/frwiki_namespace_0_0.jsonl"], "download"),
    "extract-paragraphs": (("extract-paragraphs", "--workers", "1"), ["data/paragraphs/part-00000.parquet"],
                           "extract-paragraphs"),
    "tokenize": (("tokenize", "--plain-bpe", "--vocab-size", "400", "--workers", "1"),
                 ["data/tokenizer/tokenizer.json"] + [f"data/tokens/{split}{ext}" for split in ("train", "val")
                                                      for ext in (".bin", ".docs.npy")], "tokenize"),
    "pack": (("pack", "--seq-len", "64"), [f"data/packed/seq64/{split}{ext}" for split in ("train", "val")
                                           for ext in (".bin", ".doc_lens.npy", ".row_offsets.npy")], "pack-seq64"),
}


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory) -> Path:
    """Every stage run once, from the folder itself: data/ and manifests/ side by side."""
    root = tmp_path_factory.mktemp("pipeline")
    write_corpus(root / "in.jsonl", 300_000, seed=3)
    for command, _, _ in STAGE_RUNS.values():
        assert run_in(root, *command) == 0
    return root


def run_in(root: Path, *argv: object) -> int:
    """A stage run from `root`, with the default data/ and manifests/ there."""
    with contextlib.chdir(root):
        return run_stage(*argv)


def copy_of(root: Path, tmp_path: Path) -> Path:
    """A copy of the fixture: manifests record paths relative to their folder's parent, so it is valid."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


def without_stage_outputs(root: Path, stage: str) -> tuple[tuple, list[Path], Path]:
    """Remove a stage's outputs and manifest, as before its first run; return its command, outputs, manifest."""
    command, outputs, manifest = STAGE_RUNS[stage]
    for output in outputs:
        (root / output).unlink()
    (root / "manifests" / f"{manifest}.json").unlink()
    return command, [root / output for output in outputs], root / "manifests" / f"{manifest}.json"


def assert_nothing_left(outputs: list[Path], manifest: Path) -> None:
    assert [path for path in outputs if path.exists()] == [] and not manifest.exists()
    for folder in {path.parent for path in outputs}:
        assert [path.name for path in folder.iterdir() if ".tmp-" in path.name] == []


def error_line(err: str, stage: str) -> str:
    """The stage's one-line error: the last line of stderr (progress bars at most above it)."""
    assert "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith(f"error: {stage}: "), err
    return last


# ---------------------------------------------------------------------------------- locked outputs

def test_a_second_run_on_a_busy_output_folder_is_refused(pipeline_root, tmp_path, capsys):
    """Two `pack` runs on one folder: the second is refused while the first runs, and the first,
    whose temporaries the second would have deleted, finishes intact."""
    root = copy_of(pipeline_root, tmp_path)
    go, inside = tmp_path / "go", tmp_path / "inside"
    first = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
import pipeline.pack as pack
real = pack.pack_split
def paused(*args, **kwargs):
    Path({str(inside)!r}).touch()
    while not Path({str(go)!r}).exists():
        time.sleep(0.02)
    return real(*args, **kwargs)
pack.pack_split = paused
from pipeline.cli import main
sys.exit(main(["pack", "--seq-len", "64", "--force", "--data-dir", "data", "--manifests", "manifests"]))
"""], cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 60
        while not inside.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        capsys.readouterr()
        assert run_in(root, "pack", "--seq-len", "64") == 2
        message = error_line(capsys.readouterr().err, "pack")
        assert f"output folder data/packed/seq64 is in use by another process (pid {first.pid}); wait for it or stop " \
               f"it" in message
    finally:
        go.touch()
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert run_in(root, "pack", "--seq-len", "64") == 0  # the lock went with its holder
    assert "up to date" in capsys.readouterr().out


# ----------------------------------------------------------------------------- full or read-only disk

def limited_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(pipeline_root, tmp_path, stage):
    """A file-size limit makes every write past 20 kB fail, as a full disk would: the stage's main
    output cannot be written (tokenize has already renamed its tokenizer into place by then)."""
    root = copy_of(pipeline_root, tmp_path)
    command, outputs, manifest = without_stage_outputs(root, stage)
    result = subprocess.run([sys.executable, "-m", "pipeline", *command], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=limited_file_size(20_000))
    assert result.returncode == 2, result.stderr
    message = error_line(result.stderr, stage)
    assert "File too large" in message and "then rerun" in message
    assert_nothing_left(outputs, manifest)


@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_a_failed_rename_takes_back_what_the_run_renamed_before(pipeline_root, tmp_path, monkeypatch, capsys, stage):
    """EROFS injected where the stage's last data file is renamed into place: one line, and the files
    it had already renamed (the tokenizer, a split's rows) are removed again."""
    root = copy_of(pipeline_root, tmp_path)
    command, outputs, manifest = without_stage_outputs(root, stage)
    real_replace = os.replace

    def refuses_the_last(source, destination):
        if Path(destination).resolve() == outputs[-1].resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", refuses_the_last)
    capsys.readouterr()
    assert run_in(root, *command) == 2
    message = error_line(capsys.readouterr().err, stage)
    assert f"{outputs[-1].relative_to(root)}: Read-only file system; choose a writable" in message
    assert_nothing_left(outputs, manifest)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("stage", list(STAGE_RUNS))
def test_a_read_only_output_folder_is_one_line(pipeline_root, tmp_path, capsys, stage):
    root = copy_of(pipeline_root, tmp_path)
    command, outputs, manifest = without_stage_outputs(root, stage)
    folders = {path.parent for path in outputs}
    for folder in folders:
        folder.chmod(0o555)
    try:
        capsys.readouterr()
        assert run_in(root, *command) == 2
        assert "Permission denied" in error_line(capsys.readouterr().err, stage)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert_nothing_left(outputs, manifest)


def namespaces_available() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def in_small_tmpfs(root: Path, folder: str, options: str, python: str) -> tuple[int, str, list[str]]:
    """Run `python -c PYTHON` in `root` with `folder` a fresh tmpfs (mount options `options`), in a
    user and mount namespace of its own (no root needed); return its exit code, stderr and the
    files left in the tmpfs, which vanishes with the namespace."""
    script = (f'mount -t tmpfs -o {options} tmpfs {folder} && "$0" -c "$1" 2>stage.err; echo "rc=$?"; '
              f'find {folder} -type f')
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, sys.executable,
                             python], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = result.stdout.split()
    code = next(int(line[3:]) for line in lines if line.startswith("rc="))
    return code, (root / "stage.err").read_text(), [line for line in lines if not line.startswith("rc=")]


@pytest.mark.skipif(not namespaces_available(), reason="needs unprivileged user and mount namespaces")
def test_pack_on_a_full_disk_is_an_error_not_sigbus(pipeline_root, tmp_path):
    """The rows are written through a memory map: on a full disk that was a SIGBUS, no message. The
    free-space check is defeated here, to reach the write itself."""
    root = copy_of(pipeline_root, tmp_path)
    shutil.rmtree(root / "data/packed")
    (root / "data/packed").mkdir()
    code, err, left = in_small_tmpfs(root, "data/packed", "size=64k", """
import shutil, sys
shutil.disk_usage = lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)
from pipeline.cli import main
sys.exit(main(["pack", "--seq-len", "64"]))
""")
    assert code == 2, err
    assert "No space left on device; free some space" in error_line(err, "pack")
    assert [name for name in left if not name.endswith(LOCK_FILE)] == []


@pytest.mark.skipif(not namespaces_available(), reason="needs unprivileged user and mount namespaces")
@pytest.mark.parametrize("options, words", [("size=64k", "free for these rows"),
                                            ("ro", "data/packed/seq64: Read-only file system")])
def test_pack_on_a_small_or_read_only_disk_says_so_first(pipeline_root, tmp_path, options, words):
    root = copy_of(pipeline_root, tmp_path)
    shutil.rmtree(root / "data/packed")
    (root / "data/packed").mkdir()
    code, err, left = in_small_tmpfs(root, "data/packed", options, """
import sys
from pipeline.cli import main
sys.exit(main(["pack", "--seq-len", "64"]))
""")
    assert code == 2 and words in error_line(err, "pack")
    assert [name for name in left if not name.endswith(LOCK_FILE)] == []


def test_pack_checks_free_space_before_writing(pipeline_root, tmp_path, monkeypatch, capsys):
    root = copy_of(pipeline_root, tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, (1 << 30) - 1000, 1000))
    capsys.readouterr()
    assert run_in(root, "pack", "--seq-len", "128") == 2
    message = error_line(capsys.readouterr().err, "pack")
    assert "data/packed/seq128 needs" in message and "MB free" in message and "the disk has 0.0 MB" in message
    assert [path.name for path in (root / "data/packed/seq128").iterdir()] == [LOCK_FILE]


# -------------------------------------------------------------------------------- damaged manifests

def damage(path: Path, how: str) -> None:
    manifest = json.loads(path.read_text()) if path.is_file() else None
    path.unlink()
    if how == "folder":
        path.mkdir()
    elif how == "nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "not utf-8":
        path.write_bytes(b'{"stage": "\xff"}')
    elif how == "bytes as text":
        manifest["outputs"][0]["bytes"] = str(manifest["outputs"][0]["bytes"])
        path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["folder", "nested", "not utf-8", "bytes as text"])
@pytest.mark.parametrize("damaged, stage", [("download", "extract-paragraphs"), ("extract-paragraphs", "tokenize"),
                                            ("tokenize", "pack"), ("pack-seq64", "pack")])
def test_a_damaged_manifest_read_by_a_stage_is_one_line(pipeline_root, tmp_path, capsys, damaged, stage, how):
    """A stage reads the manifests of the folder until it finds who wrote its input: a damaged one,
    whichever stage wrote it (its own too), is named with the command that rewrites it."""
    root = copy_of(pipeline_root, tmp_path)
    damage(root / "manifests" / f"{damaged}.json", how)
    capsys.readouterr()
    assert run_in(root, *STAGE_RUNS[stage][0], "--force") == 2
    message = error_line(capsys.readouterr().err, stage)
    rerun = "just pack --seq-len 64" if damaged == "pack-seq64" else f"just {damaged}"
    assert f"manifests/{damaged}.json" in message and f"delete it and rerun `{rerun}`" in message


@pytest.mark.parametrize("stage, section, key", [("pack", "pack", "splits"), ("tokenize", "tokens", "special_ids"),
                                                 ("pack", "pack", None), ("tokenize", "tokens", None)])
def test_a_manifest_missing_its_section_is_never_up_to_date(pipeline_root, tmp_path, capsys, stage, section, key):
    """Train reads the section a stage writes beside the common records: a manifest without it (or
    with it damaged) makes the stage run again, not report "up to date"."""
    root = copy_of(pipeline_root, tmp_path)
    path = root / "manifests" / f"{STAGE_RUNS[stage][2]}.json"
    manifest = json.loads(path.read_text())
    if key is None:
        del manifest[section]
    else:
        del manifest[section][key]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_in(root, *STAGE_RUNS[stage][0]) == 0
    out = capsys.readouterr().out
    assert "up to date" not in out and f"is damaged (its {section!r} section lacks" in out and "running again" in out
    rewritten = json.loads(path.read_text())
    assert rewritten[section] == json.loads((pipeline_root / "manifests" / path.name).read_text())[section]


# ------------------------------------------------------------------------ paths and working directory

def test_the_same_files_are_the_same_inputs_from_any_directory(tmp_path, capsys):
    """Extract from the project folder, tokenize from elsewhere with absolute paths, pack with paths
    spelled relative to a third folder: each finds its input's manifest, and reruns spelled
    differently are up to date."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere" / "deeper"
    project.mkdir()
    elsewhere.mkdir(parents=True)
    write_corpus(project / "in.jsonl", 200_000, seed=4)
    assert run_in(project, "extract-paragraphs", "--input", "in.jsonl", "--workers", "1") == 0
    tokenize = ("tokenize", "--plain-bpe", "--vocab-size", "400", "--workers", "1")
    assert run_in(elsewhere, *tokenize, "--data-dir", project / "data", "--manifests", project / "manifests") == 0
    assert run_in(elsewhere, "pack", "--seq-len", "32", "--data-dir", "../../project/data",
                  "--manifests", "../../project/manifests") == 0
    capsys.readouterr()
    assert run_in(project, *tokenize) == 0
    assert run_in(project / "data", "pack", "--seq-len", "32", "--data-dir", ".", "--manifests", "../manifests") == 0
    assert run_in(elsewhere, "extract-paragraphs", "--input", project / "in.jsonl", "--workers", "1",
                  "--data-dir", project / "data", "--manifests", project / "manifests") == 0
    assert capsys.readouterr().out.count("up to date") == 3
    recorded = json.loads((project / "manifests/tokenize.json").read_text())
    assert recorded["inputs"][0]["path"] == "data/paragraphs/part-00000.parquet"
    assert recorded["parameters"]["out_dir"] == "data/tokens"
    with contextlib.chdir(elsewhere):
        assert tokens_info(project / "manifests").tokenizer_path == (project / "data/tokenizer/tokenizer.json").resolve()


def test_manifests_of_the_earlier_format_are_still_read(pipeline_root, tmp_path, capsys):
    """Before the format key, paths were recorded relative to the run's working directory: read
    that way, from that directory, such a manifest is up to date as before."""
    root = copy_of(pipeline_root, tmp_path)
    for path in (root / "manifests").glob("*.json"):
        manifest = json.loads(path.read_text())
        del manifest["format"]
        path.write_text(json.dumps(manifest))
    capsys.readouterr()
    for command, _, _ in STAGE_RUNS.values():
        assert run_in(root, *command) == 0
    assert capsys.readouterr().out.count("up to date") == len(STAGE_RUNS)


# ----------------------------------------------------------------------------------------- odd input

def article_line(identifier: int) -> bytes:
    return json.dumps(article(identifier, section("Abstract", paragraph(f"Texte {identifier}.")))).encode() + b"\n"


def test_an_identifier_past_64_bits_is_a_bad_line(workdir, capsys):
    lines = [article_line(i) for i in range(1, 2000)] + [article_line(1 << 63), article_line(-(1 << 63))]
    write_jsonl(workdir / "in.jsonl", lines)
    assert run_stage("extract-paragraphs", "--input", "in.jsonl", "--workers", "1") == 0
    counters = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())["counters"]
    assert counters["bad_lines"]["identifier_out_of_range"] == 1 and counters["articles"] == 2000
    assert counters["first_bad_lines"] == [{"file": "in.jsonl", "line": 2000, "reason": "identifier_out_of_range",
                                            "cause": f"identifier {1 << 63} does not fit in 64 bits"}]
    assert run_stage("extract-paragraphs", "--input", "in.jsonl", "--force", "--max-bad-fraction", "0") == 2
    assert "line 2000: identifier 9223372036854775808 does not fit in 64 bits" in capsys.readouterr().err


def test_malformed_lines_are_named_with_their_cause(workdir, capsys):
    nested = b'{"identifier": 5, "sections": ' + b"[" * 2000 + b"]" * 2000 + b"}\n"
    lines = [b"\xef\xbb\xbf" + article_line(1), article_line(2), nested, article_line(3), b"[1, 2]\n",
             b'{"name": "\xe9t\xe9"}\n']
    write_jsonl(workdir / "in.jsonl", lines)
    assert run_stage("extract-paragraphs", "--input", "in.jsonl", "--max-bad-fraction", "0.5") == 2
    message = error_line(capsys.readouterr().err, "extract-paragraphs")
    assert "4 of 6 lines are malformed (invalid_json 2, not_utf8 1, not_object 1; " in message
    assert "line 1: invalid JSON: UTF-8 byte order mark (BOM) is not supported (column 1)" in message
    assert "line 3: invalid JSON: depth limit exceeded (column" in message
    assert "line 5: not a JSON object but an array" in message
    assert "line 6" not in message  # the first three are shown; the manifest, written on success, keeps ten
    assert run_stage("extract-paragraphs", "--input", "in.jsonl", "--max-bad-fraction", "1") == 0
    first = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())["counters"]["first_bad_lines"]
    assert [(bad["line"], bad["reason"]) for bad in first] == [(1, "invalid_json"), (3, "invalid_json"),
                                                               (5, "not_object"), (6, "not_utf8")]
    assert first[2]["cause"] == "not a JSON object but an array"
    assert first[3]["cause"] == "byte 0xe9 at column 11 is not UTF-8"


@pytest.mark.parametrize("cut, cause", [(b'{"identifier": 99, "name": "Tit', "the file ends inside this line"),
                                        ('{"identifier": 99, "name": "Été'.encode()[:-1],
                                         "the file ends inside a multi-byte character")])
def test_a_last_line_cut_short_is_reported_and_skipped(workdir, capsys, cut, cause):
    """An interrupted download ends in the middle of a line: that line is skipped with a warning that
    says so, and not counted against --max-bad-fraction."""
    write_jsonl(workdir / "in.jsonl", [article_line(1), article_line(2), cut])
    assert run_stage("extract-paragraphs", "--input", "in.jsonl") == 0
    err = capsys.readouterr().err
    assert f"warning: in.jsonl: skipped the last line (line 3): {cause}" in err and "interrupted download" in err
    counters = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())["counters"]
    assert counters["bad_lines"]["truncated"] == 1 and counters["articles"] == 2


def test_gzip_input_is_read_directly_and_gives_the_plain_output(tmp_path):
    plain = tmp_path / "in.jsonl"
    write_corpus(plain, 2_000_000, seed=5)
    with open(plain, "rb") as source, gzip.open(tmp_path / "in.jsonl.gz", "wb") as packed:
        shutil.copyfileobj(source, packed)
    outputs = {}
    for name, workers in (("in.jsonl", "1"), ("in.jsonl.gz", "1"), ("in.jsonl.gz", "2")):
        out = tmp_path / f"{name}-{workers}"
        assert run_stage("extract-paragraphs", "--input", tmp_path / name, "--workers", workers,
                         "--chunk-bytes", "150000", "--data-dir", out, "--manifests", out / "manifests") == 0
        outputs[name, workers] = (out / "paragraphs/part-00000.parquet").read_bytes()
    assert outputs["in.jsonl", "1"] == outputs["in.jsonl.gz", "1"] == outputs["in.jsonl.gz", "2"]


def test_a_cut_gzip_input_is_one_line(workdir, capsys):
    with gzip.open(workdir / "in.jsonl.gz", "wb") as f:
        f.write(b"".join(article_line(i) for i in range(1, 3000)))
    data = (workdir / "in.jsonl.gz").read_bytes()
    (workdir / "in.jsonl.gz").write_bytes(data[:len(data) // 2])
    assert run_stage("extract-paragraphs", "--input", "in.jsonl.gz") == 2
    assert "is a damaged or cut gzip file" in error_line(capsys.readouterr().err, "extract-paragraphs")
    assert not (workdir / "data/paragraphs/part-00000.parquet").exists()


def test_an_empty_val_split_packs(workdir, capsys):
    """Three articles give no val article (10% of 3 rounds to none): pack writes an empty val split."""
    write_jsonl(workdir / "in.jsonl", [article(i, section("Abstract", paragraph("Une phrase assez longue. " * 40)))
                                       for i in (1, 2, 3)])
    assert run_stage("extract-paragraphs", "--input", "in.jsonl") == 0
    assert run_stage("tokenize", "--plain-bpe", "--vocab-size", "300") == 0
    assert run_stage("pack", "--seq-len", "32") == 0
    assert "no val rows: the val split is empty" in capsys.readouterr().out
    info = pack_info(workdir / "manifests", 32)
    assert info.splits["val"]["rows"] == 0 and info.splits["train"]["rows"] > 0
    assert (workdir / "data/packed/seq32/val.bin").stat().st_size == 0
    assert PackedSplit.open(workdir / "data", 32, "val", workdir / "manifests").n_rows == 0


def test_tokenize_into_one_folder_locks_it_once(pipeline_root, tmp_path):
    """With --out-dir the tokenizer and the tokens share a folder: one lock, not a clash with itself."""
    root = copy_of(pipeline_root, tmp_path)
    assert run_in(root, *STAGE_RUNS["tokenize"][0], "--out-dir", "one") == 0
    assert sorted(path.name for path in (root / "one").iterdir()) == [
        LOCK_FILE, "tokenizer.json", "train.bin", "train.docs.npy", "val.bin", "val.docs.npy"]
