"""Results in the layout of the paper's Table 3, and the results JSON document."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .registry import get_task

__all__ = ["TABLE3_COLUMNS", "PAPER_TABLE3", "released_size", "format_table3", "results_document"]

TABLE3_COLUMNS = ("LAMBADA (PPL)", "LAMBADA (ACC)", "CBT-CN (ACC)", "CBT-NE (ACC)", "WikiText2 (PPL)",
                  "PTB (PPL)", "enwik8 (BPB)", "text8 (BPC)", "WikiText103 (PPL)", "1BW (PPL)")

# Radford et al. (2019), Table 3, by the paper's parameter counts.
PAPER_TABLE3: dict[str, tuple[float, ...]] = {
    "117M": (35.13, 45.99, 87.65, 83.4, 29.41, 65.85, 1.16, 1.17, 37.50, 75.20),
    "345M": (15.60, 55.48, 92.35, 87.1, 22.76, 47.33, 1.01, 1.06, 26.37, 55.72),
    "762M": (10.87, 60.12, 93.45, 88.0, 19.93, 40.31, 0.97, 1.02, 22.05, 44.575),
    "1542M": (8.63, 63.24, 93.30, 89.05, 18.34, 35.76, 0.93, 0.98, 17.48, 42.16),
}

# (n_layer, n_embd, n_head) of the released models -> the paper's name for the size
_RELEASED = {(12, 768, 12): "117M", (24, 1024, 16): "345M", (36, 1280, 20): "762M", (48, 1600, 25): "1542M"}


def released_size(config: Any) -> str | None:
    """The paper's size name ("117M", ...) when `config` has a released model's shape."""
    if getattr(config, "vocab_size", None) != 50257 or getattr(config, "n_ctx", None) != 1024:
        return None
    return _RELEASED.get((config.n_layer, config.n_embd, config.n_head))


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}"


def format_table3(results: Mapping[str, Any], *, model_name: str = "ours", model_size: str | None = None) -> str:
    """A markdown table laid out like Table 3: our row, then the paper's row for `model_size`.

    Only the columns of the evaluated tasks are shown; the LAMBADA accuracies of every protocol
    and the counts follow the table."""
    ours: dict[str, float] = {}
    for name, res in results.items():
        for column, metric in get_task(name).table3:
            ours[column] = res["metrics"][metric]
    columns = [c for c in TABLE3_COLUMNS if c in ours]
    lines = []
    if columns:  # tasks outside Table 3 have their own report (eval.transfer_metrics.format_transfer)
        lines += ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns),
                  f"| {model_name} | " + " | ".join(_fmt(ours[c]) for c in columns) + " |"]
    if columns and model_size in PAPER_TABLE3:
        paper = dict(zip(TABLE3_COLUMNS, PAPER_TABLE3[model_size]))
        lines.append(f"| paper {model_size} | " + " | ".join(_fmt(paper[c]) for c in columns) + " |")
    for name in ("lambada", "lambada-original"):
        if name in results:
            m = {k: _fmt(v) for k, v in results[name]["metrics"].items()}
            lines += ["", f"{name} ACC by protocol: whole word greedy + stop-word filter {m['acc_word_stopfilter']} "
                          f"(the ACC column), whole word greedy {m['acc_word']}, last BPE token + stop-word filter "
                          f"{m['acc_token_stopfilter']}, last BPE token {m['acc_token']}; last-word PPL {m['ppl']}"]
    lines.append("")
    for name, res in results.items():
        c = res["counts"]
        lines.append(f"{name}: " + ", ".join(f"{c[k]} {k[:-1] if c[k] == 1 else k}"
                                             for k in ("documents", "requests", "tokens")))
    return "\n".join(lines)


def results_document(results: Mapping[str, Any], *, model: str, model_size: str | None,
                     options: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The results JSON: every metric, counts and protocol per task, the run's options, and the
    paper's numbers for the matching released size."""
    paper = None
    if model_size in PAPER_TABLE3:
        paper = dict(zip(TABLE3_COLUMNS, PAPER_TABLE3[model_size]))
    return {"model": model, "paper_size": model_size, "options": dict(options), "seconds": round(seconds, 3),
            "tasks": dict(results), "paper_table3": paper}
