"""Token shards: corpus -> uint16 memmaps on disk -> training batches.

`prepare` turns text inputs (anything `gpt2kit.corpus.iter_documents` reads) into a folder:

    meta.json                 tokenizer fingerprint, token/char counts, sources, shard list
    tokenizer/                the tokenizer that made the shards (so the folder is self-contained)
    train_000000.bin ...      raw little-endian uint16 token ids, `shard_tokens` per shard
    val_000000.bin ...        (the last shard of a split may be shorter)

Documents are cut at paragraph (else line) breaks into segments of about `segment_chars` characters;
every k-th segment (k = round(1 / val_fraction)) goes to the validation split, so the held-out text
is spread evenly over the corpus and the split never depends on worker count or timing. Each run of
consecutive segments of one document is preceded by `<|endoftext|>`, so the model always sees a
document boundary where the text is discontinuous (GPT-2 separates documents the same way).

Rerunning `prepare` with the same arguments skips finished shards: after each shard, a progress
file records how far each split's stream got, and a resumed run only reads (not tokenizes) the
segments before that point.

The batch functions at the bottom are pure: offsets for an optimizer step depend only on
(seed, step), so a resumed or distributed run reads exactly the windows an uninterrupted
single-process run would.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .corpus import expand_inputs, iter_file_documents
from .errors import GPT2KitError, InputFileError, check_spawn_guard
from .io import atomic_path, check_output_path, write_json

log = logging.getLogger(__name__)

FORMAT = "gpt2kit-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DTYPE = np.uint16


class DataError(GPT2KitError):
    """A shard folder is missing, incomplete, or does not match what it is used with."""


# ---------------------------------------------------------------------------------------------
# Segmenting documents and assigning them to splits (pure)


def split_segments(text: str, segment_chars: int) -> list[str]:
    """Cut `text` into pieces of `segment_chars` to `2 * segment_chars` characters (the last may be
    shorter). A piece ends at the first paragraph break (a blank line) past `segment_chars`
    characters if one comes before `2 * segment_chars`, else at the first line break there, else
    it is cut at `2 * segment_chars`. The pieces concatenate back to `text`.

    >>> split_segments("aa\\n\\nbb\\n\\ncc", 3)
    ['aa\\n\\n', 'bb\\n\\n', 'cc']
    """
    return list(iter_split_segments(text, segment_chars))


def iter_split_segments(text: str, segment_chars: int) -> Iterator[str]:
    """The pieces of `split_segments`, one at a time.

    Each piece looks for its end only within `segment_chars` characters past its minimum length:
    searching on to the end of the text for a blank line that may not exist made splitting
    quadratic in text without blank lines (one sentence per line), and one far blank line would
    have made a single piece of everything before it.
    """
    start, n = 0, len(text)
    while n - start > segment_chars:
        lo, hi = start + segment_chars, min(start + 2 * segment_chars, n)
        cut = text.find("\n\n", lo, hi)
        if cut >= 0:
            cut += 2
        else:
            cut = text.find("\n", lo, hi)
            cut = hi if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


MAX_VAL_FRACTION = 0.5
# Recorded in an unfinished run's progress file: its resume point counts segments, so a run may
# only be resumed by code that cuts the same segments. 2: pieces end within 2 * segment_chars.
_SEGMENTING = 2


def val_period(val_fraction: float) -> int:
    """Every how many segments one goes to the validation split (0: no validation split)."""
    if not 0 <= val_fraction <= MAX_VAL_FRACTION:  # also rejects NaN
        raise DataError(f"val_fraction must be in [0, {MAX_VAL_FRACTION}], got {val_fraction}")
    if val_fraction == 0:
        return 0
    return max(2, round(1 / val_fraction))


def split_of(index: int, period: int) -> str:
    """The split of the segment with this global index: the middle one of every `period`."""
    return "val" if period and index % period == period // 2 else "train"


@dataclass(frozen=True)
class Segment:
    index: int          # global position in the corpus's segment stream
    split: str
    boundary: bool      # preceded by <|endoftext|> in its split's stream
    text: str


def iter_segments(paths: Sequence[Path], *, field: str, segment_chars: int, period: int) -> Iterator[Segment]:
    """All segments of the inputs, in order, each with its split and whether a document boundary
    (an <|endoftext|>) precedes it in that split's stream."""
    index = 0
    last = {s: -2 for s in SPLITS}  # global index of the last segment appended to each split
    for path in paths:
        for doc in iter_file_documents(path, field=field):
            if not doc:
                continue
            for i, text in enumerate(iter_split_segments(doc, segment_chars)):
                split = split_of(index, period)
                # A new document, or a gap inside this one (the other split took the segment before).
                boundary = i == 0 or last[split] != index - 1
                last[split] = index
                yield Segment(index, split, boundary, text)
                index += 1


# ---------------------------------------------------------------------------------------------
# Tokenizing, here or in worker processes

_BATCH_CHARS = 1 << 16  # text per task sent to a worker: large enough to hide the round trip


def _load_tokenizer(spec: str | os.PathLike):
    from .tokenizer import Tokenizer

    return Tokenizer.from_pretrained(spec)


def _encode_here(tok, segs: Iterator[Segment]) -> Iterator[tuple[Segment, np.ndarray]]:
    for seg in segs:
        yield seg, np.asarray(tok.encode_ordinary(seg.text), dtype=DTYPE)


_worker_tokenizer = None


def _worker_init(spec: str) -> None:
    import signal

    # Ctrl-C reaches the whole process group; only the parent acts on it (it keeps the finished
    # shards and shuts the pool down). A worker killed by it would print a traceback of its own,
    # break the pool, and could leave a half-sent result in the pipe the parent reads.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_tokenizer
    _worker_tokenizer = _load_tokenizer(spec)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(_worker_tokenizer.encode_ordinary(t), dtype=DTYPE) for t in texts]  # type: ignore[union-attr]


def _batches(segs: Iterator[Segment]) -> Iterator[list[Segment]]:
    batch: list[Segment] = []
    size = 0
    for seg in segs:
        batch.append(seg)
        size += len(seg.text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_in_pool(spec: str, segs: Iterator[Segment], workers: int) -> Iterator[tuple[Segment, np.ndarray]]:
    """Segments with their tokens, in order, tokenized by `workers` processes. Segments are read
    here, in the calling thread, and only a few batches ahead of the results."""
    import concurrent.futures as cf
    import multiprocessing as mp
    from collections import deque

    # spawn, not fork: the tokenizer may hold threads (Rust) that do not survive a fork.
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                  initargs=(spec,))
    in_flight: deque = deque()
    try:
        for batch in _batches(segs):
            in_flight.append((batch, _submit_sigint_blocked(pool, [s.text for s in batch])))
            if len(in_flight) > 2 * workers:
                batch, future = in_flight.popleft()
                yield from zip(batch, future.result())
        while in_flight:
            batch, future = in_flight.popleft()
            yield from zip(batch, future.result())
    except cf.process.BrokenProcessPool:
        raise DataError(f"prepare: a tokenizing worker process failed (its error is printed above), was killed or "
                        f"ran out of memory; what is written so far resumes: run it again (out of memory: with fewer "
                        f"workers than {workers}; failed at its start: with the script's work under "
                        f"`if __name__ == \"__main__\":`)") from None
    finally:
        # Queued tasks are dropped; a worker finishes the task it holds (one still starting up
        # first finishes starting) and exits. Killing it instead could cut a result off midway
        # through the shared result pipe, which leaves the executor waiting for the rest forever.
        pool.shutdown(wait=True, cancel_futures=True)


def _submit_sigint_blocked(pool, texts: list[str]):
    """pool.submit, which may start a worker: one started with SIGINT blocked cannot be killed by
    a Ctrl-C (with a traceback) while it imports, before `_worker_init` ignores SIGINT."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows
        return pool.submit(_worker_encode, texts)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(_worker_encode, texts)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a Ctrl-C meanwhile is delivered here


# ---------------------------------------------------------------------------------------------
# Writing shards


def shard_name(split: str, i: int) -> str:
    return f"{split}_{i:06d}.bin"


class _ShardWriter:
    """One split's token stream, cut into fixed-size shards written atomically.

    `disk` describes what is on disk: the shards, their token count, the characters and segments
    wholly inside them, and the resume point (the first segment not wholly on disk, and how many
    of its tokens are).
    """

    def __init__(self, out: Path, split: str, shard_tokens: int, disk: dict | None):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.disk = disk or {"shards": [], "tokens": 0, "chars": 0, "segments": 0, "next_segment": 0, "skip": 0}
        self.shards: list[str] = list(self.disk["shards"])
        self.chars, self.segments = self.disk["chars"], self.disk["segments"]
        self.skip = self.disk["skip"]
        self.pending: list[list] = []  # [segment index, tokens not yet on disk, chars, tokens already on disk]
        self.buffered = 0

    @property
    def tokens(self) -> int:
        return self.disk["tokens"] + self.buffered

    def add(self, seg_index: int, ids: np.ndarray, n_chars: int) -> bool:
        """Append one segment's tokens; True when a shard was written."""
        done = 0
        if self.skip:
            ids, done, self.skip = ids[self.skip:], self.skip, 0
        self.pending.append([seg_index, ids, n_chars, done])
        self.buffered += len(ids)
        wrote = False
        while self.buffered >= self.shard_tokens:
            self._write(self._take(self.shard_tokens))
            wrote = True
        return wrote

    def finish(self) -> None:
        if self.buffered:
            self._write(self._take(self.buffered))

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n:
            entry = self.pending[0]
            k = min(n, len(entry[1]))
            parts.append(entry[1][:k])
            entry[1], entry[3] = entry[1][k:], entry[3] + k
            n -= k
            self.buffered -= k
            if not len(entry[1]):
                self.pending.pop(0)
                self.chars += entry[2]
                self.segments += 1
                self.disk["next_segment"] = entry[0] + 1
        return np.concatenate(parts)

    def _write(self, arr: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        with atomic_path(self.out / name) as tmp:
            arr.astype(DTYPE, copy=False).tofile(tmp)
        self.shards.append(name)
        head = self.pending[0] if self.pending else None
        self.disk = {"shards": list(self.shards), "tokens": self.disk["tokens"] + len(arr),
                     "chars": self.chars, "segments": self.segments,
                     "next_segment": head[0] if head else self.disk["next_segment"],
                     "skip": head[3] if head else 0}


def _sources(paths: Sequence[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths]


def prepare(inputs: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike, *, tokenizer: str = "gpt2",
            field: str = "text", val_fraction: float = 0.005, shard_tokens: int = 100_000_000,
            segment_chars: int = 10_000, workers: int = 1, progress: bool = False) -> dict:
    """Tokenize `inputs` into shards under `out` and return the metadata (also `out/meta.json`).

    `tokenizer` is anything `Tokenizer.from_pretrained` accepts (a released name or a folder).
    """
    for name, value in (("shard_tokens", shard_tokens), ("segment_chars", segment_chars), ("workers", workers)):
        if value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
    period = val_period(val_fraction)
    out = check_output_path(out, folder=True, what="output folder", error=DataError)
    # `prepare data/ --out data/tokens`: what an earlier run wrote there (meta.json, progress.json,
    # tokenizer/*.json) is not corpus, and reading it made a rerun look like one of other inputs
    paths = [p for p in expand_inputs(inputs) if not p.resolve().is_relative_to(out.resolve())]
    tok = _load_tokenizer(tokenizer)
    if tok.n_vocab > np.iinfo(DTYPE).max + 1:
        raise DataError(f"tokenizer {tokenizer}: {tok.n_vocab} tokens do not fit uint16 shards (at most 65536)")
    from .tokenizer import ENDOFTEXT

    if ENDOFTEXT not in tok.special_tokens:
        raise DataError(f"tokenizer {tokenizer}: has no {ENDOFTEXT} token, which prepare puts between documents; "
                        f"train one with {ENDOFTEXT} among its special tokens")
    settings = {
        "tokenizer_fingerprint": tok.fingerprint, "field": field, "val_fraction": val_fraction,
        "shard_tokens": shard_tokens, "segment_chars": segment_chars, "sources": _sources(paths),
    }
    meta_path, progress_path = out / "meta.json", out / "progress.json"
    if meta_path.exists():
        meta = read_meta(out)
        if meta.get("settings") == settings:
            log.info("%s: already prepared (%d train, %d val tokens)", out,
                     meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"])
            return meta
        raise DataError(f"{out}: holds shards prepared with other inputs or settings; choose another --out")
    if workers > 1:  # (a folder already prepared above starts no worker)
        check_spawn_guard(f"prepare(workers={workers})", DataError)
    state = None
    if progress_path.exists():
        state = _read_json(progress_path)
        if state.get("settings") != settings:
            raise DataError(f"{progress_path}: an unfinished run with other inputs or settings; choose another --out")
        if state.get("segmenting") != _SEGMENTING:
            raise DataError(f"{progress_path}: an unfinished run by an older gpt2kit, which cut segments "
                            "differently; delete the folder or choose another --out")
        for split in SPLITS:  # each a full shard when recorded: one cut short since would resume silently
            for name in state[split]["shards"]:
                size = (out / name).stat().st_size if (out / name).is_file() else None
                if size != shard_tokens * np.dtype(DTYPE).itemsize:
                    raise DataError(f"{out / name}: {'missing' if size is None else f'{size:,} bytes'}, expected "
                                    f"{shard_tokens * np.dtype(DTYPE).itemsize:,} (a damaged shard of an unfinished "
                                    f"run); delete {out} to prepare it again")
        log.info("%s: resuming after %s", out, ", ".join(f"{len(state[s]['shards'])} {s} shards" for s in SPLITS))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer")
    writers = {s: _ShardWriter(out, s, shard_tokens, state and state[s]) for s in SPLITS}

    def todo() -> Iterator[Segment]:
        for seg in iter_segments(paths, field=field, segment_chars=segment_chars, period=period):
            if seg.index >= writers[seg.split].disk["next_segment"]:
                yield seg

    def save_progress() -> None:
        write_json(progress_path, {"settings": settings, "segmenting": _SEGMENTING,
                                   **{s: w.disk for s, w in writers.items()}})

    eot = tok.eot_token
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True, desc="prepare")
    encoded = _encode_in_pool(str(tokenizer), todo(), workers) if workers > 1 else _encode_here(tok, todo())
    try:
        for seg, ids in encoded:
            if seg.boundary:
                ids = np.concatenate([np.array([eot], dtype=DTYPE), ids])
            if writers[seg.split].add(seg.index, ids, len(seg.text)):
                save_progress()
            if bar is not None:
                bar.update(len(seg.text.encode("utf-8")))
    finally:
        encoded.close()  # stops the worker processes now, also on Ctrl-C or an error
        if bar is not None:
            bar.close()
    problem: GPT2KitError | None = None
    if writers["train"].tokens == 0:
        problem = InputFileError(paths[0] if len(paths) == 1 else out, "the corpus holds no text")
    elif period and writers["val"].tokens == 0:
        problem = DataError(f"{out}: too little text for a validation split with val_fraction={val_fraction} "
                            f"({writers['train'].segments} segments); lower --segment-chars or set --val-fraction 0")
    if problem is not None:
        if state is None:  # what this run wrote is of no use, and full shards under final names looked done
            for name in (n for w in writers.values() for n in w.shards):
                (out / name).unlink(missing_ok=True)
            progress_path.unlink(missing_ok=True)
            shutil.rmtree(out / "tokenizer", ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise problem
    for w in writers.values():
        w.finish()
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "dtype": "uint16",
        "tokenizer": {"fingerprint": tok.fingerprint, "n_vocab": tok.n_vocab, "eot_token": eot,
                      "source": str(tokenizer), "folder": "tokenizer"},
        "settings": settings,
        "splits": {s: {"shards": w.shards, "tokens": w.tokens, "chars": w.chars, "segments": w.segments}
                   for s, w in writers.items()},
    }
    write_json(meta_path, meta)
    progress_path.unlink(missing_ok=True)
    return meta


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputFileError(path, f"cannot read JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# Reading shards


def read_meta(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / "meta.json"
    if not path.exists():
        hint = " (an unfinished `gpt2kit prepare`: rerun it)" if (folder / "progress.json").exists() else ""
        raise DataError(f"{folder}: not a prepared shard folder, no meta.json{hint}")
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        raise InputFileError(path, f"expected format {FORMAT!r}, got {meta.get('format')!r}")
    return meta


class TokenStream:
    """The shards of one split, read through memmaps as one long token sequence."""

    def __init__(self, folder: str | os.PathLike, split: str):
        folder = Path(folder)
        meta = read_meta(folder)
        if split not in meta["splits"]:
            raise DataError(f"{folder}: no split {split!r}")
        self.shards = []
        for name in meta["splits"][split]["shards"]:
            path = folder / name
            if not path.exists():
                raise InputFileError(path, "shard listed in meta.json is missing")
            size = path.stat().st_size
            if size % np.dtype(DTYPE).itemsize:  # (numpy's own error names neither file nor cause)
                raise InputFileError(path, f"{size} bytes: not whole {np.dtype(DTYPE).name} tokens, the shard is "
                                           "truncated or damaged")
            if size == 0:  # np.memmap refuses empty files
                self.shards.append(np.zeros(0, dtype=DTYPE))
                continue
            self.shards.append(np.memmap(path, dtype=DTYPE, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        if self.starts[-1] != meta["splits"][split]["tokens"]:
            raise DataError(f"{folder}: {split} shards hold {self.starts[-1]} tokens, meta.json says "
                            f"{meta['splits'][split]['tokens']}")
        self.meta = meta
        self.chars = int(meta["splits"][split]["chars"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, across shard boundaries if need be."""
        parts = []
        pos, end = start, start + length
        i = int(np.searchsorted(self.starts, pos, side="right") - 1)
        while pos < end:
            lo = pos - self.starts[i]
            take = min(end - pos, len(self.shards[i]) - lo)
            parts.append(self.shards[i][lo:lo + take])
            pos += take
            i += 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


def fingerprint_of(folder: str | os.PathLike) -> str:
    return read_meta(folder)["tokenizer"]["fingerprint"]


# ---------------------------------------------------------------------------------------------
# Batches (pure functions)


def step_offsets(seed: int, step: int, n_tokens: int, block_size: int, batch_size: int, *,
                 stream: int = 0) -> np.ndarray:
    """Start offsets of the `batch_size` windows (of block_size+1 tokens) of optimizer step `step`
    (`stream` tells independent uses apart: 0 training, 1 the fixed validation batches).

    A pure function of its arguments: resuming at step s or splitting the batch across ranks reads
    exactly the windows an uninterrupted single-process run reads.
    """
    if n_tokens < block_size + 1:
        raise DataError(f"{n_tokens} tokens are fewer than one training window of {block_size + 1}")
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - block_size, size=batch_size, dtype=np.int64)


def micro_offsets(offsets: np.ndarray, *, rank: int, world_size: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's micro-batches of a step's offsets: rank r takes the r-th contiguous part, cut into
    `grad_accum` equal micro-batches.

    >>> [m.tolist() for m in micro_offsets(np.arange(8), rank=1, world_size=2, grad_accum=2)]
    [[4, 5], [6, 7]]
    """
    per_rank, rem = divmod(len(offsets), world_size * grad_accum)
    if rem or per_rank == 0:
        raise DataError(f"a batch of {len(offsets)} sequences does not divide into {world_size} ranks x "
                        f"{grad_accum} micro-batches")
    mine = offsets[rank * per_rank * grad_accum:(rank + 1) * per_rank * grad_accum]
    return [mine[i * per_rank:(i + 1) * per_rank] for i in range(grad_accum)]


def get_batch(stream: TokenStream | np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, both (len(offsets), block_size) int64."""
    if isinstance(stream, np.ndarray):
        rows = np.stack([stream[o:o + block_size + 1].astype(np.int64) for o in offsets])
    else:
        rows = np.stack([stream.window(int(o), block_size + 1) for o in offsets])
    return rows[:, :-1], rows[:, 1:]


def sequential_windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) windows that together predict every token but the first exactly once:
    each window has `length` inputs starting at `start` and targets from `start + 1`.

    >>> sequential_windows(10, 4)
    [(0, 4), (4, 4), (8, 1)]
    """
    out = []
    start = 0
    while start < n_tokens - 1:
        length = min(block_size, n_tokens - 1 - start)
        out.append((start, length))
        start += length
    return out


def data_hash(folder: str | os.PathLike) -> str:
    """A short identity of a prepared folder (its meta.json), recorded in checkpoints."""
    return hashlib.sha256((Path(folder) / "meta.json").read_bytes()).hexdigest()[:16]
