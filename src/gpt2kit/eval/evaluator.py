"""Run tasks on a model: build every task's requests, answer them all in one batched pass, score."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .registry import get_task
from .scoring import Scorer

__all__ = ["evaluate", "make_task"]

log = logging.getLogger(__name__)


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], data_dir: str | Path, *, limit: int | None = None,
             batch_size: int = 8, stride: int | None = None, detokenize: bool = True,
             progress: bool | float = True, task_options: Mapping[str, Any] | None = None,
             journal: str | Path | None = None, keep_journal: bool = False) -> dict[str, Any]:
    """Evaluate `model` on the named tasks; returns {task: {"metrics", "counts", "protocol"}}.

    `task_options` (e.g. {"shots": 10, "seed": 1}) go to the tasks whose constructor takes them.
    `journal`: a file that keeps the answers of finished batches (`gpt2kit.eval.journal`): an
    interrupted evaluation run again with it, the same model, data and options, resumes where it
    stopped; the file is deleted when the evaluation completes, unless `keep_journal` (a caller
    that still has to store the results deletes it once they are safe).

    All tasks' files are read (and checked) before the model runs, so a missing file fails fast.
    Requests of all tasks go to the scorer together: batches mix documents and tasks."""
    from .registry import TaskError

    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be at least 1, got {limit}")
    if isinstance(tasks, str):  # one task's name, not its letters
        tasks = [tasks]
    check_data_dir(data_dir)
    instances = [make_task(name, data_dir, detokenize=detokenize, **(task_options or {})) for name in tasks]
    for t in instances:
        t.path  # noqa: B018 -- raises MissingDataError naming the file and its source
    scorer = Scorer(model, tokenizer, batch_size=batch_size, stride=stride, progress=progress)
    plan = []  # (task, docs, per-doc request counts)
    requests = []
    for t in instances:
        docs = t.documents(limit)
        if not docs:  # else its metrics would be NaN: nothing was measured
            raise TaskError(f"{t.path}: no {t.name} documents in it (an empty file?)")
        per_doc = [t.requests(d, tokenizer) for d in docs]
        # a protocol's decoding length that the model's context cannot hold: said for the task,
        # before any task runs (the scorer would stop the whole run at its first such batch)
        # (the scorer's rule: new tokens + the prompt's fixed suffix, or + 1 prompt token without one)
        need = max(((r.max_new_tokens, len(getattr(r, "suffix", ())))
                    for rs in per_doc for r in rs if hasattr(r, "max_new_tokens")),
                   default=(0, 0), key=lambda m: m[0] + max(m[1], 1))
        if need[0] + max(need[1], 1) > scorer.n_ctx:
            fixed = f" after its {need[1]}-token prompt suffix" if need[1] else ""
            raise TaskError(f"{t.name}: its protocol decodes up to {need[0]} new tokens{fixed}, which a model with a "
                            f"{scorer.n_ctx}-token context cannot hold with a prompt; evaluate it with a model "
                            f"whose context is longer than {need[0] + max(need[1], 1) - 1} tokens")
        plan.append((t, docs, [len(r) for r in per_doc]))
        for r in per_doc:
            requests.extend(r)
    log.debug("%d tasks, %d requests", len(instances), len(requests))
    if journal is not None:
        scorer.journal = _open_journal(journal, model, requests, scorer)
    start = time.perf_counter()
    try:
        results = scorer.score(requests)
    finally:
        if scorer.journal is not None:
            scorer.journal.close()  # what it holds stays for the next run if this one stops here
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {}
    pos = 0
    for t, docs, counts in plan:
        scores = []
        for doc, n in zip(docs, counts):
            scores.append(t.score(doc, results[pos:pos + n]))
            pos += n
        n_tokens = _count_tokens(requests[pos - sum(counts):pos])
        out[t.name] = {
            "metrics": t.aggregate(scores),
            "counts": {"documents": len(docs), "requests": sum(counts), "tokens": n_tokens},
            "protocol": {**t.protocol(), "limit": limit, "stride": scorer.stride, "n_ctx": scorer.n_ctx},
        }
    log.debug("scored %d requests in %.1fs", len(requests), seconds)
    if scorer.journal is not None and not keep_journal:
        scorer.journal.finish()
    return out


def _open_journal(path: str | Path, model: Any, requests: Sequence[Any], scorer: Scorer) -> Any:
    from .journal import Journal, fingerprint

    # the device too: another one rounds differently, and a run's numbers should come from one
    device = next((str(p.device) for p in model.parameters()), "cpu") if hasattr(model, "parameters") else "cpu"
    settings = {"batch_size": scorer.batch_size, "stride": scorer.stride, "rank": scorer.rank, "world": scorer.world,
                "device": device}
    journal = Journal(path, fingerprint(model, requests, settings))
    if journal.resumed:
        log.info("resuming from %s: %d finished batches", path, journal.resumed)
    return journal


def check_data_dir(data_dir: str | Path) -> None:
    """A data dir that is no folder, said as such (a task would say none of its files is in it)."""
    from .registry import TaskError

    if not Path(data_dir).is_dir():
        raise TaskError(f"{data_dir}: {'not a folder' if Path(data_dir).exists() else 'no such folder'}; expected "
                        f"the folder of the tasks' data files")


def make_task(name: str, data_dir: str | Path, **options: Any) -> Any:
    """The task `name` on `data_dir`, given those of `options` its constructor accepts."""
    import inspect

    cls = get_task(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(data_dir, **{k: v for k, v in options.items() if k in accepted and v is not None})


def _count_tokens(requests: Sequence[Any]) -> int:
    """Tokens the task's requests put in front of the model (contexts + continuations)."""
    n = 0
    for r in requests:
        n += len(getattr(r, "tokens", ())) + len(getattr(r, "context", ())) + len(getattr(r, "continuation", ()))
    return n
