"""Shared fixtures. Tests run under pytest-xdist with 2 workers: keep torch to one thread each."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A suite started in the background by a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# ignored, and every command a test starts would too (Python keeps an ignored SIGINT ignored): the
# tests that press Ctrl-C on a command need it live there, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:  # torch is installed for the whole suite, but keep conftest importable without it
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def shakespeare_files() -> list[Path]:
    """The default corpus (downloaded once per machine into gpt2kit's cache)."""
    from gpt2kit.corpus import shakespeare

    return shakespeare()


def run_cli(*args: str, input: str | bytes | None = None, cwd: str | os.PathLike | None = None,
            env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `gpt2kit ARGS...` in a real subprocess, as a user would."""
    text = not isinstance(input, bytes)
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpt2kit", *args], input=input, capture_output=True,
                          text=text, cwd=cwd, env=full_env, timeout=timeout)


def save_sharp_tiny_model(folder, tokenizer, *, seed: int, n_ctx: int, scale: float):
    """A random `tiny` GPT-2 saved to `folder` with its matrices scaled up by `scale`: sharper
    predictions than the N(0, 0.02) init, so that ties cannot make a scoring test vacuous."""
    import torch

    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(seed)
    model = GPT2(GPT2Config.from_preset("tiny", n_ctx=n_ctx))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale if p.dim() > 1 else 1.0)
    model.save_pretrained(str(folder), tokenizer)
    return folder


@pytest.fixture
def cli():
    return run_cli
