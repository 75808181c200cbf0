"""add-corpus: local JSONL, Parquet, text and save_to_disk datasets through the real `datasets` code
path, offline, into paragraphs parts with a source column and a manifest."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import add_corpus
from pipeline.errors import StageError
from pipeline.manifest import StageRun, verify_input
from pipeline.paragraphs import SCHEMA, open_dataset, part_files
from tests.conftest import run_stage, write_jsonl

DOCS = [
    {"id": "d0", "title": "Premier", "text": "Bonjour le monde.\n  Deuxième ligne.  \n\nTroisième."},
    {"id": "d1", "title": None, "text": ""},  # empty: skipped, its index still counts
    {"id": "d2", "title": "Troisième", "text": "Un seul paragraphe."},
    {"id": "d3", "text": "Ligne A\r\nLigne B"},
]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Nothing reaches the network, and `datasets` keeps its cache (lock files) in the test's folder."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def corpus_rows(name: str = "web") -> list[dict]:
    return open_dataset(Path("data/corpora") / name).to_table().to_pylist()


def manifest(name: str = "web") -> dict:
    return json.loads(Path(f"manifests/corpus-{name}.json").read_text())


def index_of(article_id: int) -> int:
    return article_id & 0xFFFF_FFFF


def test_jsonl_files_become_paragraph_parts_with_the_corpus_source(workdir):
    write_jsonl(workdir / "a.jsonl", DOCS[:2])
    with gzip.open(workdir / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(doc, ensure_ascii=False) + "\n" for doc in DOCS[2:])
    assert run_stage("add-corpus", "web", "--files", "a.jsonl", "b.jsonl.gz", "--rows-per-part", "2") == 0

    rows = corpus_rows()
    assert [r["text"] for r in rows] == ["Bonjour le monde.", "Deuxième ligne.", "Troisième.", "Un seul paragraphe.",
                                         "Ligne A", "Ligne B"]
    assert [r["paragraph_index"] for r in rows] == [0, 1, 2, 0, 0, 1]
    assert [r["title"] for r in rows] == ["Premier"] * 3 + ["Troisième", "", ""]
    assert {r["source"] for r in rows} == {"web"} and {r["section_path"] for r in rows} == {""}
    # the document's index in the stream (the empty document counts), under one tag per corpus
    assert [index_of(r["article_id"]) for r in rows] == [0, 0, 0, 2, 3, 3]
    assert {r["article_id"] >> 32 for r in rows} == {add_corpus.corpus_tag("web")}
    assert add_corpus.corpus_tag("web") != add_corpus.corpus_tag("oscar")

    # a part ends after the document that reaches --rows-per-part: documents never straddle parts
    parts = part_files(Path("data/corpora/web"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    assert [pq.read_metadata(p).num_rows for p in parts] == [3, 3]
    assert pq.read_schema(parts[0]).equals(SCHEMA)

    recorded = manifest()
    assert recorded["stage"] == "corpus-web"
    assert recorded["corpus"]["origin"] == {"kind": "files", "builder": "json", "files": 2}
    counts = recorded["counters"]
    assert counts["documents"] == 4 and counts["empty_documents"] == 1 and counts["paragraphs"] == 6
    assert counts["bytes"] == sum(len(r["text"].encode()) for r in rows)
    assert [Path(i["path"]).name for i in recorded["inputs"]] == ["a.jsonl", "b.jsonl.gz"]
    assert [o["counts"]["documents"] for o in recorded["outputs"]] == [1, 2]


def test_parquet_with_other_columns_and_blank_line_paragraphs(workdir):
    table = pa.table({"content": ["Une ligne\ncoupée.\n\n \nSuite.", "Seul."], "url": ["u1", "u2"]})
    pq.write_table(table, workdir / "c.parquet")
    assert run_stage("add-corpus", "livres", "--files", "c.parquet", "--text-column", "content",
                     "--paragraphs", "blank-line") == 0
    rows = corpus_rows("livres")
    assert [r["text"] for r in rows] == ["Une ligne\ncoupée.", "Suite.", "Seul."]
    assert {r["title"] for r in rows} == {""}  # no title column
    assert manifest("livres")["corpus"]["title_column"] is None


def test_text_files_are_one_document_each(workdir):
    (workdir / "livre1.txt").write_text("Chapitre un.\n\nIl était une fois.\n")
    (workdir / "livre2.txt").write_text("Fin.\n")
    assert run_stage("add-corpus", "gutenberg", "--files", "livre1.txt", "livre2.txt") == 0
    rows = corpus_rows("gutenberg")
    assert [(index_of(r["article_id"]), r["text"]) for r in rows] == [
        (0, "Chapitre un."), (0, "Il était une fois."), (1, "Fin.")]
    assert manifest("gutenberg")["corpus"]["origin"]["builder"] == "text"


def test_a_dataset_saved_with_save_to_disk(workdir):
    import datasets

    train = datasets.Dataset.from_dict({"text": ["Entraînement."], "title": ["T"]})
    test = datasets.Dataset.from_dict({"text": ["Essai un.\nEssai deux."], "title": ["E"]})
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(workdir / "saved"))
    assert run_stage("add-corpus", "saved", "--from-disk", "saved", "--split", "test") == 0
    assert [(r["title"], r["text"]) for r in corpus_rows("saved")] == [("E", "Essai un."), ("E", "Essai deux.")]
    origin = manifest("saved")["corpus"]["origin"]
    assert origin["kind"] == "disk" and origin["split"] == "test" and origin["rows"] == 1
    assert origin["fingerprint"] == datasets.load_from_disk(str(workdir / "saved"))["test"]._fingerprint
    assert any(Path(i["path"]).name == "dataset_dict.json" for i in manifest("saved")["inputs"])

    train.save_to_disk(str(workdir / "single"))
    assert run_stage("add-corpus", "single", "--from-disk", "single") == 0
    assert [r["text"] for r in corpus_rows("single")] == ["Entraînement."]


def test_max_bytes_stops_after_the_document_that_reaches_it(workdir):
    write_jsonl(workdir / "a.jsonl", [{"text": "x" * 10}, {"text": "y" * 10}, {"text": "z" * 10}])
    assert run_stage("add-corpus", "web", "--files", "a.jsonl", "--max-bytes", "15") == 0
    assert [r["text"] for r in corpus_rows()] == ["x" * 10, "y" * 10]
    counts = manifest()["counters"]
    assert counts["bytes"] == 20 and counts["stopped_at_max_bytes"] is True


def test_a_rerun_is_skipped_and_a_changed_input_replaces_every_part(workdir, capsys):
    write_jsonl(workdir / "a.jsonl", [{"text": f"document {i}"} for i in range(3)])
    args = ("add-corpus", "web", "--files", "a.jsonl", "--rows-per-part", "1")
    assert run_stage(*args) == 0
    assert len(part_files(Path("data/corpora/web"))) == 3
    assert run_stage(*args) == 0
    assert "up to date" in capsys.readouterr().out

    write_jsonl(workdir / "a.jsonl", [{"text": "seul document"}])
    assert run_stage(*args) == 0
    assert [p.name for p in part_files(Path("data/corpora/web"))] == ["part-00000.parquet"]
    assert [r["text"] for r in corpus_rows()] == ["seul document"]


def test_a_source_that_cannot_be_opened_leaves_the_previous_corpus_in_place(workdir):
    """The Hub unreachable (or a saved dataset gone) on a rerun: an error, and the corpus already there stays."""
    write_jsonl(workdir / "a.jsonl", [{"text": "document gardé"}])
    assert run_stage("add-corpus", "web", "--files", "a.jsonl") == 0
    (workdir / "folder").mkdir()
    assert run_stage("add-corpus", "web", "--from-disk", "folder") != 0
    assert [r["text"] for r in corpus_rows()] == ["document gardé"]


def write_bad_inputs(root: Path) -> None:
    write_jsonl(root / "good.jsonl", [{"text": "Bonjour.", "n": 1}])
    write_jsonl(root / "bad.jsonl", [{"text": "ok"}, b'{"text": cut\n'])
    write_jsonl(root / "numbers.jsonl", [{"text": 3}])
    write_jsonl(root / "empty.jsonl", [{"text": ""}, {"text": " \n "}])
    (root / "notes.txt").write_text("texte\n")
    (root / "table.csv").write_text("text\nbonjour\n")
    (root / "folder").mkdir()


@pytest.mark.parametrize("args, message", [
    (("frwiki", "--files", "good.jsonl"), "names the Wikipedia paragraphs"),
    (("Web/x", "--files", "good.jsonl"), "lowercase letters, digits"),
    (("web", "--files", "missing.jsonl"), "missing.jsonl does not exist"),
    (("web", "--files", "folder"), "is a folder"),
    (("web", "--files", "table.csv"), "unknown format"),
    (("web", "--files", "good.jsonl", "notes.txt"), "mixes formats"),
    (("web", "--files", "good.jsonl", "--text-column", "body"), "has no column 'body' (its columns: text, n)"),
    (("web", "--files", "numbers.jsonl"), "holds Value('int64'), not text"),
    (("web", "--files", "bad.jsonl"), "bad.jsonl"),  # the file `datasets` could not parse is named
    (("web", "--files", "empty.jsonl"), "holds no text"),
    (("web", "--files", "good.jsonl", "--split", "test"), "--split does not apply to --files"),
    (("web", "--files", "good.jsonl", "--config", "fr"), "apply to a Hub dataset"),
    (("web", "--from-disk", "folder"), "saved dataset folder"),
    (("web", "--hf", "nobody/nothing", "--config", "fr"), "Couldn't reach 'nobody/nothing' on the Hub"),
])
def test_bad_input_is_one_line_and_leaves_nothing(workdir, capsys, args, message):
    write_bad_inputs(workdir)
    assert run_stage("add-corpus", *args) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not line.startswith("add-corpus ")]
    assert len(lines) == 1, err  # no traceback, and what `datasets` logs goes into the one line
    assert lines[0].startswith("error: add-corpus: ") and message in lines[0], err
    assert not list(Path("data").rglob("*.parquet")) and not list(Path("manifests").glob("*.json"))


def test_an_interrupted_run_leaves_no_part_and_no_manifest(workdir, monkeypatch):
    write_jsonl(workdir / "a.jsonl", [{"text": f"document {i}"} for i in range(5)])
    split = add_corpus.split_paragraphs
    calls = []

    def interrupt_at_the_fourth(text: str, on_blank_lines: bool) -> list[str]:
        calls.append(text)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return split(text, on_blank_lines)

    monkeypatch.setattr(add_corpus, "split_paragraphs", interrupt_at_the_fourth)
    assert run_stage("add-corpus", "web", "--files", "a.jsonl", "--rows-per-part", "1") == 130
    folder = Path("data/corpora/web")
    assert not part_files(folder) and not list(folder.glob(".*.tmp-*"))
    assert not Path("manifests/corpus-web.json").exists()


def test_rerun_hints_name_the_command_that_rewrites_a_corpus_or_a_pack(workdir):
    for stage, command in (("corpus-web", "just add-corpus web"), ("pack-seq128", "just pack --seq-len 128")):
        output = workdir / f"{stage}.bin"
        output.write_bytes(b"x")
        with StageRun(stage, Path("manifests"), {}, []) as run:
            run.add_output(output)
            run.finish()
        output.unlink()
        with pytest.raises(StageError, match=f"run `{command}"):
            verify_input(output, Path("manifests"))


def test_a_full_disk_while_closing_a_part_leaves_no_file(workdir, monkeypatch, capsys):
    import errno

    class FullDiskWriter(pq.ParquetWriter):
        def close(self) -> None:
            super().close()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(add_corpus.pq, "ParquetWriter", FullDiskWriter)
    write_jsonl(workdir / "a.jsonl", [{"text": "Bonjour."}])
    assert run_stage("add-corpus", "web", "--files", "a.jsonl") == 2
    assert "No space left on device" in capsys.readouterr().err
    folder = Path("data/corpora/web")
    assert not part_files(folder) and not list(folder.glob(".*.tmp-*"))
    assert not Path("manifests/corpus-web.json").exists()


def test_an_added_corpus_mixes_into_tokenize_and_stats(workdir):
    """The stages end to end as a user runs them: Wikipedia extracted, a corpus added through
    `datasets`, one token stream mixing both with per-source validation, and the report over both."""
    from benchmarks.synthetic_corpus import write_corpus

    write_corpus(workdir / "wiki.jsonl", 400_000, seed=3)
    write_jsonl(workdir / "web.jsonl", [{"id": i, "text": f"Le texte numéro {i} parle de la ville.\nIl a deux lignes."}
                                        for i in range(300)])
    assert run_stage("extract-paragraphs", "--input", "wiki.jsonl") == 0
    assert run_stage("add-corpus", "web", "--files", "web.jsonl") == 0
    assert run_stage("tokenize", "--plain-bpe", "--vocab-size", "400", "--mix", "frwiki=0.6,web=0.4") == 0
    tokens = json.loads(Path("manifests/tokenize.json").read_text())["tokens"]
    assert tokens["sources"] == ["frwiki", "web"]
    assert set(tokens["val_split"]["by_source"]) == {"frwiki", "web"}
    assert run_stage("stats") == 0
    summary = json.loads(Path("data/stats/summary.json").read_text())
    assert "web" in json.dumps(summary) and "frwiki" in json.dumps(summary)
