"""`just export`: a run's checkpoint as a Hugging Face Llama folder, loadable with no frlm code.

The folder holds model.safetensors, config.json and generation_config.json for
`LlamaForCausalLM`, the tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
and a README.md model card with the run's provenance. It runs on the CPU; `transformers` is needed
only here (`uv sync --extra hf`).

How frlm's model maps onto Llama, exactly (the export checks it: the Llama model's logits on a probe
must equal frlm's before anything is written):
  * RMSNorm is the same formula, x / sqrt(mean(x^2) + eps) * weight, in FP32 in both.
  * RoPE rotates the two halves of each head (frlm's `apply_rope`), which is Llama's `rotate_half`
    convention, with the same frequencies: q and k weights are copied, not permuted.
  * The fused q|k|v and gate|up projections are split into Llama's separate ones.
  * Factorized embeddings (model.embed_rank = r) have no Llama equivalent and are folded, in
    float64 so the only rounding is the final cast: the input V x r table times the r -> d
    projection gives a V x d embedding, and the head d -> r -> V gives a V x d head. Tied
    embeddings stay tied in Llama only without a rank (with one, the folded input and output
    tables differ).
  * The vocabulary rows frlm pads up to a multiple of 128 are dropped: the tokenizer can neither
    produce nor decode those ids, and they were never a training target, so `vocab_size` equals the
    tokenizer's size and `generate` can never sample an id without text. Logits of the real ids
    are unchanged; a softmax now runs over the real ids only, which moves a log-probability by the
    padded rows' share of the mass (vanishing once trained; at the default 65,536 vocabulary there
    are no padded rows at all).
  * A checkpoint trained in FP8 loads its FP32 master weights into torch modules; the file holds
    BF16 by default (`--dtype float32` keeps FP32).

Training saw every document as <|endoftext|> followed by its text, so the tokenizer prepends
<|endoftext|> to every text it encodes with special tokens (a post-processor in tokenizer.json and
`add_bos_token` in its config): `generate` and lm-evaluation-harness see what training saw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import HelpFormatter, layout
from pipeline.errors import StageError
from pipeline.manifest import load_manifest, pack_info, pack_manifest_name, sha256_file, tokens_info
from train import checkpoint
from train.config import TrainConfig, from_dict
from train.model import Transformer
from train.precision import Precision
from train.sample import SampleSettings, load_model

EOT, PAD = "<|endoftext|>", "<|pad|>"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PROBE_TOKENS = 64
# A mapping error moves logits by O(1); FP32 rounding between the two implementations by ~1e-6 of their size.
PROBE_TOLERANCE = 1e-4


class ExportError(Exception):
    """The export cannot be made; the message says what to do."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ExportError("the Hugging Face export needs `transformers`: run `uv sync --extra hf`") from None
    return transformers


@dataclass
class Source:
    """What an export (or an evaluation) reads: the checkpoint and, when known, its run folder."""

    checkpoint: Path
    run_dir: Path | None  # runs/NAME when the checkpoint lies in its checkpoints/ folder


def find_checkpoint(run: str | None, path: Path | None, out_dir: Path, command: str) -> Source:
    """`--checkpoint` when given, else the run's best checkpoint; the run folder is the one holding
    the checkpoint's `checkpoints/` folder (or OUT_DIR/RUN)."""
    if path is None:
        if run is None:
            raise ExportError(f"{command}: pass --run NAME (its best checkpoint) or --checkpoint PATH")
        path = checkpoint.best(out_dir / run / "checkpoints")
        if not path.exists():
            raise ExportError(f"no checkpoint at {path}; train first (`just train --run {run}`) or pass --checkpoint")
    elif not path.exists():
        raise ExportError(f"--checkpoint {path}: no such file or folder")
    if run is not None:
        return Source(path, out_dir / run)
    folder = path.parent if path.name == checkpoint.WEIGHTS else path
    return Source(path, folder.parent.parent if folder.parent.name == "checkpoints" else None)


def load_checked(source: Source, tokenizer_path: Path | None) -> tuple[Transformer, checkpoint.Checkpoint, Path]:
    """The model on the CPU (FP32) and the tokenizer file it was trained with (checked by sha256)."""
    try:
        model, found = load_model(source.checkpoint, torch.device("cpu"))
    except checkpoint.CheckpointError as err:
        raise ExportError(str(err)) from None
    tokenizer_path = tokenizer_path or layout.tokenizer_file(found.config["data"]["data_dir"])
    if not tokenizer_path.is_file():
        raise ExportError(f"tokenizer {tokenizer_path} not found; pass --tokenizer")
    if sha256_file(tokenizer_path) != found.tokenizer_sha256:
        raise ExportError(f"{tokenizer_path} is not the tokenizer this checkpoint was trained with; pass --tokenizer")
    return model, found, tokenizer_path


# ------------------------------------------------------------------------------------------ weights

def llama_weights(model: Transformer, vocab_size: int) -> dict[str, torch.Tensor]:
    """frlm's weights under LlamaForCausalLM's names, padded vocabulary rows dropped, factorized
    embeddings folded (see the module docstring). Every tensor is FP32."""
    cfg = model.cfg
    head_dim = cfg.d_model // cfg.n_heads
    q_out, kv_out = cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim
    table = model.embed.weight[:vocab_size].double()
    embed = table @ model.embed_proj.weight.double().T if model.embed_proj is not None else table
    head = table if model.lm_head is None else model.lm_head.weight[:vocab_size].double()
    if model.head_proj is not None:
        head = head @ model.head_proj.weight.double()
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": embed if tied_in_llama(model) else head,
               "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        attn, ffn = block.attn, block.ffn
        q, k, v = (attn.qkv.weight.split([q_out, kv_out, kv_out]) if attn.fused
                   else (attn.q.weight, attn.k.weight, attn.v.weight))
        gate, up = ffn.gate_up.weight.chunk(2) if ffn.fused else (ffn.gate.weight, ffn.up.weight)
        layer = {"input_layernorm": block.attn_norm.weight, "self_attn.q_proj": q, "self_attn.k_proj": k,
                 "self_attn.v_proj": v, "self_attn.o_proj": attn.o.weight,
                 "post_attention_layernorm": block.ffn_norm.weight, "mlp.gate_proj": gate, "mlp.up_proj": up,
                 "mlp.down_proj": ffn.down.weight}
        weights.update({f"model.layers.{i}.{name}.weight": tensor for name, tensor in layer.items()})
    return {name: tensor.detach().float().contiguous() for name, tensor in weights.items()}


def tied_in_llama(model: Transformer) -> bool:
    """Llama shares the head with the embedding only when frlm did without a rank."""
    return model.cfg.tie_embeddings and model.embed_proj is None


def llama_model(model: Transformer, vocab_size: int, eot_id: int, pad_id: int):
    """A LlamaForCausalLM (FP32, CPU) holding the model's weights."""
    transformers = require_transformers()
    cfg = model.cfg
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads, hidden_act="silu", max_position_embeddings=model.max_positions,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=tied_in_llama(model),
        attention_bias=False, mlp_bias=False, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=pad_id)
    llama = transformers.LlamaForCausalLM(config).float()
    llama.load_state_dict(llama_weights(model, vocab_size), strict=True)
    sampling = SampleSettings()  # `just sample`'s defaults
    llama.generation_config = transformers.GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=pad_id, do_sample=True,
        temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens)
    return llama.eval()


@torch.no_grad()
def check_logits(model: Transformer, llama, vocab_size: int) -> float:
    """Largest logit difference between frlm and the Llama model on a fixed probe (both FP32).
    A mapping error is an ExportError, never a silently wrong folder."""
    probe = torch.randint(0, vocab_size, (1, min(PROBE_TOKENS, model.max_positions)),
                          generator=torch.Generator().manual_seed(0))
    expected = model(probe)[..., :vocab_size]
    difference = float((llama(input_ids=probe).logits - expected).abs().max())
    if difference > PROBE_TOLERANCE * (1 + float(expected.abs().max())):
        raise ExportError(f"the Llama model's logits differ from frlm's by {difference:.3g}: this checkpoint's "
                          f"structure does not map onto LlamaForCausalLM")
    return difference


# ---------------------------------------------------------------------------------------- tokenizer

def write_tokenizer(tokenizer_path: Path, folder: Path, max_positions: int) -> tuple[int, int, int]:
    """tokenizer.json (prepending <|endoftext|>), tokenizer_config.json, special_tokens_map.json.
    Returns the vocabulary size and the ids of <|endoftext|> and <|pad|>."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eot_id, pad_id = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
    if eot_id is None or pad_id is None:
        raise ExportError(f"{tokenizer_path} lacks {EOT} or {PAD}; it is not a tokenizer `just tokenize` wrote")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOT}:0 $A:0", pair=f"{EOT}:0 $A:0 {EOT}:1 $B:1", special_tokens=[(EOT, eot_id)])
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}
    # PreTrainedTokenizerFast keeps tokenizer.json's pipeline as it is (a model-specific class such as
    # LlamaTokenizer would rebuild it); no clean-up, so decoding returns the text byte for byte.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_positions}
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special)
    return tokenizer.get_vocab_size(with_added_tokens=True), eot_id, pad_id


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def add_legacy_config_keys(folder: Path, rope_theta: float, dtype: str) -> None:
    """transformers 5 writes `rope_parameters` and `dtype`; earlier versions (and tools built on
    them) read `rope_theta` and `torch_dtype`. Both are written, so every reader sees one model."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.setdefault("rope_theta", rope_theta)
    config.setdefault("torch_dtype", dtype)
    config.setdefault("dtype", dtype)
    write_json(path, config)


# --------------------------------------------------------------------------------------- model card

def run_metrics(run_dir: Path | None) -> list[dict]:
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def validation_at(metrics: list[dict], step: int) -> dict | None:
    """The last validation logged at or before the checkpoint's step."""
    return next((m for m in reversed(metrics) if "val_loss" in m and m["step"] <= step), None)


def manifest_rows(path: Path, what: str, other_tokenizer: bool = False) -> list[tuple[str, str, str]]:
    """(what, file, sha256) of every output a stage manifest records, or one row saying why none."""
    try:
        manifest = load_manifest(path)
    except StageError:
        return [(what, f"not recorded ({path} is damaged)", "")]
    if manifest is None:
        return [(what, f"not recorded ({path} is missing)", "")]
    if other_tokenizer:
        return [(what, f"not recorded ({path} describes data made with another tokenizer)", "")]
    return [(what, record["path"], record["sha256"]) for record in manifest["outputs"]]


def recorded_tokenizer(read) -> str | None:
    """The tokenizer sha256 a typed manifest reader reports; None when its manifest is missing or damaged."""
    try:
        info = read()
    except StageError:
        return None
    return info.tokenizer_sha256 if info is not None else None


def provenance(found: checkpoint.Checkpoint, config: TrainConfig, manifests: Path,
               run_dir: Path | None) -> list[tuple[str, str, str]]:
    """Every link from the downloaded file to this checkpoint, from the manifests. A link they do
    not hold, or one made with another tokenizer than the model's (data retokenized since), reads
    "not recorded"."""
    def other(read) -> bool:
        return recorded_tokenizer(read) not in (None, found.tokenizer_sha256)

    rows = [*manifest_rows(manifests / "download.json", "downloaded file"),
            *manifest_rows(manifests / "extract-paragraphs.json", "paragraphs (Parquet)"),
            *manifest_rows(manifests / "tokenize.json", "tokenizer and token stream",
                           other(lambda: tokens_info(manifests)))]
    for seq_len in sorted({stage.seq_len for stage in config.curriculum}):
        rows += manifest_rows(manifests / f"{pack_manifest_name(seq_len)}.json", f"pack seq{seq_len}",
                              other(lambda: pack_info(manifests, seq_len)))
    resolved = run_dir / "config.resolved.json" if run_dir else None
    rows.append(("training config", str(resolved), sha256_file(resolved)) if resolved and resolved.is_file()
                else ("training config", "not recorded (no config.resolved.json in the run folder)", ""))
    weights = found.path / checkpoint.WEIGHTS if found.path.is_dir() else found.path
    rows.append(("checkpoint exported", str(weights), sha256_file(weights)))
    return rows


def model_card(model: Transformer, llama, found: checkpoint.Checkpoint, vocab_size: int, source: Source,
               manifests: Path, dtype: str, probe_difference: float) -> str:
    config = from_dict(found.config)
    cfg = config.model
    metrics = run_metrics(source.run_dir)
    val = validation_at(metrics, found.step)
    tokens = found.step * config.optim.tokens_per_step
    name = source.run_dir.name if source.run_dir else found.path.name
    embeddings = (f"factorized at rank {cfg.embed_rank} in training, folded into V x d tables here"
                  if cfg.embed_rank else "plain V x d")
    tied = "tied" if tied_in_llama(model) else "untied" + (" (tied in training, untied by folding)"
                                                          if cfg.tie_embeddings and cfg.embed_rank else "")
    val_text = (f"val loss {val['val_loss']:.4f} nats/token, {val['val_bpb']:.4f} bits per byte (step {val['step']}, "
                f"seq {val.get('seq_len', '?')})" if val else "not recorded (no validation in the run's metrics.jsonl)")
    lines = [
        "---", "language:", "- fr", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- frlm",
        "- llama", "---", "", f"# {name}", "",
        "A French language model trained from scratch with frlm on French Wikipedia, exported from the checkpoint "
        f"`{found.path}` (step {found.step}).", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "FOLDER = \".\"  # this folder, or its name on the Hub",
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER)",
        "ids = tokenizer(\"La ville de\", return_tensors=\"pt\").input_ids  # starts with <|endoftext|>, as in training",
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=60)[0], skip_special_tokens=True))",
        "```", "",
        "## Architecture", "",
        f"- LlamaForCausalLM: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads and "
        f"{cfg.n_kv_heads} key/value heads of {cfg.d_model // cfg.n_heads}, SwiGLU {cfg.ffn_dim}, RMSNorm eps "
        f"{cfg.norm_eps:g}, RoPE theta {cfg.rope_theta:g}, context {model.max_positions} tokens",
        f"- vocabulary {vocab_size:,} (byte-level BPE; {EOT} begins every document, {PAD} pads); embeddings "
        f"{embeddings}; head {tied}",
        f"- parameters: {sum(p.numel() for p in llama.parameters()):,} exported "
        f"({sum(p.numel() for p in model.parameters()):,} in frlm's form, padded vocabulary rows included)",
        f"- weights in {dtype}; frlm's and this model's logits agree to {probe_difference:.1e} on a probe (FP32)", "",
        "## Training", "",
        f"- tokens seen: {tokens:,} ({found.step:,} optimizer steps of {config.optim.tokens_per_step:,} tokens)",
        "- curriculum: " + ", ".join(f"seq {s.seq_len} for {s.tokens:,} tokens" for s in config.curriculum),
        f"- validation: {val_text}",
        f"- optimizer: AdamW lr {config.optim.lr:g} ({config.optim.schedule}), weight decay "
        f"{config.optim.weight_decay:g}", "",
        "Precision in training (FP8 projections kept FP32 master weights, which are what is exported):", "",
        "```", Precision(config.precision, torch.device("cpu"), torch_modules_only=True).table(), "```", "",
        "## Provenance", "",
        f"Each link of the chain from the downloaded file to these weights, from the stage manifests in "
        f"`{manifests}`:", "",
        "| what | file | sha256 |", "| --- | --- | --- |",
        *(f"| {what} | `{path}` | `{digest}` |" if digest else f"| {what} | {path} | |"
          for what, path, digest in provenance(found, config, manifests, source.run_dir)),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- export

def export(source: Source, out: Path, dtype: str = "bfloat16", tokenizer_path: Path | None = None,
           manifests: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write the Hugging Face folder `out` (atomically: a folder that exists is complete)."""
    require_transformers()
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists; pass --force to replace it or --out for another folder")
    model, found, tokenizer_path = load_checked(source, tokenizer_path)
    manifests = manifests or Path(found.config["data"]["manifests"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        vocab_size, eot_id, pad_id = write_tokenizer(tokenizer_path, tmp, model.max_positions)
        if vocab_size != found.vocab_size:
            raise ExportError(f"{tokenizer_path} has {vocab_size} tokens but the checkpoint {found.vocab_size}")
        llama = llama_model(model, vocab_size, eot_id, pad_id)
        difference = check_logits(model, llama, vocab_size)
        card = model_card(model, llama, found, vocab_size, source, manifests, dtype, difference)
        llama.to(DTYPES[dtype]).save_pretrained(str(tmp))
        add_legacy_config_keys(tmp, model.cfg.rope_theta, dtype)
        (tmp / "README.md").write_text(card)
        checkpoint.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "step": found.step, "vocab_size": vocab_size, "dtype": dtype,
            "max_logit_difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just export", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run", default=None, metavar="NAME", help="run name: exports OUT_DIR/RUN/checkpoints/best unless --checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="PATH",
                        help="checkpoint folder or file to export (default: the run's best)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="the Hugging Face folder to write (default: OUT_DIR/RUN/hf)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="dtype of the exported weights")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs live")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (default: DATA_DIR/tokenizer/tokenizer.json of the run's config)")
    parser.add_argument("--manifests", type=Path, default=None,
                        help="stage manifests for the model card's provenance (default: the run config's data.manifests)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    try:
        source = find_checkpoint(args.run, args.checkpoint, args.out_dir, "export")
        out = args.out or (source.run_dir / "hf" if source.run_dir else None)
        if out is None:
            raise ExportError(f"{args.checkpoint} is not inside a run's checkpoints/ folder: pass --out")
        result = export(source, out, args.dtype, args.tokenizer, args.manifests, args.force)
    except ExportError as err:
        print(f"error: export: {err}", file=sys.stderr)
        return 2
    print(f"export: step {result['step']} -> {result['out']} (LlamaForCausalLM, {result['dtype']}, vocabulary "
          f"{result['vocab_size']:,}; logits match frlm's to {result['max_logit_difference']:.1e})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
