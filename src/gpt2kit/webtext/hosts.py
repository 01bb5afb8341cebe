"""Per-host politeness that holds across every process fetching into one work folder.

Links are bucketed into shards by host, so a host's own links are fetched by one process; but a
redirect can lead anywhere, and shorteners and link aggregators send the links of many shards to
a few hosts. The schedule of each host (the start of its latest request, the delay it asks for,
its requests in flight) is therefore kept in one file, `WORK/_state/fetch/hosts.bin`, that all
fetch processes share, and read and changed under POSIX record locks:

- a record of 24 bytes per host slot (`_SLOTS` slots chosen by a hash of the host name): the
  host's 64-bit hash, the wall-clock time of its latest request start (moved later to make the
  host's Retry-After pause), and its delay (the largest any process has used: `--host-delay`, or
  a robots.txt Crawl-delay one process has read);
- after the records, `per_host` lock bytes per slot: a request in flight holds one of its host's
  bytes locked. The kernel drops the locks of a process that dies, so a crash or a kill leaves no
  host blocked, and a resumed run needs nothing cleaned up.

Two hosts whose hashes fall in one slot share one schedule while both are active: slower, never
less polite. The file is sparse (a few KB on disk for thousands of hosts). Wall-clock times let
processes on several machines share it (a Dask cluster over a shared file system with POSIX
locks, such as NFS mounted with locking: `nolock` keeps locks on each machine, see
`locks_local_only`); spacing between two machines is then exact to within their clock difference.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import math
import os
import re
import struct
import threading
import time
from typing import Iterator

from .work import WebTextError, stable_hash

_RECORD = struct.Struct("<Qdd")     # host hash (0: free), latest start (time.time()), delay
_SLOTS = 1 << 20
_INFLIGHT = _SLOTS * _RECORD.size   # where the in-flight lock bytes begin
_POLL_S = 0.05                      # how often a request waits to see whether another process's is done


class SharedSchedule:
    """One process's handle on the shared schedule file. Locks are POSIX record locks, which belong
    to a process, not to a file descriptor: one handle per process and file (`open_schedule`),
    with a mutex for the threads of the process and a record of the lock bytes it holds."""

    def __init__(self, path: str):
        self.path = path
        self.fd = _open_lockable(path)
        self.mutex = threading.Lock()
        self.held: set[int] = set()
        self.users = 0

    def _slot(self, host: str) -> tuple[int, int]:
        h = stable_hash(host) or 1
        return h, h % _SLOTS

    @contextlib.contextmanager
    def _record(self, slot: int) -> Iterator[tuple[int, float, float]]:
        offset = slot * _RECORD.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, _RECORD.size, offset)
        try:
            data = os.pread(self.fd, _RECORD.size, offset)
            yield _RECORD.unpack(data) if len(data) == _RECORD.size else (0, -math.inf, 0.0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, _RECORD.size, offset)

    def _write(self, slot: int, key: int, last: float, delay: float) -> None:
        os.pwrite(self.fd, _RECORD.pack(key, last, delay), slot * _RECORD.size)

    def claim(self, host: str, delay: float, *, take: bool, cap: float) -> float:
        """Seconds until `host` may see its next request start (at most `cap`); 0 when it may now,
        in which case, if `take`, that start is recorded (no other process can then start one
        within the delay)."""
        key, slot = self._slot(host)
        with self.mutex, self._record(slot) as (owner, last, stored):
            if owner != key and owner != 0:
                # another host holds the slot: wait out its spacing as if it were ours, then take over
                wait = _wait(last, stored, time.time(), cap)
                new_delay = delay
            else:
                new_delay = max(delay, stored)
                wait = _wait(last, new_delay, time.time(), cap)
            if wait == 0 and take:
                self._write(slot, key, time.time(), new_delay)
            return wait

    def slow_down(self, host: str, delay: float, hold: float = 0.0) -> None:
        """Record for every process a delay one has learned (robots.txt Crawl-delay) and a pause
        the host asked for (Retry-After: no start within `hold` seconds from now)."""
        key, slot = self._slot(host)
        with self.mutex, self._record(slot) as (owner, last, stored):
            if owner not in (key, 0):
                key = owner     # another host's slot for now: its spacing may grow, ours must not shrink
            delay = max(delay, stored)
            if hold > 0:        # recorded as the start that lets the next one come `hold` from now
                last = max(last, time.time() + hold - delay)
            self._write(slot, key, last, delay)

    def take_turn(self, host: str, per_host: int) -> int | None:
        """Hold one of the host's `per_host` in-flight places; its lock offset, or None if all are taken."""
        _, slot = self._slot(host)
        with self.mutex:
            for i in range(per_host):
                offset = _INFLIGHT + slot * per_host + i
                if offset in self.held:
                    continue
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EAGAIN):
                        continue
                    raise
                self.held.add(offset)
                return offset
        return None

    def end_turn(self, offset: int) -> None:
        with self.mutex:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)
            self.held.discard(offset)


def _open_lockable(path: str) -> int:
    """Open the schedule, refusing a file system without POSIX locks (an NFS mount without its lock
    service): there every request would fail instead of waiting its turn."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WebTextError(f"{path}: cannot open the per-host schedule: {e.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):     # held by another process: locks work
            os.close(fd)
            raise WebTextError(f"{path}: the work folder's file system does not lock files ({e.strerror}); "
                               "fetch processes share this file under POSIX locks") from None
    return fd


def locks_local_only(path: str | os.PathLike) -> str | None:
    """Why POSIX locks on `path` hold only among this machine's processes, or None where nothing
    says so (or not Linux). Such a mount passes `_open_lockable`'s check, since locking works, but
    processes on other machines never see the locks: they would share no schedule at all."""
    try:
        device = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mountinfo = f.read()
    except OSError:
        return None
    return local_lock_reason(mountinfo, os.major(device), os.minor(device))


# Mount options that keep locks on the client: NFS's nolock (shown as local_lock=all too) and
# local_lock=posix never ask the server's lock manager; CIFS's nobrl never sends byte-range locks.
_LOCAL_LOCK_OPTIONS = {"nfs": ("nolock", "local_lock=all", "local_lock=posix"), "cifs": ("nobrl",), "smb3": ("nobrl",)}


def local_lock_reason(mountinfo: str, major: int, minor: int) -> str | None:
    """The /proc/self/mountinfo line of device major:minor, read for options that keep locks local."""
    for line in mountinfo.splitlines():
        mount, sep, fs = line.partition(" - ")       # optional fields end at a lone "-" (proc(5))
        mount, fs = mount.split(), fs.split()
        if not sep or len(mount) < 6 or len(fs) < 3 or mount[2] != f"{major}:{minor}":
            continue
        fstype = fs[0]
        options = set(mount[5].split(",")) | set(fs[2].split(","))   # per mount, then per file system
        for option in _LOCAL_LOCK_OPTIONS.get("nfs" if fstype.startswith("nfs") else fstype, ()):
            if option in options:
                where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount[4])   # \040 is a space
                return f"{fstype} mount {where} ({fs[1]}) with {option}"
    return None


def _wait(last: float, delay: float, now: float, cap: float) -> float:
    # never more than the longest wait the host can ask for: a clock set back (or another
    # machine's ahead of ours) must not stall the host for the difference
    return max(0.0, min(last + delay - now, max(delay, cap)))


_OPEN: dict[tuple[int, str], SharedSchedule] = {}
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def open_schedule(path: str | os.PathLike | None) -> Iterator[SharedSchedule | None]:
    """The process's handle on the schedule at `path` (None: no sharing, politeness per process).
    Closed when its last user is done: closing a file drops all the process's locks on it, which
    is then harmless."""
    if path is None:
        yield None
        return
    key = (os.getpid(), os.path.realpath(path))     # a forked child opens its own
    with _OPEN_LOCK:
        schedule = _OPEN.get(key) or _OPEN.setdefault(key, SharedSchedule(key[1]))
        schedule.users += 1
    try:
        yield schedule
    finally:
        with _OPEN_LOCK:
            schedule.users -= 1
            if schedule.users == 0:
                del _OPEN[key]
                os.close(schedule.fd)


class HostGate:
    """At most `per_host` requests in flight to a host, starts at least `delay` seconds apart and
    none within a pause the host asked for (`max_hold` at most): within this process, and, given a
    shared schedule, across all processes that share it."""

    def __init__(self, host: str, per_host: int, delay: float, shared: SharedSchedule | None = None,
                 max_hold: float = 0.0):
        self.host = host
        self.per_host = per_host
        self.slots = asyncio.Semaphore(per_host)
        self.delay = delay
        self.shared = shared
        self.max_hold = max_hold
        self.last_start = -math.inf

    def raise_delay(self, delay: float) -> None:
        self.delay = max(self.delay, delay)
        if self.shared is not None:
            self.shared.slow_down(self.host, self.delay)

    def hold(self, seconds: float) -> None:
        """Start nothing for `seconds` (capped at `max_hold`): the host answered Retry-After."""
        seconds = min(seconds, self.max_hold)
        if self.shared is not None:
            self.shared.slow_down(self.host, self.delay, seconds)
        else:
            self.last_start = max(self.last_start, time.monotonic() + seconds - self.delay)

    @contextlib.asynccontextmanager
    async def turn(self, global_slots: asyncio.Semaphore):
        """Hold a place among the host's requests in flight and one of `global_slots`, entered at
        least `delay` after the host's previous request start."""
        async with self.slots:
            place = await self._place()
            try:
                await self._start(global_slots)
                try:
                    yield
                finally:
                    global_slots.release()
            finally:
                if place is not None:
                    self.shared.end_turn(place)

    async def _place(self) -> int | None:
        if self.shared is None:
            return None
        while (place := self.shared.take_turn(self.host, self.per_host)) is None:
            await asyncio.sleep(_POLL_S)
        return place

    def _claim(self, take: bool) -> float:
        if self.shared is not None:
            return self.shared.claim(self.host, self.delay, take=take, cap=self.max_hold)
        wait = max(0.0, self.last_start + self.delay - time.monotonic())
        if wait == 0 and take:
            self.last_start = time.monotonic()
        return wait

    async def _start(self, global_slots: asyncio.Semaphore) -> None:
        """Return holding one of `global_slots`, having recorded this start. The spacing is checked
        once the global slot is held: a turn booked before queueing for it would let two requests
        that queued together start together. No global slot is held while sleeping, so a long
        Crawl-delay idles no capacity."""
        while True:
            wait = self._claim(take=False)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await global_slots.acquire()
            if self._claim(take=True) == 0:     # no await since the check: no one in this process passed
                return
            global_slots.release()              # another request to this host started meanwhile
