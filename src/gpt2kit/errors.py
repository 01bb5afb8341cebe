"""Errors that are part of gpt2kit's interface.

Every error a user can cause by what they pass in (a file, a field, an option) derives from
`GPT2KitError`. Its message is one line that names the file or field and what was expected; the
CLI prints it as `gpt2kit: error: <message>` and exits with code 2, without a traceback.
Modules define their own subclasses beside the code that raises them.
"""
from __future__ import annotations

import os


class GPT2KitError(Exception):
    """A user-facing error: bad input, a missing file, an invalid option."""


class InputFileError(GPT2KitError):
    """A file is missing, unreadable, or not in the expected format."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(GPT2KitError):
    """A configuration key or value is invalid."""
