from __future__ import annotations

import json
import math

import pytest
import torch

from train import checkpoint
from train.config import load
from train.model import KVCache, Transformer
from train.precision import Precision
from train.sample import Decoder, SampleError, SampleSettings, choose, decode_logits, main, next_tokens, repeated_4gram_rate

GREEDY = SampleSettings(max_new_tokens=30, temperature=0)


def tiny_config(preset="configs/tiny.toml", **precision_map):
    config = load(preset)
    config.model.d_model, config.model.n_layers, config.model.n_heads, config.model.n_kv_heads = 64, 2, 4, 2
    config.model.ffn_dim = 128
    config.precision.map.update(precision_map)
    return config


def tiny_model(preset="configs/tiny.toml", vocab_size=500, **precision_map):
    config = tiny_config(preset, **precision_map)
    torch.manual_seed(0)
    model = Transformer(config.model, vocab_size, Precision(config.precision, torch.device("cpu"),
                                                            torch_modules_only=True), 64)
    return model.eval()


@torch.no_grad()
def greedy_uncached(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    """The reference: every step reruns the whole sequence, no cache."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_matches_the_uncached_full_forward():
    model = tiny_model()
    batch = Decoder(model, 1).generate([[0, 5, 17, 42]], GREEDY)
    assert batch.tokens[0] == greedy_uncached(model, [0, 5, 17, 42], 30)


def test_a_batch_of_prompts_of_different_lengths_matches_each_prompt_alone():
    model = tiny_model()
    prompts = [[0, 7], [0, 5, 17, 42, 8, 300, 2, 9, 11], [3]]
    decoder = Decoder(model, 4, max_len=48)  # one dummy row, a cache shorter than the context
    batch = decoder.generate(prompts, GREEDY)
    assert batch.tokens == [greedy_uncached(model, prompt, 30) for prompt in prompts]
    again = decoder.generate(prompts[::-1], GREEDY)  # the cache is reused, stale slots and all
    assert again.tokens == batch.tokens[::-1]


@pytest.mark.parametrize("read_every", [1, 4, 7])
def test_each_row_stops_at_its_own_end_of_text(read_every):
    """Whatever the window the host reads the ids in (a GPU's is 16, each read one window late),
    each row is cut at its own end-of-text and streamed whole."""
    model = tiny_model()
    prompts = [[0, 7], [0, 5, 17, 42]]
    full = [greedy_uncached(model, prompt, 30) for prompt in prompts]
    eot = full[0][3]
    decoder, streamed = Decoder(model, 2), []
    decoder.read_every = read_every
    batch = decoder.generate(prompts, GREEDY, eot_id=eot, on_tokens=lambda rows: streamed.append([*map(len, rows)]))
    assert streamed[-1] == [*map(len, batch.tokens)] and streamed == sorted(streamed)
    expected = [row[:row.index(eot)] if eot in row else row for row in full]
    assert batch.tokens == expected and len(expected[0]) == full[0].index(eot)
    assert [len(e) for e in batch.entropies] == [len(row) + (eot in f) for row, f in zip(expected, full)]


def test_kv_cache_logits_match_step_by_step_at_each_rows_position():
    model = tiny_model()
    ids = torch.randint(0, 500, (2, 20))
    reference = model(ids)
    cache = KVCache(2, 2, 2, 16, 24, "cpu", torch.float32)
    prefill = model(ids[:, :12], cache=cache)
    steps = [model(ids[:, i:i + 1], cache=cache, positions=torch.full((2, 1), i)) for i in range(12, 20)]
    assert torch.allclose(torch.cat([prefill, *steps], dim=1), reference, atol=1e-5)
    # the rows need not stand at the same position: row 1 goes back to redo its position 15
    again = model(torch.stack([ids[0, 19:20], ids[1, 15:16]]), cache=cache, positions=torch.tensor([[19], [15]]))
    assert torch.allclose(again[:, 0], torch.stack([reference[0, 19], reference[1, 15]]), atol=1e-5)


def test_the_decode_forward_traces_as_one_graph():
    """What the GPU compiles before capturing the step as a CUDA graph, traced here on the CPU: no
    graph break, same logits."""
    model = tiny_model()
    cache = KVCache(2, 2, 2, 16, 16, "cpu", torch.float32)
    model(torch.tensor([[0, 5, 17], [0, 9, 9]]), cache=cache)
    arguments = (model, cache, torch.tensor([[4], [6]]), torch.tensor([3, 3]))
    eager = decode_logits(*arguments)
    traced = torch.compile(decode_logits, backend="eager", fullgraph=True, dynamic=False)(*arguments)
    assert torch.equal(eager, traced)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_cuda_graph_generates_what_the_eager_steps_generate(temperature):
    """The captured step replays the eager step: same tokens from the same seed, rows of different
    prompt lengths, a second call replaying the graph captured by the first. (Inductor's forward
    may round differently from the eager one; that it traces whole is tested above.)"""
    model = tiny_model().cuda()
    prompts = [[0, 5, 17, 3], [0, 9], [0, 1, 2, 3, 4, 5]]
    settings = SampleSettings(max_new_tokens=12, temperature=temperature, top_k=40, top_p=0.9, seed=3)
    eager, graphed = Decoder(model, 4, 32, compile=False), Decoder(model, 4, 32, compile=True)
    graphed.forward, graphed.next_tokens = decode_logits, next_tokens  # eager in the graph: bit for bit
    for _ in range(2):
        assert graphed.generate(prompts, settings).tokens == eager.generate(prompts, settings).tokens
    assert len(graphed.graphs) == 1


def test_compile_on_the_cpu_is_one_error():
    with pytest.raises(SampleError, match="needs a GPU"):
        Decoder(tiny_model(), 1, 16, compile=True)


@pytest.mark.parametrize("factorized", [False, True])
def test_projections_cast_once_compute_what_autocast_computed(factorized):
    """What the GPU does at load, checked with the CPU's BF16 autocast: same logits, bit for bit."""
    from train.sample import cast_projections

    model = tiny_model("configs/yxanul-197m.toml" if factorized else "configs/tiny.toml")
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(ids)
        cast_projections(model, torch.bfloat16)
        assert torch.equal(model(ids), reference)
    assert model.blocks[0].ffn.down.weight.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.float32


def test_split_q_structure_loads_without_transformer_engine():
    model = tiny_model("configs/small-q-bf16.toml", q="bf16")
    assert hasattr(model.blocks[0].attn, "q") and not hasattr(model.blocks[0].attn, "qkv")


def draws(logits: torch.Tensor, n: int, **settings) -> torch.Tensor:
    noise = torch.empty(n, logits.numel()).exponential_(generator=torch.Generator().manual_seed(0))
    options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **settings}
    return choose(logits.expand(n, -1), noise, **options)


def test_top_k_top_p_and_the_draw_on_the_device():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits, -1)  # p0 ~ 0.71, p0 + p1 ~ 0.97
    assert set(draws(logits, 300, top_k=2).tolist()) == {0, 1}
    assert set(draws(logits, 300, top_p=0.9).tolist()) == {0, 1} and probs[0] < 0.9
    assert set(draws(logits, 300, top_p=0.5).tolist()) == {0}
    frequencies = torch.bincount(draws(logits, 20000), minlength=5) / 20000
    assert torch.allclose(frequencies, probs, atol=0.015)  # argmax(p / Exp(1)) draws from p
    assert choose(logits[None], None, 0, 0, 1.0).tolist() == [0]


def test_ids_of_the_vocabulary_padding_are_never_chosen():
    model = tiny_model()  # 500 ids, padded to 512 rows
    with torch.no_grad():
        model.lm_head.weight[500:] = 1.0  # the padding rows would win every argmax
    assert max(Decoder(model, 1).generate([[0, 1]], GREEDY).tokens[0]) >= 500
    assert max(Decoder(model, 1, vocab_size=500).generate([[0, 1]], GREEDY).tokens[0]) < 500


def test_same_seed_same_sample():
    model = tiny_model()
    settings = SampleSettings(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)
    decoder = Decoder(model, 2)
    first = decoder.generate([[0, 1], [0, 2]], settings).tokens
    assert decoder.generate([[0, 1], [0, 2]], settings).tokens == first
    assert decoder.generate([[0, 1], [0, 2]], SampleSettings(20, 1.0, 0, 0.9, seed=4)).tokens != first


def test_degeneration_signals():
    assert repeated_4gram_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repeated_4gram_rate(list(range(10))) == 0
    batch = Decoder(tiny_model(), 1).generate([[0]], SampleSettings(max_new_tokens=5, temperature=0))
    assert len(batch.entropies[0]) == 5 and all(0 <= e <= math.log(512) + 1e-4 for e in batch.entropies[0])


@pytest.mark.parametrize("settings, message", [
    (SampleSettings(max_new_tokens=-5), "--max-new-tokens must be at least 1"),
    (SampleSettings(temperature=-0.5), "--temperature must be 0"),
    (SampleSettings(top_p=0), "--top-p must be above 0"),
    (SampleSettings(top_p=1.5), "--top-p must be above 0 and at most 1"),
    (SampleSettings(top_k=-3), "--top-k must be 0"),
])
def test_settings_without_meaning_are_refused(settings, message):
    with pytest.raises(SampleError, match=message):
        settings.check()


# `just sample` end to end: a tiny checkpoint and the tokenizer it names.

TEXT = ("La ville de Lyon est une commune française située au confluent du Rhône et de la Saône. "
        "Le château de Versailles est un château et un monument historique français. ") * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    from pipeline.manifest import sha256_file

    root = tmp_path_factory.mktemp("sample")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(root / "tokenizer.json"))
    config = tiny_config()
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    model = Transformer(config.model, vocab, Precision(config.precision, torch.device("cpu")), 256)
    meta = {"vocab_size": vocab, "tokenizer_sha256": sha256_file(root / "tokenizer.json"), "config": config.to_dict()}
    checkpoint.save(root / "checkpoints", 1, model.state_dict(), meta, {}, 1, is_best=True)
    return root


def sample(trained, capsys, *argv) -> tuple[int, str, str]:
    code = main(["--checkpoint", str(trained / "checkpoints" / "best"), "--tokenizer", str(trained / "tokenizer.json"),
                 "--device", "cpu", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith("error: sample: ") and message in err, err


def test_a_prompt_streams_then_reports(trained, capsys):
    code, out, err = sample(trained, capsys, "--prompt", "La ville de", "--max-new-tokens", 12, "--temperature", 0)
    text, report = out.rstrip("\n").rsplit("\n", 1)
    assert code == 0 and text.startswith("La ville de") and err == ""
    assert json.loads(report)["tokens"] <= 12 and "compile_s" not in report


def test_prompts_in_batches_equal_each_prompt_alone(trained, tmp_path, capsys):
    prompts = ["La ville de", "Le château de Versailles est", "", "Lyon"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    code, out, _ = sample(trained, capsys, "--prompts", tmp_path / "prompts.txt", "--batch-size", 2,
                          "--max-new-tokens", 10, "--temperature", 0)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [line["prompt"] for line in lines[:-1]] == ["La ville de", "Le château de Versailles est",
                                                                     "Lyon"]
    assert lines[-1]["prompts"] == 3 and lines[-1]["batch_size"] == 2
    for line in lines[:-1]:
        code, alone, _ = sample(trained, capsys, "--prompt", line["prompt"], "--max-new-tokens", 10,
                                "--temperature", 0)
        assert alone.rsplit("\n", 2)[0] == line["prompt"] + line["text"]


def test_a_prompt_longer_than_the_context_is_refused_before_anything_is_echoed(trained, capsys):
    assert_one_line_error(*sample(trained, capsys, "--prompt", "Lyon " * 600), "the model's context is 256")


def test_new_tokens_beyond_the_context_are_capped_saying_so(trained, capsys):
    code, out, err = sample(trained, capsys, "--prompt", "Lyon", "--max-new-tokens", 5000, "--temperature", 0,
                            "--top-k", 1)
    assert code == 0 and "--max-new-tokens 5000 capped at" in err and "256-token context" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
    (["--temperature", "-1"], "--temperature must be 0"),
    (["--top-p", "0"], "--top-p must be above 0"),
    (["--top-p", "1.5"], "--top-p must be above 0"),
    (["--top-k", "-3"], "--top-k must be 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "gpu0"], "--device gpu0: expected cpu, cuda or cuda:N"),
])
def test_bad_options_are_one_line_errors(trained, capsys, argv, message):
    assert_one_line_error(*sample(trained, capsys, *argv), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(trained, capsys):
    assert_one_line_error(*sample(trained, capsys, "--device", "cuda"), "no CUDA GPU is available here")


def test_a_truncated_checkpoint_is_a_one_line_error(trained, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "best"
    shutil.copytree(trained / "checkpoints" / "best", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, out, err = main(["--checkpoint", str(damaged), "--tokenizer", str(trained / "tokenizer.json"),
                           "--device", "cpu"]), *capsys.readouterr()
    assert_one_line_error(code, out, err, "model.safetensors cannot be read")


def test_weights_that_do_not_fit_their_config_are_a_one_line_error(trained, tmp_path, capsys):
    config = tiny_config()
    meta = {"vocab_size": 300, "tokenizer_sha256": "ab" * 32, "config": config.to_dict()}
    config.model.n_layers = 3  # the weights of a deeper model than the config says
    model = Transformer(config.model, 300, Precision(config.precision, torch.device("cpu")), 256)
    checkpoint.save(tmp_path, 1, model.state_dict(), meta, {}, 1, is_best=True)
    code, out, err = main(["--checkpoint", str(tmp_path / "best"), "--device", "cpu"]), *capsys.readouterr()
    assert_one_line_error(code, out, err, "the weights do not fit the model of their config")


def test_bench_sample_prints_a_row_per_batch_size(capsys):
    from benchmarks import bench_sample

    assert bench_sample.main(["--config", "configs/tiny.toml", "--vocab-size", "300", "--prompt-tokens", "3",
                              "--new-tokens", "4", "--devices", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| CPU, FP32 | eager | 1 |" in out and "| CPU, FP32 | eager | 64 |" in out


def test_the_runs_tokenizer_is_found_from_another_directory(trained, tmp_path, monkeypatch, capsys):
    """A run trained with relative data_dir and out_dir is sampled from elsewhere without --tokenizer."""
    import shutil

    from pipeline import layout

    root = tmp_path / "project"
    tokenizer = layout.tokenizer_file(root / "mydata")
    tokenizer.parent.mkdir(parents=True)
    shutil.copyfile(trained / "tokenizer.json", tokenizer)
    found = checkpoint.load(trained / "checkpoints" / "best")
    config = {**found.config, "data": {**found.config["data"], "data_dir": "mydata"},
              "run": {**found.config["run"], "out_dir": "out/runs"}}
    meta = {"vocab_size": found.vocab_size, "tokenizer_sha256": found.tokenizer_sha256, "config": config}
    checkpoint.save(root / "out/runs/r/checkpoints", 1, found.weights, meta, {}, 1, is_best=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(["--checkpoint", str(root / "out/runs/r/checkpoints/best"), "--device", "cpu", "--prompt", "a",
                 "--max-new-tokens", "3"])
    assert code == 0, capsys.readouterr().err



def test_prompts_are_prefilled_in_a_few_shapes_and_the_warm_up_takes_theirs():
    """The first prefill of a shape is slow on a GPU, so lengths round up to a multiple of 32 (within
    the cache) and the warm-up prefills at the prompts' own length."""
    model = tiny_model()
    decoder = Decoder(model, 2, max_len=48)
    assert [decoder.prefill_width(n) for n in (1, 32, 33, 47)] == [32, 32, 48, 48]
    shapes, hidden = [], model.hidden
    model.hidden = lambda ids, *args, **kwargs: shapes.append(tuple(ids.shape)) or hidden(ids, *args, **kwargs)
    decoder.warm_up(GREEDY, 40)
    decoder.generate([[0, 7], [0, 5, 17, 42]], GREEDY)
    assert [shape for shape in shapes if shape[1] > 1] == [(2, 48), (2, 32)]  # the decode steps are (2, 1)
