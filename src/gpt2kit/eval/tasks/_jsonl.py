"""Reading the line-oriented files of several tasks (JSON lines: one object per line, errors naming the line).

Only "\n" ends a line in these files: `str.splitlines` also splits at U+2028, U+0085, form feeds and
other separators that real text (a news sentence, a JSON string written with ensure_ascii=False)
holds inside a line, which would cut a sentence in two or misalign parallel files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ...corpus import read_text
from ..registry import TaskError


def split_lines(text: str, *, keepends: bool = False) -> list[str]:
    """The lines of `text`, ended by "\n" only (a "\r" before it stays on the line); no empty last line."""
    lines = text.split("\n")
    last = lines.pop()
    if keepends:
        lines = [line + "\n" for line in lines]
    return lines + [last] if last else lines


def iter_jsonl(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `expected` describes an object for errors."""
    for n, line in enumerate(split_lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}: line {n}: expected {expected}")
        yield n, obj
