"""CNN/Daily Mail summarization (Hermann et al., 2015; See et al., 2017), paper §3.6 and Table 4.

Reads either a folder `cnndm/` of the original `.story` files (article paragraphs, then each
highlight after an `@highlight` line; files in name order) or a JSONL test split with "article"
and "highlights" (a string with one highlight per line, or a list), e.g. `cnndm_test.jsonl`.

The prompt is the article followed by `\\nTL;DR:`; 100 tokens are sampled with top-k 2 (seeded)
and the first 3 generated sentences are the summary. The paper's ablation without the hint
(the article alone) runs too (`nohint_*`), and so does the Lead-3 baseline (the article's first
3 sentences). ROUGE-1/2/L(/Lsum) F1 against the highlights, stemming on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...corpus import read_text
from ..registry import MissingDataError, Task, TaskError, register_task
from ..requests import Generation, Request, Result
from ..transfer_metrics import first_sentences, require_extra, rouge_f1
from ._jsonl import iter_jsonl, split_lines

HINT = "\nTL;DR:"
SUMMARY_TOKENS = 100
TOP_K = 2
SENTENCES = 3
JSONL_FILES = ("cnndm_test.jsonl", "cnn_dailymail_test.jsonl", "cnndm/test.jsonl")
STORY_DIRS = ("cnndm", "cnn_dailymail", "cnn/stories")


@dataclass(frozen=True)
class Article:
    id: str
    text: str
    highlights: tuple[str, ...]


def parse_story(path: Path) -> Article:
    """A `.story` file: paragraphs separated by blank lines, then `@highlight` + one highlight each."""
    body, highlights, in_highlight = [], [], False
    for line in split_lines(read_text(path)):
        line = line.strip()
        if line == "@highlight":
            in_highlight = True
        elif line and in_highlight:
            highlights.append(line)
            in_highlight = False
        elif line and not highlights:
            body.append(line)
    if not body or not highlights:
        raise TaskError(f"{path}: expected a .story file: article text, then '@highlight' lines each followed "
                        "by a highlight")
    return Article(path.stem, "\n".join(body), tuple(highlights))


def parse_jsonl(path: Path) -> list[Article]:
    out = []
    expected = "a JSON object with an \"article\" string and \"highlights\" (a string or a list)"
    for n, obj in iter_jsonl(path, expected):
        try:
            hl = obj["highlights"]
            highlights = tuple(h.strip() for h in (split_lines(hl) if isinstance(hl, str) else hl) if h.strip())
            article = obj["article"]
            if not isinstance(article, str) or not highlights:
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise TaskError(f"{path}: line {n}: expected {expected}") from None
        out.append(Article(str(obj.get("id", n)), article, highlights))
    return out


@register_task("cnndm")
class CNNDailyMail(Task):
    data_files = JSONL_FILES
    source = ("the .story files of https://cs.nyu.edu/~kcho/DMQA/ (cnn_stories.tgz, dailymail_stories.tgz; the "
              "test split's files, see See et al.'s url_lists) in a folder 'cnndm/', or the Hugging Face "
              "'cnn_dailymail' 3.0.0 test split exported as JSONL")

    def __init__(self, data_dir: str | Path, *, detokenize: bool = True, seed: int = 0):
        super().__init__(data_dir, detokenize=detokenize)
        require_extra("rouge_score.rouge_scorer", "rouge-score")  # fail before generating, not after
        self.seed = seed

    @property
    def path(self) -> Path:
        for rel in JSONL_FILES:
            if (self.data_dir / rel).is_file():
                return self.data_dir / rel
        for rel in STORY_DIRS:
            folder = self.data_dir / rel
            if folder.is_dir() and any(folder.glob("*.story")):
                return folder
        raise MissingDataError(self.name, self.data_dir, [*JSONL_FILES, *(f"{d}/*.story" for d in STORY_DIRS)],
                               self.source)

    def documents(self, limit: int | None = None) -> list[Article]:
        path = self.path
        if path.is_dir():
            return [parse_story(p) for p in sorted(path.glob("*.story"))[:limit]]
        return parse_jsonl(path)[:limit]

    def requests(self, doc: Article, tokenizer: Any) -> list[Request]:
        article = tuple(tokenizer.encode_ordinary(doc.text))
        sample = dict(do_sample=True, top_k=TOP_K, seed=self.seed, truncate="right")
        # A long article loses its end: the hint and the article's start (the lead) are kept.
        return [Generation(article, SUMMARY_TOKENS, suffix=tuple(tokenizer.encode_ordinary(HINT)), **sample),
                Generation(article, SUMMARY_TOKENS, **sample)]

    def score(self, doc: Article, results: list[Result]) -> dict[str, Any]:
        hint, nohint = ("\n".join(first_sentences(r.text, SENTENCES)) for r in results)  # type: ignore[union-attr]
        lead = "\n".join(first_sentences(doc.text, SENTENCES))
        return {"reference": "\n".join(doc.highlights), "hint": hint, "nohint": nohint, "lead3": lead}

    def aggregate(self, scores: list[dict[str, Any]]) -> dict[str, float]:
        refs = [s["reference"] for s in scores]
        out: dict[str, float] = {}
        for variant, prefix in (("hint", ""), ("nohint", "nohint_"), ("lead3", "lead3_")):
            r = rouge_f1(refs, [s[variant] for s in scores])
            for k, v in r.items():
                out[prefix + k] = v
            out[prefix + "avg"] = (r["rouge1"] + r["rouge2"] + r["rougeL"]) / 3
        return out

    def protocol(self) -> dict[str, Any]:
        return {**super().protocol(), "prompt": "article + '\\nTL;DR:' (nohint_*: the article alone)",
                "decoding": f"top-k {TOP_K} sampling", "seed": self.seed, "max_new_tokens": SUMMARY_TOKENS,
                "summary": f"first {SENTENCES} generated sentences", "truncation": "end of the article",
                "metric": "rouge-score F1 x100, use_stemmer=True; avg = mean of R-1, R-2, R-L"}
