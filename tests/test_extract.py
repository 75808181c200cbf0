from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from benchmarks.synthetic_corpus import write_corpus
from pipeline.extract import ExtractOptions, extract
from pipeline.locks import LOCK_FILE
from tests.conftest import article, paragraph, run_stage, section, write_jsonl


def read_rows(path):
    return pq.read_table(path).to_pylist()


def extract_file(workdir, records, *options):
    source = write_jsonl(workdir / "in.jsonl", records)
    code = run_stage("extract-paragraphs", "--input", source, "--workers", "1", *options)
    return code, workdir / "data/paragraphs/paragraphs.parquet"


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
    assert [str(f.type) for f in table.schema] == ["int64", "string", "string", "int32", "string"]
    assert pq.ParquetFile(out).metadata.row_group(0).column(4).compression == "ZSTD"
    rows = table.to_pylist()
    assert [(r["article_id"], r["paragraph_index"], r["section_path"], r["text"]) for r in rows] == [
        (7, 0, "Abstract", "Le chapeau."), (7, 1, "Abstract", "Deuxième."), (7, 2, "Histoire", "Avant."),
        (7, 3, "Histoire > Moyen Âge", "Pendant."),
        (7, 4, " > ".join(f"N{d}" for d in range(1, 9)), "Tout au fond."),
        (3, 0, "Abstract", "Seul paragraphe.")]
    assert rows[0]["title"] == "Lyon" and rows[-1]["title"] == "Brest"


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
    assert [(bad["line"], bad["reason"]) for bad in counters["first_bad_lines"]] == [
        (2, "invalid_json"), (4, "not_object"), (6, "not_utf8"), (12, "truncated")]


def test_too_many_bad_lines_fail_and_write_nothing(workdir, capsys):
    records = [article(1, section("Abstract", paragraph("ok"))), b"{broken\n", b"{broken\n"]
    code, out = extract_file(workdir, records)
    assert code == 2
    message = capsys.readouterr().err.split("error: extract-paragraphs: ")[-1]
    assert "max-bad-fraction" in message and message.count("\n") == 1 and message.endswith("\n")
    assert not out.exists() and not list(out.parent.glob(".*.tmp-*"))
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
    real = extract_module.process_range

    def dies_on_second_range(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(extract_module, "process_range", dies_on_second_range)
    code = run_stage("extract-paragraphs", "--input", "in.jsonl", "--workers", "1", "--chunk-bytes", "50000")
    assert code == 130
    out_dir = workdir / "data/paragraphs"
    assert [path.name for path in out_dir.iterdir()] == [LOCK_FILE]  # the lock stays, unlocked


def test_output_identical_for_any_worker_count(tmp_path):
    source = tmp_path / "corpus.jsonl"
    write_corpus(source, 2_000_000, seed=5)
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"out{workers}.parquet"
        extract(source, out, ExtractOptions(lists=True), workers, 200_000, 0.001, progress=False)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert pq.read_metadata(tmp_path / "out1.parquet").num_row_groups > 3


def test_huge_line(tmp_path):
    big = paragraph("mot " * 3_000_000)  # a 12 MB paragraph on a single line
    source = write_jsonl(tmp_path / "in.jsonl", [article(1, section("Abstract", big)), article(2)])
    totals = extract(source, tmp_path / "o.parquet", ExtractOptions(), 2, 1 << 20, 0.0, progress=False)
    assert totals.rows == 1 and totals.characters == len(big["value"])
