"""LAMBADA (Paperno et al., 2016): predict the last word of a passage (paper §3.3).

Reads OpenAI's `lambada_test.jsonl` (5153 passages, `{"text": ...}`, the version without
preprocessing that the paper used) or else the original `lambada_test_plain_text.txt`
(tokenized, Penn-Treebank quotes; de-tokenized here). The target is the passage's last
whitespace-separated word. Reported, all from the same passages:

- `ppl`: perplexity of the target word, exp(-mean over passages of log p(word | passage before));
- `acc_word`: the whole word, greedily decoded (as many tokens as it takes) from the passage
  before it, is exactly the target;
- `acc_token`: the target's last BPE token is the argmax given every token before it (the
  protocol of several public re-implementations, which scores well above `acc_word`);
- `*_stopfilter`: the same with the paper's stop-word filter on predictions: stop words may not
  be predicted (for `acc_word`: may not be the first generated token; for `acc_token`, when the
  last token is a piece inside a longer word, only the stop words' space-led forms are removed).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from ...corpus import read_text
from ..detokenizers import ptb_quotes
from ..registry import Task, TaskError, register_task
from ..requests import GreedyGeneration, Loglikelihood, Request, Result
from ._jsonl import split_lines

# Function words that a reader would never pick as the missing last word of a LAMBADA passage.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split())

MAX_WORD_TOKENS = 8  # no LAMBADA target needs more; a longer generation is wrong anyway
WORD_END = r"(?<=\w)[^\w']"  # the first character after the word (apostrophes stay inside it)
_LAST_WORD = re.compile(r"^(.*\S)(\s+)(\S+)\s*$", re.S)


@lru_cache(maxsize=8)
def stop_word_tokens(tokenizer: Any, *, spaced_only: bool = False) -> frozenset[int]:
    """Token ids that are a whole stop word, with or without a leading space or capital
    (`spaced_only`: only the forms with a leading space)."""
    ids = set()
    for w in STOP_WORDS:
        forms = (" " + w, " " + w.capitalize()) + (() if spaced_only else (w, w.capitalize()))
        for form in forms:
            toks = tokenizer.encode_ordinary(form)
            if len(toks) == 1:
                ids.add(toks[0])
    return frozenset(ids)


@register_task("lambada")
class Lambada(Task):
    data_files = ("lambada_test.jsonl", "lambada_test_plain_text.txt",
                  "lambada-dataset/lambada_test_plain_text.txt")
    source = ("OpenAI's https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl, or the original "
              "release https://zenodo.org/record/2630551 (lambada-dataset.tar.gz)")
    table3 = (("LAMBADA (PPL)", "ppl"), ("LAMBADA (ACC)", "acc_word_stopfilter"))

    def documents(self, limit: int | None = None) -> list[tuple[str, str, str]]:
        path = self.path
        if path.suffix == ".jsonl":
            texts = []
            for n, line in enumerate(split_lines(read_text(path)), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise TaskError(f"{path}: line {n}: expected a JSON object with a \"text\" string")
                texts.append(text)
        else:
            texts = [ptb_quotes(t) if self.detokenize else t for t in split_lines(read_text(path)) if t.strip()]
        docs = []
        for n, text in enumerate(texts[:limit], 1):
            m = _LAST_WORD.match(text)
            if not m:
                raise TaskError(f"{path}: passage {n} has no last word to predict")
            docs.append((m.group(1), m.group(2) + m.group(3), m.group(3)))  # context, " word", word
        return docs

    def requests(self, doc: tuple[str, str, str], tokenizer: Any) -> list[Request]:
        context, continuation, _ = doc
        ctx = tuple(tokenizer.encode_ordinary(context))
        word = tuple(tokenizer.encode_ordinary(continuation))
        passage = tuple(tokenizer.encode_ordinary(context + continuation))
        stop = stop_word_tokens(tokenizer)
        # The filter removes predicted words: the target's last token is a piece inside it (" Beth"+"any",
        # " Kent"+"on") unless only whitespace precedes it, and a piece spelling a stop word is no stop word.
        starts_word = not tokenizer.decode(list(word[:-1])).strip()
        last_stop = stop if starts_word else stop_word_tokens(tokenizer, spaced_only=True)
        return [
            Loglikelihood(ctx, word),
            Loglikelihood(passage[:-1], passage[-1:]),
            Loglikelihood(passage[:-1], passage[-1:], exclude=last_stop),
            GreedyGeneration(ctx, MAX_WORD_TOKENS, stop_regex=WORD_END),
            GreedyGeneration(ctx, MAX_WORD_TOKENS, stop_regex=WORD_END, suppress_first=stop),
        ]

    def score(self, doc: tuple[str, str, str], results: list[Result]) -> dict[str, float]:
        word_ll, token, token_filtered, gen, gen_filtered = results
        target = doc[2]
        return {
            "logprob": word_ll.logprob,  # type: ignore[union-attr]
            "acc_word": float(gen.text.strip() == target),  # type: ignore[union-attr]
            "acc_word_stopfilter": float(gen_filtered.text.strip() == target),  # type: ignore[union-attr]
            "acc_token": float(token.is_greedy),  # type: ignore[union-attr]
            "acc_token_stopfilter": float(token_filtered.is_greedy),  # type: ignore[union-attr]
        }

    def aggregate(self, scores: list[dict[str, float]]) -> dict[str, float]:
        import math

        n = len(scores)
        out = {"ppl": math.exp(-sum(s["logprob"] for s in scores) / n) if n else math.nan}
        for key in ("acc_word_stopfilter", "acc_word", "acc_token_stopfilter", "acc_token"):
            out[key] = 100.0 * sum(s[key] for s in scores) / n if n else math.nan
        return out

    def protocol(self) -> dict[str, Any]:
        plain = self.path.suffix != ".jsonl"
        return {**super().protocol(), "detokenizer": "ptb_quotes" if plain and self.detokenize else "none",
                "max_word_tokens": MAX_WORD_TOKENS, "word_end_regex": WORD_END,
                "stop_words": len(STOP_WORDS), "ppl": "of the last word"}


@register_task("lambada-original")
class LambadaOriginal(Lambada):
    """The same protocols on the original release's tokenized text (de-tokenized unless told not to)."""

    data_files = ("lambada_test_plain_text.txt", "lambada-dataset/lambada_test_plain_text.txt")
    source = "the original release https://zenodo.org/record/2630551 (lambada-dataset.tar.gz)"
    table3 = ()
