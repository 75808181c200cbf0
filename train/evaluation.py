"""`just eval`: bits per byte of a model on any French text, and French benchmarks.

Bits per byte (--text, --parquet, --val) are counted exactly as training's validation counts them: each
document is <|endoftext|> followed by its text; documents are packed into rows of the run's last
curriculum length with the pack stage's own placement (best-fit decreasing, long documents cut);
the loss is summed over every non-padding target, in nats, and divided by ln 2 and the UTF-8 bytes
of the documents' text. Given the run's validation articles it reproduces the trainer's val bpb
(on the CPU, in FP32, to the last digits); --val does so from the run's own tokenized validation
split, and reports each source of a mixture apart (`just tokenize --mix`) and all of them together. On a GPU the model runs in BF16; an FP8-trained run is
evaluated from its FP32 master weights, so its figure differs slightly from its FP8 validation.
Perplexity is e^(nats per token) with this tokenizer.

--tasks runs EleutherAI's lm-evaluation-harness (`uv sync --extra eval`) on the Hugging Face model:
the --hf folder, or the checkpoint exported to a temporary folder. Its tokenizer prepends
<|endoftext|> as training did. Task data is downloaded from the Hugging Face Hub at run time;
--include-path adds a folder of your own YAML tasks. `--tasks french` runs a French set:
{french}.

Results are printed as a table and written as JSON to RUN/eval/ (or, for --hf, DIR/eval/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import HelpFormatter, layout
from pipeline.errors import StageError
from pipeline.manifest import sha256_file, tokens_info, verify_input, write_json_atomic
from pipeline.packed import PackedSplit, best_fit_decreasing, cut_documents
from train import checkpoint
from train.config import PrecisionConfig, RunConfig, from_dict
from train.export import EOT, PAD, ExportError, Source, export, find_checkpoint, load_checked, require_transformers
from train.loss import Loss
from train.precision import Precision
from train.trainer import Distributed, evaluate

# A French set from lm-evaluation-harness: FrenchBench's multiple-choice tasks (CroissantLLM's benchmark: ARC
# challenge, HellaSwag, grammar and vocabulary in French), Belebele's French reading comprehension, XNLI in French.
FRENCH_TASKS = ("french_bench_mc", "belebele_fra_Latn", "xnli_fr")
HF_BATCH = 8  # rows per forward for a --hf folder, which has no run config to take it from


class EvalError(Exception):
    """The evaluation cannot run; the message says what to do."""


@dataclass
class Scored:
    """A model ready to score text the way training did."""

    model: nn.Module  # forward(ids, doc_lens=None) -> logits
    tokenizer: Any  # a `tokenizers.Tokenizer`
    eot_id: int  # the token before every document
    pad_id: int
    seq_len: int  # rows of this many predictions
    max_positions: int
    micro_batch: int
    doc_mask: bool
    what: str  # the checkpoint or folder evaluated
    description: dict[str, Any]  # what was evaluated, for the JSON
    run_data: dict[str, str] | None = None  # an frlm checkpoint's config `data` section: where its tokens are
    tokenizer_sha256: str = ""


class HFLogits(nn.Module):
    """A transformers causal LM with frlm's forward signature (no document mask)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, doc_lens: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits


# -------------------------------------------------------------------------------------------- models

def frlm_model(source: Source, tokenizer_path: Path | None, device: torch.device) -> Scored:
    from tokenizers import Tokenizer

    model, found, tokenizer_path = load_checked(source, tokenizer_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    config = from_dict(found.config)
    last = config.curriculum[-1]
    return Scored(model.to(device), tokenizer, tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD), last.seq_len,
                  model.max_positions, last.micro_batch, config.attention.doc_mask, str(found.path),
                  {"checkpoint": str(found.path), "step": found.step, "run": str(source.run_dir)},
                  found.config["data"], found.tokenizer_sha256)


def hf_model(folder: Path, device: torch.device) -> Scored:
    transformers = require_transformers()
    if not (folder / "config.json").is_file():
        raise EvalError(f"--hf {folder}: no config.json; pass a folder `just export` wrote")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if backend is None or prefix is None or tokenizer.pad_token_id is None:
        raise EvalError(f"--hf {folder}: bits per byte need a fast tokenizer with a begin- or end-of-text token and a "
                        f"padding token, as `just export` writes")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    positions = model.config.max_position_embeddings
    return Scored(HFLogits(model), backend, prefix, tokenizer.pad_token_id, positions, positions, HF_BATCH, False,
                  str(folder), {"hf": str(folder)})


# ---------------------------------------------------------------------------------------- documents

def text_documents(path: Path) -> list[str]:
    """The documents of a UTF-8 text file: separated by blank lines, surrounding whitespace dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalError(f"--text {path} is not UTF-8 text (byte {err.start})") from None
    return [doc.strip() for doc in re.split(r"\n(?:[ \t]*\n)+", text) if doc.strip()]


def parquet_documents(path: Path) -> list[str]:
    """One document per article: consecutive rows of one article_id joined with newlines, as `tokenize` does.
    `path` is a Parquet file or a paragraphs folder (its parts in order)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["article_id", "text"])
    except Exception as err:  # pyarrow raises several types for unreadable files and missing columns
        raise EvalError(f"--parquet {path} cannot be read as paragraphs (article_id, text): "
                        f"{str(err).splitlines()[0][:120]}") from None
    ids, texts = table.column("article_id").to_numpy(), table.column("text").to_pylist()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else np.zeros(0, dtype=np.int64)
    return ["\n".join(texts[a:b]) for a, b in zip(starts, np.r_[starts[1:], ids.size])]


def val_streams(scored: Scored) -> dict[str, tuple[list[np.ndarray], int]]:
    """The run's tokenized validation documents, per source: (each document's ids, UTF-8 bytes)."""
    manifests, data_dir = Path(scored.run_data["manifests"]), Path(scored.run_data["data_dir"])
    try:
        info = tokens_info(manifests)
        bin_path, index_path = layout.token_files(layout.tokens_dir(data_dir), "val")
        for path in (bin_path, index_path):
            verify_input(path, manifests, producer_required="tokenize")
    except StageError as err:
        raise EvalError(f"--val: {err}") from None
    if info.tokenizer_sha256 != scored.tokenizer_sha256:
        raise EvalError(f"--val: the tokens in {data_dir} were made with another tokenizer than this checkpoint's")
    tokens = np.fromfile(bin_path, dtype=np.dtype(info.dtype)).astype(np.int64)
    index = np.load(index_path)
    sources = info.sources or ("all",)
    source_of = index["source"] if "source" in index.dtype.names else np.zeros(index.size, dtype=np.int64)
    return {name: ([tokens[start:start + count] for start, count in zip(index["start"][mine], index["tokens"][mine])],
                   int(index["bytes"][mine].sum()))
            for number, name in enumerate(sources) if (mine := source_of == number).any()}


def pack_text(documents: list[str], scored: Scored) -> PackedSplit:
    """The documents as the pack stage would pack them: rows of seq_len + 1 ids, padding at the end."""
    encodings = scored.tokenizer.encode_batch(documents, add_special_tokens=False)
    streams = [np.array([scored.eot_id, *encoding.ids], dtype=np.int64) for encoding in encodings]
    return pack_streams(streams, sum(len(doc.encode("utf-8")) for doc in documents), scored)


def pack_streams(streams: list[np.ndarray], utf8_bytes: int, scored: Scored) -> PackedSplit:
    """Documents' ids (each starting with the end-of-text id) packed as the pack stage packs them."""
    if not streams:
        raise EvalError("the input holds no document")
    tokens = np.concatenate(streams)
    lengths = np.array([stream.size for stream in streams], dtype=np.int64)
    row_len = scored.seq_len + 1
    starts, pieces, _ = cut_documents(np.cumsum(lengths) - lengths, lengths, row_len)
    row, offset, n_rows = best_fit_decreasing(pieces, row_len)
    rows = np.full((n_rows, row_len), scored.pad_id, dtype=np.int64)
    for start, length, r, o in zip(starts, pieces, row, offset):
        rows[r, o:o + length] = tokens[start:start + length]
    order = np.lexsort((offset, row))  # pieces by row, then by place in the row: the doc_lens layout
    return PackedSplit(seq_len=scored.seq_len, rows=rows, doc_lens=pieces[order].astype(np.int32),
                       row_offsets=np.r_[0, np.cumsum(np.bincount(row, minlength=n_rows))], pad_id=scored.pad_id,
                       eot_id=scored.eot_id, vocab_size=scored.tokenizer.get_vocab_size(with_added_tokens=True),
                       utf8_bytes=utf8_bytes, documents=len(streams), tokenizer_sha256="")


def bits_per_byte(scored: Scored, split: PackedSplit, device: torch.device) -> dict[str, Any]:
    if scored.seq_len > scored.max_positions:
        raise EvalError(f"--seq-len {scored.seq_len} exceeds the model's {scored.max_positions} positions")
    precision = Precision(PrecisionConfig(mode="bf16" if device.type == "cuda" else "fp32"), device)
    loss = Loss(RunConfig(), scored.model, compiled=False)  # the plain loss: the same sum, whatever the run used
    result = evaluate(scored.model, loss, split, precision, scored.micro_batch, 0, scored.doc_mask, device,
                      Distributed())
    return {"documents": split.documents, "utf8_bytes": split.utf8_bytes, "rows": split.n_rows,
            "seq_len": split.seq_len, "tokens": int(result["val_tokens"]), "loss_nats_per_token": result["val_loss"],
            "perplexity": math.exp(result["val_loss"]), "bits_per_byte": result["val_bpb"],
            "precision": precision.mode, "doc_mask": scored.doc_mask}


# -------------------------------------------------------------------------------------------- tasks

def run_tasks(folder: Path, tasks: list[str], include_path: Path | None, device: torch.device, batch_size: int,
              limit: float | None, num_fewshot: int | None) -> dict[str, Any]:
    """lm-evaluation-harness on a Hugging Face folder; its results dict."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("--tasks needs lm-evaluation-harness: run `uv sync --extra eval`") from None
    if include_path is not None and not include_path.is_dir():
        raise EvalError(f"--include-path {include_path}: no such folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}: see `lm-eval ls tasks`, or --include-path for your own")
    model_args = {"pretrained": str(folder), "dtype": "bfloat16" if device.type == "cuda" else "float32",
                  "add_bos_token": True}
    return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                                   device=str(device), batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=False)


def task_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of every metric the harness reported: keys "metric,filter"
    (others, such as alias and sample_len, describe the task)."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, comma, _ = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            rows.append((task, key, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


# ------------------------------------------------------------------------------------------ output

def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in (header, *rows):
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())


def write_result(results_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    path = results_dir / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', name)[:120]}.json"
    stamped = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **payload}
    write_json_atomic(path, json.loads(json.dumps(stamped, default=str)))
    return path


def parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    return [task for name in names for task in (FRENCH_TASKS if name == "french" else (name,))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="just eval", description=__doc__.format(french=", ".join(FRENCH_TASKS)),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--run", default=None, metavar="NAME", help="run name: evaluates OUT_DIR/RUN/checkpoints/best unless --checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="PATH", help="checkpoint folder or file (default: the run's best)")
    parser.add_argument("--hf", type=Path, default=None, metavar="DIR", help="evaluate this Hugging Face folder (from `just export`) instead")
    parser.add_argument("--text", type=Path, default=None, metavar="FILE", help="UTF-8 text file, documents separated by blank lines")
    parser.add_argument("--parquet", type=Path, default=None, metavar="PATH",
                        help="paragraphs (article_id, text): a Parquet file or a folder of parts, e.g. "
                             "data/paragraphs from `just extract-paragraphs`; one document per article")
    parser.add_argument("--val", action="store_true",
                        help="the run's own validation split (its data's tokens/val.bin), per source and all together")
    parser.add_argument("--tasks", default=None, metavar="LIST",
                        help="lm-evaluation-harness tasks, comma separated (e.g. french_bench_hellaswag,belebele_fra_Latn,"
                             f"xnli_fr,arc_fr); `french` stands for {','.join(FRENCH_TASKS)}")
    parser.add_argument("--include-path", type=Path, default=None, metavar="DIR", help="folder of your own lm-evaluation-harness YAML tasks")
    parser.add_argument("--limit", type=float, default=None, metavar="N",
                        help="--tasks: examples per task (a fraction if below 1), for a quick look; all when not given")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="--tasks: few-shot examples (default: each task's own)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                        help="row length for bits per byte (default: the run's last curriculum length; --hf: the "
                             "model's context)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help=f"rows per forward for bits per byte, the run's last micro-batch when not given (as its "
                             f"validation ran; --hf: {HF_BATCH}); requests per forward for --tasks, 1 when not given. "
                             f"Lower it when memory is short")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"), help="where runs live")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (default: DATA_DIR/tokenizer/tokenizer.json of the run's config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        source = None if args.hf is not None else find_checkpoint(args.run, args.checkpoint, args.out_dir, "eval")
        if args.hf is not None:
            results_dir, label = args.hf / "eval", "hf"
        else:
            folder = source.checkpoint.parent if source.checkpoint.name == checkpoint.WEIGHTS else source.checkpoint
            results_dir, label = (source.run_dir or folder.parent) / "eval", folder.stem
        if args.text is not None or args.parquet is not None:
            score_text(args, source, device, results_dir, label)
        if args.val:
            score_val(args, source, device, results_dir, label)
        if args.tasks is not None:
            score_tasks(args, source, device, results_dir, label)
    except (EvalError, ExportError) as err:
        print(f"error: eval: {err}", file=sys.stderr)
        return 2
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    if args.text is not None and args.parquet is not None:
        raise EvalError("pass --text or --parquet, not both")
    if args.text is None and args.parquet is None and args.tasks is None and not args.val:
        raise EvalError("nothing to evaluate: pass --text FILE, --parquet PATH, --val or --tasks LIST")
    if args.hf is not None and (args.run is not None or args.checkpoint is not None):
        raise EvalError("pass --hf DIR, or --run/--checkpoint, not both")
    if args.hf is not None and args.val:
        raise EvalError("--val needs --run or --checkpoint: the validation split is the one the run trained with")
    for option, path in (("--text", args.text), ("--parquet", args.parquet)):
        if path is not None and not (path.is_file() or option == "--parquet" and path.is_dir()):
            raise EvalError(f"{option} {path}: no such file")
    if args.tasks is not None and not parse_tasks(args.tasks):
        raise EvalError("--tasks names no task")


def scored_model(args: argparse.Namespace, source: Source | None, device: torch.device) -> Scored:
    scored = hf_model(args.hf, device) if args.hf is not None else frlm_model(source, args.tokenizer, device)
    scored.seq_len = args.seq_len or scored.seq_len
    scored.micro_batch = args.batch_size or scored.micro_batch
    return scored


def score_text(args: argparse.Namespace, source: Source | None, device: torch.device, results_dir: Path,
               label: str) -> None:
    scored = scored_model(args, source, device)
    path = args.text or args.parquet
    documents = text_documents(path) if args.text is not None else parquet_documents(path)
    result = bits_per_byte(scored, pack_text(documents, scored), device)
    print(f"eval: {path}: {result['documents']:,} documents, {result['utf8_bytes']:,} bytes, {result['rows']:,} rows "
          f"of {result['seq_len']} tokens ({result['precision']} on {device})")
    print_table(["model", "tokens", "nats/token", "perplexity", "bits/byte"],
                [[scored.what, f"{result['tokens']:,}", f"{result['loss_nats_per_token']:.4f}",
                  f"{result['perplexity']:.2f}", f"{result['bits_per_byte']:.4f}"]])
    written = write_result(results_dir, f"bpb-{path.stem}-{label}",
                           {**scored.description, "input": str(path),
                            "input_sha256": sha256_file(path) if path.is_file() else None, **result})
    print(f"-> {written}")


def score_val(args: argparse.Namespace, source: Source | None, device: torch.device, results_dir: Path,
              label: str) -> None:
    """Bits per byte on the run's validation split: each source apart, then all of them (the
    trainer's val bpb) when there are several."""
    scored = scored_model(args, source, device)
    groups = val_streams(scored)
    if len(groups) > 1:
        groups["all"] = ([stream for streams, _ in groups.values() for stream in streams],
                         sum(size for _, size in groups.values()))
    results = {name: bits_per_byte(scored, pack_streams(streams, size, scored), device)
               for name, (streams, size) in groups.items()}
    print(f"eval: {scored.what}: validation split of {scored.run_data['data_dir']} ({scored.seq_len}-token rows)")
    print_table(["source", "documents", "bytes", "tokens", "nats/token", "bits/byte"],
                [[name, f"{r['documents']:,}", f"{r['utf8_bytes']:,}", f"{r['tokens']:,}",
                  f"{r['loss_nats_per_token']:.4f}", f"{r['bits_per_byte']:.4f}"] for name, r in results.items()])
    written = write_result(results_dir, f"val-bpb-{label}", {**scored.description, "by_source": results})
    print(f"-> {written}")


def score_tasks(args: argparse.Namespace, source: Source | None, device: torch.device, results_dir: Path,
                label: str) -> None:
    tasks = parse_tasks(args.tasks)
    with tempfile.TemporaryDirectory(prefix="frlm-eval-") as tmp:
        folder = args.hf
        if folder is None:  # the harness loads Hugging Face models: export the checkpoint first
            folder = Path(tmp) / "hf"
            export(source, folder, "float32", args.tokenizer)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit  # >= 1: a count
        results = run_tasks(folder, tasks, args.include_path, device, args.batch_size or 1, limit, args.num_fewshot)
    what = str(args.hf or source.checkpoint)
    print(f"eval: lm-evaluation-harness on {what}")
    print_table(["task", "metric", "value", "stderr"],
                [[task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}"]
                 for task, metric, value, stderr in task_rows(results)])
    written = write_result(results_dir, f"tasks-{'+'.join(tasks)}-{label}",
                           {"model": what, "tasks": tasks, "results": results["results"],
                            "n-shot": results.get("n-shot"), "n-samples": results.get("n-samples"),
                            "versions": results.get("versions"), "config": results.get("config")})
    print(f"-> {written}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
