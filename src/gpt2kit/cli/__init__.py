"""The `gpt2kit` command: a thin layer over the Python API.

Each command group lives in its own module here and exposes `register(subparsers)`, which adds its
subcommands and sets `func` on them. Modules import heavy libraries (torch, fastapi, ...) inside
their handlers, so `gpt2kit --help` stays fast. A `GPT2KitError`, or an `OSError` (a path the
system refuses), becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from ..errors import GPT2KitError

# Order is the order of `gpt2kit --help`.
_COMMAND_MODULES = ("tokenizer", "model", "generate", "serve", "train", "eval", "overlap", "webtext")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="gpt2kit",
        description="GPT-2, complete: tokenizer, model, training, generation, serving, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2kit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        modname = f"{__name__}.{name}"
        if importlib.util.find_spec(modname) is not None:
            importlib.import_module(modname).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s" if not args.verbose else "%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except GPT2KitError as e:
        print(f"gpt2kit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2kit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `gpt2kit ... | head`: the reader went away; that is not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        # what the system refused: an output path under a file or onto a folder, no permission, a
        # full disk. The user's to fix, named as such (the verbose log keeps the traceback).
        logging.getLogger(__name__).debug("OSError", exc_info=True)
        print(f"gpt2kit: error: {_os_error_message(e)}", file=sys.stderr)
        return 2


def _os_error_message(e: OSError) -> str:
    if e.filename is None:
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{where}: {e.strerror or e}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
