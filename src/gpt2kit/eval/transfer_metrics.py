"""Metrics of the paper's transfer tasks (§3.5-3.8) and their report.

- CoQA F1/EM as the official evaluation script v1.0 computes them: answers normalized (lower
  case, punctuation and the articles a/an/the removed, whitespace collapsed), bag-of-tokens F1,
  the maximum over the gold answers, and when a question has several gold answers the average
  of leave-one-out maxima (each of the n human answers left out in turn), so a prediction is
  compared with n-1 humans exactly as a human answer is.
- Natural Questions exact match: the same (SQuAD) normalization, a match with any gold answer;
  calibration: accuracy on the most confident X% of questions.
- ROUGE-1/2/L F1 via the `rouge-score` package (Porter stemming on), corpus BLEU via `sacrebleu`
  (its default 13a tokenization). Both are the `eval` extra: `pip install 'gpt2kit[eval]'`.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any, Mapping, Sequence

from ..errors import GPT2KitError

__all__ = ["MissingExtraError", "require_extra", "normalize_answer", "answer_f1", "answer_em", "coqa_turn_scores",
           "exact_match", "first_sentences", "rouge_f1", "corpus_bleu", "top_confidence_accuracy", "PAPER_TRANSFER",
           "format_transfer"]


class MissingExtraError(GPT2KitError):
    """A metric needs a package of an optional extra that is not installed."""


_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the CoQA/SQuAD normalization).

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_em(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def answer_f1(gold: str, pred: str) -> float:
    """Bag-of-tokens F1 of the normalized answers; two empty answers agree (F1 1)."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((Counter(g) & Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def coqa_turn_scores(golds: Sequence[str], pred: str) -> tuple[float, float]:
    """(EM, F1) of one CoQA answer against the question's gold answers (official script v1.0).

    >>> coqa_turn_scores(["white", "gray", "gray", "black"], "white")[1]  # "white" left out: 0, else 1
    0.75
    """
    if not golds:
        raise ValueError("coqa_turn_scores needs at least one gold answer")
    if len(golds) == 1:
        return answer_em(golds[0], pred), answer_f1(golds[0], pred)
    em = f1 = 0.0
    for i in range(len(golds)):
        others = [*golds[:i], *golds[i + 1:]]
        em += max(answer_em(g, pred) for g in others)
        f1 += max(answer_f1(g, pred) for g in others)
    return em / len(golds), f1 / len(golds)


def exact_match(golds: Sequence[str], pred: str) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer (Natural Questions)."""
    p = normalize_answer(pred)
    return float(any(normalize_answer(g) == p for g in golds))


# A sentence ends at . ! or ? (with any closing quotes/brackets) before whitespace and a capital letter,
# perhaps after an opening quote (so '"Why?" she asked.' and 'vs. 2009' stay whole), or at a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z])|\n")


def first_sentences(text: str, n: int) -> list[str]:
    """The first `n` non-empty sentences of `text` (§3.6: the summary is the first 3 generated).

    >>> first_sentences('He left. "Why?" she asked.\\nThen rain. More.', 3)
    ['He left.', '"Why?" she asked.', 'Then rain.']
    """
    out, start = [], 0
    if n < 1:
        return out
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        start = m.end()
        if piece:
            out.append(piece)
            if len(out) == n:
                return out
    tail = text[start:].strip()
    if tail and len(out) < n:
        out.append(tail)
    return out


def require_extra(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"this metric needs the {package!r} package: pip install 'gpt2kit[eval]' "
                                f"(or pip install {package})") from None


def rouge_f1(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 (x100) over the pairs, stemming on.

    Sentences are separated by newlines in both texts (ROUGE-Lsum reads them)."""
    rouge_scorer = require_extra("rouge_score.rouge_scorer", "rouge-score")
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    tokenizers = require_extra("rouge_score.tokenizers", "rouge-score")
    # its default tokenizer, stemming, given explicitly: made implicitly, it logs "Using default
    # tokenizer." through absl on every call (printed where INFO logging is on, as in the CLI)
    scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    totals = dict.fromkeys(keys, 0.0)
    for ref, pred in zip(references, predictions, strict=True):
        s = scorer.score(ref, pred)
        for k in keys:
            totals[k] += s[k].fmeasure
    n = len(references)
    return {k: 100.0 * v / n if n else math.nan for k, v in totals.items()}


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """sacrebleu's corpus BLEU (13a tokenization, one reference per sentence): the score and its
    signature, so that a reported number says how it was computed."""
    sacrebleu = require_extra("sacrebleu", "sacrebleu")
    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": float(result.score), "signature": str(metric.get_signature())}


def top_confidence_accuracy(confidence: Sequence[float], correct: Sequence[float], percent: float) -> float:
    """Accuracy (x100) on the `percent`% most confident answers (at least one answer).

    >>> top_confidence_accuracy([0.9, 0.1, 0.5, 0.7], [1, 0, 0, 1], 50)
    100.0
    """
    if not confidence:
        return math.nan
    k = max(1, math.ceil(len(confidence) * percent / 100))
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])[:k]
    return 100.0 * sum(correct[i] for i in order) / k


# The paper's numbers for its largest model (1542M), by task and metric (§3.5-3.8, Table 4).
PAPER_TRANSFER: dict[str, dict[str, float]] = {
    "coqa": {"f1": 55.0},
    "cnndm": {"rouge1": 29.34, "rouge2": 8.27, "rougeL": 26.58, "nohint_rouge1": 21.58, "nohint_rouge2": 4.03,
              "nohint_rougeL": 19.47},
    "wmt14-en-fr": {"bleu": 5.0},
    "wmt14-fr-en": {"bleu": 11.5},
    "nq": {"em": 4.1, "acc_top1pct": 63.1},
    "winograd": {"acc_best": 70.70},
}


def _fmt(x: Any) -> str:
    if isinstance(x, int):  # counts (questions, sentences, ...)
        return str(x)
    return f"{x:.2f}" if isinstance(x, float) and not math.isnan(x) else "-"


def format_transfer(results: Mapping[str, Any], *, model_name: str = "ours", paper_size: str | None = None) -> str:
    """A markdown table of every numeric metric of the tasks without a Table 3 column, with the
    paper's number beside it when the model has the paper's largest size (1542M)."""
    from .registry import get_task

    rows = []
    for name, res in results.items():
        if get_task(name).table3:
            continue
        paper = PAPER_TRANSFER.get(name, {}) if paper_size == "1542M" else {}
        for metric, value in res["metrics"].items():
            if isinstance(value, (int, float)):
                rows.append(f"| {name} | {metric} | {_fmt(value)} | {_fmt(paper.get(metric))} |")
    if not rows:
        return ""
    return "\n".join([f"| task | metric | {model_name} | paper 1542M |", "|---|---|---|---|", *rows])
