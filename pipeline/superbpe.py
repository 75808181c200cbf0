"""SuperBPE tokenizer training with stock HF `tokenizers` (Liu et al. 2025, arXiv 2503.13423).

Stage 1 is byte-level BPE on whitespace-respecting pretokens; its first `t` merges are kept.
Stage 2 continues the same greedy BPE on pretokens that may span several words ("superwords").
Stock `tokenizers` cannot resume training from merges, so stage 2 works in a translated space:
each stage-2 pretoken is encoded with the stage-1 model, every current token id becomes one
private-use Unicode character, a stock BpeTrainer learns merges over those strings, and the learned
merges are translated back. The paper's rules are kept exactly:
  * a superword never crosses a paragraph (training reads paragraph by paragraph);
  * it never bridges ": " (words are split between a token ending in ":" and one starting with a
    space; no stage-1 token contains ": ", and every token containing a vetoed one is vetoed too);
  * it spans at most 4 words: when the trainer learns a merge that would exceed that, the merges
    before it are kept, words are split at every adjacency whose merge would exceed it, and training
    continues from there (again through the private-use translation). Splitting is exact because a
    token that bridges a split must contain both sides whole, so it would be vetoed as well.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import chain
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

STAGE1_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
STAGE2_PATTERN = r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]{2,}[\r\n/]*| +(?!\S)"
EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
MAX_WORDS = 4
SPACE = "Ġ"  # a space in ByteLevel's alphabet
PUA_PLANES = (0xF0000, 0x100000)
PUA_PLANE_SIZE = 65534


def pua(index: int) -> str:
    """The private-use character standing for token `index` during stage-2 training."""
    plane, offset = divmod(index, PUA_PLANE_SIZE)
    return chr(PUA_PLANES[plane] + offset)


PUA_TABLE = np.array([chr(PUA_PLANES[i // PUA_PLANE_SIZE] + i % PUA_PLANE_SIZE) for i in range(2 * PUA_PLANE_SIZE)],
                     dtype=object)


def pua_index(char: str) -> int:
    code = ord(char)
    return code - PUA_PLANES[0] if code < PUA_PLANES[1] else PUA_PLANE_SIZE + code - PUA_PLANES[1]


def pretokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def assemble(tokens: list[str], merges: list[tuple[str, str]], pattern: str) -> Tokenizer:
    """A byte-level BPE tokenizer: special tokens first (ids 0, 1), then `tokens` in order."""
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *tokens])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pretokenizer(pattern)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def words_in(token: str) -> int:
    """How many words a (ByteLevel) token spans: its maximal runs of non-space characters."""
    return len(token.replace(SPACE, " ").split())


@dataclass
class Stage1:
    alphabet: list[str]  # the 256 byte characters, in ByteLevel order
    merges: list[tuple[str, str]]  # every stage-1 merge, in order


def train_stage1(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Stage1:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pretokenizer(STAGE1_PATTERN)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return Stage1(alphabet=alphabet, merges=[tuple(pair) for pair in model["merges"]])


def plain_bpe(stage1: Stage1) -> Tokenizer:
    """The baseline: all stage-1 merges, whitespace-respecting pretokenization."""
    return assemble(stage1.alphabet + ["".join(m) for m in stage1.merges], stage1.merges, STAGE1_PATTERN)


class Stage2Vocabulary:
    """Tokens known so far (ByteLevel strings, index = private-use index) and their word counts."""

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def add(self, token: str) -> int:
        self.index[token] = len(self.tokens)
        self.tokens.append(token)
        return self.index[token]

    def decode(self, private: str) -> str:
        """ByteLevel string of a stage-2 training string (private-use characters)."""
        return "".join(self.tokens[pua_index(c)] for c in private)

    def flags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per token: word count, starts with a space, ends with a space, ends with ':'."""
        words = np.array([words_in(t) for t in self.tokens], dtype=np.int32)
        starts = np.array([t.startswith(SPACE) for t in self.tokens])
        ends = np.array([t.endswith(SPACE) for t in self.tokens])
        colon = np.array([t.endswith(":") for t in self.tokens])
        return words, starts, ends, colon


def split_points(ids: np.ndarray, flags: tuple[np.ndarray, ...]) -> np.ndarray:
    """Positions i (cut between ids[i-1] and ids[i]) where a merge would break a SuperBPE rule."""
    words, starts, ends, colon = flags
    left, right = ids[:-1], ids[1:]
    joined_words = words[left] + words[right] - ((~ends[left]) & (~starts[right]) & (words[left] > 0) & (words[right] > 0))
    bad = (joined_words > MAX_WORDS) | (colon[left] & starts[right])
    return np.flatnonzero(bad) + 1


def cut_words(ids: np.ndarray, lengths: np.ndarray, counts: np.ndarray, flags: tuple[np.ndarray, ...],
              into: Counter) -> None:
    """Add to `into` the pieces of words given as one flat id array: every word is cut where a merge
    would break a rule, and each piece is written as private-use characters, counted `counts` times."""
    if ids.size == 0:
        return
    word_starts = np.cumsum(lengths) - lengths
    cuts = np.union1d(word_starts, split_points(ids, flags))
    cuts = np.union1d(cuts[(cuts > 0) & (cuts < ids.size)], [0])
    ends = np.r_[cuts[1:], ids.size]
    piece_counts = counts[np.searchsorted(word_starts, cuts, side="right") - 1]
    text = "".join(PUA_TABLE[ids])
    for a, b, count in zip(cuts.tolist(), ends.tolist(), piece_counts.tolist()):
        into[text[a:b]] += count


def stage2_words(texts: Iterable[str], stage1: Stage1, transition: int, batch: int = 4096) -> tuple[Counter, Stage2Vocabulary]:
    """Count stage-2 pretokens, each segmented by the first `transition` stage-1 merges and
    written as private-use characters (one per token), already split where the rules forbid merges."""
    merges = stage1.merges[:transition]
    vocabulary = Stage2Vocabulary(stage1.alphabet + ["".join(m) for m in merges])
    encoder = assemble(vocabulary.tokens, merges, STAGE2_PATTERN)
    flags = vocabulary.flags()
    offset = len(SPECIAL_TOKENS)
    counts: Counter = Counter()
    chunk: list[str] = []

    def flush() -> None:
        encodings = encoder.encode_batch(chunk, add_special_tokens=False)
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64) - offset
        word_ids = np.fromiter(chain.from_iterable(e.word_ids for e in encodings), dtype=np.int64)
        sequence_lengths = np.array([len(e.ids) for e in encodings])
        # A new word starts where the pretoken index changes or a new paragraph begins.
        new_word = np.r_[True, word_ids[1:] != word_ids[:-1]]
        new_word[np.cumsum(sequence_lengths)[:-1]] = True
        starts = np.flatnonzero(new_word)
        lengths = np.diff(np.r_[starts, ids.size])
        cut_words(ids, lengths, np.ones(starts.size, dtype=np.int64), flags, counts)
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()
    return counts, vocabulary


def counted_text(counts: Counter, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Feed word counts to a stock trainer: words repeated `count` times, space separated, in chunks."""
    parts, size = [], 0
    for word, count in counts.items():
        while count:
            n = min(count, max(1, chunk_chars // (len(word) + 1)))
            parts.append((word + " ") * n)
            size += n * (len(word) + 1)
            count -= n
            if size >= chunk_chars:
                yield "".join(parts)
                parts, size = [], 0
    if parts:
        yield "".join(parts)


def train_stage2(counts: Counter, vocabulary: Stage2Vocabulary, n_merges: int,
                 show_progress: bool = False) -> list[tuple[str, str]]:
    """Learn `n_merges` stage-2 merges (ByteLevel pairs), keeping the SuperBPE rules exactly."""
    learned: list[tuple[str, str]] = []
    while len(learned) < n_merges and counts:
        alphabet = [pua(i) for i in range(len(vocabulary.tokens))]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n_merges - len(learned), initial_alphabet=alphabet,
                                      show_progress=show_progress, min_frequency=2)
        tokenizer.train_from_iterator(counted_text(counts), trainer)
        round_merges = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
        if not round_merges:
            break
        accepted = 0
        for left, right in round_merges:
            pair = (vocabulary.decode(left), vocabulary.decode(right))
            if words_in(pair[0] + pair[1]) > MAX_WORDS:
                break
            learned.append(pair)
            accepted += 1
        if accepted == len(round_merges):
            break
        # A merge broke the word limit: keep the ones before it, resegment and split, train on.
        counts = resegment(counts, round_merges[:accepted], vocabulary)
    return learned


def resegment(counts: Counter, merges: list[tuple[str, str]], vocabulary: Stage2Vocabulary) -> Counter:
    """Apply this round's accepted merges to every word, give the new tokens private-use characters,
    and split words where a further merge would break a rule."""
    round_vocab = {pua(i): i for i in range(len(vocabulary.tokens))}
    round_to_global = list(range(len(vocabulary.tokens)))
    for left, right in merges:
        if left + right in round_vocab:
            continue
        token = vocabulary.decode(left + right)
        round_vocab[left + right] = len(round_vocab)
        round_to_global.append(vocabulary.index[token] if token in vocabulary.index else vocabulary.add(token))
    encoder = Tokenizer(models.BPE(vocab=round_vocab, merges=merges))
    to_global = np.array(round_to_global, dtype=np.int64)
    flags = vocabulary.flags()
    words = list(counts)
    resegmented: Counter = Counter()
    for start in range(0, len(words), 200_000):
        batch = words[start:start + 200_000]
        encodings = encoder.encode_batch(batch, add_special_tokens=False)
        ids = to_global[np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64)]
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        cut_words(ids, lengths, np.array([counts[w] for w in batch], dtype=np.int64), flags, resegmented)
    return resegmented


def train_superbpe(texts: list[str], vocab_size: int, transition: int, show_progress: bool = False) -> Tokenizer:
    """The SuperBPE tokenizer: `transition` stage-1 merges, then stage-2 merges up to `vocab_size`."""
    stage1 = train_stage1(texts, vocab_size, show_progress)
    return superbpe_from_stage1(texts, stage1, vocab_size, transition, show_progress)


def superbpe_from_stage1(texts: list[str], stage1: Stage1, vocab_size: int, transition: int,
                         show_progress: bool = False) -> Tokenizer:
    transition = min(transition, len(stage1.merges))
    counts, vocabulary = stage2_words(texts, stage1, transition)
    n_stage2 = vocab_size - len(SPECIAL_TOKENS) - len(stage1.alphabet) - transition
    stage2 = train_stage2(counts, vocabulary, n_stage2, show_progress)
    merges = stage1.merges[:transition] + stage2
    tokens = stage1.alphabet + ["".join(m) for m in merges]
    return assemble(tokens, merges, STAGE2_PATTERN)
