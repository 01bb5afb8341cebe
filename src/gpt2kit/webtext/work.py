"""The work folder that every WebText stage reads from and writes to, and how stages run.

Layout (one folder per stage; shard `K` of one stage becomes shard `K` of the next):

    WORK/links/links-00000.jsonl.zst        canonical links, bucketed by host
    WORK/fetch/fetch-00000.warc.gz          raw responses (WARC/1.0)
    WORK/fetch/fetch-00000.manifest.jsonl.zst   the status of every URL of the shard
    WORK/extract/extract-00000.jsonl.zst    main text of the pages that passed the filters
    WORK/dedup/dedup-00000.jsonl.zst        documents left after exact + near de-duplication
    WORK/shards/webtext-00000.jsonl.zst     the final corpus;  WORK/report.{json,md}, funnel.png

Resumability: a task writes its outputs atomically and *then* a marker
`_state/STAGE/done/NAME.json` holding its counts. A rerun skips every task whose marker exists, so
finished shards are never repeated and a killed task leaves nothing but temporary files behind.
When all tasks of a stage are done, `_state/STAGE/COMPLETE.json` records the totals; the next
stage refuses to start without it. Each stage also records its options and the upstream stage's
fingerprint in `_state/STAGE/config.json`,
so that a rerun with different options is an error instead of a silently mixed corpus.

Parallelism: a task is a plain picklable function call over shard files. `run_tasks` runs them
in-process, in a local process pool (`workers`), or on a Dask cluster (`engine="dask"`), whose
`Client.get_executor()` is a standard `concurrent.futures.Executor`.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..errors import GPT2KitError
from ..io import atomic_path, check_output_path, write_json

log = logging.getLogger(__name__)

STAGES = ("links", "fetch", "extract", "dedup", "shards")
ZSTD_LEVEL = 6


class WebTextError(GPT2KitError):
    """A WebText stage cannot run: a missing upstream stage, conflicting options, bad input."""


# Options are checked when a config is made, so that `webtext run` refuses a bad value of a late
# stage before the early stages spend hours; the messages name the CLI flag the value came from.


def check_int(flag: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise WebTextError(f"{flag}: expected an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise WebTextError(f"{flag}: expected at most {maximum}, got {value!r}")


def check_seconds(flag: str, value, *, zero_ok: bool) -> None:
    # argparse's float() takes "nan" and "inf"; neither is a usable delay or deadline
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            or (value == 0 and not zero_ok)):
        raise WebTextError(f"{flag}: expected a finite number of seconds {'>= 0' if zero_ok else '> 0'}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# JSONL.zst shards


def write_jsonl_zst(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as zstd-compressed JSON lines, atomically; return how many were written."""
    import zstandard

    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw:
            with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False) as z:
                buf = io.TextIOWrapper(z, encoding="utf-8", write_through=True)
                for rec in records:
                    buf.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
                    buf.write("\n")
                    n += 1
                buf.flush()
                buf.detach()
    return n


def read_jsonl_zst(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a shard written by `write_jsonl_zst` (our own files: errors are fatal)."""
    import zstandard

    try:
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(raw)
            for lineno, line in enumerate(io.TextIOWrapper(reader, encoding="utf-8"), 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise WebTextError(f"{path}: line {lineno}: not valid JSON (a damaged shard; "
                                           "delete it and its marker in WORK/_state to redo it)") from None
    except FileNotFoundError:
        raise WebTextError(f"{path}: no such shard") from None
    except zstandard.ZstdError as e:
        raise WebTextError(f"{path}: damaged zstd shard ({e})") from None


# ---------------------------------------------------------------------------------------------
# Work folder


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and on every machine (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def shard_name(stage: str, k: int) -> str:
    return f"{stage}-{k:05d}"


def config_dict(cfg: Any) -> dict:
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(d, default=str))


class WorkFolder:
    """Paths, markers and option records of one pipeline run."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def state_dir(self, stage: str) -> Path:
        """Where a stage keeps its markers: outside its output folder, which holds only data."""
        return self.root / "_state" / stage

    def done_path(self, stage: str, task: str) -> Path:
        return self.state_dir(stage) / "done" / f"{task}.json"

    def is_done(self, stage: str, task: str) -> bool:
        return self.done_path(stage, task).exists()

    def mark_done(self, stage: str, task: str, stats: dict) -> None:
        write_json(self.done_path(stage, task), stats)

    def task_stats(self, stage: str, task: str) -> dict:
        return json.loads(self.done_path(stage, task).read_text(encoding="utf-8"))

    def complete_path(self, stage: str) -> Path:
        return self.state_dir(stage) / "COMPLETE.json"

    def is_complete(self, stage: str) -> bool:
        return self.complete_path(stage).exists()

    def complete(self, stage: str) -> dict:
        """The `COMPLETE.json` record of a finished stage, or an error telling what to run."""
        path = self.complete_path(stage)
        if not path.exists():
            dumps = " DUMP..." if stage == "links" else ""  # the Reddit dumps it reads: a required argument
            raise WebTextError(f"{self.root}: stage {stage!r} has not finished; run `gpt2kit webtext "
                               f"{_CLI_NAME.get(stage, stage)} {self.root}{dumps}` first")
        return json.loads(path.read_text(encoding="utf-8"))

    def fingerprint(self, stage: str) -> str:
        return hashlib.sha256(self.complete_path(stage).read_bytes()).hexdigest()[:16]

    def shard_ids(self, stage: str) -> list[int]:
        return list(self.complete(stage)["shards"])

    def check_config(self, stage: str, options: dict, pacing: tuple[str, ...] = ()) -> None:
        """Record the options of a stage on its first run; refuse a rerun with other options,
        except those named in `pacing` (how fast the work goes, not what it makes: a crawl may
        resume with more requests in flight), which are recorded anew. Called when a stage
        starts: takes the work folder's lock (one run per folder at a time) and removes the
        temporary files of a killed earlier run."""
        self.lock()
        for tmp in self.stage_dir(stage).rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        path = self.state_dir(stage) / "config.json"
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            if any(k not in pacing for k in changed):
                raise WebTextError(
                    f"{path}: this stage was started with other options (differs in: "
                    f"{', '.join(k for k in changed if k not in pacing)}); delete {self.state_dir(stage)} and "
                    f"{self.stage_dir(stage)} to redo it with the new ones")
            if changed:
                log.info("%s: resuming with %s", stage,
                         ", ".join(f"{k} {options.get(k)} (was {old.get(k)})" for k in changed))
                write_json(path, options)
        else:
            write_json(path, options)

    def lock(self) -> None:
        """Hold an exclusive lock on WORK/.lock until this process ends."""
        import fcntl

        key = str(self.root.resolve())
        if key in _LOCKS:
            return
        check_output_path(self.root, folder=True, what="work folder", error=WebTextError)
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / ".lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise WebTextError(f"{self.root}: another `gpt2kit webtext` run is using this work folder") from None
        _LOCKS[key] = f

    def finish(self, stage: str, shards: Sequence[int], totals: dict, extra: dict | None = None) -> dict:
        record = {"stage": stage, "shards": list(shards), "totals": totals, **(extra or {})}
        write_json(self.complete_path(stage), record)
        return record


_CLI_NAME = {"shards": "shard"}
_LOCKS: dict[str, Any] = {}   # work folder -> open lock file, held for the life of the process


def sum_counts(stats: Iterable[dict]) -> dict:
    """Add up the integer counts of several tasks (nested dicts are added key by key)."""
    total: dict = {}
    for s in stats:
        for k, v in s.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
            elif isinstance(v, dict):
                total[k] = dict(Counter(total.get(k, {})) + Counter({a: b for a, b in v.items() if b}))
    return total


# ---------------------------------------------------------------------------------------------
# Running tasks


@dataclass(frozen=True)
class Runner:
    """How tasks run: `workers` processes on this machine, or a Dask cluster.

    engine="local": workers == 1 runs in this process; more uses a process pool.
    engine="dask":  `dask_address` names a running scheduler ("tcp://host:8786"); without it a
                    LocalCluster with `workers` workers is started (and stopped) for the stage.
    """

    workers: int = 1
    engine: str = "local"
    dask_address: str | None = None
    progress: bool = False

    def __post_init__(self):
        check_int("--workers", self.workers, 1)
        if self.engine not in ("local", "dask"):
            raise WebTextError(f"--engine: expected 'local' or 'dask', got {self.engine!r}")

    def task_slots(self) -> int:
        """How many tasks can run at once: `workers`, or on a running Dask cluster the threads of
        its workers now (a limit shared by all tasks is divided by this)."""
        if self.engine != "dask" or not self.dask_address:
            return self.workers
        with _dask_connect(self.dask_address) as client:
            # nthreads() lists every worker; scheduler_info() lists only 5 by default on distributed
            # 2025.5-2026.6, which on a larger cluster would hand each task several times its share.
            return max(1, sum(client.nthreads().values()))


def _dask_client():
    try:
        from distributed import Client
    except ImportError:
        raise WebTextError("--engine dask needs the 'distributed' package (pip install 'gpt2kit[webtext]')") from None
    return Client


def _dask_connect(address: str):
    """A client of the scheduler at `address`, or a one-line error naming the option."""
    client_class = _dask_client()
    try:
        return client_class(address)
    except (OSError, TimeoutError, ValueError) as e:  # (distributed's "Timed out trying to connect ...")
        raise WebTextError(f"--dask-address {address}: no Dask scheduler reached there ({e})") from None


@contextlib.contextmanager
def _executor(runner: Runner) -> Iterator[cf.Executor | None]:
    if runner.engine == "dask":
        client_class = _dask_client()
        from distributed import LocalCluster

        if runner.dask_address:
            with _dask_connect(runner.dask_address) as client:
                yield client.get_executor()
        else:
            with LocalCluster(n_workers=runner.workers, threads_per_worker=1, processes=runner.workers > 1,
                              dashboard_address=None) as cluster, client_class(cluster) as client:
                yield client.get_executor()
    elif runner.workers == 1:
        yield None
    else:
        with cf.ProcessPoolExecutor(max_workers=runner.workers, initializer=_pool_worker_init) as pool:
            yield pool


# A Ctrl-C reaches the pool's workers too. The pool has already handed each worker its next task
# (it keeps one more queued than it has workers), and the parent, waiting for the pool to shut
# down, would wait for those to run whole: a links task reads a monthly dump, minutes. A worker
# that has seen the Ctrl-C therefore starts no task, and one busy with a task stops it (a task
# writes its outputs atomically, so nothing half-written is kept).
_interrupted = False
_task_running = False


def _pool_worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    if _task_running:  # idle, the worker waits in the pool's own loop, which must not be broken
        raise KeyboardInterrupt


def _pool_task(fn: Callable[..., dict], *args: Any) -> dict:
    global _task_running
    _task_running = True
    try:
        if _interrupted:  # checked after the flag above, so a Ctrl-C at any moment is seen
            raise KeyboardInterrupt
        return fn(*args)
    finally:
        _task_running = False


def run_tasks(work: WorkFolder, stage: str, fn: Callable[..., dict], tasks: Sequence[tuple[str, tuple]],
              runner: Runner, *, desc: str | None = None) -> tuple[dict, int]:
    """Run `fn(*args)` for every (task name, args) whose done-marker is missing; `fn` returns the
    task's counts, which become its marker. Returns (counts of all tasks summed, tasks skipped)."""
    from tqdm.auto import tqdm

    todo = [(name, args) for name, args in tasks if not work.is_done(stage, name)]
    skipped = len(tasks) - len(todo)
    bar = tqdm(total=len(tasks), initial=skipped, desc=desc or stage, unit="shard", disable=not runner.progress,
               dynamic_ncols=True)
    try:
        with _executor(runner) as pool:
            if pool is None:
                for name, args in todo:
                    work.mark_done(stage, name, fn(*args))
                    bar.update()
            else:
                local = isinstance(pool, cf.ProcessPoolExecutor)  # Dask's workers keep their own signals
                futures = {(pool.submit(_pool_task, fn, *args) if local else pool.submit(fn, *args)): name
                           for name, args in todo}
                try:
                    for fut in cf.as_completed(futures):
                        work.mark_done(stage, futures[fut], fut.result())
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return sum_counts(work.task_stats(stage, name) for name, _ in tasks), skipped
