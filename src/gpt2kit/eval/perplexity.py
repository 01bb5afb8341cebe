"""Base class of the language-modeling tasks: the log-probability of a whole test set.

Paper §3.1: the log-probability the model assigns to the (de-tokenized) test set, divided by the
number of the dataset's canonical units: words for perplexity (exp of minus the mean log-prob
per word), bytes for bits per byte, characters for bits per character. Units are always counted
on the dataset's original text, so de-tokenizing can change the tokens the model sees but never
the denominator.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

from .detokenizers import DETOKENIZERS, count_words
from .registry import Task
from .requests import Request, Result, RollingLoglikelihood

__all__ = ["PerplexityTask"]


class PerplexityTask(Task):
    """Subclasses set `unit` ("word", "byte" or "char"), `detokenizer` (a `DETOKENIZERS` key) and
    `stream`, and implement `read_documents()` -> the original texts in order.

    With `stream`, the (first `limit`) documents are concatenated and scored as one text through
    the sliding window (PTB, enwik8, text8); otherwise each document is scored on its own
    (WikiText articles, 1BW sentences)."""

    unit: ClassVar[str] = "word"
    detokenizer: ClassVar[str] = "none"
    stream: ClassVar[bool] = False

    def read_documents(self) -> list[str]:
        raise NotImplementedError

    def documents(self, limit: int | None = None) -> list[str]:
        docs = self.read_documents()[:limit]
        return ["".join(docs)] if self.stream and docs else docs

    def units(self, original: str) -> int:
        if self.unit == "word":
            return count_words(original)
        if self.unit == "byte":
            return len(original.encode("utf-8"))
        return len(original)

    def requests(self, doc: str, tokenizer: Any) -> list[Request]:
        text = DETOKENIZERS[self.detokenizer](doc) if self.detokenize else doc
        return [RollingLoglikelihood(tuple(tokenizer.encode_ordinary(text)))]

    def score(self, doc: str, results: list[Result]) -> dict[str, float]:
        (res,) = results
        return {"logprob": res.logprob, "tokens": res.n_tokens, "units": self.units(doc)}  # type: ignore[union-attr]

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        logprob = sum(s["logprob"] for s in scores)
        units = sum(s["units"] for s in scores)
        tokens = sum(s["tokens"] for s in scores)
        out = {"logprob": logprob, "units": units, "tokens": tokens,
               "token_ppl": math.exp(-logprob / tokens) if tokens else math.nan}
        if self.unit == "word":
            out["ppl"] = math.exp(-logprob / units) if units else math.nan
        else:
            out["bpb" if self.unit == "byte" else "bpc"] = -logprob / math.log(2) / units if units else math.nan
        return out

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "detokenizer": self.detokenizer if self.detokenize else "none",
                "unit": self.unit + ("s (+1 end-of-line per line)" if self.unit == "word" else "s"),
                "scored_as": "one stream" if self.stream else "one text per document"}
