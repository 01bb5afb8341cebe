"""Zero-shot evaluation (paper §3): tasks in a registry, batched scorers, Table 3 reports.

>>> from gpt2kit import GPT2, Tokenizer                                     # doctest: +SKIP
>>> from gpt2kit.eval import evaluate, format_table3
>>> results = evaluate(GPT2.from_pretrained("gpt2"), Tokenizer.gpt2(), ["lambada", "ptb"], "data/")
>>> print(format_table3(results, model_size="117M"))
"""
from __future__ import annotations

from .evaluator import evaluate
from .registry import MissingDataError, Task, TaskError, get_task, register_task, task_names
from .report import PAPER_TABLE3, format_table3, released_size, results_document
from .requests import (Generation, GenerationResult, GreedyGeneration, Loglikelihood, LoglikelihoodResult,
                       RollingLoglikelihood, RollingResult)
from .scoring import Scorer, rolling_windows

__all__ = ["evaluate", "Task", "register_task", "get_task", "task_names", "TaskError", "MissingDataError",
           "Scorer", "rolling_windows", "Loglikelihood", "LoglikelihoodResult", "RollingLoglikelihood",
           "RollingResult", "GreedyGeneration", "Generation", "GenerationResult", "PAPER_TABLE3", "format_table3",
           "released_size", "results_document"]
