"""SuperBPE training is checked against an independent pure-Python replay of greedy BPE, and its
merges on a fixed corpus are pinned to those of the first implementation (the stock trainer fed
every training text), so memory and speed work on the trainer cannot change what it learns."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pipeline import superbpe as sb

PHRASES = ["est une commune française située dans le département", "au cours de la", "la ville de",
           "Population : 1 200 habitants", "Climat : tempéré", "il y a", "dans le nord de la France"]
WORDS = ["maison", "rivière", "château", "église", "village", "marché", "pont", "forêt", "l'homme", "aujourd'hui"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(PHRASES) if rng.random() < 0.5 else rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
            + rng.choice([".", " !", "", " : fin."]) for _ in range(n)]


SUBJECTS = ["la commune", "le village", "la rivière", "l'église Saint-Martin", "le château fort", "la gare",
            "le pont de pierre", "la forêt domaniale", "le marché couvert", "l'école primaire", "la mairie"]
VERBS = ["est située", "a été construite", "se trouve", "fut détruite", "est traversée", "a été rénovée",
         "est classée", "compte", "accueille", "borde"]
COMPLEMENTS = ["dans le département de l'Aisne", "au bord de la Loire", "près de Lyon", "en Bretagne",
               "au XIIᵉ siècle", "depuis 1850", "au nord de la ville", "entre les deux guerres",
               "sur la rive gauche", "au cœur du bourg", "à l'est de Paris", "dans la vallée"]
EXTRAS = ["Population : {} habitants.", "Altitude : {} m.", "Superficie : {} km².", "Code postal : {}.",
          "Voir aussi : {}.", "Il y a {} ans, elle comptait {} habitants !", "« Citation n° {} » — fin…"]


def pinned_corpus(n: int = 3000, seed: int = 7) -> list[str]:
    """Paragraphs of French-like sentences: frequent phrases (superword material), colons, digits,
    accents and rarer words, from a seeded generator whose output is stable across Python versions."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.25:
                sentences.append(rng.choice(EXTRAS).format(rng.randint(1, 99999), rng.randint(1, 999)))
            else:
                sentences.append(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(COMPLEMENTS)}"
                                 + rng.choice([".", ",", " et", " ;"]))
        texts.append(" ".join(sentences))
    return texts


def merges_sha256(tokenizer: Tokenizer) -> str:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return hashlib.sha256(json.dumps(merges, ensure_ascii=False).encode()).hexdigest()


# sha256 of the merges list, computed with the stock-trainer implementation before any change to it.
PINNED = {"plain": "a4d5ce2a98dfce4fdf49996e4bd27277851e9312887e2175f502bbb9638c156f",
          "superbpe t=300": "5a448372785679913d5a19f08d1f85c9162a7428c3203069b4654a3224581fef",
          "superbpe t=600": "f2b7659708a67c9d3203bb45db468a931405f2fb1e3bc6780ce0a7f95340fd3e"}


def test_merges_are_pinned_on_a_fixed_corpus():
    texts = pinned_corpus()
    stage1 = sb.train_stage1(texts, 1200)
    assert merges_sha256(sb.plain_bpe(stage1)) == PINNED["plain"]
    for transition in (300, 600):  # both restart stage 2 several times at the 4-word limit
        tokenizer = sb.superbpe_from_stage1(texts, stage1, 1200, transition)
        assert tokenizer.get_vocab_size() == 1200
        assert merges_sha256(tokenizer) == PINNED[f"superbpe t={transition}"]


def stock_merges(words: sb.Words, n_alphabet: int, vocab_size: int) -> list[tuple[int, int]]:
    """The stock trainer on the same counted words: each id is one private-use character, each word
    fed `count` times, as stage 2 was trained before it had its own trainer."""
    def char(i: int) -> str:
        return chr(0xF0000 + i)

    starts = np.cumsum(words.lengths) - words.lengths
    text = [("".join(map(char, words.ids[a:a + n].tolist())) + " ") * int(c)
            for a, n, c in zip(starts, words.lengths, words.counts)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=[char(i) for i in range(n_alphabet)],
                                  show_progress=False, min_frequency=2)
    tokenizer.train_from_iterator(text, trainer)
    spelled = {char(i): i for i in range(n_alphabet)}
    merges = []
    for left, right in json.loads(tokenizer.to_str())["model"]["merges"]:
        merges.append((spelled[left], spelled[right]))
        spelled[left + right] = len(spelled)
    return merges


def greedy_merges(words: sb.Words, n_alphabet: int, vocab_size: int) -> list[tuple[int, int]]:
    return list(sb.GreedyBpe(words, n_alphabet).merges(vocab_size))


def random_words(rng: random.Random, n_alphabet: int) -> sb.Words:
    words = [[rng.randrange(n_alphabet) for _ in range(rng.randint(2, 14))] for _ in range(rng.randint(1, 60))]
    return sb.Words(np.array([i for word in words for i in word], dtype=np.int32),
                    np.array([len(word) for word in words], dtype=np.int64),
                    np.array([rng.randint(1, 5) for _ in words], dtype=np.int64))


@pytest.mark.parametrize("seed", range(0, 400, 50))
def test_greedy_bpe_learns_the_stock_trainers_merges(seed):
    # Tiny alphabets make runs ("a a a a"), ties and pairs that fall below two occurrences common.
    for case in range(seed, seed + 50):
        rng = random.Random(case)
        n_alphabet = rng.randint(1, 6)
        words = random_words(rng, n_alphabet)
        vocab_size = n_alphabet + rng.randint(1, 80)
        assert greedy_merges(words, n_alphabet, vocab_size) == stock_merges(words, n_alphabet, vocab_size), case


def test_greedy_bpe_learns_the_stock_trainers_merges_on_stage2_words():
    texts = pinned_corpus()
    stage1 = sb.train_stage1(texts, 1200)
    words, vocabulary = sb.stage2_words(texts, stage1, 300)
    n_alphabet = len(vocabulary.tokens)
    merges = greedy_merges(words, n_alphabet, n_alphabet + 2000)
    assert len(merges) > 1000  # until no pair is seen twice
    assert merges == stock_merges(words, n_alphabet, n_alphabet + 2000)


def test_greedy_bpe_stops_before_the_merge_it_yielded_last():
    words = sb.Words(np.array([0, 1, 2, 0, 1, 2], dtype=np.int32), np.array([3, 3]), np.array([1, 1]))
    trainer = sb.GreedyBpe(words, 3)
    for a, b in trainer.merges(10):
        assert (a, b) == (0, 1)
        break
    ids, lengths = trainer.words(np.arange(3, dtype=np.int32))
    assert ids.tolist() == [0, 1, 2, 0, 1, 2] and lengths.tolist() == [3, 3]
    trainer = sb.GreedyBpe(words, 3)
    assert list(trainer.merges(4)) == [(0, 1)]
    ids, lengths = trainer.words(np.array([0, 1, 2, 7], dtype=np.int32))
    assert ids.tolist() == [7, 2, 7, 2] and lengths.tolist() == [2, 2]


def bpe_apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Reference BPE: repeatedly merge the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, 1 << 60), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 60:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def allowed(left: str, right: str) -> bool:
    token = left + right
    return sb.words_in(token) <= sb.MAX_WORDS and ":Ġ" not in token


def test_stage2_merges_are_greedy_under_the_rules():
    texts = corpus()
    stage1 = sb.train_stage1(texts, 420)
    transition = 100
    counts, vocabulary = sb.stage2_words(texts, stage1, transition)
    merges = sb.train_stage2(counts, vocabulary, 120)
    assert len(merges) > 60

    # Independent reference: STAGE2 pretokens, stage-1 merges applied in Python, greedy replay.
    pre = Tokenizer.from_str(sb.assemble(stage1.alphabet, [], sb.STAGE2_PATTERN).to_str()).pre_tokenizer
    ranks = {pair: i for i, pair in enumerate(stage1.merges[:transition])}
    words: Counter = Counter()
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            words[tuple(bpe_apply(list(piece), ranks))] += 1
    vetoed_somewhere = False
    for left, right in merges:
        assert allowed(left, right), (left, right)
        pair_counts: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        best = max((c for p, c in pair_counts.items() if allowed(*p)), default=0)
        vetoed_somewhere |= any(c > best for p, c in pair_counts.items() if not allowed(*p))
        assert pair_counts[(left, right)] == best, (left, right, pair_counts[(left, right)], best)
        merged: Counter = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (left, right):
                    out.append(left + right)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    assert vetoed_somewhere  # the corpus really exercised the rules


def test_final_tokenizer_round_trips_and_keeps_every_byte():
    texts = corpus(200, seed=1)
    tokenizer = sb.train_superbpe(texts, 400, 120)
    assert tokenizer.token_to_id(sb.EOT) == 0 and tokenizer.token_to_id(sb.PAD) == 1
    for text in texts[:50] + ["emoji 🦜 et 中文, l'homme: 12345\tfin", "ligne\nsuivante"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == text
    vocab = tokenizer.get_vocab()
    assert all(sb.words_in(t) <= 4 and ":Ġ" not in t and (len(t) == 1 or "Ċ" not in t) for t in vocab)
    assert any(sb.words_in(t) >= 2 for t in vocab)  # superwords exist
    l_homme = tokenizer.pre_tokenizer.pre_tokenize_str("l'homme")
    assert [piece for piece, _ in l_homme] == ["l'homme"]  # stage 2 may merge across the apostrophe
    stage1 = sb.plain_bpe(sb.train_stage1(texts, 400)).pre_tokenizer.pre_tokenize_str("l'homme est")
    assert [piece for piece, _ in stage1] == ["l", "'homme", "Ġest"]


def test_pretokenizers_follow_the_paper():
    text = "de la ville, en 2024 !! puis   fin"
    stage1 = [p for p, _ in sb.pretokenizer(sb.STAGE1_PATTERN).pre_tokenize_str(text)]
    stage2 = [p for p, _ in sb.pretokenizer(sb.STAGE2_PATTERN).pre_tokenize_str(text)]
    assert stage1 == ["de", "Ġla", "Ġville", ",", "Ġen", "Ġ", "202", "4", "Ġ!!", "Ġpuis", "ĠĠ", "Ġfin"]
    # stage 2 isolates only digit groups, runs of 2+ punctuation and runs of spaces
    assert stage2 == ["deĠlaĠville,ĠenĠ", "202", "4", "Ġ!!", "Ġpuis", "ĠĠ", "Ġfin"]


@pytest.fixture
def small_parquet(workdir):
    """A corpus far too small for a large vocabulary: 300 short paragraphs in 30 articles."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus(300, seed=4)
    pq.write_table(pa.table({"article_id": [i // 10 for i in range(len(texts))], "text": texts}), workdir / "p.parquet")
    return workdir / "p.parquet"


@pytest.mark.parametrize("plain", [False, True])
def test_a_vocabulary_the_corpus_cannot_fill_is_said_and_recorded(small_parquet, workdir, capsys, plain):
    from tests.conftest import run_stage

    extra = ["--plain-bpe"] if plain else []
    assert run_stage("tokenize", "--input", small_parquet, "--vocab-size", "5000", "--val-min-articles", "1",
                     "--workers", "1", *extra) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "fewer than --vocab-size 5,000" in line]
    tokens = json.loads((workdir / "manifests/tokenize.json").read_text())["tokens"]
    tokenizer = Tokenizer.from_file(str(workdir / "data/tokenizer/tokenizer.json"))
    assert tokens["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True) < 5000
    assert tokens["requested_vocab_size"] == 5000
    assert len(said) == 1 and f"yields {tokens['vocab_size']:,} tokens" in said[0]
    assert sorted(tokenizer.get_vocab().values()) == list(range(tokens["vocab_size"]))  # ids without holes


def test_strict_vocab_makes_the_shortfall_an_error(small_parquet, workdir, capsys):
    from tests.conftest import run_stage

    assert run_stage("tokenize", "--input", small_parquet, "--vocab-size", "5000", "--val-min-articles", "1",
                     "--workers", "1", "--strict-vocab") == 2
    err = capsys.readouterr().err  # the progress bars, then the error's one line
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "fewer than --vocab-size 5,000" in last and "--strict-vocab" in last
    assert not (workdir / "manifests/tokenize.json").exists()
    assert [p for p in (workdir / "data").rglob("*") if p.is_file() and p.name != ".lock"] == []


def test_a_vocabulary_the_corpus_fills_says_nothing(small_parquet, workdir, capsys):
    from tests.conftest import run_stage

    assert run_stage("tokenize", "--input", small_parquet, "--vocab-size", "300", "--transition", "20",
                     "--val-min-articles", "1", "--workers", "1", "--strict-vocab") == 0
    assert "fewer than --vocab-size" not in capsys.readouterr().out
    tokens = json.loads((workdir / "manifests/tokenize.json").read_text())["tokens"]
    assert tokens["vocab_size"] == tokens["requested_vocab_size"] == 300


def counted(words: sb.Words) -> Counter:
    pieces = np.split(words.ids, np.cumsum(words.lengths)[:-1]) if words.lengths.size else []
    return Counter({tuple(piece.tolist()): int(count) for piece, count in zip(pieces, words.counts)})


def test_empty_paragraphs_are_counted_as_nothing():
    texts = corpus(50, seed=2)
    stage1 = sb.train_stage1(texts, 400)
    words, _ = sb.stage2_words(texts, stage1, 100)
    with_empty, _ = sb.stage2_words(["", *texts[:25], "", "", *texts[25:], ""], stage1, 100, batch=7)
    assert counted(with_empty) == counted(words) and sum(counted(words).values()) > 50
