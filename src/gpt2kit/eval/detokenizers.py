"""Invertible de-tokenizers: undo each benchmark's tokenization artifacts (paper §3.1).

The paper notes that word-level benchmarks were tokenized in ways WebText never is (spaces
around punctuation, ` @-@ ` for hyphens, `<unk>`, `N` for numbers), and that de-tokenizing them
is worth 2.5 to 5 perplexity points. Each function here maps a dataset's text to natural text by
local rewrites that undo one tokenization convention each (the dataset's tokens can be read back
from the result: nothing is dropped or invented); no line is added or removed. The number of
words that perplexity is normalized by is always counted on the original text (`count_words`).
`<unk>` is kept as text, as in the paper.
"""
from __future__ import annotations

import re
from typing import Callable

__all__ = ["DETOKENIZERS", "count_words", "detokenize", "wikitext", "ptb", "lm1b", "ptb_quotes"]


def count_words(text: str, *, eos_per_line: bool = True) -> int:
    """The canonical number of words of a word-level test set: whitespace-separated tokens plus,
    with `eos_per_line`, one end-of-sentence token per line, as the word-level language models
    these benchmarks were built for count them (Mikolov's PTB, WikiText, 1BW's `</S>`)."""
    n = len(text.split())
    if eos_per_line:
        n += text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    return n


# ----------------------------------------------------------------------------- shared rewrites

# English clitics split off by Penn-Treebank-style tokenizers: "it 's", "do n't", "we 're", ...
_CLITICS = re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d|'S|'RE|'VE|'M|'LL|'D|N'T)\b")
# WikiText and 1BW split "don't" as "don 't" (not Penn Treebank's "do n't"), and every colon, also in times
# (`at 16 : 40`, `2 : 56 remaining`), which they never write unsplit.
_SPLIT_NOT = re.compile(r"(?<=[nN]) ('[tT])\b")
_SPLIT_TIME = re.compile(r"(?<=\d) : (?=\d)")
# Closing punctuation never has a space before it in running text.
_SPACE_BEFORE_CLOSING = re.compile(r" ([.,;:!?%)\]}])")
# Opening brackets and currency never have a space after them.
_SPACE_AFTER_OPENING = re.compile(r"([(\[{$£€¥#]) ")


def _attach_punctuation(text: str) -> str:
    text = _CLITICS.sub(r"\1", text)
    text = _SPACE_BEFORE_CLOSING.sub(r"\1", text)
    return _SPACE_AFTER_OPENING.sub(r"\1", text)


_CLAUSE_ENDS = frozenset({",", ".", "?", "!", "..."})


def _pair_straight_quotes(line: str) -> str:
    """`a " quoted text " , b` -> `a "quoted text" , b`: among the line's space-separated `"`
    tokens, odd ones open (joined to the word after) and even ones close (joined to the word
    before), counting from the second when the first closes a quotation begun earlier. Runs
    before punctuation is attached, which would hide a closing quote followed by `,` or `.` and
    turn every later quote of the line around."""
    words = line.split(" ")
    quotes = [i for i, word in enumerate(words) if word == '"']
    if not quotes:
        return line
    out, opening, after_opening = [], not _closes_a_quotation_begun_before(words, quotes), False
    for word in words:
        quote = word == '"'
        joined = (not opening) if quote else after_opening
        out.append(word if joined or not out else " " + word)
        after_opening = quote and opening
        opening ^= quote
    return "".join(out)


def _closes_a_quotation_begun_before(words: list[str], quotes: list[int]) -> bool:
    """An odd number of quotes: a quotation runs over from the previous sentence of a shuffled 1BW
    line (`... dissatisfied , " said the manager`) or on into the next one. The first quote closes
    it when it ends the line, or comes after a clause's end and before a lower-case word (a quoted
    sentence starts with a capital; a quoted phrase, `had been " no conduct`, follows a word)."""
    first = quotes[0]
    if len(quotes) % 2 == 0 or first == 0:
        return False
    after = words[first + 1] if first + 1 < len(words) else ""
    return not after or (words[first - 1] in _CLAUSE_ENDS and after[:1].islower())


# Penn Treebank's escapes for brackets, whole tokens: Stanford's tokenizer writes every bracket of CBT's books this
# way (`-LCB- Chapter heading picture : p1.jpg -RCB-`), lower-cased in lower-cased text.
_PTB_BRACKETS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}
_PTB_BRACKET = re.compile(r"(?<!\S)-[lr][rsc]b-(?!\S)", re.IGNORECASE)
# With quotes written `` '' ` ', a lone ' always ends something: a single quotation or a plural possessive
# (`the others '`), never opens one.
_LONE_CLOSING_QUOTE = re.compile(r" '(?=\s|$)")


def ptb_quotes(text: str) -> str:
    """Text tokenized with Penn Treebank quotes (`` and '', ` and '), as LAMBADA's plain-text file
    and CBT are: quotes become straight quotes attached to the quoted words, bracket tokens
    (`-LRB-`, `-RSB-`, ...) become brackets, clitics and punctuation are re-attached."""
    text = _PTB_BRACKET.sub(lambda m: _PTB_BRACKETS[m.group().lower()], text)
    text = re.sub(r"(^|\s)` ", r"\1'", text)  # a single opening quote, before `` takes the space after it
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = _LONE_CLOSING_QUOTE.sub("'", text)
    return _attach_punctuation(text)


# ----------------------------------------------------------------------------- per dataset

def _wikitext_text(text: str) -> str:
    # numbers: `1 @,@ 000` -> `1,000`, `3 @.@ 5` -> `3.5`; hyphens: `state @-@ of` -> `state-of`
    text = re.sub(r" @([-,.])@ ", r"\1", text)
    text = _SPLIT_TIME.sub(":", _SPLIT_NOT.sub(r"\1", text))
    return _attach_punctuation(_pair_straight_quotes(text))


def _wikitext_line(line: str) -> str:
    line = line.strip()
    words = line.split(" ")
    level = next((i for i, w in enumerate(words) if w != "="), len(words))
    if 0 < level < len(words) and words[-level:] == ["="] * level:
        # ` = = Gameplay = = ` -> `== Gameplay ==`, the way the heading is written in wiki markup; its title is
        # tokenized like any text (`= = = Hero 's ( 2007 ) = = =`)
        marks = "=" * level
        return f"{marks} {_wikitext_text(' '.join(words[level:-level]))} {marks}"
    return _wikitext_text(line)


def wikitext(text: str) -> str:
    """WikiText-2/-103 (`wiki.test.tokens` or `.raw`): one paragraph or heading per line."""
    return "\n".join(_wikitext_line(line) for line in text.split("\n"))


_PTB_NUMBER = re.compile(r"(?<!\S)N(?!\S)")


def ptb(text: str) -> str:
    """Mikolov's PTB (`ptb.test.txt`): lower-cased, no punctuation, `N` for every number.

    `N` becomes the digit `1`: WebText writes numbers as digits, and since PTB's digits only
    occur inside words (`500-stock`, `1980s`), never as a word of their own, the rewrite stays
    invertible. The Treebank's escaped slash `\\/` (`mgm\\/ua`) becomes `/`, which PTB never has
    unescaped."""
    lines = []
    for line in text.split("\n"):
        line = _CLITICS.sub(r"\1", line.strip())
        line = _LONE_CLOSING_QUOTE.sub("'", line)  # without punctuation, a plural possessive: `analysts ' views`
        line = _PTB_NUMBER.sub("1", line)
        lines.append(line.replace("$ 1", "$1").replace("\\/", "/"))
    return "\n".join(lines)


def lm1b(text: str) -> str:
    """One Billion Word (`news.en.heldout-*`): one tokenized news sentence per line."""
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"(\w) n't\b", r"\1n't", line.strip())  # "does n't" -> "doesn't"
        line = _SPLIT_TIME.sub(":", _SPLIT_NOT.sub(r"\1", line))  # the held-out set's own "doesn 't", "2 : 56"
        lines.append(_attach_punctuation(_pair_straight_quotes(line)))
    return "\n".join(lines)


def identity(text: str) -> str:
    return text


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext,
    "ptb": ptb,
    "lm1b": lm1b,
    "ptb_quotes": ptb_quotes,  # LAMBADA's plain-text release, CBT
    "none": identity,
}


def detokenize(name: str, text: str) -> str:
    return DETOKENIZERS[name](text)
