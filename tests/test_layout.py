"""The package layering: `pipeline/` owns the on-disk contract, `train/` reads it, tools live outside.

Dependencies point one way: benchmarks/ and tests may import both packages, `train/` imports only
the on-disk contract from `pipeline/`, and `pipeline/` never imports `train/` or the tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What `train/` may read of `pipeline/`: the data layout, manifests, the packed format, the error type,
# and the directory lock (one writer per output folder: a stage's, a training run's).
PIPELINE_CONTRACT = {"pipeline", "pipeline.layout", "pipeline.manifest", "pipeline.packed", "pipeline.errors",
                     "pipeline.locks"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def package_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", package_files("pipeline"), ids=lambda p: p.name)
def test_pipeline_imports_neither_train_nor_tools(path):
    offending = {m for m in imported_modules(path) if m.split(".")[0] in ("train", "benchmarks", "tests")}
    assert not offending, f"{path.relative_to(ROOT)} imports {sorted(offending)}"


@pytest.mark.parametrize("path", package_files("train"), ids=lambda p: p.name)
def test_train_reads_only_the_on_disk_contract_of_pipeline(path):
    imported = imported_modules(path)
    from_pipeline = {m for m in imported if m.split(".")[0] == "pipeline"}
    # `from pipeline.packed import PackedSplit` shows as both the module and module.name: judge modules.
    modules = {m for m in from_pipeline if m in PIPELINE_CONTRACT or m.rsplit(".", 1)[0] not in PIPELINE_CONTRACT}
    assert modules <= PIPELINE_CONTRACT, f"{path.relative_to(ROOT)} imports {sorted(modules - PIPELINE_CONTRACT)}"
    assert not {m for m in imported if m.split(".")[0] in ("benchmarks", "tests")}


def test_no_benchmark_inside_the_product_packages():
    inside = [p.relative_to(ROOT).as_posix() for package in ("pipeline", "train")
              for p in (ROOT / package).glob("bench*.py")]
    assert not inside, f"benchmarks belong in benchmarks/: {inside}"


def test_layout_check_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from train.trainer import Trainer\n")
    assert "train.trainer" in imported_modules(bad)
