"""Winograd Schema Challenge, WSC273 (Levesque et al., 2012), paper §3.4 / Figure 3.

Reads `wsc273.jsonl`, one schema per line in the layout of the Hugging Face `winograd_wsc`
dataset: {"text", "pronoun", "pronoun_loc" (character offset of the pronoun in text),
"options": [two candidates], "label": index of the right one}. Each candidate replaces the
pronoun (a possessive pronoun becomes "candidate's"; a leading "The"/"A"/"An" is lower-cased
inside a sentence), and the model scores it two ways (Trinh & Le, 2018):

- full scoring: log p(whole substituted sentence);
- partial scoring: log p(the words after the pronoun | the sentence up to and including the
  candidate): only the part that does not depend on the candidate's own likelihood.

The more probable candidate is the prediction; accuracy is reported for both, and the better of
the two as `acc_best` (the paper's 70.70% for its largest model).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..registry import Task, TaskError, register_task
from ..requests import Loglikelihood, Request, Result
from ._jsonl import iter_jsonl

POSSESSIVE = frozenset({"his", "her", "its", "their", "my", "our", "your"})
_DETERMINER = re.compile(r"^(The|A|An)\b")


@dataclass(frozen=True)
class Schema:
    before: str  # the text before the pronoun
    after: str  # the text after the pronoun
    options: tuple[str, ...]  # candidates as substituted
    label: int


def substitute(text: str, pronoun: str, loc: int, option: str) -> str:
    """The candidate as it reads in place of the pronoun."""
    if pronoun.lower() in POSSESSIVE:
        option += "'s"
    if pronoun.lower() == "i":  # always a capital: the punctuation before it tells
        sentence_start = not text[:loc].strip() or text[:loc].rstrip()[-1] in ".!?"
    else:  # the text's own capital says it, after quotes and brackets too (`"Why?" she asked`: none)
        sentence_start = text[loc:loc + 1].isupper()
    if not sentence_start:
        option = _DETERMINER.sub(lambda m: m.group(1).lower(), option)
    return option


def read_wsc(path: Any) -> list[Schema]:
    out = []
    expected = "a JSON object with \"text\", \"pronoun\", \"pronoun_loc\", \"options\" and \"label\""
    for n, obj in iter_jsonl(path, expected):
        try:
            text, pronoun, loc = obj["text"], obj["pronoun"], int(obj["pronoun_loc"])
            options, label = obj["options"], int(obj["label"])
        except (KeyError, TypeError, ValueError):
            raise TaskError(f"{path}: line {n}: expected {expected}") from None
        if not (isinstance(text, str) and isinstance(pronoun, str) and pronoun and isinstance(options, list)
                and all(isinstance(o, str) for o in options)):
            raise TaskError(f"{path}: line {n}: expected {expected} (text, pronoun and options as strings)")
        if text[loc:loc + len(pronoun)].lower() != pronoun.lower():
            raise TaskError(f"{path}: line {n}: \"pronoun_loc\" {loc} does not point at the pronoun {pronoun!r}")
        if not 0 <= label < len(options) or len(options) < 2:
            raise TaskError(f"{path}: line {n}: expected at least two \"options\" and a \"label\" indexing them")
        after = text[loc + len(pronoun):]
        if not after.strip():
            raise TaskError(f"{path}: line {n}: nothing follows the pronoun, so partial scoring is undefined")
        subs = tuple(substitute(text, pronoun, loc, o) for o in options)
        out.append(Schema(text[:loc], after, subs, label))
    return out


@register_task("winograd")
class Winograd(Task):
    data_files = ("wsc273.jsonl", "WSC273.jsonl", "winograd/wsc273.jsonl")
    source = ("the Hugging Face dataset 'winograd_wsc' (config wsc273, split test) exported as JSONL; the schemas "
              "are from https://cs.nyu.edu/~davise/papers/WinogradSchemas/WS.html")

    def documents(self, limit: int | None = None) -> list[Schema]:
        return read_wsc(self.path)[:limit]

    def requests(self, doc: Schema, tokenizer: Any) -> list[Request]:
        out: list[Request] = []
        for option in doc.options:
            out.append(Loglikelihood((), tuple(tokenizer.encode_ordinary(doc.before + option + doc.after))))
        for option in doc.options:
            out.append(Loglikelihood(tuple(tokenizer.encode_ordinary(doc.before + option)),
                                     tuple(tokenizer.encode_ordinary(doc.after))))
        return out

    def score(self, doc: Schema, results: list[Result]) -> dict[str, float]:
        k = len(doc.options)
        full = [r.logprob for r in results[:k]]  # type: ignore[union-attr]
        partial = [r.logprob for r in results[k:]]  # type: ignore[union-attr]
        return {"acc_full": float(max(range(k), key=full.__getitem__) == doc.label),
                "acc_partial": float(max(range(k), key=partial.__getitem__) == doc.label)}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        n = len(scores)
        full = 100.0 * sum(s["acc_full"] for s in scores) / n if n else float("nan")
        partial = 100.0 * sum(s["acc_partial"] for s in scores) / n if n else float("nan")
        return {"acc_full": full, "acc_partial": partial, "acc_best": max(full, partial), "schemas": n}

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(),
                "full": "log p(substituted sentence | <|endoftext|>)",
                "partial": "log p(text after the pronoun | text before + candidate)",
                "acc_best": "the better of full and partial scoring (the paper's Figure 3 reports the better)"}
