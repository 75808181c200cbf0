"""`just export`: the Hugging Face folder loads in transformers and computes what frlm computes."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import layout
from pipeline.manifest import sha256_file
from tests.conftest import build_packed_corpus
from train import checkpoint
from train.config import load
from train.export import main as export_main
from train.model import Transformer, padded_vocab
from train.precision import Precision

VOCAB = 300  # padded to 384 in frlm: the export drops the 84 padded rows

VARIANTS = {
    "plain": ({}, {}),
    "factorized": ({"embed_rank": 16}, {}),
    "tied": ({"tie_embeddings": True}, {}),
    "factorized-tied": ({"embed_rank": 16, "tie_embeddings": True}, {}),
    # FP8-trained structure: q apart from k|v, gate apart from up (TE modules load as torch ones)
    "fp8-split": ({}, {"mode": "fp8", "map": {"q": "bf16", "k": "fp8", "v": "fp8", "gate": "bf16", "up": "fp8"}}),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_packed_corpus(tmp_path_factory.mktemp("export"), 400_000, 5, VOCAB, "32,64")


def make_run(corpus, name: str, model: dict, precision: dict, step: int = 3):
    """A run folder as `just train` leaves it, with a randomly initialised model (norms included, so a
    swapped norm would show) saved through the real checkpoint code."""
    config = load("configs/tiny.toml")
    for key, value in {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
                       "rope_theta": 5000.0, **model}.items():
        setattr(config.model, key, value)
    config.precision.mode = precision.get("mode", config.precision.mode)
    config.precision.map.update(precision.get("map", {}))
    config.curriculum[0].seq_len, config.curriculum[1].seq_len = 32, 64
    config.data.data_dir, config.data.manifests = str(corpus / "data"), str(corpus / "manifests")
    config.run.name, config.run.out_dir = name, str(corpus / "runs")
    torch.manual_seed(1)
    frlm = Transformer(config.model, VOCAB, Precision(config.precision, torch.device("cpu"), torch_modules_only=True), 64)
    with torch.no_grad():
        for param in frlm.parameters():
            param.add_(torch.randn_like(param) * (0.1 if param.dim() == 1 else 0.02))
    run_dir = corpus / "runs" / name
    tokenizer = layout.tokenizer_file(corpus / "data")
    meta = {"vocab_size": VOCAB, "tokenizer_sha256": sha256_file(tokenizer), "config": config.to_dict()}
    checkpoint.save(run_dir / "checkpoints", step, frlm.state_dict(), meta, {}, keep_last=1, is_best=True)
    (run_dir / "config.resolved.json").write_text(json.dumps(config.to_dict()))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": step, "seq_len": 64, "loss": 5.1, "val_loss": 5.25,
                                                       "val_bpb": 2.125}) + "\n")
    return frlm.eval(), run_dir


def export(corpus, *argv):
    return export_main(["--out-dir", str(corpus / "runs"), *map(str, argv)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_logits_equal_frlm(corpus, variant):
    from transformers import LlamaForCausalLM

    model, precision = VARIANTS[variant]
    frlm, run_dir = make_run(corpus, variant, model, precision)
    assert frlm.vocab_size == padded_vocab(VOCAB) > VOCAB
    assert export(corpus, "--run", variant, "--dtype", "float32") == 0
    llama = LlamaForCausalLM.from_pretrained(run_dir / "hf").eval()
    config = llama.config
    assert (config.vocab_size, config.num_key_value_heads, config.rms_norm_eps) == (VOCAB, 2, frlm.cfg.norm_eps)
    assert config.tie_word_embeddings == (variant == "tied")
    assert json.loads((run_dir / "hf/config.json").read_text())["rope_theta"] == 5000.0
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = frlm(ids)[..., :VOCAB]
        got = llama(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-4


def test_tokenizer_prepends_end_of_text_and_round_trips(corpus):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    make_run(corpus, "tok", {}, {})
    assert export(corpus, "--run", "tok") == 0
    hf = AutoTokenizer.from_pretrained(corpus / "runs/tok/hf")
    reference = Tokenizer.from_file(str(layout.tokenizer_file(corpus / "data")))
    eot, pad = reference.token_to_id("<|endoftext|>"), reference.token_to_id("<|pad|>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (eot, eot, pad, VOCAB)
    texts = pq.read_table(layout.paragraphs_dir(corpus / "data")).column("text").to_pylist()[:200]
    texts += ["  deux espaces, l'été à Montréal : « 12,5 % » — fin.\n", "é"]
    for text in texts:
        ids = hf(text).input_ids
        assert ids == [eot] + reference.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids, skip_special_tokens=True) == text


def test_generate_and_the_default_bf16_folder(corpus):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_run(corpus, "gen", {"embed_rank": 16}, {})
    assert export(corpus, "--run", "gen") == 0
    folder = corpus / "runs/gen/hf"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= {p.name for p in folder.iterdir()}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("La ville de", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1] and int(out.max()) < VOCAB
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)


def test_model_card_states_the_run_and_its_provenance(corpus):
    make_run(corpus, "card", {}, {"mode": "fp8", "map": {"lm_head": "bf16"}}, step=3)
    assert export(corpus, "--run", "card") == 0
    card = (corpus / "runs/card/hf/README.md").read_text()
    config = json.loads((corpus / "runs/card/config.resolved.json").read_text())
    assert f"tokens seen: {3 * config['optim']['tokens_per_step']:,}" in card
    assert "val loss 5.2500 nats/token, 2.1250 bits per byte (step 3" in card
    assert "precision fp8, recipe delayed" in card and "te.Linear" in card
    tokenize = json.loads((corpus / "manifests/tokenize.json").read_text())
    for record in tokenize["outputs"]:
        assert f"`{record['sha256']}`" in card
    for seq_len in (32, 64):
        for record in json.loads((corpus / f"manifests/pack-seq{seq_len}.json").read_text())["outputs"]:
            assert f"`{record['sha256']}`" in card
    parquet = json.loads((corpus / "manifests/extract-paragraphs.json").read_text())["outputs"][0]
    assert f"`{parquet['sha256']}`" in card
    assert "| downloaded file | not recorded (" in card  # the fixture never ran `download`
    assert f"`{sha256_file(corpus / 'runs/card/config.resolved.json')}`" in card


def test_errors_are_one_line_and_leave_nothing(corpus, capsys, monkeypatch, tmp_path):
    assert export(corpus, "--run", "never-trained") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "just train --run never-trained" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/model.safetensors").write_bytes(b"not safetensors")
    assert export(corpus, "--checkpoint", tmp_path / "junk", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read" in err and not (tmp_path / "out").exists()
    make_run(corpus, "twice", {}, {})
    assert export(corpus, "--run", "twice") == 0
    assert export(corpus, "--run", "twice") == 2
    assert "--force" in capsys.readouterr().err
    other = tmp_path / "other-tokenizer.json"
    other.write_text((layout.tokenizer_file(corpus / "data")).read_text().replace("<|pad|>", "<|pad2|>"))
    assert export(corpus, "--run", "twice", "--tokenizer", other, "--out", tmp_path / "out") == 2
    assert "not the tokenizer" in capsys.readouterr().err
    assert list(tmp_path.glob(".out*")) == [] and not (tmp_path / "out").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert export(corpus, "--run", "twice", "--out", tmp_path / "out") == 2
    assert "uv sync --extra hf" in capsys.readouterr().err
