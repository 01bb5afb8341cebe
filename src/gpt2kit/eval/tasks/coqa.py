"""CoQA (Reddy et al., 2019), conversational reading comprehension (paper §3.5).

Reads the official `coqa-dev-v1.0.json`: {"data": [{"id", "story", "questions": [{"turn_id",
"input_text"}], "answers": [{"turn_id", "input_text"}], "additional_answers": {"0": [...], ...}}]}.
Every question of a story is one request. The prompt is the story, a blank line, the conversation
so far as `Q: question` / `A: gold answer` lines, then the new `Q: question` and `A:`; the answer
is greedy decoding up to the end of the line. Scores: the official F1/EM (normalized answers,
leave-one-out over the 4 human answers), averaged over all questions as the official "overall".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...corpus import read_text
from ..registry import Task, TaskError, register_task
from ..requests import Generation, Request, Result
from ..transfer_metrics import coqa_turn_scores

MAX_ANSWER_TOKENS = 48  # CoQA answers are short free-form spans; the line ends long before


@dataclass(frozen=True)
class Conversation:
    id: str
    story: str
    questions: tuple[str, ...]
    golds: tuple[tuple[str, ...], ...]  # per question: the answer, then the additional answers


def parse_coqa(path: Any) -> list[Conversation]:
    try:
        data = json.loads(read_text(path))["data"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TaskError(f"{path}: expected CoQA's JSON: an object with a \"data\" list of stories") from None
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected CoQA's JSON: an object with a \"data\" list of stories")
    return [_conversation(path, n, story) for n, story in enumerate(data)]


def _texts(items: Any) -> list[str] | None:
    """The "input_text" strings of a list of turn objects, or None if it is not one."""
    if not isinstance(items, list) or not all(isinstance(x, dict) and isinstance(x.get("input_text"), str)
                                              for x in items):
        return None
    return [x["input_text"] for x in items]


def _conversation(path: Any, n: int, story: Any) -> Conversation:
    where = f"{path}: story {n}"
    shape = "\"story\", \"questions\" and \"answers\" lists of objects with \"input_text\" strings"
    if not isinstance(story, dict) or not isinstance(story.get("story"), str):
        raise TaskError(f"{where}: expected an object with {shape}")
    questions, answers = _texts(story.get("questions")), _texts(story.get("answers"))
    if questions is None or answers is None:
        raise TaskError(f"{where}: expected {shape}")
    extra = story.get("additional_answers", {})
    if not isinstance(extra, dict):
        raise TaskError(f"{where}: expected \"additional_answers\" to be an object of answer lists")
    # The official script pairs the i-th answer of every list with the i-th question: a missing one
    # would only surface when scoring, after every answer had been generated.
    answer_lists = [("\"answers\"", answers)]
    for key, items in extra.items():
        texts = _texts(items)
        if texts is None:
            raise TaskError(f"{where}: expected \"additional_answers\" {key!r} to be a list of objects with "
                            "\"input_text\" strings")
        answer_lists.append((f"\"additional_answers\" \"{key}\"", texts))
    for name, texts in answer_lists:
        if len(texts) != len(questions):
            raise TaskError(f"{where}: expected one answer per question in {name} ({len(questions)} questions, "
                            f"{len(texts)} answers)")
    golds = tuple(tuple(texts[i] for _, texts in answer_lists) for i in range(len(questions)))
    return Conversation(str(story.get("id", n)), story["story"], tuple(questions), golds)


def coqa_prompt(conv: Conversation, turn: int) -> str:
    """The story, the conversation before `turn` with its gold answers, then `Q: ...` and `A:`."""
    lines = [f"Q: {q}\nA: {g[0]}\n" for q, g in zip(conv.questions[:turn], conv.golds[:turn])]
    return f"{conv.story}\n\n" + "".join(lines) + f"Q: {conv.questions[turn]}\nA:"


@register_task("coqa")
class CoQA(Task):
    data_files = ("coqa-dev-v1.0.json", "coqa/coqa-dev-v1.0.json")
    source = "https://nlp.stanford.edu/data/coqa/coqa-dev-v1.0.json (the CoQA site, stanfordnlp.github.io/coqa)"

    def documents(self, limit: int | None = None) -> list[Conversation]:
        return parse_coqa(self.path)[:limit]

    def requests(self, doc: Conversation, tokenizer: Any) -> list[Request]:
        return [Generation(tuple(tokenizer.encode_ordinary(coqa_prompt(doc, t))), MAX_ANSWER_TOKENS, stop=("\n",))
                for t in range(len(doc.questions))]

    def score(self, doc: Conversation, results: list[Result]) -> dict[str, float]:
        em = f1 = 0.0
        for golds, res in zip(doc.golds, results):
            e, f = coqa_turn_scores(golds, res.text.strip())  # type: ignore[union-attr]
            em, f1 = em + e, f1 + f
        return {"em": em, "f1": f1, "turns": len(results)}

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        turns = sum(s["turns"] for s in scores)
        if not turns:
            return {"f1": float("nan"), "em": float("nan"), "questions": 0}
        return {"f1": 100.0 * sum(s["f1"] for s in scores) / turns,
                "em": 100.0 * sum(s["em"] for s in scores) / turns, "questions": turns}

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "prompt": "story\\n\\n(Q: q\\nA: gold\\n)*Q: q\\nA:", "decoding": "greedy",
                "stop": "\\n", "max_new_tokens": MAX_ANSWER_TOKENS, "shots": 0,
                "metric": "official CoQA v1.0 F1/EM, leave-one-out over human answers, mean over questions"}
