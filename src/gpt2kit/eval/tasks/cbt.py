"""Children's Book Test (Hill et al., 2015), common nouns (CN) and named entities (NE).

File format (`cbtest_CN_valid_2000ex.txt`, ...): blocks of 21 numbered lines separated by a blank
line; lines 1-20 are the story's sentences, line 21 is the query sentence with `XXXXX` for the
missing word, a tab, the answer, two tabs, and the 10 candidates separated by `|`. The text is
tokenized with Penn-Treebank quotes and is de-tokenized here.

Paper §3.2: each candidate is substituted for `XXXXX` and the model scores the candidate together
with the rest of the query sentence, given the story and the query's beginning; the most
probable candidate is the prediction. The paper reports the validation sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...corpus import read_text
from ..detokenizers import ptb_quotes
from ..registry import Task, TaskError, register_task
from ..requests import Loglikelihood, Request, Result

BLANK = "XXXXX"
SOURCE = "the bAbI project's CBTest.tgz (https://research.facebook.com/downloads/babi/, folder CBTest/data/)"


@dataclass(frozen=True)
class Question:
    story: tuple[str, ...]
    query: str
    answer: str
    candidates: tuple[str, ...]


def parse_cbt(path: Path) -> list[Question]:
    questions: list[Question] = []
    block: list[tuple[int, str]] = []
    lines = read_text(path).split("\n")
    for n, line in enumerate(lines + [""], 1):
        if line.strip():
            block.append((n, line.rstrip("\r")))
            continue
        if not block:
            continue
        if len(block) != 21:
            raise TaskError(f"{path}: line {block[0][0]}: expected a block of 21 numbered lines, got {len(block)}")
        story = []
        for k, (lineno, text) in enumerate(block, 1):
            num, _, rest = text.partition(" ")
            if num != str(k):
                raise TaskError(f"{path}: line {lineno}: expected the line to start with its number {k}")
            story.append(rest)
        lineno, last = block[-1][0], story.pop()
        fields = last.split("\t")
        if len(fields) != 4 or BLANK not in fields[0]:
            raise TaskError(f"{path}: line {lineno}: expected 'query with {BLANK}<TAB>answer<TAB><TAB>c1|...|c10'")
        candidates = tuple(c for c in fields[3].split("|") if c)
        if fields[1] not in candidates:
            raise TaskError(f"{path}: line {lineno}: the answer {fields[1]!r} is not among the candidates")
        questions.append(Question(tuple(story), fields[0], fields[1], candidates))
        block = []
    return questions


class _CBT(Task):
    def documents(self, limit: int | None = None) -> list[Question]:
        return parse_cbt(self.path)[:limit]

    def split(self, q: Question) -> tuple[str, str]:
        """(context, rest of the query after the blank), de-tokenized as one text."""
        text = " ".join(q.story + (q.query,))
        if self.detokenize:
            text = ptb_quotes(text)
        before, _, after = text.partition(BLANK)
        return before, after

    def requests(self, doc: Question, tokenizer: Any) -> list[Request]:
        before, after = self.split(doc)
        context = before.rstrip(" ")
        space = before[len(context):]
        ctx = tuple(tokenizer.encode_ordinary(context))
        return [Loglikelihood(ctx, tuple(tokenizer.encode_ordinary(space + c + after))) for c in doc.candidates]

    def score(self, doc: Question, results: list[Result]) -> dict[str, float]:
        best = max(range(len(results)), key=lambda i: results[i].logprob)  # type: ignore[union-attr]
        return {"acc": float(doc.candidates[best] == doc.answer)}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        return {"acc": 100.0 * sum(s["acc"] for s in scores) / len(scores) if scores else float("nan")}

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "detokenizer": "ptb_quotes" if self.detokenize else "none",
                "scored": "candidate + rest of the query sentence"}


@register_task("cbt-cn")
class CBTCommonNouns(_CBT):
    data_files = ("cbtest_CN_valid_2000ex.txt", "CBTest/data/cbtest_CN_valid_2000ex.txt",
                  "cbtest_CN_test_2500ex.txt", "CBTest/data/cbtest_CN_test_2500ex.txt")
    source = SOURCE
    table3 = (("CBT-CN (ACC)", "acc"),)


@register_task("cbt-ne")
class CBTNamedEntities(_CBT):
    data_files = ("cbtest_NE_valid_2000ex.txt", "CBTest/data/cbtest_NE_valid_2000ex.txt",
                  "cbtest_NE_test_2500ex.txt", "CBTest/data/cbtest_NE_test_2500ex.txt")
    source = SOURCE
    table3 = (("CBT-NE (ACC)", "acc"),)
