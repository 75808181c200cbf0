"""`just eval`: bits per byte counted as training counts them; lm-evaluation-harness run for real, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import layout
from tests.conftest import build_packed_corpus
from train.__main__ import main as train_main
from train.evaluation import main as eval_main, parquet_documents, text_documents
from train.sample import load_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
        "optim.tokens_per_step=512", "optim.warmup_tokens=1024", "optim.lr=1e-2",
        "curriculum.0.seq_len=32", "curriculum.0.tokens=3072", "curriculum.0.micro_batch=8",
        "curriculum.1.seq_len=64", "curriculum.1.tokens=3072", "curriculum.1.micro_batch=4",
        "run.eval_rows=0", "run.log_every=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # several validation articles, so rows hold pieces of several documents (placement and doc_mask matter)
    root = build_packed_corpus(tmp_path_factory.mktemp("eval"), 400_000, 31, 384, "32,64", "--val-fraction", "0.4")
    val_split = json.loads((root / "manifests/tokenize.json").read_text())["tokens"]["val_split"]
    val_ids = val_split["by_source"]["frwiki"]["article_ids"]
    table = pq.read_table(layout.paragraphs_dir(root / "data"))
    keep = [article_id in set(val_ids) for article_id in table.column("article_id").to_pylist()]
    pq.write_table(table.filter(keep), root / "val.parquet")
    return root


@pytest.fixture(scope="module")
def trained(corpus) -> str:
    """One tiny run the tests share (attention without document mask, the default)."""
    train_run(corpus, "tiny")
    return "tiny"


def train_run(corpus, name: str, *settings: str) -> dict:
    """Train a tiny run on the CPU; its last metrics line (validated over the whole val split)."""
    argv = ["--config", "configs/tiny.toml", "--run", name, "--precision", "fp32", "--device", "cpu",
            "--data-dir", corpus / "data", "--manifests", corpus / "manifests", "--out-dir", corpus / "runs"]
    assert train_main([str(a) for a in argv] + [f"--set={s}" for s in (*TINY, *settings)]) == 0
    return json.loads((corpus / "runs" / name / "metrics.jsonl").read_text().splitlines()[-1])


def last_checkpoint(corpus, name: str) -> Path:
    return sorted((corpus / "runs" / name / "checkpoints").glob("step_*"))[-1]


def evaluate(corpus, *argv) -> int:
    return eval_main(["--out-dir", str(corpus / "runs"), "--device", "cpu", *map(str, argv)])


@pytest.mark.parametrize("doc_mask", [False, True])
def test_val_split_gives_the_trainers_val_bpb(corpus, trained, doc_mask, capsys):
    name = "doc-mask" if doc_mask else trained
    if doc_mask:
        train_run(corpus, name, "attention.doc_mask=true")
    final = json.loads((corpus / "runs" / name / "metrics.jsonl").read_text().splitlines()[-1])
    step = last_checkpoint(corpus, name)
    assert evaluate(corpus, "--run", name, "--checkpoint", step, "--parquet", corpus / "val.parquet") == 0
    result = json.loads((corpus / "runs" / name / "eval" / f"bpb-val-{step.name}.json").read_text())
    assert result["bits_per_byte"] == pytest.approx(final["val_bpb"], rel=1e-6)
    assert result["loss_nats_per_token"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert result["tokens"] == final["val_tokens"] and result["seq_len"] == 64
    assert result["perplexity"] == pytest.approx(torch.tensor(final["val_loss"]).exp().item(), rel=1e-5)
    assert "bits/byte" in capsys.readouterr().out
    # the same documents as plain text, separated by blank lines, count alike
    text = corpus / f"{name}.txt"
    text.write_text("\n\n".join(parquet_documents(corpus / "val.parquet")) + "\n")
    assert evaluate(corpus, "--checkpoint", step, "--text", text) == 0
    from_text = json.loads((corpus / "runs" / name / "eval" / f"bpb-{name}-{step.name}.json").read_text())
    assert from_text["bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-9)


def test_val_option_reads_the_runs_own_split(corpus, trained, capsys):
    final = json.loads((corpus / "runs" / trained / "metrics.jsonl").read_text().splitlines()[-1])
    step = last_checkpoint(corpus, trained)
    assert evaluate(corpus, "--run", trained, "--checkpoint", step, "--val") == 0
    result = json.loads((corpus / "runs" / trained / "eval" / f"val-bpb-{step.name}.json").read_text())
    assert list(result["by_source"]) == ["frwiki"]  # one source: no "all" row
    assert result["by_source"]["frwiki"]["bits_per_byte"] == pytest.approx(final["val_bpb"], rel=1e-6)
    assert result["by_source"]["frwiki"]["tokens"] == final["val_tokens"]
    assert "frwiki" in capsys.readouterr().out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two sources tokenized as a mixture, packed, and a tiny run trained on them."""
    from benchmarks.synthetic_corpus import write_corpus
    from pipeline.cli import main as pipeline_main

    root = tmp_path_factory.mktemp("mixed")
    common = ["--data-dir", str(root / "data"), "--manifests", str(root / "manifests")]
    for name, seed, out in (("wiki", 41, root / "data/paragraphs"), ("other", 42, root / "data/corpora/other")):
        write_corpus(root / f"{name}.jsonl", 250_000, seed=seed)
        assert pipeline_main(["extract-paragraphs", "--input", str(root / f"{name}.jsonl"), "--out-dir", str(out),
                              "--manifests", str(root / f"manifests-{name}")]) == 0
    assert pipeline_main(["tokenize", "--plain-bpe", "--vocab-size", "384", "--val-fraction", "0.4", "--input",
                          str(root / "data/paragraphs"), "--mix", "frwiki=0.5,other=0.5", *common]) == 0
    assert pipeline_main(["pack", "--seq-len", "32,64", *common]) == 0
    train_run(root, "mix")
    return root


def test_val_option_reports_each_source_and_all(mixed):
    """Each source's figure is the one --parquet gives on that source's validation articles; "all" is
    the trainer's validation bits per byte."""
    final = json.loads((mixed / "runs/mix/metrics.jsonl").read_text().splitlines()[-1])
    step = last_checkpoint(mixed, "mix")
    assert evaluate(mixed, "--run", "mix", "--checkpoint", step, "--val") == 0
    result = json.loads((mixed / "runs/mix/eval" / f"val-bpb-{step.name}.json").read_text())["by_source"]
    assert list(result) == ["frwiki", "other", "all"]
    assert result["all"]["bits_per_byte"] == pytest.approx(final["val_bpb"], rel=1e-6)
    assert result["all"]["documents"] == result["frwiki"]["documents"] + result["other"]["documents"]
    val_split = json.loads((mixed / "manifests/tokenize.json").read_text())["tokens"]["val_split"]["by_source"]
    for name, folder in (("frwiki", "paragraphs"), ("other", "corpora/other")):
        table = pq.read_table(mixed / "data" / folder)
        keep = [i in set(val_split[name]["article_ids"]) for i in table.column("article_id").to_pylist()]
        pq.write_table(table.filter(keep), mixed / f"{name}.parquet")
        assert evaluate(mixed, "--run", "mix", "--checkpoint", step, "--parquet", mixed / f"{name}.parquet") == 0
        alone = json.loads((mixed / "runs/mix/eval" / f"bpb-{name}-{step.name}.json").read_text())
        assert result[name]["documents"] == alone["documents"] == val_split[name]["articles"]
        assert result[name]["bits_per_byte"] == pytest.approx(alone["bits_per_byte"], rel=1e-6)


def test_parquet_takes_a_paragraphs_folder(corpus, trained):
    """The validation articles as a folder of two parts count as the one file does."""
    table = pq.read_table(corpus / "val.parquet")
    ids = table.column("article_id").to_pylist()
    half = ids.index(ids[len(ids) // 2])  # parts end between articles
    (corpus / "valparts").mkdir()
    pq.write_table(table.slice(0, half), corpus / "valparts/part-00000.parquet")
    pq.write_table(table.slice(half), corpus / "valparts/part-00001.parquet")
    for path in (corpus / "val.parquet", corpus / "valparts"):
        assert evaluate(corpus, "--run", trained, "--parquet", path) == 0
    whole, parts = (json.loads((corpus / "runs" / trained / f"eval/bpb-{stem}-best.json").read_text())
                    for stem in ("val", "valparts"))
    assert parts["documents"] == whole["documents"] > 1
    assert parts["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-9)


def test_exported_folder_scores_like_its_checkpoint(corpus, trained):
    from train.export import main as export_main

    assert export_main(["--out-dir", str(corpus / "runs"), "--run", trained, "--dtype", "float32"]) == 0
    assert evaluate(corpus, "--run", trained, "--parquet", corpus / "val.parquet") == 0
    assert evaluate(corpus, "--hf", corpus / "runs" / trained / "hf", "--parquet", corpus / "val.parquet",
                    "--batch-size", "4") == 0
    frlm = json.loads((corpus / "runs" / trained / "eval/bpb-val-best.json").read_text())
    hf = json.loads((corpus / "runs" / trained / "hf/eval/bpb-val-hf.json").read_text())
    assert (hf["tokens"], hf["utf8_bytes"], hf["rows"]) == (frlm["tokens"], frlm["utf8_bytes"], frlm["rows"])
    assert hf["bits_per_byte"] == pytest.approx(frlm["bits_per_byte"], rel=1e-5)


def test_text_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Premier document.\nSa suite.\n\n  \n\nDeuxième.\n\n\n")
    assert text_documents(path) == ["Premier document.\nSa suite.", "Deuxième."]


def test_bad_input_is_one_line(corpus, trained, tmp_path, capsys):
    cases = [
        (["--run", "nothing-here", "--text", tmp_path / "none.txt"], "no such file"),
        (["--run", "nothing-here", "--parquet", corpus / "val.parquet"], "just train --run nothing-here"),
        (["--hf", tmp_path, "--parquet", corpus / "val.parquet"], "no config.json"),
        (["--run", "x"], "nothing to evaluate"),
        (["--run", "x", "--text", corpus / "val.parquet", "--parquet", corpus / "val.parquet"], "not both"),
        (["--hf", tmp_path, "--val"], "--val needs --run or --checkpoint"),
    ]
    for argv, message in cases:
        assert evaluate(corpus, *argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    (tmp_path / "latin1.txt").write_bytes("déjà".encode("latin-1"))
    assert evaluate(corpus, "--run", trained, "--text", tmp_path / "latin1.txt") == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert evaluate(corpus, "--run", trained, "--tasks", "no_such_task_anywhere") == 2
    assert "unknown task(s) no_such_task_anywhere" in capsys.readouterr().err


QUESTIONS = [("La capitale de la France est", ["Paris", "Lyon", "Berlin"], 0),
             ("La commune est située dans le", ["département", "chat", "bleu"], 0),
             ("Le fleuve qui traverse Paris est la", ["Loire", "Seine"], 1),
             ("Il est né en", ["1850", "maison", "rouge"], 0),
             ("La ville compte environ", ["habitants", "rivières"], 0),
             ("Elle est membre de la", ["communauté", "pomme"], 0)]
TASKS = """task: frlm_test_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
target_delimiter: " "
{target}
metric_list:
{metrics}
"""


def write_tasks(folder: Path) -> None:
    folder.mkdir()
    data = folder / "questions.jsonl"
    # a loglikelihood task's continuation is its target as written (no delimiter): the space is in the data
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "target": " " + c[a]}, ensure_ascii=False)
                            + "\n" for q, c, a in QUESTIONS))
    (folder / "mc.yaml").write_text(TASKS.format(
        name="mc", data=data, output_type="multiple_choice",
        target='doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"',
        metrics="  - metric: acc\n    aggregation: mean\n    higher_is_better: true"))
    (folder / "ll.yaml").write_text(TASKS.format(
        name="ll", data=data, output_type="loglikelihood", target='doc_to_target: "{{target}}"',
        metrics="  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false"))


def reference_loglikelihoods(checkpoint: Path, context: str, continuation: str) -> float:
    """What the harness must compute if it sees what training saw: <|endoftext|> + context, then
    the continuation's log-probability under frlm's own forward."""
    from tokenizers import Tokenizer

    model, found = load_model(checkpoint, torch.device("cpu"))
    tokenizer = Tokenizer.from_file(str(layout.tokenizer_file(found.config["data"]["data_dir"])))
    eot = tokenizer.token_to_id("<|endoftext|>")
    whole = [eot] + tokenizer.encode(context + continuation, add_special_tokens=False).ids
    head = [eot] + tokenizer.encode(context, add_special_tokens=False).ids
    ids = head + whole[len(head):]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0, :, :found.vocab_size], -1)
    n = len(whole) - len(head)
    return float(log_probs[-n:].gather(1, torch.tensor(ids[-n:])[:, None]).sum())


def test_lm_evaluation_harness_runs_offline_on_a_local_task(corpus, trained, tmp_path):
    write_tasks(tmp_path / "tasks")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "train.evaluation", "--out-dir", str(corpus / "runs"), "--run", trained, "--device",
            "cpu", "--tasks", "frlm_test_mc,frlm_test_ll", "--include-path", str(tmp_path / "tasks")]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "frlm_test_mc" in done.stdout and "acc,none" in done.stdout
    result = json.loads((corpus / "runs" / trained / "eval/tasks-frlm_test_mc+frlm_test_ll-best.json").read_text())
    best = corpus / "runs" / trained / "checkpoints/best"
    scores = [[reference_loglikelihoods(best, q, " " + choice) for choice in choices] for q, choices, _ in QUESTIONS]
    accuracy = sum(max(range(len(s)), key=s.__getitem__) == a for s, (_, _, a) in zip(scores, QUESTIONS)) / len(QUESTIONS)
    assert result["results"]["frlm_test_mc"]["acc,none"] == pytest.approx(accuracy)
    mean_ll = sum(s[a] for s, (_, _, a) in zip(scores, QUESTIONS)) / len(QUESTIONS)
    assert result["results"]["frlm_test_ll"]["perplexity,none"] == pytest.approx(torch.tensor(-mean_ll).exp().item(),
                                                                                  rel=1e-4)
    assert result["n-samples"]["frlm_test_mc"]["effective"] == len(QUESTIONS)
