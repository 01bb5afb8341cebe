"""enwik8 (bits per byte) and text8 (bits per character), from the Hutter Prize data.

Both files are 100M units; the standard split is 90M/5M/5M and the test set is the last 5M. A
file of exactly 100M units (or the `.zip` holding it) is split that way; any other file is taken
to be a pre-split test set and used whole. Both are scored as one stream through the sliding
window; for `--limit`, a document is a line of enwik8 and a 10,000-character piece of text8
(a single line).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from ...errors import InputFileError
from ..perplexity import PerplexityTask
from ..registry import register_task

FULL, TEST = 100_000_000, 5_000_000
TEXT8_PIECE = 10_000


def read_hutter_file(path: Path, member: str) -> bytes:
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                return z.read(member)
        return path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise InputFileError(path, f"cannot read {member!r}: {e}") from None


def standard_test_split(data: bytes) -> bytes:
    return data[FULL - TEST:] if len(data) == FULL else data


def decode_cut(data: bytes) -> str:
    """UTF-8 text of a byte range cut out of a larger file: a character split by the cut at either
    end is dropped (at most 3 bytes each side); anything else that does not decode is an error."""
    start = 0
    while start < min(3, len(data)) and 0x80 <= data[start] < 0xC0:
        start += 1
    data = data[start:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":
            return data[:e.start].decode("utf-8")
        raise


@register_task("enwik8")
class Enwik8(PerplexityTask):
    data_files = ("enwik8", "enwik8.zip")
    source = "the Hutter Prize data (http://mattmahoney.net/dc/enwik8.zip)"
    table3 = (("enwik8 (BPB)", "bpb"),)
    unit = "byte"
    stream = True

    def read_documents(self) -> list[str]:
        data = standard_test_split(read_hutter_file(self.path, "enwik8"))
        try:
            return decode_cut(data).splitlines(keepends=True)
        except UnicodeDecodeError as e:
            raise InputFileError(self.path, f"not valid UTF-8 at byte {e.start} of the test split") from None


@register_task("text8")
class Text8(PerplexityTask):
    data_files = ("text8", "text8.zip")
    source = "Matt Mahoney's text8 (http://mattmahoney.net/dc/text8.zip)"
    table3 = (("text8 (BPC)", "bpc"),)
    unit = "char"
    stream = True

    def read_documents(self) -> list[str]:
        data = standard_test_split(read_hutter_file(self.path, "text8"))
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as e:
            raise InputFileError(self.path, f"text8 must be ASCII (a-z and space); byte {e.start} is not") from None
        return [text[i:i + TEXT8_PIECE] for i in range(0, len(text), TEXT8_PIECE)]
