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


def check_spawn_guard(call: str, error: type[GPT2KitError] = GPT2KitError) -> None:
    """Refuse, before any process starts, to start "spawn" worker processes from a script with no
    `if __name__ == "__main__":` in it. Each such worker first re-runs the script that started it,
    as the module `__mp_main__` (what multiprocessing's spawn does, to find the script's functions):
    an unguarded script would redo all its work up to `call` in every worker, then fail there."""
    import sys

    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    # what spawn does not re-run (multiprocessing.spawn.get_preparation_data): a package's
    # __main__ (python -m pkg), an interactive session
    if (name is not None and (name == "__main__" or name.endswith(".__main__"))) or not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if "__name__" not in source or "__main__" not in source:
        raise error(f"{call}: its worker processes would each re-run {path} from the top (multiprocessing's "
                    f"spawn), which has no `if __name__ == \"__main__\":`: put the script's work under one, or "
                    f"pass workers=1")
