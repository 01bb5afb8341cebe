"""HellaSwag (Zellers et al., 2019): pick the right ending of a context among four.

Not in the paper, but the benchmark GPT-2 reproductions compare on. Reads the official
`hellaswag_val.jsonl` (one object per line: "activity_label", "ctx_a", "ctx_b", "endings" (4),
"label"). The context is "activity_label: ctx_a Ctx_b" and each ending is scored as its
continuation after a space, with the dataset's WikiHow markup ("[title]", "[header]", ...) removed.
Reported: `acc` (highest total log-likelihood), `acc_norm` (highest log-likelihood per byte of
the ending, the number usually quoted) and `acc_token_norm` (per token).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..registry import Task, TaskError, register_task
from ..requests import Loglikelihood, Request, Result
from ._jsonl import iter_jsonl

_MARKUP = re.compile(r"\[[^\]]*\]")


def clean(text: str) -> str:
    """Drop WikiHow markup: a "[title]" ends a sentence, other "[...]" tags vanish."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(" +", " ", _MARKUP.sub("", text)).strip()


@dataclass(frozen=True)
class Item:
    context: str
    endings: tuple[str, ...]  # each with its leading space
    label: int


def read_hellaswag(path: Any) -> list[Item]:
    out = []
    expected = "a HellaSwag object with \"activity_label\", \"ctx_a\", \"ctx_b\", \"endings\" and \"label\""
    for n, obj in iter_jsonl(path, expected):
        fields = [obj.get("activity_label"), obj.get("ctx_a"), obj.get("ctx_b")]
        endings = obj.get("endings")
        if not (all(isinstance(f, str) for f in fields) and isinstance(endings, list)
                and all(isinstance(e, str) for e in endings)):
            raise TaskError(f"{path}: line {n}: expected {expected} (strings, and a list of ending strings)")
        try:
            ctx_b = obj["ctx_b"]
            context = clean(f"{obj['activity_label']}: {obj['ctx_a']} {ctx_b[:1].upper() + ctx_b[1:]}")
            endings = tuple(" " + clean(e) for e in obj["endings"])
            label = int(obj["label"])
        except (KeyError, TypeError, ValueError):
            raise TaskError(f"{path}: line {n}: expected {expected}") from None
        if not 0 <= label < len(endings):
            raise TaskError(f"{path}: line {n}: \"label\" {label} is not an index of the {len(endings)} endings")
        out.append(Item(context, endings, label))
    return out


@register_task("hellaswag")
class HellaSwag(Task):
    data_files = ("hellaswag_val.jsonl", "hellaswag/hellaswag_val.jsonl")
    source = "https://github.com/rowanz/hellaswag (data/hellaswag_val.jsonl)"

    def documents(self, limit: int | None = None) -> list[Item]:
        return read_hellaswag(self.path)[:limit]

    def requests(self, doc: Item, tokenizer: Any) -> list[Request]:
        ctx = tuple(tokenizer.encode_ordinary(doc.context))
        return [Loglikelihood(ctx, tuple(tokenizer.encode_ordinary(e))) for e in doc.endings]

    def score(self, doc: Item, results: list[Result]) -> dict[str, float]:
        lp = [r.logprob for r in results]  # type: ignore[union-attr]
        per_byte = [x / len(e.encode("utf-8")) for x, e in zip(lp, doc.endings)]
        per_token = [x / r.n_tokens for x, r in zip(lp, results)]  # type: ignore[union-attr]

        def right(values: list[float]) -> float:
            return float(max(range(len(values)), key=values.__getitem__) == doc.label)

        return {"acc": right(lp), "acc_norm": right(per_byte), "acc_token_norm": right(per_token)}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        n = len(scores)
        out = {k: 100.0 * sum(s[k] for s in scores) / n if n else math.nan
               for k in ("acc_norm", "acc", "acc_token_norm")}
        return {**out, "items": n}

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "context": "activity_label: ctx_a Ctx_b", "continuation": "' ' + ending",
                "acc_norm": "log-likelihood / UTF-8 bytes of the ending", "acc_token_norm": "per BPE token"}
