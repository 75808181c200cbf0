from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.pack import best_fit_decreasing
from tests.conftest import build_packed_corpus, run_stage
from train.loader import IGNORE_INDEX, PackedLoader
from pipeline.packed import PackedDataError, PackedSplit


@pytest.fixture(scope="module")
def tokens_root(tmp_path_factory):
    """Real tokens from the pipeline on a small generated corpus (plain BPE for speed)."""
    return build_packed_corpus(tmp_path_factory.mktemp("pack"), 1_500_000, 21, 400, "64,512")


def load_tokens(root, split):
    stream = np.fromfile(root / "data/tokens" / f"{split}.bin", dtype="<u2")
    index = np.load(root / "data/tokens" / f"{split}.docs.npy")
    return [stream[s:s + n] for s, n in zip(index["start"], index["tokens"])]


@pytest.mark.parametrize("seq_len", [64, 512])
def test_packing_invariants(tokens_root, seq_len):
    split = PackedSplit.open(tokens_root / "data", seq_len, "train", tokens_root / "manifests")
    row_len = seq_len + 1
    rows = np.asarray(split.rows)
    pieces = []
    for r in range(split.n_rows):
        lens = split.row_doc_lens(r)
        filled = int(lens.sum())
        assert (rows[r, filled:] == split.pad_id).all()  # padding only at the row's end
        assert (rows[r, :filled] != split.pad_id).all()
        offsets = np.r_[0, np.cumsum(lens)]
        pieces += [tuple(rows[r, a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    expected = []
    for doc in load_tokens(tokens_root, "train"):
        doc_pieces = [tuple(doc[i:i + row_len]) for i in range(0, len(doc), row_len)]
        if len(doc) <= row_len:
            assert len(doc_pieces) == 1  # never cut
        expected += doc_pieces
    assert sorted(pieces) == sorted(expected)  # every token exactly once, in order within its document
    manifest = json.loads((tokens_root / f"manifests/pack-seq{seq_len}.json").read_text())
    counts = manifest["pack"]["splits"]["train"]
    assert counts["tokens"] == sum(map(len, expected)) and counts["rows"] == split.n_rows
    assert counts["padding_fraction"] == pytest.approx(1 - counts["tokens"] / (split.n_rows * row_len), abs=1e-6)


def test_every_row_starts_a_document_or_piece(tokens_root):
    split = PackedSplit.open(tokens_root / "data", 512, "train", tokens_root / "manifests")
    starts = {tuple(doc[i:i + 8]) for doc in load_tokens(tokens_root, "train") for i in range(0, len(doc), 513)}
    assert all(tuple(np.asarray(split.rows[r, :8])) in starts for r in range(split.n_rows))


def test_best_fit_decreasing_matches_a_reference():
    rng = random.Random(0)
    for _ in range(20):
        sizes = np.array([rng.randint(1, 20) for _ in range(rng.randint(1, 60))])
        item_bin, offset, n_bins = best_fit_decreasing(sizes, 20)
        bins: list[int] = []  # reference: room left per bin
        expected = {}
        for i in sorted(range(sizes.size), key=lambda i: (-sizes[i], i)):
            fits = [b for b, room in enumerate(bins) if room >= sizes[i]]
            b = min(fits, key=lambda b: (bins[b], -b)) if fits else len(bins)
            if not fits:
                bins.append(20)
            expected[i] = bins[b]
            bins[b] -= sizes[i]
        assert n_bins == len(bins)
        loads = np.bincount(item_bin, weights=sizes, minlength=n_bins)
        assert (loads <= 20).all() and sorted(loads.tolist()) == sorted(20 - np.array(bins))


def test_pack_is_deterministic_and_idempotent(tokens_root, tmp_path, capsys):
    common = ("--data-dir", tokens_root / "data", "--manifests", tokens_root / "manifests")
    before = (tokens_root / "data/packed/seq64/train.bin").read_bytes()
    assert run_stage("pack", "--seq-len", "64", *common) == 0
    assert "up to date" in capsys.readouterr().out
    assert run_stage("pack", "--seq-len", "64", "--force", *common) == 0
    assert (tokens_root / "data/packed/seq64/train.bin").read_bytes() == before


def test_loader_resume_ranks_and_epochs(tokens_root):
    split = PackedSplit.open(tokens_root / "data", 64, "train", tokens_root / "manifests")
    loader = PackedLoader(split, batch_rows=8, seed=3)
    batches = [next(loader) for _ in range(7)]
    assert loader.position == 56
    resumed = PackedLoader(split, batch_rows=8, seed=3, position=24)
    for expected in batches[3:]:
        got = next(resumed)
        assert torch_equal(got.inputs, expected.inputs) and torch_equal(got.targets, expected.targets)
        assert torch_equal(got.doc_lens, expected.doc_lens)
    loader.close(), resumed.close()
    first = batches[0]
    assert first.inputs.shape == (8, 64) and int(first.doc_lens.sum()) == 8 * 64
    assert (first.targets == IGNORE_INDEX).sum() == (first.inputs[:, 1:] == split.pad_id).sum() + \
        (np.asarray(split.rows[PackedLoader(split, 8, seed=3).rows_at(0)])[:, -1] == split.pad_id).sum()
    # ranks: disjoint strided slices whose union is the global batch
    global_rows = PackedLoader(split, batch_rows=8, seed=3).rows_at(16)
    shares = [PackedLoader(split, batch_rows=8, seed=3, rank=r, world_size=4).rows_at(16) for r in range(4)]
    assert sorted(np.concatenate(shares).tolist()) == sorted(global_rows.tolist())
    assert len(set(np.concatenate(shares).tolist())) == 8
    # epochs: each a different permutation from seed + epoch, every row once per epoch
    probe = PackedLoader(split, batch_rows=8, seed=3)
    epoch0 = np.concatenate([probe.rows_at(p) for p in range(0, probe.rows_per_epoch, 8)])
    epoch1 = np.concatenate([probe.rows_at(p) for p in range(probe.rows_per_epoch, 2 * probe.rows_per_epoch, 8)])
    assert len(set(epoch0.tolist())) == probe.rows_per_epoch and not np.array_equal(epoch0, epoch1)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.parametrize("value", ["100", "4", "8200", "12,x"])
def test_bad_seq_len(workdir, capsys, value):
    assert run_stage("pack", "--seq-len", value) == 2
    assert "--seq-len" in capsys.readouterr().err


def test_missing_tokens_names_the_stage(workdir, capsys):
    assert run_stage("pack", "--seq-len", "128") == 2
    assert "just tokenize" in capsys.readouterr().err


def test_truncated_or_tampered_packed_file_is_refused(tokens_root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tokens_root, copy)
    # manifests record paths; rewrite them to the copy
    for manifest in (copy / "manifests").glob("*.json"):
        manifest.write_text(manifest.read_text().replace(str(tokens_root), str(copy)))
    packed = copy / "data/packed/seq64/train.bin"
    packed.write_bytes(packed.read_bytes()[:-10])
    with pytest.raises(PackedDataError, match="truncated or tampered"):
        PackedSplit.open(copy / "data", 64, "train", copy / "manifests")
    val = copy / "data/packed/seq64/val.bin"
    data = bytearray(val.read_bytes())
    data[0] ^= 1
    val.write_bytes(bytes(data))
    PackedSplit.open(copy / "data", 64, "val", copy / "manifests")  # same size: only --verify sees it
    with pytest.raises(PackedDataError, match="sha256"):
        PackedSplit.open(copy / "data", 64, "val", copy / "manifests", verify=True)
    with pytest.raises(PackedDataError, match="just pack --seq-len 128"):
        PackedSplit.open(copy / "data", 128, "train", copy / "manifests")


def test_stale_tokens_refused(tokens_root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tokens_root, copy)
    for manifest in (copy / "manifests").glob("*.json"):
        manifest.write_text(manifest.read_text().replace(str(tokens_root), str(copy)))
    tokenizer = copy / "data/tokenizer/tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<|pad|>"', '"<|pad2|>"'))
    assert run_stage("pack", "--seq-len", "64", "--force", "--data-dir", copy / "data",
                     "--manifests", copy / "manifests") == 2
    assert "changed since `tokenize`" in capsys.readouterr().err


def test_input_segments_cover_each_row_by_document(tokens_root):
    from train.loader import input_segments

    split = PackedSplit.open(tokens_root / "data", 64, "train", tokens_root / "manifests")
    row_ids = np.arange(split.n_rows)
    segments = input_segments(split, row_ids)
    expected = []
    for r in row_ids:
        lens = list(split.row_doc_lens(r))
        if sum(lens) < 65:
            lens.append(65 - sum(lens))
        lens[-1] -= 1
        expected += [x for x in lens if x]
    assert segments.tolist() == expected
