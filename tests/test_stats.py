"""stats: counts per source and part, lengths, duplicates within and across sources, the most frequent
paragraphs, and the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import stats
from pipeline.paragraphs import SCHEMA, part_name
from tests.conftest import run_stage

PORTAIL = "Portail de la France"
COOKIES = "Accepter les cookies"


def write_part(folder: Path, index: int, source: str, articles: dict[int, list[str]]) -> None:
    rows = [(article_id, f"T{article_id}", "", i, text, source)
            for article_id, texts in articles.items() for i, text in enumerate(texts)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(list(zip(*rows)), schema=SCHEMA), folder / part_name(index))


@pytest.fixture
def two_sources(workdir) -> Path:
    """frwiki in two parts (PORTAIL three times, once per article), a corpus `web` (COOKIES twice);
    "Bonjour." is in both sources."""
    paragraphs = workdir / "data" / "paragraphs"
    write_part(paragraphs, 0, "frwiki", {1: ["Bonjour.", PORTAIL], 2: ["Un texte de vingt-six signes"[:26], PORTAIL]})
    write_part(paragraphs, 1, "frwiki", {3: ["Trois.", PORTAIL]})
    write_part(workdir / "data" / "corpora" / "web", 0, "web", {7: [COOKIES, "Bonjour."], 8: [COOKIES]})
    return workdir


def report() -> dict:
    return json.loads(Path("data/stats/summary.json").read_text())


def test_counts_duplicates_and_the_most_frequent_paragraphs(two_sources, capsys):
    assert run_stage("stats") == 0
    summary = report()
    totals = summary["totals"]
    assert (totals["sources"], totals["parts"], totals["articles"], totals["paragraphs"]) == (2, 3, 5, 9)
    assert totals["characters"] == sum(len(t) for t in ["Bonjour.", PORTAIL, "Un texte de vingt-six sign", PORTAIL,
                                                        "Trois.", PORTAIL, COOKIES, "Bonjour.", COOKIES])
    # distinct texts: Bonjour, PORTAIL, the 26-char one, Trois, COOKIES -> 9 - 5 rows repeat an earlier one
    assert totals["duplicate_paragraphs"] == 4
    assert totals["paragraphs_in_several_sources"] == 2  # "Bonjour." once in each

    frwiki, web = summary["sources"]["frwiki"], summary["sources"]["web"]
    assert (frwiki["parts"], frwiki["articles"], frwiki["paragraphs"]) == (2, 3, 6)
    assert (frwiki["duplicates"], frwiki["texts_repeated"], frwiki["shared"]) == (2, 1, 1)
    assert (web["articles"], web["paragraphs"], web["duplicates"], web["shared"]) == (2, 3, 1, 1)
    assert web["duplicate_rate"] == pytest.approx(1 / 3, abs=1e-6)

    assert [(p["source"], Path(p["path"]).parent.name, p["articles"], p["paragraphs"]) for p in summary["parts"]] == [
        ("frwiki", "paragraphs", 2, 4), ("frwiki", "paragraphs", 1, 2), ("web", "web", 2, 3)]

    assert [(t["text"], t["count"], t["sources"]) for t in summary["top_paragraphs"]] == [
        (PORTAIL, 3, {"frwiki": 3}), (COOKIES, 2, {"web": 2}), ("Bonjour.", 2, {"frwiki": 1, "web": 1})]

    lengths = {(row["source"], of): row for of, rows in summary["lengths"].items() for row in rows}
    assert (lengths["web", "paragraph"]["min"], lengths["web", "paragraph"]["max"]) == (8, 20)
    assert lengths["frwiki", "article"]["count"] == 3
    assert lengths["frwiki", "article"]["max"] == 26 + len(PORTAIL)
    assert sum(summary["histogram"]["paragraph"]["web"].values()) == 3

    out = capsys.readouterr().out
    assert PORTAIL in out and "| frwiki | 2     | 3        | 6" in out
    markdown = Path("data/stats/summary.md").read_text()
    assert "## Per source" in markdown and "## Most frequent paragraphs" in markdown and COOKIES in markdown
    assert Path("data/stats/lengths.png").read_bytes().startswith(b"\x89PNG")
    recorded = json.loads(Path("manifests/stats.json").read_text())
    assert sorted(Path(o["path"]).name for o in recorded["outputs"]) == ["lengths.png", "summary.json", "summary.md"]
    assert len(recorded["inputs"]) == 3

    assert run_stage("stats") == 0
    assert "up to date" in capsys.readouterr().out


def test_input_folders_and_top(two_sources):
    assert run_stage("stats", "--input", "data/corpora/web", "--top", "1") == 0
    summary = report()
    assert list(summary["sources"]) == ["web"]
    assert [t["text"] for t in summary["top_paragraphs"]] == [COOKIES]


def test_without_matplotlib_the_png_is_left_out_and_said_so(two_sources, monkeypatch, capsys):
    monkeypatch.setattr(stats, "has_matplotlib", lambda: False)
    assert run_stage("stats") == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert sorted(p.name for p in Path("data/stats").iterdir() if not p.name.startswith(".")) == [
        "summary.json", "summary.md"]


def test_an_added_corpus_is_reported_beside_wikipedia(two_sources, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", two_sources / "hf-cache")
    (two_sources / "livre.txt").write_text(f"{PORTAIL}\nUne phrase.\n")
    assert run_stage("add-corpus", "livre", "--files", "livre.txt") == 0
    assert run_stage("stats") == 0
    summary = report()
    assert list(summary["sources"]) == ["frwiki", "livre", "web"]
    assert summary["top_paragraphs"][0]["sources"] == {"frwiki": 3, "livre": 1}


@pytest.mark.parametrize("args, message", [
    ((), "no paragraphs under data"),
    (("--input", "elsewhere"), "--input elsewhere holds no part-*.parquet"),
    (("--top", "-1"), "--top must be 0 or more"),
])
def test_nothing_to_report_is_one_line(workdir, capsys, args, message):
    assert run_stage("stats", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: stats: ") and message in err and "\n" not in err
    assert not Path("data/stats/summary.json").exists()


def test_a_part_that_is_not_a_paragraphs_part_is_refused_by_name(workdir, capsys):
    folder = workdir / "data" / "paragraphs"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"article_id": [1], "text": ["x"]}), folder / part_name(0))
    assert run_stage("stats") == 2
    assert "part-00000.parquet lacks the column(s) source" in capsys.readouterr().err
    (folder / part_name(0)).write_bytes(b"not parquet")
    assert run_stage("stats") == 2
    assert "part-00000.parquet is not a readable Parquet file" in capsys.readouterr().err
