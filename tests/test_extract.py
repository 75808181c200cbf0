from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.synthetic_corpus import write_corpus
from pipeline.extract import DigestSet, ExtractOptions, extract
from pipeline.locks import LOCK_FILE
from pipeline.paragraphs import SCHEMA, open_dataset
from tests.conftest import article, paragraph, run_stage, section, write_jsonl


def read_rows(path):
    return pq.read_table(path).to_pylist()


def extract_file(workdir, records, *options):
    source = write_jsonl(workdir / "in.jsonl", records)
    code = run_stage("extract-paragraphs", "--input", source, "--workers", "1", *options)
    return code, workdir / "data/paragraphs/part-00000.parquet"


def test_schema_order_and_section_paths(workdir):
    nested = paragraph("Tout au fond.")
    for depth in range(8, 0, -1):
        nested = section(f"N{depth}", nested)
    records = [article(7, section("Abstract", paragraph("Le chapeau."), paragraph("Deuxième.")),
                       section("Histoire", paragraph("Avant."), section("Moyen Âge", paragraph("Pendant."))), nested,
                       name="Lyon"),
               article(3, section("Abstract", paragraph("Seul paragraphe.")), name="Brest")]
    code, out = extract_file(workdir, records)
    assert code == 0
    table = pq.read_table(out)
    assert table.schema == SCHEMA
    assert pq.ParquetFile(out).metadata.row_group(0).column(4).compression == "ZSTD"
    rows = table.to_pylist()
    assert [(r["article_id"], r["paragraph_index"], r["section_path"], r["text"]) for r in rows] == [
        (7, 0, "Abstract", "Le chapeau."), (7, 1, "Abstract", "Deuxième."), (7, 2, "Histoire", "Avant."),
        (7, 3, "Histoire > Moyen Âge", "Pendant."),
        (7, 4, " > ".join(f"N{d}" for d in range(1, 9)), "Tout au fond."),
        (3, 0, "Abstract", "Seul paragraphe.")]
    assert rows[0]["title"] == "Lyon" and rows[-1]["title"] == "Brest"
    assert {row["source"] for row in rows} == {"frwiki"}


def test_lists_emit_nested_items_once_and_only_with_flag(workdir):
    items = [{"type": "list_item", "value": "Parent : 2012 : titre A 2010 : titre B"},
             {"type": "list_item", "value": "2012 : titre A"}, {"type": "list_item", "value": "2010 : titre B"},
             {"type": "list_item", "value": "Autre élément"},
             {"type": "list_item", "value": "Imbriqué : x y", "has_parts": [
                 {"type": "list", "has_parts": [{"type": "list_item", "value": "x y"}]}]}]
    records = [article(1, section("Abstract", paragraph("Intro."), {"type": "list", "has_parts": items}))]
    code, out = extract_file(workdir, records)
    assert [r["text"] for r in read_rows(out)] == ["Intro."]
    code, out = extract_file(workdir, records, "--lists", "--force")
    assert code == 0
    assert [r["text"] for r in read_rows(out)] == ["Intro.", "Parent : 2012 : titre A 2010 : titre B",
                                                   "Autre élément", "Imbriqué : x y"]


def test_links_without_value_missing_keys_and_min_chars(workdir):
    records = [
        article(1, section("Abstract", {"type": "paragraph", "links": [{"url": "u", "text": "t"}]},
                           paragraph("   "), paragraph("court"), paragraph("assez long pour passer"))),
        {"identifier": 2},  # no name, no sections
        {"identifier": 3, "sections": [{"has_parts": [{"type": "paragraph", "value": "sans type ni nom"}]}]},
        {"identifier": 4, "sections": [{"type": "section"}, "pas un objet", {"type": "paragraph"}]},
        {"name": "sans identifiant", "sections": [section("Abstract", paragraph("perdu"))]},
    ]
    code, out = extract_file(workdir, records, "--min-chars", "10")
    assert code == 0
    rows = read_rows(out)
    assert [(r["article_id"], r["title"], r["section_path"], r["text"]) for r in rows] == [
        (1, "Titre", "Abstract", "assez long pour passer"), (3, "", "", "sans type ni nom")]
    counters = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())["counters"]
    assert counters["short_paragraphs_skipped"] == 1
    assert counters["lines_without_identifier"] == 1
    assert counters["articles_without_paragraphs"] == 2


def test_duplicates_keep_latest_date_else_first(workdir):
    records = [article(1, section("Abstract", paragraph("v1")), date_modified="2024-01-01T00:00:00Z"),
               article(2, section("Abstract", paragraph("premier"))),
               article(1, section("Abstract", paragraph("v2")), date_modified="2024-05-01T00:00:00Z"),
               article(2, section("Abstract", paragraph("second"))),
               article(1, section("Abstract", paragraph("v0")), date_modified="2023-01-01T00:00:00Z")]
    code, out = extract_file(workdir, records)
    assert code == 0
    assert [(r["article_id"], r["text"]) for r in read_rows(out)] == [(2, "premier"), (1, "v2")]
    manifest = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())
    assert manifest["counters"]["duplicate_articles"] == 3
    assert manifest["outputs"][0]["counts"] == {"rows": 2, "articles": 2, "characters": 9}
    assert manifest["counters"]["files"][0]["duplicate_articles"] == 3


def test_bad_lines_counted_by_reason_with_line_numbers(workdir):
    good = [json.dumps(article(i, section("Abstract", paragraph(f"p{i}")))).encode() + b"\n" for i in range(1, 8)]
    records = [good[0], b"{not json\n", good[1], b"[1, 2]\n", good[2], b'{"name": "\xff\xfe"}\n', good[3],
               good[4], b"\n", good[5], good[6], b'{"identifier": 9, "sections": [']
    code, out = extract_file(workdir, records, "--max-bad-fraction", "0.5")
    assert code == 0
    assert len(read_rows(out)) == 7
    counters = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())["counters"]
    assert counters["bad_lines"] == {"invalid_json": 1, "not_utf8": 1, "not_object": 1, "identifier_out_of_range": 0,
                                     "truncated": 1}
    assert [(bad["file"], bad["line"], bad["reason"]) for bad in counters["first_bad_lines"]] == [
        ("in.jsonl", 2, "invalid_json"), ("in.jsonl", 4, "not_object"), ("in.jsonl", 6, "not_utf8"),
        ("in.jsonl", 12, "truncated")]


def test_too_many_bad_lines_fail_and_write_nothing(workdir, capsys):
    records = [article(1, section("Abstract", paragraph("ok"))), b"{broken\n", b"{broken\n"]
    code, out = extract_file(workdir, records)
    assert code == 2
    message = capsys.readouterr().err.split("error: extract-paragraphs: ")[-1]
    assert "max-bad-fraction" in message and message.count("\n") == 1 and message.endswith("\n")
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [LOCK_FILE]
    assert not (workdir / "manifests/extract-paragraphs.json").exists()


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"PAR1\x00\x00", "Parquet"),
                                             (b"PK\x03\x04", "zip archive"), (b"\x1f\x8b\x08\x00", "damaged or cut gzip"),
                                             (b'{"a": 1}\n', "no frwiki article")])
def test_wrong_kind_of_file(workdir, capsys, content, message):
    (workdir / "in.jsonl").write_bytes(content)
    assert run_stage("extract-paragraphs", "--input", "in.jsonl") == 2
    assert message in capsys.readouterr().err


def test_missing_input_names_the_stage(workdir, capsys):
    assert run_stage("extract-paragraphs") == 2
    assert "just download" in capsys.readouterr().err


def test_rerun_is_idempotent_and_changed_input_reruns(workdir, capsys):
    records = [article(1, section("Abstract", paragraph("un")))]
    code, out = extract_file(workdir, records)
    first = out.read_bytes()
    capsys.readouterr()
    assert run_stage("extract-paragraphs", "--input", "in.jsonl") == 0
    assert "up to date" in capsys.readouterr().out
    assert out.read_bytes() == first
    write_jsonl(workdir / "in.jsonl", records + [article(2, section("Abstract", paragraph("deux")))])
    assert run_stage("extract-paragraphs", "--input", "in.jsonl") == 0
    assert len(read_rows(out)) == 2


def test_refuses_input_changed_under_its_download_manifest(workdir, capsys):
    source = write_jsonl(workdir / "mine.jsonl", [article(1, section("Abstract", paragraph("un")))])
    assert run_stage("download", "--from", source) == 0
    raw = workdir / "data/raw/frwiki_namespace_0_0.jsonl"
    assert run_stage("extract-paragraphs") == 0
    raw.write_bytes(raw.read_bytes() + b"\n")
    capsys.readouterr()
    assert run_stage("extract-paragraphs") == 2
    err = capsys.readouterr().err
    assert "changed since `download` wrote it" in err and "just download" in err


def test_interrupted_write_leaves_nothing_at_final_path(workdir, monkeypatch):
    write_corpus(workdir / "in.jsonl", 300_000, seed=3)
    import pipeline.extract as extract_module

    calls = {"n": 0}
    real = extract_module.parse_unit

    def dies_on_second_range(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(extract_module, "parse_unit", dies_on_second_range)
    code = run_stage("extract-paragraphs", "--input", "in.jsonl", "--workers", "1", "--chunk-bytes", "50000")
    assert code == 130
    out_dir = workdir / "data/paragraphs"
    assert [path.name for path in out_dir.iterdir()] == [LOCK_FILE]  # the lock stays, unlocked


def test_huge_line(tmp_path):
    big = paragraph("mot " * 3_000_000)  # a 12 MB paragraph on a single line
    source = write_jsonl(tmp_path / "in.jsonl", [article(1, section("Abstract", big)), article(2)])
    [totals] = extract(source, tmp_path / "o", ExtractOptions(), 2, 1 << 20, 0.0, progress=False)
    assert totals.rows == 1 and totals.characters == len(big["value"])


# ------------------------------------------------------------------------------------------ several shards

def part_rows(folder):
    return {path.name: read_rows(path) for path in sorted(folder.glob("part-*.parquet"))}


def test_several_shards_one_part_each_ids_unique_and_duplicates_removed(workdir):
    """Article 2 appears in shards 0 and 2: the later date wins, so shard 0's copy goes; paragraph
    duplicates are then judged among kept rows only: "Ancien." (only in the dropped copy) is kept in
    article 4, and the new copy of article 2 keeps its own paragraphs."""
    old, new = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00+00:00"
    shards = [
        [article(1, section("Abstract", paragraph("Commun."), paragraph("Un."))),
         article(2, section("Abstract", paragraph("Deux."), paragraph("Ancien.")), date_modified=old)],
        [article(3, section("Abstract", paragraph("Trois."), paragraph("Commun."), paragraph("Trois.")))],
        [article(4, section("Abstract", paragraph("Ancien."), paragraph("Quatre."))),
         article(2, section("Abstract", paragraph("Deux."), paragraph("Nouveau.")), date_modified=new)],
    ]
    for number, records in enumerate(shards):
        write_jsonl(workdir / f"s{number}.jsonl", records)
    assert run_stage("extract-paragraphs", *(arg for n in range(3) for arg in ("--input", f"s{n}.jsonl"))) == 0
    parts = part_rows(workdir / "data/paragraphs")
    assert list(parts) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    texts = {name: [(r["article_id"], r["paragraph_index"], r["text"]) for r in rows] for name, rows in parts.items()}
    assert texts == {"part-00000.parquet": [(1, 0, "Commun."), (1, 1, "Un.")],
                     "part-00001.parquet": [(3, 0, "Trois.")],
                     "part-00002.parquet": [(4, 0, "Ancien."), (4, 1, "Quatre."), (2, 0, "Deux."), (2, 1, "Nouveau.")]}
    table = open_dataset(workdir / "data/paragraphs").to_table()  # the folder reads as one table
    assert table.num_rows == 7 and set(table.column("source").to_pylist()) == {"frwiki"}
    owners = {}
    for name, rows in parts.items():
        for row in rows:
            owners.setdefault(row["article_id"], set()).add(name)
    assert all(len(names) == 1 for names in owners.values())  # each article in one part only
    manifest = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())
    counters = manifest["counters"]
    assert (counters["duplicate_articles"], counters["duplicate_paragraphs"], counters["paragraphs"]) == (1, 2, 7)
    assert counters["articles"] == 4
    assert [(f["file"], f["part"], f["duplicate_articles"], f["duplicate_paragraphs"], f["rows"], f["articles"])
            for f in counters["files"]] == [("s0.jsonl", "part-00000.parquet", 1, 0, 2, 1),
                                            ("s1.jsonl", "part-00001.parquet", 0, 2, 1, 1),
                                            ("s2.jsonl", "part-00002.parquet", 0, 0, 4, 2)]
    assert [o["counts"]["rows"] for o in manifest["outputs"]] == [2, 1, 4]


def test_shards_identical_for_any_worker_count(tmp_path):
    """Three shards, one gzip-compressed and one a copy of the first (every article and paragraph a
    duplicate): the parts are byte-identical for 1, 2 and 3 workers."""
    write_corpus(tmp_path / "a.jsonl", 1_200_000, seed=5)
    write_corpus(tmp_path / "b.jsonl", 800_000, seed=6)
    with open(tmp_path / "b.jsonl", "rb") as source, gzip.open(tmp_path / "b.jsonl.gz", "wb") as packed:
        shutil.copyfileobj(source, packed)
    shutil.copyfile(tmp_path / "a.jsonl", tmp_path / "c.jsonl")
    inputs = [tmp_path / name for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl")]
    outputs = []
    for workers in (1, 2, 3):
        files = extract(inputs, tmp_path / f"out{workers}", ExtractOptions(lists=True), workers, 150_000, 0.001,
                        progress=False)
        outputs.append([path.read_bytes() for path in sorted((tmp_path / f"out{workers}").glob("part-*.parquet"))])
    assert len(outputs[0]) == 3 and outputs[0] == outputs[1] == outputs[2]
    assert pq.read_metadata(tmp_path / "out1/part-00000.parquet").num_row_groups > 3
    assert files[2].rows == files[2].articles == 0 and files[2].duplicate_articles == files[0].articles
    assert files[0].duplicate_paragraphs < files[0].rows  # a generated shard repeats a few paragraphs itself
    texts = pq.read_table(tmp_path / "out1", columns=["text"]).column("text").to_pylist()
    assert len(texts) == len(set(texts))


def test_every_input_is_kept_in_order(workdir):
    """`--input A --input B` makes two parts, A's then B's (it used to keep only B)."""
    write_jsonl(workdir / "a.jsonl", [article(1, section("Abstract", paragraph("De A.")))])
    write_jsonl(workdir / "b.jsonl", [article(2, section("Abstract", paragraph("De B.")))])
    assert run_stage("extract-paragraphs", "--input", "a.jsonl", "--input", "b.jsonl") == 0
    assert {name: [r["text"] for r in rows] for name, rows in part_rows(workdir / "data/paragraphs").items()} == {
        "part-00000.parquet": ["De A."], "part-00001.parquet": ["De B."]}
    assert run_stage("extract-paragraphs", "--input", "b.jsonl") == 0  # fewer shards: no stale part is left
    assert list(part_rows(workdir / "data/paragraphs")) == ["part-00000.parquet"]


def test_default_inputs_are_the_download_manifests_files(workdir):
    (workdir / "dump").mkdir()
    for number in range(3):
        write_jsonl(workdir / f"dump/frwiki_namespace_0_{number}.jsonl",
                    [article(number + 1, section("Abstract", paragraph(f"Texte {number}.")))])
    assert run_stage("download", "--from", "dump") == 0
    assert run_stage("extract-paragraphs") == 0
    parts = part_rows(workdir / "data/paragraphs")
    assert [[r["text"] for r in rows] for rows in parts.values()] == [["Texte 0."], ["Texte 1."], ["Texte 2."]]
    inputs = json.loads((workdir / "manifests/extract-paragraphs.json").read_text())["inputs"]
    assert [Path(i["path"]).name for i in inputs] == [f"frwiki_namespace_0_{n}.jsonl" for n in range(3)]


def test_bad_shards_are_named(workdir, capsys):
    write_jsonl(workdir / "good.jsonl", [article(1, section("Abstract", paragraph("Bien.")))])
    write_jsonl(workdir / "bad.jsonl", [article(2, section("Abstract", paragraph("Mal."))), b"{broken\n"])
    assert run_stage("extract-paragraphs", "--input", "good.jsonl", "--input", "bad.jsonl") == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: 1 of 2 lines are malformed" in err and "good.jsonl" not in err
    assert [p.name for p in (workdir / "data/paragraphs").iterdir()] == [LOCK_FILE]
    assert run_stage("extract-paragraphs", "--input", "good.jsonl", "--input", "./good.jsonl") == 2
    assert "given more than once" in capsys.readouterr().err


def test_digest_set_is_exact():
    rng = np.random.default_rng(0)
    seen, reference = DigestSet(), set()
    for size in rng.integers(0, 400, size=60):
        digests = rng.integers(0, 2000, size=size).astype(np.uint64)  # many repeats, within and across batches
        expected = []
        for value in digests.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert seen.first_seen(digests).tolist() == expected
    assert sum(run.size for run in seen.runs) == len(reference) and len(seen.runs) <= 12


def test_an_interrupt_while_the_writer_thread_starts_leaves_none_running(tmp_path, monkeypatch):
    """Ctrl-C landing while the write thread starts: `close` still waits for that thread (it used to
    be started on the first write, untracked when interrupted, and kept writing into a closed file)."""
    import signal
    import threading

    import pyarrow as pa

    from pipeline.extract import OverlappedWriter

    started, real_start = [], threading.Thread.start
    real_write = pq.ParquetWriter.write_table

    def start_then_interrupt(thread):
        real_start(thread)
        started.append(thread)
        if len(started) == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", lambda self, table: (time.sleep(0.3), real_write(self, table)))
    table = pa.table({"x": list(range(1000))})
    with pytest.raises(KeyboardInterrupt):
        writer = OverlappedWriter(tmp_path / "t.parquet", table.schema)
        try:
            writer.write(table)
        finally:
            writer.close()
    assert started and not any(thread.is_alive() for thread in started)
