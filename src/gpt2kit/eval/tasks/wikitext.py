"""WikiText-2 and WikiText-103 test sets (Merity et al., 2016): per-word perplexity.

`wiki.test.tokens` is word-level: ` @-@ `, ` @,@ `, ` @.@ ` inside hyphenated words and numbers,
spaces around punctuation, ` = Heading = ` lines, and `<unk>` for words outside the vocabulary
(WikiText-2's smaller vocabulary has more of them). Both share the same test articles. Each
article (starting at a level-1 heading) is scored as one text; words are counted on the original
file with one end-of-line per line, as word-level models count WikiText.
"""
from __future__ import annotations

import re

from ...corpus import read_text
from ..perplexity import PerplexityTask
from ..registry import register_task

_ARTICLE_START = re.compile(r"^ = [^=].* = $")

SOURCE = ("the WikiText release (Salesforce/MetaMind: wikitext-{n}-v1.zip / wikitext-{n}-raw-v1.zip, "
          "which unpack to wikitext-{n}/ and wikitext-{n}-raw/; also on the Hugging Face hub as Salesforce/wikitext)")


def split_articles(text: str) -> list[str]:
    """The file's lines grouped into articles (from one level-1 heading to the next), each keeping
    its lines' newlines; the blank lines before the first heading belong to the first article.

    A heading follows a blank line: WikiText-2's test set also has formula lines shaped like one
    (` = 1 <unk> / s and a nominal <unk> k = `), right after a line of text."""
    articles: list[list[str]] = []
    after_blank = True
    for line in text.splitlines(keepends=True):
        heading = after_blank and _ARTICLE_START.match(line.rstrip("\n"))
        if not articles or (heading and any(x.strip() for x in articles[-1])):  # blank lines join the next article
            articles.append([])
        articles[-1].append(line)
        after_blank = not line.strip()
    return ["".join(a) for a in articles]


class _WikiText(PerplexityTask):
    detokenizer = "wikitext"

    def read_documents(self) -> list[str]:
        return split_articles(read_text(self.path))


@register_task("wikitext2")
class WikiText2(_WikiText):
    data_files = ("wikitext-2/wiki.test.tokens", "wikitext-2-raw/wiki.test.raw")
    source = SOURCE.format(n=2)
    table3 = (("WikiText2 (PPL)", "ppl"),)


@register_task("wikitext103")
class WikiText103(_WikiText):
    data_files = ("wikitext-103/wiki.test.tokens", "wikitext-103-raw/wiki.test.raw")
    source = SOURCE.format(n=103)
    table3 = (("WikiText103 (PPL)", "ppl"),)
