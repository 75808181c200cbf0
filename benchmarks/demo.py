"""`just demo`: the whole pipeline on an embedded corpus, no download, no credentials, no GPU needed.

Generates a realistic frwiki-format corpus with the project's own generator, then extract,
tokenize (a SuperBPE tokenizer trained on it), pack two curriculum lengths, train the `tiny`
preset through both stages (fp32 on the CPU, bf16 on a GPU), evaluate val bits per byte against a
unigram baseline of the same corpus, and generate a French sample. Everything goes under demo/
(its own data, manifests and runs), never the user's data/.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import HelpFormatter

SEQ_LENS = (64, 256)


def unigram_bpb(data_dir: Path, manifests: Path, seq_len: int) -> float:
    """Bits per byte of a unigram model (train counts, add-one) on the same val targets the model is scored on."""
    from pipeline import layout
    from pipeline.manifest import tokens_info
    from pipeline.packed import PackedSplit

    info = tokens_info(manifests)
    train_bin, _ = layout.token_files(layout.tokens_dir(data_dir), "train")
    train_tokens = np.fromfile(train_bin, dtype=np.dtype(info.dtype))
    counts = np.bincount(train_tokens, minlength=info.vocab_size).astype(np.float64) + 1
    log_p = np.log(counts / counts.sum())
    val = PackedSplit.open(data_dir, seq_len, "val", manifests)
    targets = np.asarray(val.rows[:, 1:]).reshape(-1)
    targets = targets[targets != val.pad_id]
    return float(-log_p[targets].sum() / math.log(2) / val.utf8_bytes)


def run_step(name: str, function, *args) -> None:
    code = function(list(map(str, args)))
    if code:
        raise SystemExit(f"demo: {name} failed (exit {code})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("demo"), help="folder for all demo outputs (replaced)")
    parser.add_argument("--megabytes", type=float, default=6.0, help="size of the generated corpus")
    parser.add_argument("--vocab-size", type=int, default=2048, help="SuperBPE vocabulary")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps over both curriculum stages")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    import torch

    from pipeline.cli import main as pipeline_main
    from benchmarks.synthetic_corpus import write_corpus
    from train.__main__ import main as train_main
    from train.sample import Decoder, SampleSettings, load_model, sample_text

    started = time.perf_counter()
    root = args.root
    if root.exists():
        shutil.rmtree(root)
    data, manifests, runs = root / "data", root / "manifests", root / "runs"
    common = ["--data-dir", data, "--manifests", manifests]
    print(f"demo: 1/6 generating a {args.megabytes:.0f} MB frwiki-format corpus", flush=True)
    write_corpus(root / "frwiki_demo.jsonl", int(args.megabytes * 1e6), seed=7)
    run_step("download", pipeline_main, "download", "--from", root / "frwiki_demo.jsonl", *common)
    print("demo: 2/6 extract-paragraphs", flush=True)
    run_step("extract", pipeline_main, "extract-paragraphs", *common)
    print(f"demo: 3/6 tokenize (SuperBPE, vocab {args.vocab_size})", flush=True)
    run_step("tokenize", pipeline_main, "tokenize", "--vocab-size", args.vocab_size, "--train-bytes", 2_000_000,
             *common)
    print(f"demo: 4/6 pack {','.join(map(str, SEQ_LENS))}", flush=True)
    run_step("pack", pipeline_main, "pack", "--seq-len", ",".join(map(str, SEQ_LENS)), *common)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.startswith("cuda") else "fp32"
    print(f"demo: 5/6 train tiny for {args.steps} steps through seq {SEQ_LENS[0]} then {SEQ_LENS[1]} "
          f"({precision} on {device})", flush=True)
    train_started = time.perf_counter()
    run_step("train", train_main, "--config", "configs/tiny.toml", "--run", "tiny", "--max-steps", args.steps,
             "--precision", precision, "--device", device, "--data-dir", data, "--manifests", manifests,
             "--out-dir", runs, "--set", "run.eval_rows=0", "--set", "run.eval_every=100000")
    train_seconds = time.perf_counter() - train_started
    metrics = [json.loads(line) for line in (runs / "tiny" / "metrics.jsonl").read_text().splitlines()]
    final = metrics[-1]
    baseline = unigram_bpb(data, manifests, SEQ_LENS[-1])
    print("demo: 6/6 sampling with the KV cache", flush=True)
    model, found = load_model(runs / "tiny" / "checkpoints" / "best", torch.device(device))
    from tokenizers import Tokenizer

    from pipeline import layout

    tokenizer = Tokenizer.from_file(str(layout.tokenizer_file(data)))
    prompt = "La commune de"
    sys.stdout.write("\n" + prompt)
    decoder = Decoder(model, 1, vocab_size=found.vocab_size, compile=False)  # 80 tokens do not repay a compilation
    sample = sample_text(decoder, tokenizer, prompt, SampleSettings(max_new_tokens=80, temperature=0.8, top_p=0.95),
                         tokenizer.token_to_id("<|endoftext|>"), sys.stdout)
    tokens_trained = final["tokens"]
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_tokens": tokens_trained,
        "train_tokens_per_s": round(tokens_trained / train_seconds),
        "val_bpb": round(final["val_bpb"], 4),
        "unigram_bpb": round(baseline, 4),
        "bpb_vs_unigram": round(final["val_bpb"] / baseline, 3),
        "sample_tokens_per_s": round(sample.tokens_per_s, 1),
        "sample_mean_entropy_nats": round(sample.mean_entropy, 3),
        "sample_repeated_4gram_rate": round(sample.repeated_4gram_rate, 3),
    }
    print("\n== demo summary ==")
    print(f"trained {tokens_trained:,} tokens at {summary['train_tokens_per_s']:,} tokens/s ({precision}, {device})")
    print(f"val bits per byte {summary['val_bpb']} vs unigram baseline {summary['unigram_bpb']} "
          f"({summary['bpb_vs_unigram']:.0%} of it)")
    print(f"sample: {summary['sample_tokens_per_s']} tokens/s, mean entropy {summary['sample_mean_entropy_nats']} nats, "
          f"repeated 4-grams {summary['sample_repeated_4gram_rate']:.0%}")
    print(f"sample again: just sample --out-dir {shlex.quote(str(runs))} --run tiny --prompt {shlex.quote(prompt)}")
    print(f"artifacts: corpus {root / 'frwiki_demo.jsonl'}, data {data}, manifests {manifests}, "
          f"run {runs / 'tiny'} (metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"export it for transformers: just export --run tiny --out-dir {runs}")
    print(f"wall time {summary['wall_seconds']:.0f} s")
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if final["val_bpb"] >= 0.9 * baseline:
        print("demo: the model did not clearly beat the unigram baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
