"""Atomic file output: a crash or a full disk never leaves a half-written file behind.

Everything gpt2kit writes for a user (vocabularies, checkpoints, shards, results) goes through
`atomic_write`: the data lands in a temporary file in the destination folder, is flushed to disk,
and only then renamed over the destination (rename is atomic within one file system).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _umask() -> int:
    try:  # read without setting it: os.umask would change it for every thread meanwhile
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The permissions `path` gets: those of the file it replaces, else what `open` would give
    (0666 less the umask). mkstemp makes its file 0600, which would keep a model or a shard
    folder from the other users and services that a normally written file is readable by."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; on a clean exit, fsync it and rename it to `path`.

    >>> with atomic_write("out.txt") as f:   # doctest: +SKIP
    ...     f.write("all or nothing")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` for writers that want a file name (torch.save,
    safetensors, numpy); rename it to `path` when the block exits cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # (the writer may have replaced the file: set it last)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_path(path: str | os.PathLike, *, folder: bool, what: str = "output",
                      error: type[Exception] | None = None) -> Path:
    """Fail now, with one line, where writing `path` later would: a folder where a file goes
    (or the reverse), an ancestor that is a file, a place not writable. Commands call it before
    long work, so that a typo in --out does not throw the work away at the end. `error`: the
    `GPT2KitError` subclass to raise (default: GPT2KitError)."""
    from .errors import GPT2KitError

    error = error or GPT2KitError
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        expected = "a folder" if folder else "a file"
        raise error(f"{what} {path}: exists and is not {expected}")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:  # folders get created from the first that exists
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {path}: {parent} is not writable")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
