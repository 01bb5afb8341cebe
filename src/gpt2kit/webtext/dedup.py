"""Stage 4: remove exact and near duplicates across the whole corpus.

Exact duplicates share the hash of their normalized text (NFKC, lower case, punctuation and
whitespace collapsed). Near duplicates are found as OpenWebText did: MinHash signatures of word
5-gram shingles (128 permutations; datasketch's values bit for bit, computed with numpy a shard at
a time), banded LSH with the band/row split that datasketch's `MinHashLSH` picks for the Jaccard
threshold (0.5 by default: 25 bands of 5 rows), and every candidate pair verified by its
estimated Jaccard similarity. datasketch itself is the tests' oracle, not a run-time dependency.

Of a group of duplicates the document kept is the one with the highest karma (then the smallest
URL, so the choice is deterministic). Documents are visited in that order and a document is
dropped when a kept one is similar to it; this greedy rule is the one of an LSH index that is
queried before each insert, computed here with sorted arrays instead of an in-memory index, so that
8M documents need about 8M x 25 x 8 bytes of band keys instead of tens of GB of Python objects.

Three steps, each resumable: signatures per shard (parallel), the global decision (one process),
filtered shards (parallel). `dedup/duplicates.jsonl.zst` says which document each dropped one
duplicated.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..io import atomic_path
from .work import (Runner, WebTextError, WorkFolder, check_int, config_dict, read_jsonl_zst, run_tasks, shard_name,
                   write_jsonl_zst)

MAX_BUCKET_NEIGHBOURS = 8   # candidates per document and band, besides its bucket's leader


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.5      # Jaccard similarity of 5-gram shingle sets
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1

    def __post_init__(self):
        # written as one chained comparison so that nan fails it too
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise WebTextError(f"--threshold: expected a Jaccard similarity in (0, 1], got {t!r}")
        check_int("--num-perm", self.num_perm, 1)
        check_int("ngram", self.ngram, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise WebTextError(f"seed: expected an integer in [0, 2**32), got {self.seed!r}")   # numpy's RandomState


def normalize(text: str) -> str:
    """The text that exact de-duplication compares.

    >>> normalize("Hello,  World!\\n") == normalize("hello world")
    True
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"\w+", text))


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalize(text).encode(), digest_size=8).digest(), "little")


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams of the normalized text (the whole text when it is shorter than n words).

    >>> sorted(shingles("a b c", 2))
    [b'a b', b'b c']
    """
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


# MinHash, the "affine32" scheme of datasketch >= 2.0 (its values, bit for bit; the tests check
# them against datasketch): each shingle's 32-bit SHA-1 prefix is pre-mixed by the MurmurHash3
# finalizer, then permuted by h -> a*h + b (mod 2**32, a odd), and each permutation keeps its minimum.
# Computed here for a whole shard at once with numpy instead of one Python object per document.


@lru_cache(maxsize=4)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), each (num_perm,) uint32, drawn exactly as datasketch draws them for `seed`."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """The 32-bit hashes (SHA-1 prefix, little endian) of a text's distinct shingles."""
    digests = b"".join(hashlib.sha1(s).digest()[:4] for s in shingles(text, n))
    return np.frombuffer(digests, dtype="<u4").astype(np.uint32)


def minhash_signatures(texts: list[str], cfg: "DedupConfig", chunk: int = 1 << 16) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures of the texts' shingle sets."""
    a, b = permutations(cfg.num_perm, cfg.seed)
    sigs = np.full((len(texts), cfg.num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    hashes = [shingle_hashes(t, cfg.ngram) for t in texts]
    with np.errstate(over="ignore"):
        for i, hv in enumerate(hashes):
            mixed = _fmix32(hv)
            for start in range(0, len(mixed), chunk):
                # (shingles, num_perm): every shingle under every permutation; wraps mod 2**32
                phv = mixed[start:start + chunk, None] * a[None, :] + b[None, :]
                np.minimum(sigs[i], phv.min(axis=0), out=sigs[i])
    return sigs


def minhash_signature(text: str, cfg: "DedupConfig") -> np.ndarray:
    return minhash_signatures([text], cfg)[0]


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false positive and false negative probability mass,
    the choice datasketch's MinHashLSH makes (integrals by Gauss-Legendre quadrature)."""
    x, w = np.polynomial.legendre.leggauss(64)

    def integral(f, lo, hi):
        s = (hi - lo) / 2 * x + (hi + lo) / 2
        return float((hi - lo) / 2 * np.sum(w * f(s)))

    best, opt = float("inf"), (0, 0)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = integral(lambda s: 1 - (1 - s ** rows) ** bands, 0.0, threshold)
            fn = integral(lambda s: (1 - s ** rows) ** bands, threshold, 1.0)
            err = fp * fp_weight + fn * fn_weight
            if err < best:
                best, opt = err, (bands, rows)
    return opt


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one hash per band of each signature; equal bands give equal keys."""
    keys = np.zeros((sigs.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(sigs.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
            for c in range(b * rows, (b + 1) * rows):
                h = (h ^ sigs[:, c].astype(np.uint64)) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(29)
            keys[:, b] = h
    return keys


def candidate_pairs(keys: np.ndarray, max_neighbours: int = MAX_BUCKET_NEIGHBOURS) -> np.ndarray:
    """(m, 2) pairs (i, j), i < j, of rows that share a band key. Rows are in priority order; each
    row is paired with its bucket's first row and with up to `max_neighbours` rows just before it."""
    pairs = []
    for b in range(keys.shape[1]):
        order = np.argsort(keys[:, b], kind="stable")
        sk = keys[order, b]
        new_group = np.ones(len(sk), dtype=bool)
        new_group[1:] = sk[1:] != sk[:-1]
        leader = order[np.maximum.accumulate(np.where(new_group, np.arange(len(sk)), 0))]
        same = ~new_group
        pairs.append(np.stack([leader[same], order[same]], axis=1))
        for d in range(1, max_neighbours + 1):
            if d >= len(sk):
                break
            m = sk[d:] == sk[:-d]
            pairs.append(np.stack([order[:-d][m], order[d:][m]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    allp = np.concatenate(pairs).astype(np.int64)
    allp = allp[allp[:, 0] != allp[:, 1]]
    allp.sort(axis=1)
    return np.unique(allp, axis=0)


def near_duplicates(sigs: np.ndarray, threshold: float, bands: int, rows: int) -> np.ndarray:
    """For rows in priority order: -1 for a row to keep, else the kept row it duplicates."""
    n = sigs.shape[0]
    dup_of = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return dup_of
    pairs = candidate_pairs(band_keys(sigs, bands, rows))
    if len(pairs):
        sim = (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1)
        pairs = pairs[sim >= threshold]
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by later row, then earlier
    for hi, lo in pairs:
        if dup_of[lo] == -1 and dup_of[hi] == -1:
            dup_of[lo] = hi
    return dup_of


# ---------------------------------------------------------------------------------------------
# Steps


def signature_shard(in_path: str, out_path: str, cfg: DedupConfig) -> dict:
    docs = list(read_jsonl_zst(in_path))
    sigs = minhash_signatures([d["text"] for d in docs], cfg)
    hashes = np.array([text_hash(d["text"]) for d in docs], dtype=np.uint64)
    # URLs as one UTF-8 buffer and end offsets: a fixed-width numpy string array would be as wide as
    # the longest URL (thousands of characters) for every document, on disk and in `decide`
    encoded = [d["url"].encode("utf-8") for d in docs]
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sigs=sigs, hashes=hashes, scores=np.array([d["score"] for d in docs], dtype=np.int64),
                 url_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8),
                 url_ends=np.cumsum([len(u) for u in encoded], dtype=np.int64))
    return {"docs": len(docs)}


def _url_columns(part) -> tuple[np.ndarray, np.ndarray]:
    if "url_bytes" in part.files:
        return part["url_bytes"], part["url_ends"]
    # a signature file of an earlier gpt2kit (a fixed-width string array): a resumed run reads it
    encoded = [u.encode("utf-8") for u in part["urls"].tolist()]
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum([len(u) for u in encoded], dtype=np.int64)


class _URLs:
    """The URLs of every signature file, indexable, without one Python object per URL at rest."""

    def __init__(self, parts: list):
        columns = [_url_columns(p) for p in parts]
        self.blob = b"".join(data.tobytes() for data, _ in columns)
        ends, base = [], 0
        for data, part_ends in columns:
            ends.append(part_ends + base)
            base += len(data)
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], self.ends[:-1]]).astype(np.int64)

    def raw(self, i: int) -> bytes:
        return self.blob[self.starts[i]:self.ends[i]]

    def __getitem__(self, i) -> str:
        return self.raw(int(i)).decode("utf-8")

    def order(self) -> np.ndarray:
        """Each URL's position in sorted order (UTF-8 bytes sort as code points, as str does)."""
        by_url = np.array(sorted(range(len(self.ends)), key=self.raw), dtype=np.int64)
        pos = np.empty_like(by_url)
        pos[by_url] = np.arange(len(by_url))
        return pos


def decide(sig_paths: list[str], keep_path: str, dups_path: str, cfg: DedupConfig) -> dict:
    """Load every signature, decide which documents stay; write the keep mask and the duplicate list."""
    parts = [np.load(p) for p in sig_paths]
    sigs = np.concatenate([p["sigs"] for p in parts]) if parts else np.zeros((0, cfg.num_perm), np.uint32)
    hashes = np.concatenate([p["hashes"] for p in parts]) if parts else np.zeros(0, np.uint64)
    scores = np.concatenate([p["scores"] for p in parts]) if parts else np.zeros(0, np.int64)
    urls = _URLs(parts)
    sizes = [len(p["hashes"]) for p in parts]
    rank = np.lexsort((urls.order(), -scores))   # priority order: highest karma, then URL
    keep = np.ones(len(rank), dtype=bool)
    dups = []
    _, first = np.unique(hashes[rank], return_index=True)
    exact_kept = np.zeros(len(rank), dtype=bool)
    exact_kept[first] = True
    leader = {int(hashes[rank[i]]): rank[i] for i in first}
    for i in np.flatnonzero(~exact_kept):
        doc = rank[i]
        keep[doc] = False
        dups.append({"url": str(urls[doc]), "duplicate_of": str(urls[leader[int(hashes[doc])]]), "kind": "exact"})
    survivors = rank[exact_kept]
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    dup_of = near_duplicates(sigs[survivors], cfg.threshold, bands, rows)
    for i in np.flatnonzero(dup_of >= 0):
        doc = survivors[i]
        keep[doc] = False
        dups.append({"url": str(urls[doc]), "duplicate_of": str(urls[survivors[dup_of[i]]]), "kind": "near"})
    with atomic_path(keep_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, keep=keep, sizes=np.array(sizes, dtype=np.int64))
    dups.sort(key=lambda d: d["url"])
    write_jsonl_zst(dups_path, dups)
    n_exact = int((~exact_kept).sum())
    return {"exact_duplicates": n_exact, "near_duplicates": int((dup_of >= 0).sum()), "kept": int(keep.sum())}


def filter_shard(in_path: str, out_path: str, keep: np.ndarray) -> dict:
    docs = [d for d, k in zip(read_jsonl_zst(in_path), keep) if k]
    n = write_jsonl_zst(out_path, docs)
    return {"docs": n, "bytes": sum(len(d["text"].encode()) for d in docs)}


def dedup_documents(work, cfg: DedupConfig = DedupConfig(), runner: Runner = Runner()) -> dict:
    """Run the dedup stage over all extracted shards; returns its totals."""
    wf = WorkFolder(work)
    ids = wf.shard_ids("extract")
    wf.check_config("dedup", {**config_dict(cfg), "upstream": wf.fingerprint("extract")})
    src, out = wf.stage_dir("extract"), wf.stage_dir("dedup")
    sig_paths = {k: str(out / "_sig" / f"sig-{k:05d}.npz") for k in ids}
    sig_tasks = [(f"sig-{k:05d}", (str(src / f"{shard_name('extract', k)}.jsonl.zst"), sig_paths[k], cfg)) for k in ids]
    _, skipped = run_tasks(wf, "dedup", signature_shard, sig_tasks, runner, desc="dedup: signatures")
    keep_path = out / "_keep.npz"
    decision, skipped2 = run_tasks(wf, "dedup", decide, [("decide", ([sig_paths[k] for k in ids], str(keep_path),
                                                                      str(out / "duplicates.jsonl.zst"), cfg))],
                                   Runner(progress=runner.progress), desc="dedup: decide")
    with np.load(keep_path) as z:
        keep, sizes = z["keep"], z["sizes"]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    tasks = []
    for i, k in enumerate(ids):
        name = shard_name("dedup", k)
        tasks.append((name, (str(src / f"{shard_name('extract', k)}.jsonl.zst"), str(out / f"{name}.jsonl.zst"),
                             keep[offsets[i]:offsets[i + 1]])))
    kept, skipped3 = run_tasks(wf, "dedup", filter_shard, tasks, runner, desc="dedup: write")
    totals = {"docs_in": int(offsets[-1]), **decision, "docs": kept.get("docs", 0), "bytes": kept.get("bytes", 0)}
    wf.finish("dedup", ids, totals)
    return {**totals, "skipped_tasks": skipped + skipped2 + skipped3}
