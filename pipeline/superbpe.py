"""SuperBPE tokenizer training (Liu et al. 2025, arXiv 2503.13423).

Stage 1 is byte-level BPE on whitespace-respecting pretokens, trained by the stock HF `tokenizers`
trainer; its first `t` merges are kept. Stage 2 continues the same greedy BPE on pretokens that may
span several words ("superwords"): each stage-2 pretoken is segmented by the `t` stage-1 merges and
counted, and greedy merges are learned over those counted words. The paper's rules are kept exactly:
  * a superword never crosses a paragraph (training reads paragraph by paragraph);
  * it never bridges ": " (words are split between a token ending in ":" and one starting with a
    space; no stage-1 token contains ": ", and every token containing a vetoed one is vetoed too);
  * it spans at most 4 words: when the trainer would learn a merge that exceeds that, the merges
    before it are kept, words are split at every adjacency whose merge would exceed it, and training
    restarts from there. Splitting is exact because a token that bridges a split must contain both
    sides whole, so it would be vetoed as well.

Memory. Stage-2 pretokens are sentence fragments, nearly all distinct, so stage 2 holds every symbol
of the training text. The stock trainer, which an earlier version drove through a private-use
character per token, spent about 160 bytes per symbol (a 32-byte linked-list cell, hash sets of word
indices per pair) and its allocator kept growing over the restarts: 3.1 GB peak for 32 MB of French.
Stage 2 therefore runs on `GreedyBpe`, a replica of the stock trainer's greedy loop over numpy arrays
that learns the same merges (tests compare them) at about 16 bytes per symbol plus the positions of
pairs that can still be merged. Stage 1 stays on the stock trainer: its pretokens are words, whose
distinct count grows far slower than the text.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

STAGE1_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
STAGE2_PATTERN = r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]{2,}[\r\n/]*| +(?!\S)"
EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
MAX_WORDS = 4
SPACE = "Ġ"  # a space in ByteLevel's alphabet
MIN_FREQUENCY = 2  # what the stock trainer was given in stage 2: a pair seen once is never merged
ID_BITS = 20  # a pair of token ids (a, b) is the integer a << ID_BITS | b
COUNT_SHIFT = 2 * ID_BITS  # a queue entry is -count << COUNT_SHIFT | pair: smallest = best


def max_transition(vocab_size: int) -> int:
    """The stage-1 merges a vocabulary has room for: all but the 256 bytes and the special tokens."""
    return vocab_size - 256 - len(SPECIAL_TOKENS)


def default_transition(vocab_size: int) -> int:
    """SuperBPE's transition point t when none is given: 80% of the merges (the paper's choice)."""
    return int(0.8 * max_transition(vocab_size))


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
    """Tokens known so far (ByteLevel strings; a token's id is its index)."""

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def add(self, token: str) -> int:
        self.index[token] = len(self.tokens)
        self.tokens.append(token)
        return self.index[token]

    def flags(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per token: word count, starts with a space, ends with a space, ends with ':'."""
        words = np.array([words_in(t) for t in self.tokens], dtype=np.int32)
        starts = np.array([t.startswith(SPACE) for t in self.tokens])
        ends = np.array([t.endswith(SPACE) for t in self.tokens])
        colon = np.array([t.endswith(":") for t in self.tokens])
        return words, starts, ends, colon


@dataclass
class Words:
    """Counted words of token ids, flat: word i is ids[sum(lengths[:i]):][:lengths[i]], seen counts[i] times.
    Every word has at least 2 tokens (a single token has no pair to merge)."""

    ids: np.ndarray  # int32
    lengths: np.ndarray  # int64
    counts: np.ndarray  # int64

    @classmethod
    def from_counter(cls, counter: Counter) -> Words:
        """From a Counter keyed by the int32 bytes of each word."""
        lengths = np.fromiter((len(word) // 4 for word in counter), dtype=np.int64, count=len(counter))
        counts = np.fromiter(counter.values(), dtype=np.int64, count=len(counter))
        return cls(np.frombuffer(b"".join(counter), dtype=np.int32), lengths, counts)


def split_points(ids: np.ndarray, flags: tuple[np.ndarray, ...]) -> np.ndarray:
    """Positions i (cut between ids[i-1] and ids[i]) where a merge would break a SuperBPE rule."""
    words, starts, ends, colon = flags
    left, right = ids[:-1], ids[1:]
    joined_words = words[left] + words[right] - ((~ends[left]) & (~starts[right]) & (words[left] > 0) & (words[right] > 0))
    bad = (joined_words > MAX_WORDS) | (colon[left] & starts[right])
    return np.flatnonzero(bad) + 1


def pieces(ids: np.ndarray, lengths: np.ndarray,
           flags: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut words (flat ids, none empty) wherever a merge would break a rule: the start and end of each
    piece, and the index of the word it comes from."""
    word_starts = np.cumsum(lengths) - lengths
    cuts = np.union1d(word_starts, split_points(ids, flags))
    cuts = np.union1d(cuts[(cuts > 0) & (cuts < ids.size)], [0])
    ends = np.r_[cuts[1:], ids.size]
    return cuts, ends, np.searchsorted(word_starts, cuts, side="right") - 1


def cut_words(words: Words, flags: tuple[np.ndarray, ...]) -> Words:
    """Each word's pieces, split where a merge would break a rule, with the word's count; pieces of
    one token are left out."""
    starts, ends, word = pieces(words.ids, words.lengths, flags)
    keep = ends - starts >= 2
    return Words(words.ids[np.repeat(keep, ends - starts)], (ends - starts)[keep], words.counts[word[keep]])


def stage2_words(texts: Iterable[str], stage1: Stage1, transition: int, batch: int = 4096,
                 show_progress: bool = False) -> tuple[Words, Stage2Vocabulary]:
    """Count stage-2 pretokens, each segmented by the first `transition` stage-1 merges, already split
    where the rules forbid merges. One pass over `texts`; only distinct pieces are held."""
    merges = stage1.merges[:transition]
    vocabulary = Stage2Vocabulary(stage1.alphabet + ["".join(m) for m in merges])
    encoder = assemble(vocabulary.tokens, merges, STAGE2_PATTERN)
    flags = vocabulary.flags()
    offset = len(SPECIAL_TOKENS)
    counts: Counter = Counter()
    chunk: list[str] = []

    def flush() -> None:
        encodings = encoder.encode_batch(chunk, add_special_tokens=False)
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32) - offset
        word_ids = np.fromiter(chain.from_iterable(e.word_ids for e in encodings), dtype=np.int64)
        sequence_lengths = np.array([len(e.ids) for e in encodings])
        # A new word starts where the pretoken index changes or a new paragraph begins.
        new_word = np.r_[True, word_ids[1:] != word_ids[:-1]]
        paragraph_starts = np.cumsum(sequence_lengths)[:-1]
        new_word[paragraph_starts[paragraph_starts < ids.size]] = True  # empty paragraphs start nothing
        word_starts = np.flatnonzero(new_word)
        if word_starts.size:
            starts, ends, _ = pieces(ids, np.diff(np.r_[word_starts, ids.size]), flags)
            data = ids.tobytes()
            for a, b in zip(starts.tolist(), ends.tolist()):
                if b - a >= 2:
                    counts[data[4 * a:4 * b]] += 1
        bar.update(sum(map(len, chunk)))
        chunk.clear()

    with tqdm(unit="char", unit_scale=True, desc="superbpe: stage-2 pretokens", disable=not show_progress) as bar:
        for text in texts:
            chunk.append(text)
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        bar.set_postfix_str(f"{len(counts):,} distinct pieces")
    return Words.from_counter(counts), vocabulary


def pair_of(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """The pair keys of token ids (arrays, or an int with an array)."""
    return (np.asarray(a, dtype=np.int64) << ID_BITS) | np.asarray(b, dtype=np.int64)


@dataclass
class PairPositions:
    """Where pairs occur: positions (of a pair's left token) grouped by pair, both ascending."""

    pairs: np.ndarray  # int64, ascending
    offsets: np.ndarray  # int64, len(pairs) + 1
    positions: np.ndarray

    @classmethod
    def group(cls, pairs: np.ndarray, positions: np.ndarray, positions_ascending: bool = False) -> PairPositions:
        order = np.argsort(pairs, kind="stable") if positions_ascending else np.lexsort((positions, pairs))
        pairs, positions = pairs[order], positions[order]
        starts = np.flatnonzero(np.r_[True, pairs[1:] != pairs[:-1]]) if pairs.size else np.zeros(0, np.int64)
        return cls(pairs[starts], np.r_[starts, pairs.size], positions)

    def find(self, pair: int) -> int:
        """Index of `pair` in `pairs`, or -1."""
        i = int(np.searchsorted(self.pairs, pair))
        return i if i < self.pairs.size and self.pairs[i] == pair else -1

    def of(self, pair: int) -> np.ndarray:
        i = self.find(pair)
        return self.positions[self.offsets[i]:self.offsets[i + 1]] if i >= 0 else self.positions[:0]


class GreedyBpe:
    """Greedy BPE over counted words, learning the merges `tokenizers`' BpeTrainer learns from the same
    word counts (min_frequency 2, alphabet = ids 0..n_alphabet-1 in order, no prefix or suffix).

    Its rules, replicated: the next merge is the pair of highest count, ties going to the lowest pair
    of ids (a new token's id is the next free one); a pair's count is its occurrences times the word
    counts, overlapping ones included; a merge is applied in each word left to right; training stops
    at the vocabulary size, or when no pair is seen twice. A token is a linked-list cell in flat int
    arrays (symbol, next, previous); the positions of each pair are indexed once and again for each
    new token's pairs, stale ones being skipped when read. Two shortcuts hold because a greedy merge
    never recreates an existing token (checked: that case raises): a pair's occurrences only appear
    when its newest token is made, so a pair counted once then can be forgotten, and the positions
    of a pair are those indexed when its newest token was made.
    """

    def __init__(self, words: Words, n_alphabet: int):
        if n_alphabet >= 1 << ID_BITS:
            raise ValueError(f"GreedyBpe handles ids below {1 << ID_BITS:,}, not an alphabet of {n_alphabet:,}")
        n = words.ids.size
        index = np.int32 if n < np.iinfo(np.int32).max else np.int64
        self.n_alphabet = n_alphabet
        self.spelling: list[tuple[int, ...]] = [(i,) for i in range(n_alphabet)]  # ids -> alphabet ids
        self.spelled = set(self.spelling)
        self.sym = words.ids.astype(np.int32)  # -1 where a token was merged into its left neighbour
        self.word_starts = np.cumsum(words.lengths) - words.lengths
        self.counts = words.counts
        self.nxt = np.arange(1, n + 1, dtype=index)
        self.nxt[self.word_starts + words.lengths - 1] = -1
        self.prv = np.arange(-1, n - 1, dtype=index)
        self.prv[self.word_starts] = -1
        left = np.flatnonzero(self.nxt >= 0).astype(index)
        positions = PairPositions.group(pair_of(self.sym[left], self.sym[left + 1]), left, positions_ascending=True)
        del left
        counts = np.add.reduceat(self.weights(positions.positions), positions.offsets[:-1]) \
            if positions.pairs.size else np.zeros(0, np.int64)
        # A pair seen once now is never merged: its count can only fall. Forget it.
        frequent = counts >= MIN_FREQUENCY
        sizes = np.diff(positions.offsets)
        self.initial = PairPositions(positions.pairs[frequent], np.r_[0, np.cumsum(sizes[frequent])],
                                     positions.positions[np.repeat(frequent, sizes)])
        del positions
        self.initial_counts = counts[frequent]
        order = np.lexsort((self.initial.pairs, -self.initial_counts))
        self.initial_queue = (-self.initial_counts[order] << COUNT_SHIFT) | self.initial.pairs[order]
        self.next_initial = 0
        self.queue: list[int] = []  # entries pushed after the start (new pairs, corrected counts)
        self.counts_of_new: dict[int, int] = {}  # pairs with a merged token, while seen twice or more
        self.new_positions: dict[int, PairPositions] = {}  # newest token of the pairs -> their positions

    def weights(self, positions: np.ndarray) -> np.ndarray:
        """The count of the word each position is in."""
        return self.counts[np.searchsorted(self.word_starts, positions, side="right") - 1]

    def count(self, pair: int) -> int:
        a, b = pair >> ID_BITS, pair & ((1 << ID_BITS) - 1)
        if a < self.n_alphabet and b < self.n_alphabet:
            i = self.initial.find(pair)
            return int(self.initial_counts[i]) if i >= 0 else 0
        return self.counts_of_new.get(pair, 0)

    def pop(self) -> int | None:
        """The best queue entry, from the initial pairs (sorted once) or those pushed since."""
        initial = int(self.initial_queue[self.next_initial]) if self.next_initial < self.initial_queue.size else None
        if self.queue and (initial is None or self.queue[0] < initial):
            return heapq.heappop(self.queue)
        if initial is not None:
            self.next_initial += 1
        return initial

    def merges(self, vocab_size: int) -> Iterator[tuple[int, int]]:
        """Yield each merge (a, b) before applying it, until the vocabulary holds `vocab_size` tokens;
        the merged token's id is the next one. Stopping the iteration leaves the words as they were
        before the last merge yielded."""
        while len(self.spelling) < vocab_size:
            entry = self.pop()
            if entry is None:
                return
            pair, stored = entry & ((1 << COUNT_SHIFT) - 1), -(entry >> COUNT_SHIFT)
            current = self.count(pair)
            if current != stored:  # the count fell since the entry was queued: queue it again
                if current >= MIN_FREQUENCY:
                    heapq.heappush(self.queue, (-current << COUNT_SHIFT) | pair)
                continue
            a, b = pair >> ID_BITS, pair & ((1 << ID_BITS) - 1)
            spelling = self.spelling[a] + self.spelling[b]
            if spelling in self.spelled:
                raise RuntimeError(f"merge ({a}, {b}) recreates an existing token: GreedyBpe cannot follow "
                                   "the stock trainer there")
            yield a, b
            new = len(self.spelling)
            if new >= 1 << ID_BITS:
                raise ValueError(f"GreedyBpe handles ids below {1 << ID_BITS:,}")
            self.spelling.append(spelling)
            self.spelled.add(spelling)
            positions = self.initial.of(pair) if max(a, b) < self.n_alphabet else self.new_positions[max(a, b)].of(pair)
            self.apply(a, b, new, positions)

    def apply(self, a: int, b: int, new: int, positions: np.ndarray) -> None:
        """Merge every occurrence of (a, b) at `positions` (some stale), left to right in each word, and
        update the counts as the stock trainer does: per occurrence, the pairs with the left and right
        neighbours lose and the pairs with the new token gain, in the order the occurrences are merged."""
        sym, nxt, prv = self.sym, self.nxt, self.prv
        p = positions[sym[positions] == a]
        q = nxt[p]
        p, q = p[q >= 0], q[q >= 0]
        p, q = p[sym[q] == b], q[sym[q] == b]
        if a == b and p.size > 1:  # in "a a a" only the first two merge
            keep = np.ones(p.size, dtype=bool)
            last_right = -1
            for i, (left, right) in enumerate(zip(p.tolist(), q.tolist())):
                keep[i] = left != last_right
                if keep[i]:
                    last_right = right
            p, q = p[keep], q[keep]
        left, right = prv[p], nxt[q]
        has_left, has_right = left >= 0, right >= 0
        weight = self.weights(p)
        # The left neighbour may be the right half of the previous occurrence, already merged.
        merged_left = np.zeros(p.size, dtype=bool)
        merged_left[has_left] = np.isin(left[has_left], q, assume_unique=True)
        safe_left = np.where(has_left, left, 0)
        left_sym = np.where(merged_left, new, sym[safe_left])[has_left]
        left_at = np.where(merged_left, prv[safe_left], left)[has_left]
        right_sym = sym[np.where(has_right, right, 0)][has_right]
        lost = np.concatenate([pair_of(left_sym, a), pair_of(b, right_sym)])
        gained = np.concatenate([pair_of(left_sym, new), pair_of(new, right_sym)])
        gained_at = np.concatenate([left_at, p[has_right]]).astype(p.dtype)
        gained_weight = np.concatenate([weight[has_left], weight[has_right]])
        lost_weight = gained_weight  # each loss pairs with one gain

        sym[p], sym[q], nxt[p] = new, -1, right
        prv[right[has_right]] = p[has_right]

        pairs = np.concatenate([lost, gained])
        order = np.argsort(pairs, kind="stable")
        pairs, deltas = pairs[order], np.concatenate([-lost_weight, gained_weight])[order]
        starts = np.flatnonzero(np.r_[True, pairs[1:] != pairs[:-1]]) if pairs.size else np.zeros(0, np.int64)
        pairs, deltas = pairs[starts], np.add.reduceat(deltas, starts) if pairs.size else deltas
        mask = (1 << ID_BITS) - 1
        initial = ((pairs >> ID_BITS) < self.n_alphabet) & ((pairs & mask) < self.n_alphabet)
        index = np.searchsorted(self.initial.pairs, pairs[initial])
        found = index < self.initial.pairs.size
        found[found] = self.initial.pairs[index[found]] == pairs[initial][found]
        self.initial_counts[index[found]] += deltas[initial][found]
        with_new = ((pairs >> ID_BITS) == new) | ((pairs & mask) == new)
        for pair, delta in zip(pairs[~initial & ~with_new].tolist(), deltas[~initial & ~with_new].tolist()):
            if pair in self.counts_of_new:
                self.counts_of_new[pair] += delta
        frequent = with_new & (deltas >= MIN_FREQUENCY)
        for pair, count in zip(pairs[frequent].tolist(), deltas[frequent].tolist()):
            self.counts_of_new[pair] = count
            heapq.heappush(self.queue, (-count << COUNT_SHIFT) | pair)
        kept = np.isin(gained, pairs[frequent])
        self.new_positions[new] = PairPositions.group(gained[kept], gained_at[kept])

    def words(self, to_global: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The words as merged so far, ids mapped through `to_global`: (flat ids, lengths)."""
        alive = self.sym >= 0
        lengths = np.add.reduceat(alive, self.word_starts, dtype=np.int64) if self.word_starts.size \
            else np.zeros(0, np.int64)
        return to_global[self.sym[alive]].astype(np.int32), lengths


def train_stage2(words: Words, vocabulary: Stage2Vocabulary, n_merges: int,
                 show_progress: bool = False) -> list[tuple[str, str]]:
    """Learn `n_merges` stage-2 merges (ByteLevel pairs), keeping the SuperBPE rules exactly."""
    learned: list[tuple[str, str]] = []
    with tqdm(total=n_merges, unit="merge", desc="superbpe: stage 2", disable=not show_progress) as bar:
        restarts = 0
        while len(learned) < n_merges and words.lengths.size:
            bar.set_postfix_str(f"{restarts} restarts at the {MAX_WORDS}-word limit, "
                                f"{words.ids.size:,} tokens in {words.lengths.size:,} words")
            trainer = GreedyBpe(words, len(vocabulary.tokens))
            tokens = list(vocabulary.tokens)  # by this round's ids
            exceeded = False
            for a, b in trainer.merges(len(tokens) + n_merges - len(learned)):
                if words_in(tokens[a] + tokens[b]) > MAX_WORDS:
                    exceeded = True
                    break
                learned.append((tokens[a], tokens[b]))
                tokens.append(tokens[a] + tokens[b])
                bar.update(1)
            if not exceeded:
                break
            # Keep this round's merges, split the words where a further merge would break a rule, go on.
            to_global = list(range(len(vocabulary.tokens)))
            for token in tokens[len(vocabulary.tokens):]:
                to_global.append(vocabulary.index[token] if token in vocabulary.index else vocabulary.add(token))
            ids, lengths = trainer.words(np.array(to_global, dtype=np.int32))
            del trainer
            words = cut_words(Words(ids, lengths, words.counts), vocabulary.flags())
            restarts += 1
    return learned


def train_superbpe(texts: Iterable[str], vocab_size: int, transition: int, show_progress: bool = False) -> Tokenizer:
    """The SuperBPE tokenizer: `transition` stage-1 merges, then stage-2 merges up to `vocab_size`.
    `texts` is read twice (stage 1, then stage 2): a list, or an iterable that starts over."""
    stage1 = train_stage1(texts, vocab_size, show_progress)
    return superbpe_from_stage1(texts, stage1, vocab_size, transition, show_progress)


def superbpe_from_stage1(texts: Iterable[str], stage1: Stage1, vocab_size: int, transition: int,
                         show_progress: bool = False) -> Tokenizer:
    transition = min(transition, len(stage1.merges))
    words, vocabulary = stage2_words(texts, stage1, transition, show_progress=show_progress)
    stage2 = train_stage2(words, vocabulary, stage2_merges(stage1, vocab_size, transition), show_progress)
    return superbpe_tokenizer(stage1, transition, stage2)


def stage2_merges(stage1: Stage1, vocab_size: int, transition: int) -> int:
    """How many stage-2 merges fill the vocabulary after `transition` stage-1 merges."""
    return vocab_size - len(SPECIAL_TOKENS) - len(stage1.alphabet) - transition


def superbpe_tokenizer(stage1: Stage1, transition: int, stage2: list[tuple[str, str]]) -> Tokenizer:
    merges = stage1.merges[:transition] + stage2
    return assemble(stage1.alphabet + ["".join(m) for m in merges], merges, STAGE2_PATTERN)
