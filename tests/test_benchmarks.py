"""The bench tools print their tables and write docs/benchmarks.md only when asked (--write-docs)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_pack, report

ROOT = Path(__file__).resolve().parent.parent
DOC = "# Benchmarks\n\n## Pack\n\nold table\n\n## Loader\n\nloader table\n"


def test_docs_path_is_the_repos_whatever_the_cwd(workdir):
    assert report.BENCHMARKS_DOC == ROOT / "docs" / "benchmarks.md"


def test_bench_leaves_docs_alone_without_write_docs(tmp_path, monkeypatch, capsys):
    real_doc = report.BENCHMARKS_DOC.read_bytes()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    monkeypatch.setattr(report, "BENCHMARKS_DOC", doc)
    assert bench_pack.main(["--tokens", "20000", "--seq-len", "128"]) == 0
    assert "| 128 |" in capsys.readouterr().out  # the table is printed
    assert doc.read_text() == DOC

    assert bench_pack.main(["--tokens", "20000", "--seq-len", "128", "--write-docs"]) == 0
    text = doc.read_text()
    assert "old table" not in text and "`just bench-pack --tokens 20000`" in text
    assert text.index("## Pack") < text.index("## Loader") and "loader table" in text
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == real_doc


def test_bench_memory_names_the_largest_allocations_live_at_the_peak():
    from benchmarks.bench_memory import largest_at_peak

    def alloc(addr, size, filename):
        return {"action": "alloc", "addr": addr, "size": size,
                "frames": [{"filename": "/venv/torch/nn/functional.py", "line": 1, "name": "linear"},
                           {"filename": f"/repo/train/{filename}", "line": 7, "name": "forward"}]}

    events = [alloc(1, 50, "model.py"), alloc(2, 30, "loss.py"), {"action": "free_requested", "addr": 2},
              alloc(3, 40, "model.py"), alloc(4, 10, "loss.py"),  # the peak: 1, 3 and 4 live (100 bytes)
              {"action": "free_requested", "addr": 3}, alloc(5, 45, "trainer.py")]  # 50 + 10 + 45 = 105 > 100
    assert largest_at_peak(events, 2) == [(50, "train/model.py:7 forward"), (45, "train/trainer.py:7 forward")]
    assert largest_at_peak(events[:5], 5) == [(50, "train/model.py:7 forward"), (40, "train/model.py:7 forward"),
                                              (10, "train/loss.py:7 forward")]
