"""Reading the JSON-lines files of several tasks: one object per line, errors naming the line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ...corpus import read_text
from ..registry import TaskError


def iter_jsonl(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `expected` describes an object for errors."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}: line {n}: expected {expected}")
        yield n, obj
