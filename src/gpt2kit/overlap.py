"""Train/test overlap analysis with Bloom filters of word 8-grams (the paper's Section 4, Table 6).

GPT-2's authors asked how much of each test set a model may have memorized: they stored every
8-gram of WebText's training set in Bloom filters with a false-positive rate below 1e-8, after
normalizing text to lower-cased alphanumeric words separated by single spaces, and reported the
percentage of each test set's 8-grams found. This module does the same at any scale:

    normalize     NFKC, lower-case, then words = maximal runs of Unicode letters/digits (with their
                  combining marks); everything else separates words.  "Don't STOP-me!" -> "don t stop me"
    fingerprint   each word -> blake2b-128 (two uint64 lanes); each 8-gram -> per lane
                  fmix64(sum_i word[j+i] * C^(7-i) mod 2^64): a 128-bit fingerprint computed with a
                  few numpy passes per document instead of one hash call per 8-gram
    Bloom filter  m bits and k hashes from (capacity n, target rate p): m = -n ln p / ln(2)^2,
                  k = round(m/n ln 2); q = the largest prime <= m; bits i < ceil(k/2) of an 8-gram
                  are (a + i*b) mod q with a = h1 mod q, b = h2 mod (q-1) + 1, the others the same
                  from a second pair (a', b') mixed out of both lanes (partitioned double hashing:
                  with a prime modulus no step cycles early, and two 8-grams that share a step
                  still differ in the other half of their bits)
    ExactSet      the normalized 8-gram strings themselves: exact, for small corpora and for checking
                  the Bloom answers

Inputs are text/JSONL files (`gpt2kit.corpus`) or `gpt2kit prepare` token shard folders (decoded
with their own tokenizer). Inserts and queries run in numba kernels when numba is installed and in
numpy otherwise; both set and test the same bits.

Filter file format (`.bloom`; exact sets use the same container):

    bytes 0-7     magic b"GPT2KOVL"
    8-11          container version (uint32 little-endian)
    12-15         length L of the JSON header; 16-19  CRC-32 of it
    20..20+L      JSON header: kind, ngram, normalization, hash_scheme, capacity, fpr_target, m_bits,
                  k_hashes, n_added, payload_bytes, checksum (blake2b-256 of the payload), and
                  n_documents where known (files of earlier versions lack it)
    4096..        payload: the bit array (bit i = byte i>>3, bit i&7), or the sorted 8-grams

The payload starts on a page boundary, so queries memory-map it and filters larger than RAM work.
Files are written to a temporary name and renamed when complete. Nothing in the header depends on
time or input names: building a corpus in shards and merging them (bitwise OR) gives a file that is
byte-identical to building it in one go.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import itertools
import json
import logging
import math
import operator
import os
import pickle
import re
import struct
import tempfile
import time
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import regex

from .corpus import expand_inputs, iter_file_documents
from .errors import GPT2KitError, InputFileError, check_spawn_guard
from .io import atomic_path, check_output_path, write_json, write_text

log = logging.getLogger(__name__)

NGRAM = 8
NORMALIZATION = "nfkc-lower-alnum-words-v1"
HASH_SCHEME = "blake2b128-words/poly-fmix64-lanes/two-double-hashings-mod-prime-v2"
# Filters written before v2 used one double hashing modulo m itself, a multiple of 64: a step
# sharing a large factor with m cycles through fewer than k bits (a step of m/2 through 2), and
# two 8-grams with the same step and nearby starts share most of their bits. Both put a floor
# under the false-positive rate, far above the target for filters of under ~1M 8-grams (measured:
# 47 false hits in 1M queries of a 1,000-item filter at 1e-6, 7 with a prime modulus alone, under
# 1 on average with v2). A cubic term instead of the second pair did as well but made inserts
# 2.5x slower. v1 filters stay readable, and are queried and merged with their own scheme.
HASH_SCHEME_V1 = "blake2b128-words/poly-fmix64-lanes/double-hashing-mod-m-v1"
HASH_SCHEMES = (HASH_SCHEME, HASH_SCHEME_V1)
MAGIC = b"GPT2KOVL"
CONTAINER_VERSION = 1
HEADER_BYTES = 4096
_PREFIX = struct.Struct("<8sIII")  # magic, version, json length, json crc32
_CHUNK = 1 << 26  # bytes per step when hashing, OR-ing or counting a payload
_BATCH_NGRAMS = 1 << 14  # 8-grams per numpy insert/query step: keeps the (k, n) temporaries in cache
_FLUSH_NGRAMS = 1 << 17  # 8-grams collected from documents before they are inserted
_MAX_M_BITS = 1 << 58  # keeps a + i*b below 2^64 (k <= 64)
_MAX_WORD_CACHE = 1 << 20


class OverlapError(GPT2KitError):
    """Invalid overlap-analysis input: an empty corpus, bad parameters, incompatible filters."""


class FilterFileError(InputFileError):
    """A filter file is not a gpt2kit filter, or it is damaged."""


class OverfullError(OverlapError):
    """More distinct 8-grams were inserted than the filter was sized for."""


# ---------------------------------------------------------------------------------------------
# Normalization (Section 4: "lower-cased alphanumeric words separated by single spaces")

_WORD = regex.compile(r"[\p{L}\p{N}][\p{L}\p{N}\p{M}]*")
_ASCII_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The normalized words of `text`.

    >>> words("Don't STOP-me now,  2 Cafés!")
    ['don', 't', 'stop', 'me', 'now', '2', 'cafés']
    """
    if text.isascii():
        # the same answer, faster: ASCII is unchanged by NFKC and its only letters/digits are these
        return _ASCII_WORD.findall(text.lower())
    return _unicode_words(text)


def _unicode_words(text: str) -> list[str]:
    # NFKC first so that compatibility forms (ligatures, full-width letters, composed accents)
    # become the same word however the source typed them.
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def normalize(text: str) -> str:
    """Lower-cased alphanumeric words separated by single spaces.

    >>> normalize("  Hello,\\tWORLD -- 42!  ")
    'hello world 42'
    """
    return " ".join(words(text))


def ngrams(text_or_words: str | Sequence[str], n: int = NGRAM) -> list[str]:
    """The normalized word n-grams, in order (the reference that the fingerprints stand for)."""
    ws = words(text_or_words) if isinstance(text_or_words, str) else list(text_or_words)
    return [" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)]


# A document longer than this is read in windows of words: a .txt file is one document, and its
# word list costs ~190 bytes per word (WikiText-103's 540 MB training text would need ~19 GB).
_DOC_CHARS = 1 << 22
_CUT = re.compile(r"[ \t\n\r]")


def word_windows(text: str) -> Iterator[list[str]]:
    """The words of `text` in windows that overlap by 7 words: their 8-grams, window after window,
    are the 8-grams of the whole text, in order. Short texts are one window.

    The text is cut just before an ASCII whitespace character: no word spans it, NFKC composes
    nothing across it and the lower-casing of a final sigma sees the same context on both sides."""
    if len(text) <= _DOC_CHARS:
        yield words(text)
        return
    carry: list[str] = []
    start = 0
    while start < len(text):
        cut = _CUT.search(text, start + _DOC_CHARS)
        end = cut.start() if cut else len(text)
        ws = carry + words(text[start:end])
        yield ws
        carry = ws[-(NGRAM - 1):]
        start = end


# ---------------------------------------------------------------------------------------------
# Fingerprints

_M64 = (1 << 64) - 1
_LANE_MULT = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)  # odd: multiplication is a bijection mod 2^64
# coefficient of word i (0-based) of an 8-gram in lane l: C_l^(7-i) mod 2^64
_COEF = np.array([[pow(c, NGRAM - 1 - i, 1 << 64) for i in range(NGRAM)] for c in _LANE_MULT], dtype=np.uint64)
_PERSON = b"gpt2kit-ovl-v1"


def word_hash(word: str) -> tuple[int, int]:
    """The two 64-bit lanes of a word's blake2b-128 digest (little-endian)."""
    d = hashlib.blake2b(word.encode("utf-8"), digest_size=16, person=_PERSON).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little")


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def fingerprint(ngram: str) -> tuple[int, int]:
    """The 128-bit fingerprint (h1, h2) of one normalized 8-gram: the readable reference that
    `NgramHasher` computes in bulk."""
    ws = ngram.split(" ")
    if len(ws) != NGRAM:
        raise OverlapError(f"expected a normalized {NGRAM}-gram, got {len(ws)} words: {ngram!r}")
    lanes = []
    for lane in range(2):
        acc = 0
        for i, w in enumerate(ws):
            acc = (acc + word_hash(w)[lane] * int(_COEF[lane, i])) & _M64
        lanes.append(_fmix64(acc))
    return lanes[0], lanes[1]


def _fmix64_np(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


class NgramHasher:
    """Fingerprints of every 8-gram of a word list, vectorized; word digests are cached (word
    frequencies are Zipfian, so almost every word of a large corpus is a cache hit)."""

    def __init__(self) -> None:
        self._cache: dict[str, bytes] = {}

    def word_lanes(self, ws: Sequence[str]) -> np.ndarray:
        """(len(ws), 2) uint64: the blake2b-128 lanes of each word."""
        cache = self._cache
        missing = set(ws).difference(cache)
        if missing:
            if len(cache) + len(missing) > _MAX_WORD_CACHE:
                cache.clear()
                missing = set(ws)
            for w in missing:
                cache[w] = hashlib.blake2b(w.encode("utf-8"), digest_size=16, person=_PERSON).digest()
        buf = b"".join(map(cache.__getitem__, ws))
        return np.frombuffer(buf, dtype="<u8").reshape(-1, 2).astype(np.uint64, copy=False)

    def hashes(self, ws: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(h1, h2): uint64 arrays with one entry per 8-gram (len(ws) - 7, or 0)."""
        n = len(ws) - NGRAM + 1
        if n <= 0:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, empty.copy()
        lanes = self.word_lanes(ws)
        out = []
        for lane in range(2):
            w = lanes[:, lane]
            acc = w[0:n] * _COEF[lane, 0]
            for i in range(1, NGRAM):
                acc += w[i:i + n] * _COEF[lane, i]
            out.append(_fmix64_np(acc))
        return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Bloom filter sizing


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin: these bases decide every n < 3.3e24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for b in bases:
        if n % b == 0:
            return n == b
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for b in bases:
        x = pow(b, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _second_pair(h1: np.ndarray, h2: np.ndarray, q: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The (a', b') of the second half of a fingerprint's bits, from both lanes mixed: two 8-grams
    that share the first pair's step share at most half of their bits."""
    x = _fmix64_np(h1 ^ ((h2 << np.uint64(32)) | (h2 >> np.uint64(32))))
    return x % q, _fmix64_np(x.copy()) % (q - np.uint64(1)) + np.uint64(1)


@functools.lru_cache(maxsize=64)
def probe_modulus(m_bits: int, hash_scheme: str = HASH_SCHEME) -> int:
    """The modulus of a filter's bit positions: the largest prime <= m (v2; the bits above it stay
    0, ~ln m of them), or m itself for filters written before v2 (one double hashing for all k)."""
    if hash_scheme == HASH_SCHEME_V1:
        return m_bits
    q = m_bits
    while not _is_prime(q):
        q -= 1
    return q


def optimal_parameters(capacity: int, fpr: float) -> tuple[int, int]:
    """(m bits, k hashes) for `capacity` distinct items at false-positive rate `fpr`.

    m is rounded up to a multiple of 64 so the bit array can be read as uint64 words.

    >>> optimal_parameters(1_000_000, 1e-8)
    (38340288, 27)
    """
    if capacity < 1:
        raise OverlapError(f"capacity must be at least 1, got {capacity}")
    if not (1e-15 <= fpr < 1):
        raise OverlapError(f"false-positive rate must be in [1e-15, 1), got {fpr}")
    if capacity > _MAX_M_BITS:  # no corpus has 2.9e17 8-grams; bigger ints overflow the float math below
        raise OverlapError(f"capacity must be at most 2^58 (about 2.9e17), got a {len(str(capacity))}-digit number")
    m = math.ceil(-capacity * math.log(fpr) / math.log(2) ** 2)
    m = max(64, -(-m // 64) * 64)
    if m > _MAX_M_BITS:
        raise OverlapError(f"a filter for {capacity} items at rate {fpr} needs {m} bits, more than 2^58")
    k = max(1, min(64, round(m / capacity * math.log(2))))
    return m, k


def expected_fpr(n: float, m: int, k: int) -> float:
    """False-positive rate of an m-bit, k-hash filter holding n distinct items."""
    return (1.0 - math.exp(-k * n / m)) ** k


# How many standard deviations of the distinct-count estimate an estimate may exceed the capacity
# by before the filter is called overfull. 4 keeps a filter that holds exactly its capacity from
# being refused by chance (about 3 in 100,000 under a normal tail), while a real overfill of a
# large filter is still caught at 1%.
_NOISE_Z = 4.0


def estimate_noise(n: float, m: int, k: int) -> float:
    """Standard deviation of the distinct-count estimate -(m/k) ln(1 - X/m) of an m-bit, k-hash
    filter holding n distinct items.

    The delta method on the variance of the number of unset bits gives sqrt(m (e^L - 1 - L)) / k
    with L = kn/m. Small filters scatter more than that: double hashing in an m that is a multiple
    of 64 sometimes cycles through fewer than k bits, and one item more or less is a large step.
    Measured, the extra variance stays below one item squared, hence the floor of 1 added."""
    lam = k * n / m
    return math.sqrt(m * (math.expm1(lam) - lam) / (k * k) + 1.0)


def overfill_tolerance(capacity: int, m: int, k: int) -> float:
    """How far the estimate of a filter at capacity may exceed the capacity by chance: 1%, or
    `_NOISE_Z` standard deviations where that is more (filters below a few thousand items)."""
    return max(0.01 * capacity, _NOISE_Z * estimate_noise(capacity, m, k))


def auto_capacity(counted: int, fpr: float) -> int:
    """The capacity `build --auto` uses for a corpus of `counted` 8-grams (repeats included, so
    at least the distinct ones): the count plus `_NOISE_Z` standard deviations of the estimate.

    Sized at the bare count, a corpus of all-distinct 8-grams sits exactly at capacity, where the
    estimate lands above the capacity half of the time and, in small filters, beyond the
    tolerance often enough to refuse a filter that is provably not overfull. With the margin the
    estimate must be off by twice the tolerance, and the rate that the fill gives stays at or below
    the target instead of above it half of the time."""
    m, k = optimal_parameters(counted, fpr)
    return counted + math.ceil(_NOISE_Z * estimate_noise(counted, m, k))


# ---------------------------------------------------------------------------------------------
# File container


# Payloads from this size on get a progress bar while they are hashed (when progress is asked for):
# a WebText filter at 1e-8 (33 GiB) takes minutes.
_BAR_BYTES = 1 << 30


def _payload_checksum(payload: np.ndarray | bytes, *, progress: bool = False, name: str = "") -> str:
    from tqdm import tqdm

    h = hashlib.blake2b(digest_size=32)
    mv = memoryview(payload).cast("B") if not isinstance(payload, bytes) else memoryview(payload)
    with tqdm(total=len(mv), desc=f"checksum {name}".rstrip(), unit="B", unit_scale=True,
              disable=not progress or len(mv) < _BAR_BYTES) as bar:
        for i in range(0, len(mv), _CHUNK):
            h.update(mv[i:i + _CHUNK])
            bar.update(len(mv[i:i + _CHUNK]))
    return "blake2b-256:" + h.hexdigest()


def _header_bytes(header: dict) -> bytes:
    js = json.dumps(header, sort_keys=True).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, CONTAINER_VERSION, len(js), zlib.crc32(js))
    out = prefix + js
    if len(out) > HEADER_BYTES:
        raise OverlapError("filter header too large")  # cannot happen with the fixed field set
    return out + b"\0" * (HEADER_BYTES - len(out))


def is_filter_file(path: str | os.PathLike) -> bool:
    """True if `path` is a file that starts with the filter magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError, PermissionError, NotADirectoryError):
        return False


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a filter file, checked for magic, version, CRC, fields and file size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise FilterFileError(path, "no such file") from None
    except IsADirectoryError:
        raise FilterFileError(path, "is a folder, expected a filter file") from None
    if len(head) < _PREFIX.size or head[:8] != MAGIC:
        raise FilterFileError(path, f"not a gpt2kit overlap filter (expected magic {MAGIC!r})")
    _, version, n, crc = _PREFIX.unpack_from(head)
    if version != CONTAINER_VERSION:
        raise FilterFileError(path, f"unsupported filter container version {version} (expected {CONTAINER_VERSION})")
    js = head[_PREFIX.size:_PREFIX.size + n]
    if len(js) != n or zlib.crc32(js) != crc:
        raise FilterFileError(path, "header checksum mismatch: the header is damaged")
    try:
        header = json.loads(js)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FilterFileError(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FilterFileError(path, "header is not a JSON object")
    need = {"kind", "ngram", "normalization", "hash_scheme", "n_added", "payload_bytes", "checksum"}
    if header.get("kind") == "bloom":
        need |= {"capacity", "fpr_target", "m_bits", "k_hashes"}
    missing = sorted(need - set(header))
    if missing or header["kind"] not in ("bloom", "exact"):
        raise FilterFileError(path, f"header lacks fields {missing} or has unknown kind {header.get('kind')!r}")
    _check_header_types(path, header)
    if header["ngram"] != NGRAM or header["normalization"] != NORMALIZATION:
        raise FilterFileError(path, f"built with ngram={header['ngram']!r}, normalization {header['normalization']!r}; "
                                    f"this gpt2kit uses ngram={NGRAM}, {NORMALIZATION!r}")
    if header["kind"] == "bloom" and header["hash_scheme"] not in HASH_SCHEMES:
        raise FilterFileError(path, f"hash scheme {header['hash_scheme']!r} is not one of {', '.join(HASH_SCHEMES)}")
    size = path.stat().st_size
    if size != HEADER_BYTES + header["payload_bytes"]:
        raise FilterFileError(path, f"file is {size} bytes, header promises {HEADER_BYTES + header['payload_bytes']} "
                                    "(truncated or appended to)")
    return header


def _check_header_types(path: Path, header: dict) -> None:
    """Refuse a header whose CRC is right but whose fields are not what gpt2kit writes (another
    tool's file, or one edited by hand): the arithmetic on them would crash or go silently wrong."""
    def whole(name: str, lo: int, hi: int | None = None) -> None:
        v = header[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            expected = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise FilterFileError(path, f"header field {name} must be a whole number {expected}, got {v!r}")

    for name in ("normalization", "hash_scheme", "checksum"):
        if not isinstance(header[name], str):
            raise FilterFileError(path, f"header field {name} must be a string, got {header[name]!r}")
    whole("n_added", 0)
    whole("payload_bytes", 0)
    if header["kind"] == "bloom":
        whole("capacity", 1)
        whole("m_bits", 64)
        whole("k_hashes", 1, 64)
        fpr = header["fpr_target"]
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
            raise FilterFileError(path, f"header field fpr_target must be a number in (0, 1), got {fpr!r}")


# ---------------------------------------------------------------------------------------------
# Bloom filter

_BIT = (1 << np.arange(8)).astype(np.uint8)
ENGINES = ("auto", "numba", "numpy")


@functools.cache
def _numba_kernels():
    """(add, contains) compiled with numba, or None when numba is not installed.

    They set and test exactly the bits of the numpy path, one fingerprint at a time: position i is
    (a + i*b) mod m (m: the probe modulus), stepped as a += b, a -= m when it passes m (a, b < m),
    with (a, b) drawn anew at i = split (`_second_pair`). Compiled on first use
    and cached on disk, so `import gpt2kit.overlap` stays cheap."""
    try:
        import numba
    except ImportError:
        return None

    mix = numba.njit(cache=True, nogil=True)(_fmix64_np)  # on one uint64: the numpy path's mixing

    @numba.njit(cache=True, nogil=True)
    def add(bits, h1, h2, m, k, split):  # pragma: no cover - compiled
        one, three, seven, s32 = np.uint64(1), np.uint64(3), np.uint64(7), np.uint64(32)
        for j in range(h1.shape[0]):
            a = h1[j] % m
            b = h2[j] % (m - one) + one
            for i in range(k):
                if i == split:
                    x = mix(h1[j] ^ ((h2[j] << s32) | (h2[j] >> s32)))
                    a = x % m
                    b = mix(x) % (m - one) + one
                bits[a >> three] |= np.uint8(1 << (a & seven))
                a += b
                if a >= m:
                    a -= m

    @numba.njit(cache=True, nogil=True)
    def contains(bits, h1, h2, m, k, split, out):  # pragma: no cover - compiled
        one, three, seven, s32 = np.uint64(1), np.uint64(3), np.uint64(7), np.uint64(32)
        for j in range(h1.shape[0]):
            a = h1[j] % m
            b = h2[j] % (m - one) + one
            hit = True
            for i in range(k):
                if i == split:
                    x = mix(h1[j] ^ ((h2[j] << s32) | (h2[j] >> s32)))
                    a = x % m
                    b = mix(x) % (m - one) + one
                if (bits[a >> three] >> (a & seven)) & 1 == 0:
                    hit = False
                    break
                a += b
                if a >= m:
                    a -= m
            out[j] = hit

    return add, contains


def _check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise OverlapError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "numba" and _numba_kernels() is None:
        raise OverlapError("engine 'numba' needs the numba package: pip install 'gpt2kit[overlap]'")
    return engine


def _lanes(h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h1, h2 = np.ascontiguousarray(h1, dtype=np.uint64), np.ascontiguousarray(h2, dtype=np.uint64)
    if h1.shape != h2.shape or h1.ndim != 1:
        raise OverlapError(f"fingerprint lanes must be two 1-D arrays of equal length, got {h1.shape} and {h2.shape}")
    return h1, h2


# Loading the compiled kernels costs about a second per process; "auto" pays it only once a filter
# has seen this many 8-grams, so small jobs (tests, one-file queries) stay quick.
_NUMBA_AFTER = 1 << 20


class BloomFilter:
    """A Bloom filter over 8-gram fingerprints, held in memory or memory-mapped from a file.

    >>> bf = BloomFilter.new(capacity=1000, fpr=1e-6)
    >>> bf.add_text("one two three four five six seven eight nine")
    2
    >>> bf.contains_text("ONE two three four five six seven eight!").tolist()
    [True]
    """

    kind = "bloom"

    def __init__(self, bits: np.ndarray, *, capacity: int, fpr_target: float, m_bits: int, k_hashes: int,
                 n_added: int = 0, n_documents: int | None = None, path: Path | None = None,
                 engine: str | None = None, hash_scheme: str = HASH_SCHEME):
        self.bits = bits  # uint8, m_bits / 8 bytes (np.memmap for file-backed filters)
        self.capacity = int(capacity)
        self.fpr_target = float(fpr_target)
        self.m = int(m_bits)
        self.k = int(k_hashes)
        self.hash_scheme = hash_scheme
        self.q = probe_modulus(self.m, hash_scheme)  # bit positions are < q <= m
        # bits from `split` on come from a second (a, b) pair; k (never) for filters before v2
        self.split = (self.k + 1) // 2 if hash_scheme != HASH_SCHEME_V1 else self.k
        self.n_added = int(n_added)  # 8-grams inserted, repeats included
        # documents read to build it; None when unknown (files written before gpt2kit kept count,
        # and what was merged from them)
        self.n_documents = n_documents
        self.path = path
        self._hasher = NgramHasher()
        self._ks = np.arange(self.k, dtype=np.uint64)[:, None]

        # numba when installed (4-6x faster inserts); $GPT2KIT_OVERLAP_ENGINE=numpy forces the
        # pure-numpy path, which gives the same bits
        self.engine = _check_engine(engine or os.environ.get("GPT2KIT_OVERLAP_ENGINE", "auto"))
        self._work = 0

    def _kernels(self, n: int):
        """The numba (add, contains) pair, or None for the numpy path."""
        self._work += n
        if self.engine == "numba" or (self.engine == "auto" and self._work >= _NUMBA_AFTER):
            return _numba_kernels()
        return None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def new(cls, *, capacity: int, fpr: float = 1e-8, engine: str | None = None) -> "BloomFilter":
        """An empty in-memory filter sized for `capacity` distinct 8-grams at rate `fpr`."""
        m, k = optimal_parameters(capacity, fpr)
        return cls(np.zeros(m // 8, dtype=np.uint8), capacity=capacity, fpr_target=fpr, m_bits=m, k_hashes=k,
                   engine=engine)

    @classmethod
    @contextlib.contextmanager
    def create(cls, path: str | os.PathLike, *, capacity: int, fpr: float = 1e-8,
               like: "BloomFilter | None" = None, progress: bool = False) -> Iterator["BloomFilter"]:
        """An empty filter memory-mapped onto a temporary file beside `path`; when the block exits
        cleanly the header (with checksum) is written and the file renamed to `path`.

        `like` copies the parameters of another filter (merging)."""
        scheme = HASH_SCHEME
        if like is not None:
            m, k, capacity, fpr, scheme = like.m, like.k, like.capacity, like.fpr_target, like.hash_scheme
        else:
            m, k = optimal_parameters(capacity, fpr)
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "r+b") as f:
                f.truncate(HEADER_BYTES + m // 8)  # sparse: untouched pages cost no disk
            bits = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=HEADER_BYTES, shape=(m // 8,))
            bf = cls(bits, capacity=capacity, fpr_target=fpr, m_bits=m, k_hashes=k, path=path, hash_scheme=scheme)
            yield bf
            bits.flush()
            header = bf.header(progress=progress)
            with open(tmp, "r+b") as f:
                f.write(_header_bytes(header))
            bf.bits = np.asarray(bits)  # keep the object usable; the memmap goes with `bits`
            del bits

    @classmethod
    def from_header(cls, path: Path, header: dict, *, verify: bool = True, progress: bool = False) -> "BloomFilter":
        m = header["m_bits"]
        if header["payload_bytes"] != m // 8 or m % 64 or not 1 <= header["k_hashes"] <= 64:
            raise FilterFileError(path, f"inconsistent header: m_bits={m}, k_hashes={header['k_hashes']}, "
                                        f"payload_bytes={header['payload_bytes']}")
        bits = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(m // 8,))
        if verify and _payload_checksum(bits, progress=progress, name=path.name) != header["checksum"]:
            raise FilterFileError(path, "payload checksum mismatch: the bit array is damaged")
        return cls(bits, capacity=header["capacity"], fpr_target=header["fpr_target"], m_bits=m,
                   k_hashes=header["k_hashes"], n_added=header["n_added"], n_documents=_header_documents(path, header),
                   path=path, hash_scheme=header["hash_scheme"])

    def header(self, *, progress: bool = False) -> dict:
        return _with_documents({
            "kind": "bloom", "ngram": NGRAM, "normalization": NORMALIZATION, "hash_scheme": self.hash_scheme,
            "capacity": self.capacity, "fpr_target": self.fpr_target, "m_bits": self.m, "k_hashes": self.k,
            "n_added": self.n_added, "payload_bytes": self.m // 8,
            "checksum": _payload_checksum(self.bits, progress=progress, name=self.path.name if self.path else ""),
        }, self.n_documents)

    def save(self, path: str | os.PathLike) -> None:
        """Write the filter to `path` atomically."""
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(_header_bytes(self.header()))
                mv = memoryview(self.bits)
                for i in range(0, len(mv), _CHUNK):
                    f.write(mv[i:i + _CHUNK])

    # -- hashing ------------------------------------------------------------------------------------
    def _positions(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(byte index, bit mask) of the k bits of each fingerprint, shape (k, n)."""
        m = np.uint64(self.q)
        a = h1 % m
        b = h2 % (m - np.uint64(1)) + np.uint64(1)  # never 0: all k bits would coincide
        pos = self._ks * b  # (k, n); < 64 * 2^58: no wrap-around
        pos += a
        if self.split < self.k:
            a2, b2 = _second_pair(h1, h2, m)
            pos[self.split:] = (self._ks[:self.k - self.split] * b2 + a2)
        pos %= m
        return (pos >> np.uint64(3)).view(np.int64), _BIT[pos & np.uint64(7)]

    def add_hashes(self, h1: np.ndarray, h2: np.ndarray) -> None:
        """Insert fingerprints (two uint64 arrays of equal length)."""
        if not self.bits.flags.writeable:
            raise OverlapError(f"{self.path}: opened read-only; merge it with a new filter instead of adding to it")
        h1, h2 = _lanes(h1, h2)
        kernels = self._kernels(len(h1))
        if kernels is not None:
            kernels[0](np.asarray(self.bits), h1, h2, np.uint64(self.q), self.k, self.split)
            self.n_added += len(h1)
            return
        for s in range(0, len(h1), _BATCH_NGRAMS):
            byte, mask = self._positions(h1[s:s + _BATCH_NGRAMS], h2[s:s + _BATCH_NGRAMS])
            byte, mask = byte.ravel(), mask.ravel()
            bits = self.bits
            # A fancy-indexed |= loses one of two different bits aimed at the same byte in the same
            # call; re-apply the lost ones until none is left (usually 1-3 rounds).
            while byte.size:
                bits[byte] |= mask
                lost = (bits[byte] & mask) == 0
                byte, mask = byte[lost], mask[lost]
        self.n_added += len(h1)

    def contains_hashes(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """One bool per fingerprint: all k bits set."""
        h1, h2 = _lanes(h1, h2)
        out = np.empty(len(h1), dtype=bool)
        kernels = self._kernels(len(h1))
        if kernels is not None:
            kernels[1](np.asarray(self.bits), h1, h2, np.uint64(self.q), self.k, self.split, out)
            return out
        for s in range(0, len(h1), _BATCH_NGRAMS):
            byte, mask = self._positions(h1[s:s + _BATCH_NGRAMS], h2[s:s + _BATCH_NGRAMS])
            out[s:s + _BATCH_NGRAMS] = ((self.bits[byte] & mask) != 0).all(axis=0)
        return out

    def add_words(self, ws: Sequence[str]) -> int:
        h1, h2 = self._hasher.hashes(ws)
        self.add_hashes(h1, h2)
        return len(h1)

    def add_text(self, text: str) -> int:
        """Insert every 8-gram of `text`; return how many there were."""
        return self.add_words(words(text))

    def contains_words(self, ws: Sequence[str]) -> np.ndarray:
        return self.contains_hashes(*self._hasher.hashes(ws))

    def contains_text(self, text: str) -> np.ndarray:
        """One bool per 8-gram of `text`: possibly in the filter (True) or certainly not (False)."""
        return self.contains_words(words(text))

    # -- statistics -----------------------------------------------------------------------------------
    def bits_set(self) -> int:
        words64 = self.bits.view(np.uint64)  # m is a multiple of 64
        total = 0
        step = _CHUNK // 8
        for i in range(0, words64.size, step):
            total += int(np.bitwise_count(words64[i:i + step]).sum(dtype=np.int64))
        return total

    def stats(self) -> dict:
        """Fill ratio, estimated distinct 8-grams (Swamidass & Baldi 2007) and the false-positive
        rate the filter has now, (set bits / q)^k over the q bits the positions can reach."""
        x = self.bits_set()
        fill = x / self.q
        est = math.inf if x >= self.q else -self.q / self.k * math.log1p(-fill)
        return {"m_bits": self.m, "k_hashes": self.k, "capacity": self.capacity, "fpr_target": self.fpr_target,
                "n_added": self.n_added, "bits_set": x, "fill_ratio": fill, "estimated_distinct": est,
                "achieved_fpr": fill ** self.k, "bytes": self.m // 8}

    def overfull(self, stats: dict | None = None) -> bool:
        """True once the estimated distinct count exceeds the capacity by more than the estimate's
        own noise (`overfill_tolerance`)."""
        s = stats or self.stats()
        return s["estimated_distinct"] > self.capacity + overfill_tolerance(self.capacity, self.m, self.k)


# ---------------------------------------------------------------------------------------------
# Exact set


class ExactSet:
    """The set of normalized 8-gram strings: exact answers for corpora that fit in memory."""

    kind = "exact"

    def __init__(self, grams: Iterable[str] = (), *, n_added: int = 0, n_documents: int | None = None,
                 path: Path | None = None):
        self.grams: set[str] = set(grams)
        self.n_added = n_added
        self.n_documents = n_documents  # as BloomFilter.n_documents
        self.path = path

    def add_words(self, ws: Sequence[str]) -> int:
        g = ngrams(ws)
        self.grams.update(g)
        self.n_added += len(g)
        return len(g)

    def add_text(self, text: str) -> int:
        return self.add_words(words(text))

    def contains_words(self, ws: Sequence[str]) -> np.ndarray:
        s = self.grams
        g = ngrams(ws)
        return np.fromiter((x in s for x in g), dtype=bool, count=len(g))

    def contains_text(self, text: str) -> np.ndarray:
        return self.contains_words(words(text))

    def _payload(self) -> bytes:
        return "\n".join(sorted(self.grams)).encode("utf-8")

    def header(self, payload: bytes | None = None) -> dict:
        payload = self._payload() if payload is None else payload
        return _with_documents({
            "kind": "exact", "ngram": NGRAM, "normalization": NORMALIZATION, "hash_scheme": "none (exact strings)",
            "n_added": self.n_added, "n_distinct": len(self.grams), "payload_bytes": len(payload),
            "checksum": _payload_checksum(payload)}, self.n_documents)

    def save(self, path: str | os.PathLike) -> None:
        payload = self._payload()
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(_header_bytes(self.header(payload)))
                f.write(payload)

    @classmethod
    def from_header(cls, path: Path, header: dict, *, verify: bool = True, progress: bool = False) -> "ExactSet":
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            payload = f.read()
        if verify and _payload_checksum(payload, progress=progress, name=path.name) != header["checksum"]:
            raise FilterFileError(path, "payload checksum mismatch: the 8-gram list is damaged")
        try:
            grams = payload.decode("utf-8").split("\n") if payload else []
        except UnicodeDecodeError as e:  # only without `verify`: the checksum catches it first
            raise FilterFileError(path, f"the 8-gram list is not UTF-8 text at byte {e.start}: the file is damaged") \
                from None
        return cls(grams, n_added=header["n_added"], n_documents=_header_documents(path, header), path=path)

    def stats(self) -> dict:
        return {"n_added": self.n_added, "n_distinct": len(self.grams), "achieved_fpr": 0.0}


Filter = BloomFilter | ExactSet


def _with_documents(header: dict, n_documents: int | None) -> dict:
    # left out when unknown rather than written as a guess; a field that is absent also keeps the
    # files of earlier versions, which lack it, byte-identical when re-merged
    if n_documents is not None:
        header["n_documents"] = int(n_documents)
    return header


def _header_documents(path: Path, header: dict) -> int | None:
    n = header.get("n_documents")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise FilterFileError(path, f"header field n_documents must be a count >= 0, got {n!r}")
    return n


def open_filter(path: str | os.PathLike, *, verify: bool = True, progress: bool = False) -> Filter:
    """Open a `.bloom` file (memory-mapped) or an exact set; `verify` checks the payload checksum
    (with a progress bar for large files when `progress`)."""
    path = Path(path)
    header = read_header(path)
    cls = BloomFilter if header["kind"] == "bloom" else ExactSet
    return cls.from_header(path, header, verify=verify, progress=progress)


# ---------------------------------------------------------------------------------------------
# Inputs: text files (gpt2kit.corpus) and `gpt2kit prepare` token shard folders

SHARD_FORMAT = "gpt2kit-shards"  # the "format" field of a prepared folder's meta.json
_SHARD_CHUNK = 1 << 22  # tokens decoded per step: a 100M-token shard is not loaded as a whole


def _is_shard_folder(p: Path) -> bool:
    meta = p / "meta.json"
    if not (p.is_dir() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == SHARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _as_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list:
    """A list of paths; one path (a str or a Path) is one path: iterating "data/train" would walk
    "d", "a", ..."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def expand_sources(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Text files (folders expanded as `gpt2kit.corpus.expand_inputs` does) and prepared shard
    folders (kept as folders)."""
    out: list[Path] = []
    for p in map(Path, _as_paths(inputs)):
        out.extend([p] if _is_shard_folder(p) else expand_inputs([p]))
    return out


def iter_shard_documents(folder: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """The texts of a prepared shard folder's split, decoded with the folder's own tokenizer and cut
    at <|endoftext|>: 8-grams never span a place where `prepare` joined discontinuous text."""
    from .data import TokenStream, read_meta
    from .tokenizer import Tokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    tok = Tokenizer.from_pretrained(folder / meta["tokenizer"].get("folder", "tokenizer"))
    if tok.fingerprint != meta["tokenizer"]["fingerprint"]:
        raise InputFileError(folder / "meta.json", "tokenizer fingerprint does not match the folder's tokenizer/")
    stream = TokenStream(folder, split)
    eot = tok.eot_token
    # the bytes of the document so far: it may continue into the next chunk or shard (without a
    # validation split, a one-document corpus has no <|endoftext|> at all). Kept as bytes, not ids,
    # and decoded once whole, as a UTF-8 character may be split between two chunks.
    pieces: list[bytes] = []

    def document() -> str:
        text = b"".join(pieces).decode("utf-8", errors="replace")  # as Tokenizer.decode does
        pieces.clear()
        return text

    step = _SHARD_CHUNK
    for shard in stream.shards:
        for lo in range(0, len(shard), step):
            tokens = np.asarray(shard[lo:lo + step], dtype=np.int64)
            start = 0
            for c in np.flatnonzero(tokens == eot).tolist():
                if c > start:
                    pieces.append(tok.decode_bytes(tokens[start:c]))
                if pieces:
                    yield document()
                start = c + 1
            if start < len(tokens):
                pieces.append(tok.decode_bytes(tokens[start:]))
    if pieces:
        yield document()


def iter_source_documents(path: Path, *, field: str = "text", split: str = "train") -> Iterator[str]:
    if path.is_dir():
        return iter_shard_documents(path, split)
    return iter_file_documents(path, field=field)


# ---------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class BuildSummary:
    path: str
    kind: str
    documents: int | None  # None: a merge of filters that do not all record theirs
    ngrams: int  # 8-grams inserted, repeats included
    stats: dict

    def line(self) -> str:
        s = self.stats
        source = "" if self.documents is None else \
            f" from {self.documents:,} document{'' if self.documents == 1 else 's'}"
        if self.kind == "exact":
            return (f"{self.path}: exact set of {s['n_distinct']:,} distinct 8-grams "
                    f"({self.ngrams:,} inserted{source})")
        return (f"{self.path}: {self.ngrams:,} 8-grams{source}, ~{s['estimated_distinct']:,.0f} "
                f"distinct (capacity {s['capacity']:,}); {s['m_bits']:,} bits, k={s['k_hashes']}, "
                f"{s['bytes'] / 2**20:,.1f} MiB; false-positive rate now {s['achieved_fpr']:.3g} "
                f"(target {s['fpr_target']:.3g})")


@dataclass(frozen=True)
class _Job:
    """One worker's share of the inputs: whole files, or every `stride`-th document of them."""

    files: tuple[str, ...]  # text files and shard folders
    stride: int = 1
    offset: int = 0
    field: str = "text"
    split: str = "train"

    def documents(self) -> Iterator[str]:
        i = 0
        for path in self.files:
            for doc in iter_source_documents(Path(path), field=self.field, split=self.split):
                if i % self.stride == self.offset:
                    yield doc
                i += 1


def _size(p: Path) -> int:
    return sum(q.stat().st_size for q in p.glob("*.bin")) if p.is_dir() else p.stat().st_size


def _plan(files: list[Path], workers: int, field: str, split: str) -> list[_Job]:
    """Split the inputs among workers: by file (balancing bytes) when there are enough files,
    else by striping documents (every worker reads everything, hashes its share)."""
    if workers <= 1:
        return [_Job(tuple(map(str, files)), field=field, split=split)]
    if len(files) >= 2 * workers:
        loads: list[tuple[int, int, list[int]]] = [(0, w, []) for w in range(workers)]
        heapq.heapify(loads)
        for i in sorted(range(len(files)), key=lambda j: -_size(files[j])):
            size, w, group = heapq.heappop(loads)
            group.append(i)
            heapq.heappush(loads, (size + _size(files[i]), w, group))
        # keep the input order inside each worker, so a shard's contents do not depend on sizes
        groups = sorted(sorted(g) for _, _, g in loads if g)
        return [_Job(tuple(str(files[i]) for i in g), field=field, split=split) for g in groups]
    return [_Job(tuple(map(str, files)), stride=workers, offset=w, field=field, split=split) for w in range(workers)]


def _count_job(job: _Job, progress=None) -> tuple[int, int]:
    docs = grams = 0
    for doc in job.documents():
        docs += 1
        grams += sum(max(0, len(ws) - NGRAM + 1) for ws in word_windows(doc))
        if progress is not None:
            progress.update(1)
    return docs, grams


def _fill(target: Filter, docs: Iterable[str], *, allow_overfill: bool, progress=None) -> tuple[int, int]:
    """Insert the 8-grams of `docs`; for a Bloom filter, check the fill whenever enough 8-grams have
    arrived that the capacity could have been reached. Returns (documents, 8-grams)."""
    n_docs = n_grams = 0
    bloom = isinstance(target, BloomFilter)
    next_check = target.capacity if bloom else math.inf
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    pending_n = 0
    hasher = NgramHasher()

    def flush() -> None:
        nonlocal pending, pending_n
        if pending:
            target.add_hashes(np.concatenate([p[0] for p in pending]), np.concatenate([p[1] for p in pending]))
        pending, pending_n = [], 0

    for doc in docs:
        n_docs += 1
        for ws in word_windows(doc):
            if not bloom:
                n_grams += target.add_words(ws)
                continue
            h1, h2 = hasher.hashes(ws)
            if len(h1):
                pending.append((h1, h2))
                pending_n += len(h1)
                n_grams += len(h1)
            if pending_n >= _FLUSH_NGRAMS:
                flush()
            if n_grams > next_check:
                flush()
                s = target.stats()
                if target.overfull(s) and not allow_overfill:
                    raise OverfullError(
                        f"the filter holds {_held(s)}, more than its capacity "
                        f"{target.capacity:,}; rebuild with a larger --capacity (or --auto), or pass --allow-overfill "
                        f"to accept a false-positive rate above {target.fpr_target:g}")
                # at most one new distinct 8-gram per inserted 8-gram: no need to look again sooner
                next_check = n_grams + max(target.capacity - s["estimated_distinct"], target.capacity / 100)
        if progress is not None:
            progress.update(1)
    flush()
    return n_docs, n_grams


def _build_shard(job: _Job, path: str, capacity: int, fpr: float, allow_overfill: bool,
                 progress=None) -> tuple[int, int]:
    with BloomFilter.create(path, capacity=capacity, fpr=fpr) as bf:
        n_docs, n_grams = _fill(bf, job.documents(), allow_overfill=allow_overfill, progress=progress)
        bf.n_documents = n_docs
    return n_docs, n_grams


def check_output(path: str | os.PathLike, *, folder: bool = False, what: str = "--out") -> Path:
    """`io.check_output_path`, raising `OverlapError`."""
    return check_output_path(path, folder=folder, what=what, error=OverlapError)


def _check_replaceable(out: Path, inputs: Sequence[Path] = ()) -> None:
    """An --out that exists may be a filter (rebuilt, or merged into), never one of a build's text
    inputs or a file of another kind: it would be lost, replaced by the filter."""
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise OverlapError(f"--out {out}: is one of the inputs; choose another file")
    if out.is_file() and not is_filter_file(out):
        raise OverlapError(f"--out {out}: exists and is not a gpt2kit filter; remove it or choose another file")


def _whole(value, option: str, minimum: int) -> int:
    """`value` as an int, if it is a whole number >= `minimum` (1e6 and numpy integers are; 2.5 and
    True are not)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (bool, np.bool_)):
        with contextlib.suppress(TypeError):
            value = operator.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OverlapError(f"{option} must be a whole number >= {minimum}, got {value!r}")
    return value


def _check_fpr(fpr: float) -> None:
    if not (1e-15 <= fpr < 1):  # also false for nan
        raise OverlapError(f"--fpr must be in [1e-15, 1), got {fpr}")


def build_filter(inputs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 capacity: int | None = None, fpr: float | None = None, exact: bool = False, workers: int = 1,
                 field: str = "text", split: str = "train", allow_overfill: bool = False,
                 progress: bool = False) -> BuildSummary:
    """Insert every normalized 8-gram of `inputs` into a new filter file `out`.

    `capacity=None` sizes the filter from a first pass that counts the 8-grams (an upper bound on
    the distinct ones), plus a margin for the noise of the fill check (`auto_capacity`). With
    `workers > 1`, shard filters are built in separate processes and OR-ed together
    (`merge_filters`). Inputs are text files/folders or `gpt2kit prepare` shard folders (their
    `split`, decoded with their tokenizer). `fpr` defaults to 1e-8; `exact` takes none of the
    Bloom filter's options. Options and the output path are checked before any input is read."""
    from tqdm import tqdm

    # everything that can be refused is refused before the first pass over the corpus
    inputs = _as_paths(inputs)
    workers = _whole(workers, "--workers", 1)
    if workers > 1 and not exact:
        check_spawn_guard(f"build_filter(workers={workers})", OverlapError)
    if exact:
        _refuse_with_exact(capacity=capacity, fpr=fpr, workers=workers, allow_overfill=allow_overfill)
    else:
        fpr = 1e-8 if fpr is None else fpr
        _check_fpr(fpr)
        if capacity is not None:
            capacity = _whole(capacity, "--capacity", 1)
            optimal_parameters(capacity, fpr)
    out = check_output(out)
    files = expand_sources(inputs)
    _check_replaceable(out, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = _plan(files, 1 if exact else workers, field, split)
    if exact:
        es = ExactSet()
        with tqdm(desc="8-grams", unit=" doc", disable=not progress) as bar:
            n_docs, n_grams = _fill(es, jobs[0].documents(), allow_overfill=True, progress=bar)
        _require_ngrams(n_grams, inputs)
        es.n_documents = n_docs
        es.save(out)
        return BuildSummary(str(out), "exact", n_docs, n_grams, es.stats())

    if capacity is None:
        counts = _map(_count_job, [(j,) for j in jobs], len(jobs), desc="counting 8-grams", progress=progress)
        counted = sum(g for _, g in counts)
        _require_ngrams(counted, inputs)
        capacity = auto_capacity(counted, fpr)
        log.info("sized for the %s 8-grams counted in the inputs (an upper bound on the distinct ones), plus %s "
                 "for the noise of the fill check", f"{counted:,}", f"{capacity - counted:,}")

    if len(jobs) == 1:
        with BloomFilter.create(out, capacity=capacity, fpr=fpr, progress=progress) as bf:
            with tqdm(desc="8-grams", unit=" doc", disable=not progress) as bar:
                n_docs, n_grams = _fill(bf, jobs[0].documents(), allow_overfill=allow_overfill, progress=bar)
            _require_ngrams(n_grams, inputs)
            bf.n_documents = n_docs
            stats = _final_check(bf, allow_overfill)
        return BuildSummary(str(out), "bloom", n_docs, n_grams, stats)

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        shards = [str(Path(tmp) / f"shard{i}.bloom") for i in range(len(jobs))]
        results = _map(_build_shard, [(j, s, capacity, fpr, allow_overfill) for j, s in zip(jobs, shards)],
                       len(jobs), desc="8-grams", progress=progress)
        n_docs, n_grams = sum(r[0] for r in results), sum(r[1] for r in results)
        _require_ngrams(n_grams, inputs)
        summary = merge_filters(shards, out, allow_overfill=allow_overfill, verify=False, progress=progress)
    return BuildSummary(str(out), "bloom", n_docs, n_grams, summary.stats)


def _refuse_with_exact(**given) -> None:
    """An exact set is one process with nothing to size: a Bloom filter's option given with it
    would be silently ignored."""
    unset = {"capacity": None, "fpr": None, "workers": 1, "allow_overfill": False}
    for name, value in given.items():
        if value != unset[name]:
            raise OverlapError(f"--{name.replace('_', '-')} does not apply to --exact (an exact set stores the "
                               "8-grams themselves, in one process)")


def _map(fn, arglists: list[tuple], workers: int, *, desc: str, progress: bool = False) -> list:
    """fn(*args, progress=...) for each args, in `workers` processes when there is more than one,
    under one bar of the documents read by all of them."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from tqdm import tqdm

    with tqdm(desc=desc, unit=" doc", disable=not progress) as bar:
        if workers <= 1:
            return [fn(*a, progress=bar) for a in arglists]
        # spawn: workers must not inherit a parent's threads or locks (torch, tqdm)
        ctx = mp.get_context("spawn")
        read, stop = ctx.Value("q", 0), ctx.Value("b", 0)
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_share_count,
                                      initargs=(read, stop))
        with pool, _broken_pool_is_an_error(workers):
            futures = [pool.submit(_in_worker, fn, *a) for a in arglists]
            running = set(futures)
            while running:
                done, running = cf.wait(running, timeout=0.5, return_when=cf.FIRST_EXCEPTION)
                bar.update(read.value - bar.n)
                for f in done:
                    if f.exception() is not None:
                        # the others' work is thrown away with this error: have them stop now, not
                        # when their shares are done (leaving the pool waits for them)
                        stop.value = 1
                        f.result()
            return [f.result() for f in futures]


@contextlib.contextmanager
def _broken_pool_is_an_error(workers: int):
    import concurrent.futures as cf

    try:
        yield
    except cf.process.BrokenProcessPool:
        raise OverlapError(f"a worker process failed (its error is printed above), was killed or ran out of memory: "
                           f"run it again (out of memory: with fewer than {workers} workers; failed at its start: "
                           f"with the script's work under `if __name__ == \"__main__\":`)") from None


_shared = None  # in a worker process of `_map`: the parent's count of documents read, and its stop flag


def _share_count(counter, stop) -> None:
    global _shared
    _shared = (counter, stop)


class _Stopped(Exception):
    """Another worker failed: this one's share is not needed."""


class _SharedProgress:
    """`update(n)` for a worker process: adds to the parent's count a few times a second, not once
    per document (each addition takes a lock shared by all the workers), and stops the worker
    (`_Stopped`) once the parent says so."""

    def __init__(self, counter, stop):
        self.counter, self.stop, self.pending, self.last = counter, stop, 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.pending += n
        if time.monotonic() - self.last >= 0.2:
            self.flush()
            if self.stop.value:
                raise _Stopped()

    def flush(self) -> None:
        if self.pending:
            with self.counter.get_lock():
                self.counter.value += self.pending
        self.pending, self.last = 0, time.monotonic()


def _in_worker(fn, *args):
    """fn(*args), with a user-facing error turned into one that survives the trip back to the parent
    (an exception whose __init__ takes other arguments than its message cannot be unpickled)."""
    progress = None if _shared is None else _SharedProgress(*_shared)
    try:
        return fn(*args, progress=progress)
    except GPT2KitError as e:
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            raise OverlapError(str(e)) from None
        raise
    finally:
        if progress is not None:
            progress.flush()


def _require_ngrams(n: int, inputs: Sequence) -> None:
    if n == 0:
        names = ", ".join(map(str, inputs))
        raise OverlapError(f"{names}: no 8-grams in the inputs (documents need at least {NGRAM} words)")


def _held(stats: dict) -> str:
    n = stats["estimated_distinct"]  # inf once every bit is set: it could hold any number
    return f"~{n:,.0f} distinct 8-grams" if math.isfinite(n) else "more distinct 8-grams than it can count (every bit set)"


def _final_check(bf: BloomFilter, allow_overfill: bool) -> dict:
    s = bf.stats()
    if bf.overfull(s):
        msg = (f"the filter holds {_held(s)}, more than its capacity "
               f"{bf.capacity:,}: false-positive rate {s['achieved_fpr']:.3g}, target {bf.fpr_target:g}")
        if not allow_overfill:
            raise OverfullError(msg + "; use a larger --capacity (or --auto), or --allow-overfill")
        log.warning("warning: %s", msg)
    return s


def merge_filters(paths: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  allow_overfill: bool = False, verify: bool = True, progress: bool = False) -> BuildSummary:
    """The union of filters with equal parameters: bitwise OR of Bloom filters, union of exact sets."""
    paths = _as_paths(paths)
    if len(paths) < 1:
        raise OverlapError("merge needs at least one filter")
    out = check_output(out)
    _check_replaceable(out)
    seen = set()
    for p in paths:
        if Path(p).resolve() in seen:  # its bits would OR in harmlessly, but its counts add up twice
            raise OverlapError(f"{p} is named twice: its 8-grams and documents would be counted twice")
        seen.add(Path(p).resolve())
    headers = [read_header(p) for p in paths]
    first = headers[0]
    keys = ("kind", "m_bits", "k_hashes", "capacity", "fpr_target", "hash_scheme", "normalization", "ngram")
    for p, h in zip(paths[1:], headers[1:]):
        diff = [k for k in keys if h.get(k) != first.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {first.get(k)!r} vs {h.get(k)!r}" for k in diff)
            raise OverlapError(f"cannot merge {paths[0]} and {p}: different parameters ({detail})")
    filters = [open_filter(p, verify=verify, progress=progress) for p in paths]
    docs = [f.n_documents for f in filters]
    n_documents = None if None in docs else sum(docs)
    if first["kind"] == "exact":
        es = ExactSet(n_added=sum(f.n_added for f in filters), n_documents=n_documents)
        for f in filters:
            es.grams |= f.grams
        es.save(out)
        return BuildSummary(str(out), "exact", n_documents, es.n_added, es.stats())
    with BloomFilter.create(out, capacity=0, like=filters[0], progress=progress) as bf:
        for i in range(0, bf.bits.size, _CHUNK):
            chunk = np.array(filters[0].bits[i:i + _CHUNK])
            for f in filters[1:]:
                chunk |= f.bits[i:i + _CHUNK]
            bf.bits[i:i + _CHUNK] = chunk
        bf.n_added = sum(f.n_added for f in filters)
        bf.n_documents = n_documents
        stats = _final_check(bf, allow_overfill)
    return BuildSummary(str(out), "bloom", n_documents, bf.n_added, stats)


# ---------------------------------------------------------------------------------------------
# The paper's false-positive check


def measure_fpr(bf: BloomFilter, samples: int = 1_000_000, *, seed: int = 0, vocab: int = 50_000) -> dict:
    """Query `samples` random 8-grams of random 6-12 letter strings (none of which is in any real
    corpus) and count hits: the paper's check of its filters (1M random strings, zero hits)."""
    samples, seed = check_fpr_options(samples, seed)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 13, size=vocab)
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(lengths.sum()), dtype=np.uint8).tobytes().decode("ascii")
    ends = np.cumsum(lengths)
    vocab_words = [letters[e - n:e] for e, n in zip(ends.tolist(), lengths.tolist())]
    lanes = NgramHasher().word_lanes(vocab_words)  # through the same word hashing as real text
    hits = 0
    done = 0
    step = 1 << 18
    while done < samples:
        n = min(step, samples - done)
        pick = rng.integers(0, vocab, size=(NGRAM, n))
        hs = []
        for lane in range(2):
            acc = np.zeros(n, dtype=np.uint64)
            for i in range(NGRAM):
                acc += lanes[pick[i], lane] * _COEF[lane, i]
            hs.append(_fmix64_np(acc))
        hits += int(bf.contains_hashes(hs[0], hs[1]).sum())
        done += n
    s = bf.stats()
    rate = hits / samples
    return {"samples": samples, "hits": hits, "measured_fpr": rate,
            "upper_95": _upper95(hits, samples), "fpr_target": bf.fpr_target, "expected_fpr": s["achieved_fpr"],
            "seed": seed}


def check_fpr_options(samples: int, seed: int) -> tuple[int, int]:
    """The options of `measure_fpr`, checked apart so that the CLI can refuse them before it reads
    and verifies a filter that may be tens of GiB."""
    return _whole(samples, "--samples", 1), _whole(seed, "--seed", 0)  # numpy takes no negative seed


def _upper95(hits: int, n: int) -> float:
    """One-sided 95% upper confidence bound on a rate (Wilson score; 3/n, the rule of three, at 0)."""
    if hits == 0:
        return 3.0 / n
    z = 1.6449
    p = hits / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + half) / (1 + z * z / n)


# ---------------------------------------------------------------------------------------------
# Querying: Table 6


@dataclass
class Passage:
    words: int  # length of the overlapping run, in words
    file: str
    document: int  # index of the document within the file
    start_word: int
    text: str  # normalized words (the first 80 when longer)


@dataclass
class SetResult:
    """One test set against one filter."""

    filter: str
    test_set: str
    ngrams: int = 0
    hits: int = 0
    documents: int = 0
    short_documents: int = 0  # fewer than 8 words: no 8-grams
    files: list[dict] = field(default_factory=list)
    median_doc_percent: float = 0.0
    mean_doc_percent: float = 0.0
    share_docs_above_50: float = 0.0
    doc_percent_deciles: list[float] = field(default_factory=list)
    top_passages: list[Passage] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.hits / self.ngrams if self.ngrams else 0.0


@dataclass
class OverlapReport:
    filters: list[dict]  # name, path, kind, header statistics
    test_sets: list[str]
    results: list[SetResult]

    def percent_table(self) -> dict[str, dict[str, float]]:
        return {f["name"]: {r.test_set: r.percent for r in self.results if r.filter == f["name"]} for f in self.filters}

    def to_json(self) -> dict:
        rs = []
        for r in self.results:
            d = asdict(r)
            d["percent"] = r.percent
            rs.append(d)
        return json_safe({"ngram": NGRAM, "normalization": NORMALIZATION, "filters": self.filters,
                          "test_sets": self.test_sets, "table": self.percent_table(), "results": rs})

    def to_markdown(self) -> str:
        lines = ["# 8-gram overlap (GPT-2 paper, Section 4, Table 6)", "",
                 f"Percent of each test set's {NGRAM}-grams found in each filter "
                 f"(text normalized to lower-cased alphanumeric words separated by single spaces).", "",
                 "| filter | " + " | ".join(self.test_sets) + " |",
                 "|---|" + "---|" * len(self.test_sets)]
        table = self.percent_table()
        for f in self.filters:
            lines.append(f"| {f['name']} | " + " | ".join(f"{table[f['name']][t]:.2f}" for t in self.test_sets) + " |")
        lines += ["", "## Filters", "", "| filter | kind | 8-grams inserted | false-positive rate |", "|---|---|---|---|"]
        for f in self.filters:
            rate = "0 (exact)" if f["kind"] == "exact" else f"{f['achieved_fpr']:.2g} (target {f['fpr_target']:g})"
            lines.append(f"| {f['name']} | {f['kind']} | {f['n_added']:,} | {rate} |")
        lines += ["", "## Documents", "",
                  f"Documents shorter than {NGRAM} words have no {NGRAM}-grams; the per-document figures are "
                  "over the others.", "",
                  f"| filter | test set | documents | < {NGRAM} words | 8-grams | overlap % | mean doc % | "
                  "median doc % | docs > 50% |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            lines.append(f"| {r.filter} | {r.test_set} | {r.documents:,} | {r.short_documents:,} | {r.ngrams:,} | "
                         f"{r.percent:.2f} | {r.mean_doc_percent:.2f} | {r.median_doc_percent:.2f} | "
                         f"{100 * r.share_docs_above_50:.1f}% |")
        lines += ["", "Per-document overlap %, deciles:", "",
                  "| filter | test set | " + " | ".join(f"p{q}" for q in range(0, 101, 10)) + " |",
                  "|---|---|" + "---|" * 11]
        for r in self.results:
            lines.append(f"| {r.filter} | {r.test_set} | " + " | ".join(f"{d:.1f}" for d in r.doc_percent_deciles)
                         + " |")
        lines += ["", "## Files", "", "| filter | file | 8-grams | overlap % |", "|---|---|---|---|"]
        for r in self.results:
            for fr in r.files:
                lines.append(f"| {r.filter} | {fr['file']} | {fr['ngrams']:,} | {fr['percent']:.2f} |")
        lines += ["", "## Longest overlapping passages", ""]
        for r in self.results:
            if not r.top_passages:
                continue
            lines.append(f"### {r.test_set} in {r.filter}")
            lines.append("")
            for p in r.top_passages:
                lines.append(f"- {p.words} words, {p.file} document {p.document}, word {p.start_word}: \"{p.text}\"")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def plot(self, path: str | os.PathLike) -> None:
        """A grouped bar chart of the table (PNG, matplotlib's Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        table = self.percent_table()
        n_f = len(self.filters)
        x = np.arange(len(self.test_sets))
        width = 0.8 / n_f
        fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(self.test_sets) + 2), 3.8), dpi=120)
        for i, f in enumerate(self.filters):
            vals = [table[f["name"]][t] for t in self.test_sets]
            bars = ax.bar(x + (i - (n_f - 1) / 2) * width, vals, width, label=f["name"])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, self.test_sets, rotation=20 if len(self.test_sets) > 3 else 0)
        ax.set_ylabel(f"% of test {NGRAM}-grams in filter")
        ax.set_title(f"{NGRAM}-gram overlap (Table 6 style)")
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)

    REPORT_FILES = ("report.md", "report.json", "overlap.png")

    @classmethod
    def check_out_dir(cls, out_dir: str | os.PathLike) -> Path:
        """Refuse, before a query runs, an `out_dir` that `write` could not write into."""
        out_dir = check_output(out_dir, folder=True, what="--out-dir")
        for name in cls.REPORT_FILES:
            check_output(out_dir / name, what="--out-dir")
        return out_dir

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """report.md, report.json and overlap.png in `out_dir`."""
        out_dir = Path(out_dir)
        md, js, png = (out_dir / name for name in self.REPORT_FILES)
        write_text(md, self.to_markdown())
        write_json(js, self.to_json())
        self.plot(png)
        return [md, js, png]


def json_safe(obj):
    """`obj` with its infinite and NaN floats as None: JSON has no spelling for them (Python writes
    the bare word Infinity, which other parsers refuse). The distinct-count estimate of a filter
    with every bit set is infinite."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _runs(hits: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of True."""
    if not hits.any():
        return []
    d = np.diff(np.concatenate(([0], hits.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def _label(path: str | os.PathLike) -> str:
    p = Path(path)
    name = p.name
    for suffix in (".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name if p.is_dir() else Path(name).stem or name


def query(filters: str | os.PathLike | Sequence[str | os.PathLike] | dict,
          test_sets: str | os.PathLike | Sequence[str | os.PathLike], *, top: int = 10,
          field: str = "text", split: str = "train", verify: bool = True, progress: bool = False,
          exclude: str | os.PathLike | None = None) -> OverlapReport:
    """Percent of each test set's 8-grams in each filter, per file and per document, with the
    longest overlapping passages. `filters` are paths, or {name: path or opened filter}. Files
    under `exclude` (the report's own folder, when it lies inside a test set's) are not read."""
    from tqdm import tqdm

    top = _whole(top, "--top", 0)
    test_sets = _as_paths(test_sets)
    if not isinstance(filters, dict):
        filters = _as_paths(filters)
        filters = {_unique_label(p, filters): p for p in filters}
    if not filters or not test_sets:
        raise OverlapError("query needs at least one filter and one test set")
    opened = {name: (open_filter(f, verify=verify, progress=progress) if isinstance(f, (str, os.PathLike)) else f)
              for name, f in filters.items()}
    finfo = []
    for name, f in opened.items():
        s = f.stats()
        finfo.append({"name": name, "path": str(f.path) if f.path else None, "kind": f.kind, **s})
    labels = [_unique_label(t, test_sets) for t in test_sets]
    hasher = NgramHasher()
    any_bloom = any(isinstance(f, BloomFilter) for f in opened.values())
    results: list[SetResult] = []
    for label, ts in zip(labels, test_sets):
        per = {name: SetResult(filter=name, test_set=label) for name in opened}
        doc_pct: dict[str, list[float]] = {name: [] for name in opened}
        heaps: dict[str, list] = {name: [] for name in opened}
        file_rows: dict[str, dict[str, dict]] = {name: {} for name in opened}
        doc_index: dict[Path, int] = {}
        counter = itertools.count()
        any_doc = False
        skip = None if exclude is None else Path(exclude).resolve()
        docs = ((path, doc) for path in expand_sources([ts])
                if skip is None or not Path(path).resolve().is_relative_to(skip)
                for doc in iter_source_documents(path, field=field, split=split))
        for path, doc in tqdm(docs, desc=label, unit=" doc", disable=not progress):
            any_doc = True
            di = doc_index.get(path, 0)
            doc_index[path] = di + 1
            doc_hits: dict[str, list[np.ndarray]] = {name: [] for name in opened}
            windows = 0
            for ws in word_windows(doc):
                windows += 1
                if len(ws) < NGRAM:
                    continue
                hashes = hasher.hashes(ws) if any_bloom else None
                for name, flt in opened.items():
                    doc_hits[name].append(flt.contains_hashes(*hashes) if isinstance(flt, BloomFilter)
                                          else flt.contains_words(ws))
            wanted: list[tuple[int, int, list]] = []  # passages whose words are to be looked up
            for name, flt in opened.items():
                r = per[name]
                r.documents += 1
                row = file_rows[name].setdefault(str(path), {"file": str(path), "documents": 0, "ngrams": 0, "hits": 0})
                row["documents"] += 1
                if not doc_hits[name]:
                    r.short_documents += 1
                    continue
                hits = doc_hits[name][0] if len(doc_hits[name]) == 1 else np.concatenate(doc_hits[name])
                n = len(hits)
                h = int(hits.sum())
                r.ngrams += n
                r.hits += h
                row["ngrams"] += n
                row["hits"] += h
                doc_pct[name].append(100.0 * h / n)
                for start, length in _runs(hits):
                    heap = heaps[name]
                    if len(heap) >= top and not (top and length > heap[0][0]):
                        continue
                    # the text is looked up before the next document: this one will not be in memory
                    text: list = [None]
                    wanted.append((start, length + NGRAM - 1, text))
                    item = (length, -next(counter), str(path), di, start, text)
                    if len(heap) < top:
                        heapq.heappush(heap, item)
                    else:
                        heapq.heapreplace(heap, item)
            if wanted:
                _passage_texts(ws if windows == 1 else None, doc, wanted)
        if not any_doc:
            raise OverlapError(f"{ts}: test set holds no documents")
        for name in opened:
            r = per[name]
            if r.ngrams == 0:
                raise OverlapError(f"{ts}: no 8-grams in the test set (documents need at least {NGRAM} words)")
            pct = np.array(doc_pct[name])
            r.median_doc_percent = float(np.median(pct))
            r.mean_doc_percent = float(pct.mean())
            r.share_docs_above_50 = float((pct > 50).mean())
            r.doc_percent_deciles = [float(v) for v in np.percentile(pct, np.arange(0, 101, 10))]
            for row in file_rows[name].values():
                row["percent"] = 100.0 * row["hits"] / row["ngrams"] if row["ngrams"] else 0.0
            r.files = list(file_rows[name].values())
            r.top_passages = [Passage(words=length + NGRAM - 1, file=f, document=d, start_word=s, text=text[0])
                              for length, _, f, d, s, text in sorted(heaps[name], key=lambda t: (-t[0], -t[1]))]
            results.append(r)
    return OverlapReport(filters=finfo, test_sets=labels, results=results)


_PASSAGE_WORDS = 80  # a passage's text in the report: its first 80 words


def _passage_texts(ws: list[str] | None, doc: str, wanted: list[tuple[int, int, list]]) -> None:
    """Fill in the text of each passage (first word, words, [text]) of a document: from its words
    `ws` when the document was one window, else by reading its windows again, which keeps only
    the passages' words in memory, not the document's."""
    spans = {}
    if ws is not None:
        for start, length, _ in wanted:
            spans[start] = ws[start:start + min(length, _PASSAGE_WORDS)]
    else:
        need = {start: start + min(length, _PASSAGE_WORDS) for start, length, _ in wanted}
        spans = {start: [] for start in need}
        offset = 0  # the document's index of the window's first word
        for window in word_windows(doc):
            end = offset + len(window)
            for start, stop in need.items():
                got = spans[start]
                lo, hi = max(start + len(got), offset), min(stop, end)
                if lo < hi:
                    got.extend(window[lo - offset:hi - offset])
            offset = end - len(window[-(NGRAM - 1):])  # the next window repeats the last 7 words
    for start, length, text in wanted:
        text[0] = " ".join(spans[start]) + (" …" if length > _PASSAGE_WORDS else "")


def _unique_label(p, all_paths) -> str:
    """A short name for a path: its stem, else its file name, else the whole path, whichever is
    the first that no other path shares."""
    for name in (_label, lambda q: Path(q).name, str):
        label = name(p)
        if sum(name(q) == label for q in all_paths) == 1:
            return label
    return str(p)
