"""Resuming an interrupted evaluation: the answers of every finished batch, appended to a journal.

The scorer's batches are a pure function of the requests, the batch size, the stride and the
process's rank, so a rerun with the same ones computes the same batches in the same order: the
journal stores each batch's answers under its position, and the rerun takes them instead of
running the model. The journal's first line is a fingerprint of all that plus a sample of the
model's weights; a journal with another fingerprint (other model, device, data or options) is
not used: the run starts over and replaces it once its first batch is done. The file is JSON (never pickle): a line cut short by the interruption
is dropped when the journal is read back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from .requests import GenerationResult, LoglikelihoodResult

__all__ = ["Journal", "fingerprint"]

log = logging.getLogger(__name__)


def _canonical(x: Any) -> Any:
    """A JSON-able form of a request field whose text does not depend on hashing order."""
    if isinstance(x, (frozenset, set)):
        return sorted(x)
    if isinstance(x, (tuple, list)):
        return [_canonical(v) for v in x]
    return x


def fingerprint(model: Any, requests: Sequence[Any], settings: dict[str, Any]) -> str:
    """What determines every batch's answers: the requests, `settings` (batch size, stride, rank,
    world size) and the model (its config, and a strided sample of every weight)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(repr(getattr(model, "config", None)).encode())
    for name, tensor in _weights(model).items():
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(sample.tobytes())
    for r in requests:
        fields = [type(r).__name__] + [_canonical(getattr(r, f.name)) for f in dataclasses.fields(r)]
        h.update(json.dumps(fields).encode())
    return h.hexdigest()


def _weights(model: Any) -> dict[str, Any]:
    """The state dict, and the weights it does not hold: the inference form's layers
    (`optimize_for_cpu`, which `gpt2kit eval` runs) keep theirs as plain tensors, so a state dict
    alone would tell two checkpoints apart only by their embeddings and LayerNorms."""
    import torch

    tensors = dict(model.state_dict())
    for prefix, module in model.named_modules():
        for attr in ("weight", "bias"):
            t = getattr(module, attr, None)
            key = f"{prefix}.{attr}" if prefix else attr
            if isinstance(t, torch.Tensor) and key not in tensors:
                tensors[key] = t
    return tensors


def _encode(x: Any) -> Any:
    if isinstance(x, LoglikelihoodResult):
        return {"ll": [x.logprob, x.is_greedy, x.n_tokens]}
    if isinstance(x, GenerationResult):
        return {"gen": [x.text, list(x.tokens), x.logprob]}
    if isinstance(x, dict):
        return {"dict": [[k, _encode(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"tuple": [_encode(v) for v in x]}
    if isinstance(x, list):
        return [_encode(v) for v in x]
    return x


def _decode(x: Any) -> Any:
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    (kind, value), = x.items()
    if kind == "ll":
        return LoglikelihoodResult(float(value[0]), bool(value[1]), int(value[2]))
    if kind == "gen":
        return GenerationResult(value[0], tuple(value[1]), float(value[2]))
    if kind == "dict":
        return {k: _decode(v) for k, v in value}
    return tuple(_decode(v) for v in value)


class Journal:
    """Batch answers by key ("call:batch"), read from `path` when its fingerprint matches and
    appended to it as batches finish."""

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[str, Any] = self._read()
        self.resumed = len(self.done)
        self._file: Any = None

    def _read(self) -> dict[str, Any]:
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s: unreadable (%s); the evaluation starts over", self.path, e)
            return {}
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("fingerprint") != self.fingerprint:
            log.warning("%s: written by another run (model, data or options differ); the evaluation starts over",
                        self.path)
            return {}
        done = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
                done[str(record["key"])] = record["answers"]
            except (ValueError, KeyError, TypeError):
                break  # the line the interruption cut short, and nothing after it
        return done

    def get(self, key: str) -> list[Any] | None:
        raw = self.done.get(key)
        return None if raw is None else _decode(raw)

    def put(self, key: str, answers: list[Any]) -> None:
        if self._file is None:
            self._start()
        encoded = _encode(list(answers))
        self.done[key] = encoded
        self._file.write(json.dumps({"key": key, "answers": encoded}, ensure_ascii=False) + "\n")
        self._file.flush()

    def _start(self) -> None:
        # Rewrite what was read back (without a cut-off last line) before appending to it.
        from ..io import atomic_write

        with atomic_write(self.path) as f:
            f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for key, answers in self.done.items():
                f.write(json.dumps({"key": key, "answers": answers}, ensure_ascii=False) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- open until finish()

    def finish(self) -> None:
        """The evaluation is complete: the journal is no longer needed."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
