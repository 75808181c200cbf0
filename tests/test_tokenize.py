from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from benchmarks.synthetic_corpus import write_corpus
from pipeline.paragraphs import iter_documents
from pipeline.tokenize_stage import DOC_INDEX_DTYPE, choose_val_articles
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
    return run_stage("tokenize", "--data-dir", root / out, "--input", root / "data/paragraphs",
                     "--manifests", root / f"manifests-{out}", *SMALL, *extra)


def test_round_trip_every_val_document_and_index(corpus_dir):
    assert tokenize(corpus_dir, "--workers", "2", out="a") == 0
    tokens_dir = corpus_dir / "a/tokens"
    manifest = json.loads((corpus_dir / "manifests-a/tokenize.json").read_text())
    info = manifest["tokens"]
    assert info["dtype"] == "uint16" and info["special_ids"] == {"eot": 0, "pad": 1}
    tokenizer = Tokenizer.from_file(str(corpus_dir / "a/tokenizer/tokenizer.json"))
    texts = dict(iter_documents(corpus_dir / "data/paragraphs"))
    val_ids = set(info["val_split"]["by_source"]["frwiki"]["article_ids"])
    assert info["sources"] == ["frwiki"]
    for split in ("train", "val"):
        stream = np.fromfile(tokens_dir / f"{split}.bin", dtype="<u2")
        index = np.load(tokens_dir / f"{split}.docs.npy")
        assert index.dtype == DOC_INDEX_DTYPE
        assert index["tokens"].sum() == stream.size == info["splits"][split]["tokens"]
        assert (stream[index["start"]] == 0).all() and (stream == 0).sum() == len(index)
        assert set(index["article_id"].tolist()).isdisjoint(val_ids) == (split == "train")
        if split == "val":
            assert len(index) == len(val_ids) >= 1
            assert (index["source"] == 0).all()
            for start, count, n_bytes, article_id, _ in index.tolist():
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


# ------------------------------------------------------------------------------------------------ mixture

@pytest.fixture(scope="module")
def mixed_dir(corpus_dir):
    """A second source, `other`, in DATA_DIR/corpora/other as two parts: about twice frwiki's text, its
    article ids the same numbers as frwiki's (ids of different sources collide)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.extract import ExtractOptions, extract
    from pipeline.paragraphs import open_dataset, part_name

    write_corpus(corpus_dir / "other.jsonl", 5_000_000, seed=12)
    extract(corpus_dir / "other.jsonl", corpus_dir / "other-extracted", ExtractOptions(), 1, 1 << 20, 0.0,
            progress=False)
    table = open_dataset(corpus_dir / "other-extracted").to_table()
    frwiki_ids = np.unique(open_dataset(corpus_dir / "data/paragraphs").to_table().column("article_id").to_numpy())
    own_ids, inverse = np.unique(table.column("article_id").to_numpy(), return_inverse=True)
    assert own_ids.size > frwiki_ids.size
    colliding = np.r_[frwiki_ids, frwiki_ids.max() + 1 + np.arange(own_ids.size - frwiki_ids.size)][inverse]
    table = table.set_column(0, "article_id", pa.array(colliding, pa.int64()))
    table = table.set_column(table.schema.get_field_index("source"), "source", pa.array(["other"] * table.num_rows))
    folder = corpus_dir / "data/corpora/other"
    folder.mkdir(parents=True)
    half = table.num_rows // 2
    while table.column("article_id")[half] == table.column("article_id")[half - 1]:  # parts end between documents
        half += 1
    pq.write_table(table.slice(0, half), folder / part_name(0))
    pq.write_table(table.slice(half), folder / part_name(1))
    return corpus_dir


def mix(root, spec, out):
    return run_stage("tokenize", "--data-dir", root / "data", "--input", root / "data/paragraphs", "--out-dir",
                     root / out, "--manifests", root / f"manifests-{out}", *SMALL, "--plain-bpe", "--mix", spec)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.8)])
def test_mixture_weights_by_bytes(mixed_dir, weights):
    spec = f"frwiki={weights[0]},other={weights[1]}"
    out = f"mix{weights[0]}"
    assert mix(mixed_dir, spec, out) == 0
    info = json.loads((mixed_dir / f"manifests-{out}/tokenize.json").read_text())["tokens"]
    assert info["sources"] == ["frwiki", "other"]
    index = np.load(mixed_dir / out / "train.docs.npy")
    used = np.bincount(index["source"], weights=index["bytes"], minlength=2)
    assert used / used.sum() == pytest.approx(weights, abs=0.03)
    pairs = set(zip(index["source"].tolist(), index["article_id"].tolist()))
    assert len(pairs) == index.size  # no document repeated
    by_source = info["mixture"]["by_source"]
    for number, name in enumerate(info["sources"]):
        record = by_source[name]
        mine = index[index["source"] == number]
        assert (record["bytes_used"], record["tokens"], record["documents"]) == (
            int(mine["bytes"].sum()), int(mine["tokens"].sum()), mine.size)
        assert record["weight"] == pytest.approx(weights[number])
    # The scarcest source for its weight is used whole; the other gives its share of it.
    scarce = min(by_source, key=lambda name: by_source[name]["bytes_available"] / by_source[name]["weight"])
    assert by_source[scarce]["bytes_used"] == by_source[scarce]["bytes_available"]
    assert all(by_source[name]["bytes_used"] < by_source[name]["bytes_available"] for name in by_source if name != scarce)
    assert sum(r["bytes_used"] for r in by_source.values()) == info["splits"]["train"]["utf8_bytes"]


def test_val_split_is_per_source(mixed_dir):
    """Each source has its own validation documents, known by (source, article_id): an id that is a
    validation article in one source is an ordinary document in the other."""
    from pipeline.paragraphs import iter_documents

    assert mix(mixed_dir, "frwiki=0.5,other=0.5", "mixval") == 0
    manifest = json.loads((mixed_dir / "manifests-mixval/tokenize.json").read_text())["tokens"]
    val = {name: set(record["article_ids"]) for name, record in manifest["val_split"]["by_source"].items()}
    assert val["frwiki"] and val["other"] and val["frwiki"] != val["other"]
    index = np.load(mixed_dir / "mixval/val.docs.npy")
    stream = np.fromfile(mixed_dir / "mixval/val.bin", dtype="<u2")
    tokenizer = Tokenizer.from_file(str(mixed_dir / "mixval/tokenizer.json"))
    texts = {"frwiki": dict(iter_documents(mixed_dir / "data/paragraphs")),
             "other": dict(iter_documents(mixed_dir / "data/corpora/other"))}
    for number, name in enumerate(manifest["sources"]):
        mine = index[index["source"] == number]
        assert set(mine["article_id"].tolist()) == val[name]
        assert manifest["mixture"]["by_source"][name]["val_documents"] == mine.size
        for start, count, n_bytes, article_id, _ in mine.tolist():
            assert tokenizer.decode(stream[start + 1:start + count].tolist()) == texts[name][article_id]
    train = np.load(mixed_dir / "mixval/train.docs.npy")
    other_in_train = set(train["article_id"][train["source"] == 1].tolist())
    assert val["frwiki"] & other_in_train  # the same numbers, other documents


@pytest.mark.parametrize("spec,message", [("frwiki=0.5,nothere=0.5", "just add-corpus nothere"),
                                          ("frwiki=-1", "positive weights"), ("frwiki", "NAME=WEIGHT"),
                                          ("frwiki=1,frwiki=2", "distinct names")])
def test_bad_mix(mixed_dir, capsys, spec, message):
    assert mix(mixed_dir, spec, "bad") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("extra", [1, 2, -1])
def test_paragraphs_that_changed_since_planning_are_refused_not_truncated(tmp_path, monkeypatch, extra):
    """The encode pass reads the documents the plan counted; one more or one fewer is an error."""
    from pipeline import tokenize_stage
    from pipeline.errors import StageError

    documents = [(i, f"texte {i}") for i in range(6)]
    monkeypatch.setattr(tokenize_stage.paragraphs, "iter_documents", lambda files: iter(documents[:4 + extra]))
    plan = tokenize_stage.SourcePlan("frwiki", [], 1.0, np.arange(4), np.full(4, 7),
                                     np.full(4, tokenize_stage.TRAIN), np.array([], dtype=np.int64))
    with pytest.raises(StageError, match="changed while this stage read them"):
        list(tokenize_stage.document_batches([plan]))
