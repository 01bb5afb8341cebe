"""Learn a byte-level BPE vocabulary with GPT-2's rule (Radford et al., 2019, section 2.2).

1. Count pre-tokens. Documents stream from files (`gpt2kit.corpus.iter_text_pieces`: a large
   .txt file is read in blocks and cut where the pre-tokenizer would cut anyway), are cut at
   special-token text, and are split by GPT-2's pattern, so no merge can join a letter to a digit
   or to punctuation (a single leading space may join a word). Only the counts of distinct
   pre-tokens are kept: memory grows with the vocabulary of the corpus, not with its size. With
   `workers > 1`, batches of documents are counted in separate processes.
2. Merge. Starting from the 256 byte tokens, repeatedly add the most frequent adjacent pair as a
   new token. Pair counts are updated incrementally: a merge only revisits the pre-tokens that
   contain the pair (an index from pair to pre-tokens), and a heap with lazily discarded stale
   entries yields the next best pair.

Tie-break rule (so training is deterministic for any worker count or input order): among pairs
with the same count, the pair whose (left token bytes, right token bytes) is lexicographically
smallest wins. Within a pre-token, occurrences are merged left to right without overlap, which
is what tiktoken's and HF's encoders do for the same merge.

Ids: the 256 bytes in GPT-2's order (printable bytes first, as in OpenAI's encoder.json, which
tiktoken's loader checks), then the merges in order, then the special tokens.
"""
from __future__ import annotations

import heapq
import logging
import os
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Iterable, Iterator, Sequence

from .corpus import expand_inputs, iter_text_pieces
from .errors import GPT2KitError, InputFileError
from .tokenizer import ENDOFTEXT, Tokenizer, _special_splitter, bytes_to_unicode, split_pretokens

log = logging.getLogger(__name__)

_BATCH_CHARS = 1 << 20  # documents are sent to counting workers in batches of ~1M characters
_PAIR_SHIFT = 24  # a pair (left, right) is keyed as left << 24 | right: ids stay below 2**24


class TrainingError(GPT2KitError):
    """The training inputs or options cannot produce a vocabulary."""


def train_bpe(inputs: str | os.PathLike | Iterable[str | os.PathLike], *, vocab_size: int,
              special_tokens: Sequence[str] = (ENDOFTEXT,), field: str = "text", workers: int = 1,
              progress: bool = False) -> Tokenizer:
    """Learn `vocab_size - 256 - len(special_tokens)` merges from text files or folders (.txt,
    .jsonl with the text in `field`, optionally .gz/.zst) and return the tokenizer.

    Fewer merges are learned (with a warning) if the corpus runs out of pairs first.
    """
    if isinstance(special_tokens, str):
        raise TrainingError("special_tokens must be a list of strings, got one str")
    specials = list(dict.fromkeys(special_tokens))
    if any(not isinstance(s, str) or not s for s in specials):
        raise TrainingError("special tokens must be non-empty strings")
    for s in specials:  # refused now, not when the vocabulary is built after all the counting
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TrainingError(f"--special {s!r} is not valid Unicode: lone surrogate U+{ord(s[e.start]):04X} "
                                "cannot be encoded as UTF-8") from None
    if vocab_size < 256 + len(specials):
        raise TrainingError(
            f"--vocab-size must be at least 256 + {len(specials)} special token(s) = {256 + len(specials)}, got {vocab_size}")
    if vocab_size >= 1 << _PAIR_SHIFT:
        raise TrainingError(f"--vocab-size must be below {1 << _PAIR_SHIFT}, got {vocab_size}")
    if workers < 1:
        raise TrainingError(f"--workers must be at least 1, got {workers}")
    # Vocabulary files spell each byte token as one character (GPT-2's byte map), so a
    # one-character special token like "§" would share its key with a byte token.
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for s in specials:
        if s in byte_of:
            raise TrainingError(f"--special {s!r} is spelled like the byte token 0x{byte_of[s]:02x} in the "
                                "vocabulary files; choose a special token that is not a single character")
    if isinstance(inputs, (str, os.PathLike)):  # iterating "/data/x" would walk "/" itself
        inputs = [inputs]
    files = expand_inputs(inputs)
    counts = count_pretokens(files, special_tokens=specials, field=field, workers=workers, progress=progress)
    if not counts:
        raise TrainingError(f"the training corpus ({len(files)} file(s)) holds no text")
    ranks, merges = learn_merges(counts, vocab_size - 256 - len(specials), progress=progress)
    # A learned token can be spelled like a special token only once the merges are known.
    byte_map = bytes_to_unicode()
    spelled = {"".join(byte_map[b] for b in t): t for t in ranks}
    for s in specials:
        if s in spelled:
            raise TrainingError(f"--special {s!r} is spelled like the learned token {spelled[s]!r} in the "
                                "vocabulary files; choose a special token that cannot be learned (e.g. <|...|>)")
    special_ids = {s: len(ranks) + k for k, s in enumerate(specials)}
    return Tokenizer(ranks, merges, special_ids)


# ---------------------------------------------------------------------------------------------
# 1. Counting pre-tokens


def count_text(texts: Sequence[str], special_tokens: Sequence[str] = ()) -> Counter[str]:
    """Counts of the pre-tokens of `texts`, cut at special-token text first.

    >>> sorted(count_text(["the cat, the hat<|endoftext|>the end"], ["<|endoftext|>"]).items())
    [(' cat', 1), (' end', 1), (' hat', 1), (' the', 1), (',', 1), ('the', 2)]
    """
    counts: Counter[str] = Counter()
    for text in texts:
        for chunk in _cut_specials(text, special_tokens):
            counts.update(split_pretokens(chunk))
    return counts


def _cut_specials(text: str, special_tokens: Sequence[str]) -> list[str]:
    if not special_tokens:
        return [text]
    # The splitter `Tokenizer.encode` uses: where special tokens start alike, the longest is cut out.
    return _special_splitter(frozenset(special_tokens)).split(text)[::2]


def _batches(files, field: str, bar) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for path in files:
        # a huge .txt file arrives in pieces; a JSONL text with a lone surrogate (JSON can spell one,
        # UTF-8 cannot) is refused there, naming its line
        for doc in iter_text_pieces(path, field=field):
            batch.append(doc)
            size += len(doc)
            if size >= _BATCH_CHARS:
                yield batch
                bar.update(size)
                batch, size = [], 0
    if batch:
        yield batch
        bar.update(size)


def count_pretokens(files: Sequence[os.PathLike], *, special_tokens: Sequence[str] = (ENDOFTEXT,),
                    field: str = "text", workers: int = 1, progress: bool = False) -> Counter[str]:
    """Counts of all pre-tokens in the files, counted in `workers` processes."""
    from tqdm import tqdm

    counts: Counter[str] = Counter()
    with tqdm(desc="counting pre-tokens", unit="char", unit_scale=True, disable=not progress) as bar:
        batches = _batches(files, field, bar)
        if workers == 1:
            for batch in batches:
                counts.update(count_text(batch, special_tokens))
            return counts
        # At most 2 batches per worker in flight: memory stays bounded however large the input.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: set[Future] = set()
            for batch in batches:
                pending.add(pool.submit(count_text, batch, tuple(special_tokens)))
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        counts.update(f.result())
            for f in pending:
                counts.update(f.result())
    return counts


# ---------------------------------------------------------------------------------------------
# 2. Learning merges


def learn_merges(counts: dict[str, int], n_merges: int, *, progress: bool = False
                 ) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Learn up to `n_merges` merges from pre-token counts: (token bytes -> id, merged pairs).

    >>> ranks, merges = learn_merges({"aaab": 2, "ab": 3}, 2)
    >>> merges  # (a, b) occurs 2 + 3 times, then (a, a) twice in each of the 2 "aaab"
    [(b'a', b'b'), (b'a', b'a')]
    """
    from tqdm import tqdm

    # Byte tokens in GPT-2's order (printable bytes first), as OpenAI's encoder.json has them:
    # tiktoken's loader for encoder.json + vocab.bpe insists on it.
    order = list(bytes_to_unicode())
    token_bytes: list[bytes] = [bytes([b]) for b in order]
    to_id = bytes.maketrans(bytes(order), bytes(range(256)))
    # Distinct pre-tokens as lists of token ids, sorted so that everything below is deterministic.
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, n in sorted(counts.items()):
        data = piece.encode("utf-8")
        if len(data) > 1:  # a single byte never takes part in a pair
            words.append(list(data.translate(to_id)))
            freqs.append(n)

    pair_counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}
    for w, word in enumerate(words):
        n = freqs[w]
        for a, b in zip(word, word[1:]):
            key = a << _PAIR_SHIFT | b
            pair_counts[key] = pair_counts.get(key, 0) + n
            where.setdefault(key, set()).add(w)

    def entry(key: int, count: int):
        # heapq pops the smallest: highest count first, then the smallest (left, right) bytes.
        return (-count, token_bytes[key >> _PAIR_SHIFT], token_bytes[key & _MASK], key)

    heap = [entry(k, c) for k, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=n_merges, desc="learning merges", unit="merge", disable=not progress) as bar:
        while len(merges) < n_merges and heap:
            neg, left_bytes, right_bytes, key = heapq.heappop(heap)
            if pair_counts.get(key, 0) != -neg:
                continue  # stale: the count changed since this entry was pushed
            a, b = key >> _PAIR_SHIFT, key & _MASK
            new = len(token_bytes)
            token_bytes.append(left_bytes + right_bytes)
            merges.append((left_bytes, right_bytes))
            bar.update(1)
            changed = _apply_merge(words, freqs, where.pop(key), a, b, new, pair_counts, where)
            for k, c in changed.items():
                heapq.heappush(heap, entry(k, c))
    if len(merges) < n_merges:
        log.warning("the corpus ran out of pairs after %d merges (asked for %d)", len(merges), n_merges)
    ranks = {t: i for i, t in enumerate(token_bytes)}
    if len(ranks) != len(token_bytes):  # cannot happen: a pair's bytes are new by construction
        raise TrainingError("internal error: two merges produced the same token")
    return ranks, merges


_MASK = (1 << _PAIR_SHIFT) - 1


def _apply_merge(words: list[list[int]], freqs: list[int], affected: set[int], a: int, b: int,
                 new: int, pair_counts: dict[int, int], where: dict[int, set[int]]) -> dict[int, int]:
    """Replace a, b by `new` (left to right, no overlap) in the affected pre-tokens and update
    the pair counts; return the pairs whose count changed, with their new counts."""
    delta: dict[int, int] = {}
    for w in affected:
        word = words[w]
        n = len(word)
        out: list[int] = []
        i = 0
        while i < n:
            if i + 1 < n and word[i] == a and word[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(word[i])
                i += 1
        if len(out) == n:
            continue  # a stale index entry: the pair no longer occurs here
        f = freqs[w]
        for x, y in zip(word, word[1:]):
            k = x << _PAIR_SHIFT | y
            delta[k] = delta.get(k, 0) - f
        for x, y in zip(out, out[1:]):
            k = x << _PAIR_SHIFT | y
            delta[k] = delta.get(k, 0) + f
            if x == new or y == new:
                where.setdefault(k, set()).add(w)
        words[w] = out
    changed = {}
    for k, d in delta.items():
        if d:
            c = pair_counts.get(k, 0) + d
            if c:
                pair_counts[k] = changed[k] = c
            else:
                pair_counts.pop(k, None)
    return changed
