"""Manifests are read through one validating reader; the typed accessors refuse a damaged one."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import StageError
from pipeline.manifest import load_manifest, pack_info, tokens_info
from pipeline.workers import ordered_map
from tests.conftest import build_packed_corpus, run_stage


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return build_packed_corpus(tmp_path_factory.mktemp("manifests"), 400_000, seed=11, vocab_size=600,
                               seq_lens="64")


def test_typed_accessors_read_what_the_stages_wrote(packed):
    tokens = tokens_info(packed / "manifests")
    pack = pack_info(packed / "manifests", 64)
    assert tokens.vocab_size == pack.vocab_size and tokens.pad_id == pack.pad_id
    assert tokens.tokenizer_sha256 == pack.tokenizer_sha256
    assert tokens.tokenizer_path is not None and tokens.tokenizer_path.name == "tokenizer.json"
    assert pack.splits["train"]["rows"] > 0
    assert pack_info(packed / "manifests", 128) is None  # never packed


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"parameters": {}, "inputs": [], "outputs": [{"path": "x"}]}', "lacks path, bytes or sha256"),
])
def test_a_damaged_manifest_is_refused_with_the_stage_to_rerun(tmp_path, content, problem):
    path = tmp_path / "tokenize.json"
    path.write_text(content)
    with pytest.raises(StageError, match=problem) as err:
        load_manifest(path)
    assert "just tokenize" in str(err.value)


def test_a_manifest_missing_its_section_is_refused(packed, tmp_path):
    manifest = json.loads((packed / "manifests/pack-seq64.json").read_text())
    del manifest["pack"]["splits"]
    (tmp_path / "pack-seq64.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match="lacks splits"):
        pack_info(tmp_path, 64)


def test_pack_refuses_a_damaged_tokenize_manifest_in_one_line(tmp_path, capsys):
    root = build_packed_corpus(tmp_path, 400_000, seed=11, vocab_size=600, seq_lens="32")
    manifest = json.loads((root / "manifests/tokenize.json").read_text())
    del manifest["tokens"]["special_ids"]
    (root / "manifests/tokenize.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    code = run_stage("pack", "--seq-len", "64", "--data-dir", root / "data", "--manifests", root / "manifests")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "just tokenize" in err and "special_ids" in err


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 3])
def test_ordered_map_keeps_input_order(workers):
    assert list(ordered_map(_square, iter(range(50)), workers)) == [x * x for x in range(50)]
