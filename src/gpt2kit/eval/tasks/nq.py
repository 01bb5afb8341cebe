"""Natural Questions, open-domain version (Kwiatkowski et al., 2019; Lee et al., 2019), paper §3.8.

Reads `NQ-open.dev.jsonl` (one `{"question": ..., "answer": [...]}` per line; the open-domain
dev set stands in for the test set, whose answers are not public). The prompt is seeded with K
example pairs `Q: question` / `A: answer` (from `NQ-open.train.jsonl` when it is in the data
folder, else the first K dev questions, which are then not scored), then `Q: question` and `A:`;
greedy decoding to the end of the line. Exact match after SQuAD normalization with any gold
answer. Calibration (the paper's Table 5): the model's probability of its own answer ranks the
questions, and the accuracy on the most confident X% is reported (`acc_top1pct` is the paper's
63.1%).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..registry import Task, TaskError, register_task
from ..requests import Generation, Request, Result
from ..transfer_metrics import exact_match, top_confidence_accuracy
from ._jsonl import iter_jsonl

DEFAULT_SHOTS = 5
MAX_ANSWER_TOKENS = 32
CALIBRATION_PERCENTS = (1, 5, 10, 25, 50)


def read_nq(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    expected = "a JSON object with a \"question\" string and a non-empty \"answer\" list"
    for n, obj in iter_jsonl(path, expected):
        q, answers = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not isinstance(answers, list) or not answers:
            raise TaskError(f"{path}: line {n}: expected {expected}")
        out.append((q, tuple(str(a) for a in answers)))
    return out


def qa_prompt(examples: list[tuple[str, tuple[str, ...]]], question: str) -> str:
    """K example lines `Q: ...`/`A: ...` (first gold answer), then `Q: question` and `A:`."""
    return "".join(f"Q: {q}\nA: {a[0]}\n\n" for q, a in examples) + f"Q: {question}\nA:"


@register_task("nq")
class NaturalQuestions(Task):
    data_files = ("NQ-open.dev.jsonl", "nq-open/NQ-open.dev.jsonl")
    source = "https://github.com/google-research-datasets/natural-questions (folder nq_open/, NQ-open.dev.jsonl)"

    def __init__(self, data_dir: str | Path, *, detokenize: bool = True, shots: int = DEFAULT_SHOTS):
        super().__init__(data_dir, detokenize=detokenize)
        if shots < 0:
            raise TaskError(f"--shots must be at least 0, got {shots}")
        self.shots = shots

    def _train_file(self) -> Path | None:
        for rel in ("NQ-open.train.jsonl", "nq-open/NQ-open.train.jsonl"):
            if (self.data_dir / rel).is_file():
                return self.data_dir / rel
        return None

    def _split(self) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[str, tuple[str, ...]]], str]:
        dev = read_nq(self.path)
        train = self._train_file()
        if train is not None:
            examples = read_nq(train)[:self.shots]
            if len(examples) < self.shots:  # (as WMT's newstest2013): fewer examples than asked is no K-shot run
                raise TaskError(f"{train}: expected at least {self.shots} questions for the examples, "
                                f"found {len(examples)}")
            return examples, dev, f"first {self.shots} questions of {train.name}"
        if len(dev) <= self.shots:
            raise TaskError(f"{self.path}: expected more than {self.shots} questions (the first ones are the "
                            "prompt's examples)")
        return dev[:self.shots], dev[self.shots:], f"first {self.shots} dev questions (not scored)"

    def documents(self, limit: int | None = None) -> list[tuple[str, tuple[str, ...]]]:
        examples, questions, _ = self._split()
        return [(qa_prompt(examples, q), answers) for q, answers in questions[:limit]]

    def requests(self, doc: tuple[str, tuple[str, ...]], tokenizer: Any) -> list[Request]:
        return [Generation(tuple(tokenizer.encode_ordinary(doc[0])), MAX_ANSWER_TOKENS, stop=("\n",))]

    def score(self, doc: tuple[str, tuple[str, ...]], results: list[Result]) -> dict[str, float]:
        res = results[0]
        return {"em": exact_match(doc[1], res.text.strip()), "logprob": res.logprob}  # type: ignore[union-attr]

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        n = len(scores)
        correct = [s["em"] for s in scores]
        confidence = [math.exp(s["logprob"]) for s in scores]
        out = {"em": 100.0 * sum(correct) / n if n else math.nan, "questions": n}
        for pct in CALIBRATION_PERCENTS:
            out[f"acc_top{pct}pct"] = top_confidence_accuracy(confidence, correct, pct)
        return out

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "shots": self.shots, "examples": self._split()[2],
                "prompt": "(Q: q\\nA: a\\n\\n)*K Q: q\\nA:", "decoding": "greedy", "stop": "\\n",
                "max_new_tokens": MAX_ANSWER_TOKENS,
                "confidence": "probability of the generated tokens (the newline that ends the answer included)",
                "metric": "exact match after SQuAD normalization, any gold answer"}
