from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from benchmarks.synthetic_corpus import write_corpus
from pipeline.tokenize_stage import DOC_INDEX_DTYPE, choose_val_articles, iter_documents
from tests.conftest import run_stage

SMALL = ("--vocab-size", "600", "--transition", "250")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A generated frwiki corpus extracted once for the module (about 1 MB of text)."""
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "in.jsonl", 2_500_000, seed=11)
    assert run_stage("extract-paragraphs", "--input", root / "in.jsonl", "--data-dir", root / "data",
                     "--manifests", root / "manifests") == 0
    return root


def tokenize(root, *extra, out="data"):
    return run_stage("tokenize", "--data-dir", root / out, "--input", root / "data/paragraphs/paragraphs.parquet",
                     "--manifests", root / f"manifests-{out}", *SMALL, *extra)


def test_round_trip_every_val_document_and_index(corpus_dir):
    assert tokenize(corpus_dir, "--workers", "2", out="a") == 0
    tokens_dir = corpus_dir / "a/tokens"
    manifest = json.loads((corpus_dir / "manifests-a/tokenize.json").read_text())
    info = manifest["tokens"]
    assert info["dtype"] == "uint16" and info["special_ids"] == {"eot": 0, "pad": 1}
    tokenizer = Tokenizer.from_file(str(corpus_dir / "a/tokenizer/tokenizer.json"))
    texts = dict(iter_documents(corpus_dir / "data/paragraphs/paragraphs.parquet"))
    val_ids = set(info["val_split"]["article_ids"])
    for split in ("train", "val"):
        stream = np.fromfile(tokens_dir / f"{split}.bin", dtype="<u2")
        index = np.load(tokens_dir / f"{split}.docs.npy")
        assert index.dtype == DOC_INDEX_DTYPE
        assert index["tokens"].sum() == stream.size == info["splits"][split]["tokens"]
        assert (stream[index["start"]] == 0).all() and (stream == 0).sum() == len(index)
        assert set(index["article_id"].tolist()).isdisjoint(val_ids) == (split == "train")
        if split == "val":
            assert len(index) == len(val_ids) >= 1
            for start, count, n_bytes, article_id in index.tolist():
                text = texts[article_id]
                assert tokenizer.decode(stream[start + 1:start + count].tolist()) == text
                assert n_bytes == len(text.encode())
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(corpus_dir / "a/tokenizer/tokenizer.json"))
    assert fast.decode(fast.encode("La ville de Lyon, en 1850.")) == "La ville de Lyon, en 1850."


def test_output_identical_for_any_worker_count(corpus_dir):
    assert tokenize(corpus_dir, "--workers", "1", out="w1") == 0
    assert tokenize(corpus_dir, "--workers", "3", out="w3") == 0
    for name in ("tokenizer/tokenizer.json", "tokens/train.bin", "tokens/val.bin", "tokens/train.docs.npy"):
        assert (corpus_dir / "w1" / name).read_bytes() == (corpus_dir / "w3" / name).read_bytes(), name


def test_plain_bpe_and_loaded_tokenizer(corpus_dir, tmp_path):
    assert tokenize(corpus_dir, "--plain-bpe", out="plain") == 0
    plain = Tokenizer.from_file(str(corpus_dir / "plain/tokenizer/tokenizer.json"))
    assert all(" " not in plain.decode([i]).strip() for i in range(2, plain.get_vocab_size()))  # no superword
    # A foreign tokenizer without our specials: they are added; vocab decides the dtype.
    from tokenizers import models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(70000)}
    foreign = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    foreign.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign.save(str(tmp_path / "foreign.json"))
    assert tokenize(corpus_dir, "--tokenizer", tmp_path / "foreign.json", out="foreign") == 0
    info = json.loads((corpus_dir / "manifests-foreign/tokenize.json").read_text())["tokens"]
    assert info["dtype"] == "uint32" and info["special_ids"] == {"eot": 70000, "pad": 70001}


def test_val_split_is_stable_and_bounded():
    ids = np.arange(10_000, 30_000)
    val = choose_val_articles(ids, 0.005, 50)
    assert val.size == 100
    assert np.array_equal(val, choose_val_articles(np.random.default_rng(0).permutation(ids), 0.005, 50))
    assert choose_val_articles(np.arange(200), 0.005, 50).size == 20  # capped at 10% of a small corpus
    assert np.isin(choose_val_articles(ids[:15000], 0.005, 50), val).mean() > 0.5  # hash-stable, not positional


@pytest.mark.parametrize("extra,message", [
    (("--vocab-size", "200"), "below 256 bytes"), (("--transition", "5000"), "--transition 5000 must be within"),
    (("--tokenizer", "nope.json"), "no such file"), (("--tokenizer", "bad.json"), "not a tokenizer.json")])
def test_bad_options(workdir, capsys, extra, message, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (workdir / "bad.json").write_text("{}")
    pq.write_table(pa.table({"article_id": [1], "text": ["un"]}), workdir / "p.parquet")
    assert run_stage("tokenize", "--input", "p.parquet", "--vocab-size", "600", *extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("table,message", [({"article_id": [1], "body": ["x"]}, "lacks the column"),
                                           ({"article_id": [], "text": []}, "corpus is empty")])
def test_bad_parquet(workdir, capsys, table, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table, schema=pa.schema([("article_id", pa.int64()),
                                                     (list(table)[1], pa.string())])), workdir / "p.parquet")
    assert run_stage("tokenize", "--input", "p.parquet") == 2
    assert message in capsys.readouterr().err


def test_missing_and_unreadable_input(workdir, capsys):
    assert run_stage("tokenize") == 2
    assert "just extract-paragraphs" in capsys.readouterr().err
    (workdir / "p.parquet").write_text("not parquet")
    assert run_stage("tokenize", "--input", "p.parquet") == 2
    assert "not a readable Parquet" in capsys.readouterr().err
