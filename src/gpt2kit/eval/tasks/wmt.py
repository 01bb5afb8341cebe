"""WMT14 English<->French translation on newstest2014 (paper §3.7).

Reads the official SGML test files (`newstest2014-fren-src.en.sgm` and `newstest2014-fren-ref.fr.sgm`
for en->fr; `-src.fr` and `-ref.en` for fr->en: one `<seg id=...>` per sentence), or aligned plain
files with one sentence per line (`newstest2014.en`, `newstest2014.fr`). The prompt holds K
example pairs as lines `source = target`, then `source =`; greedy decoding, and the text up to
the end of the line is the translation. The examples come from newstest2013 when it is in the data
folder (`newstest2013.en`/`.fr` or its SGML files); otherwise they are the first K pairs of the
test set, which are then not scored. Corpus BLEU with sacrebleu (13a tokenization).
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from ...corpus import read_text
from ..registry import MissingDataError, Task, TaskError, register_task
from ..requests import Generation, Request, Result
from ..transfer_metrics import corpus_bleu, require_extra
from ._jsonl import split_lines

DEFAULT_SHOTS = 5
MAX_TRANSLATION_TOKENS = 160  # newstest2014 sentences: 99.9% of references are shorter
SOURCE = "the WMT14 test sets, http://www.statmt.org/wmt14/test-full.tgz (folder test-full/)"
_SEG = re.compile(r"<seg[^>]*>(.*?)</seg>", re.S | re.I)


def read_segments(path: Path) -> list[str]:
    """The sentences of an SGML file (`<seg>` elements) or of a plain file (one per line)."""
    text = read_text(path)
    if path.suffix == ".sgm":
        segs = [html.unescape(s).strip() for s in _SEG.findall(text)]
        if not segs:
            raise TaskError(f"{path}: expected SGML with <seg id=...>sentence</seg> elements")
        return segs
    return [line.strip() for line in split_lines(text)]


def _find_pair(data_dir: Path, year: int, src: str, tgt: str) -> tuple[Path, Path] | None:
    pairs = [(f"newstest{year}-fren-src.{src}.sgm", f"newstest{year}-fren-ref.{tgt}.sgm"),
             (f"newstest{year}-src.{src}.sgm", f"newstest{year}-ref.{tgt}.sgm"),
             (f"newstest{year}.{src}", f"newstest{year}.{tgt}")]
    for folder in (data_dir, data_dir / "test-full", data_dir / "dev", data_dir / "wmt14"):
        for a, b in pairs:
            if (folder / a).is_file() and (folder / b).is_file():
                return folder / a, folder / b
    return None


def read_pairs(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = read_segments(src_path), read_segments(tgt_path)
    if len(src) != len(tgt):
        raise TaskError(f"{src_path} has {len(src)} sentences but {tgt_path} has {len(tgt)}: expected aligned files")
    return [(s, t) for s, t in zip(src, tgt) if s and t]


def translation_prompt(examples: list[tuple[str, str]], source: str) -> str:
    """K lines `source = target`, then `source =` (§3.7)."""
    return "".join(f"{s} = {t}\n" for s, t in examples) + f"{source} ="


class _WMT14(Task):
    src = tgt = ""

    def __init__(self, data_dir: str | Path, *, detokenize: bool = True, shots: int = DEFAULT_SHOTS):
        super().__init__(data_dir, detokenize=detokenize)
        require_extra("sacrebleu", "sacrebleu")  # fail before generating, not after
        if shots < 0:
            raise TaskError(f"--shots must be at least 0, got {shots}")
        self.shots = shots

    @property
    def files(self) -> tuple[Path, Path]:
        pair = _find_pair(self.data_dir, 2014, self.src, self.tgt)
        if pair is None:
            raise MissingDataError(self.name, self.data_dir,
                                   [f"newstest2014-fren-src.{self.src}.sgm + newstest2014-fren-ref.{self.tgt}.sgm",
                                    f"newstest2014.{self.src} + newstest2014.{self.tgt}"], SOURCE)
        return pair

    @property
    def path(self) -> Path:
        return self.files[0]

    def _split(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
        """(examples, scored pairs, where the examples come from)."""
        test = read_pairs(*self.files)
        dev = _find_pair(self.data_dir, 2013, self.src, self.tgt)
        if dev is not None:
            examples = read_pairs(*dev)[:self.shots]
            if len(examples) < self.shots:
                raise TaskError(f"{dev[0]}: expected at least {self.shots} sentence pairs for the examples")
            return examples, test, f"first {self.shots} pairs of {dev[0].name}"
        if len(test) <= self.shots:
            raise TaskError(f"{self.files[0]}: expected more than {self.shots} sentence pairs (the first ones are "
                            "the prompt's examples)")
        return test[:self.shots], test[self.shots:], f"first {self.shots} pairs of the test set (not scored)"

    def documents(self, limit: int | None = None) -> list[tuple[str, str, str]]:
        examples, pairs, _ = self._split()
        return [(translation_prompt(examples, s), s, t) for s, t in pairs[:limit]]

    def requests(self, doc: tuple[str, str, str], tokenizer: Any) -> list[Request]:
        return [Generation(tuple(tokenizer.encode_ordinary(doc[0])), MAX_TRANSLATION_TOKENS, stop=("\n",))]

    def score(self, doc: tuple[str, str, str], results: list[Result]) -> dict[str, Any]:
        return {"hypothesis": results[0].text.strip(), "reference": doc[2]}  # type: ignore[union-attr]

    def aggregate(self, scores: list[dict[str, Any]]) -> dict[str, float]:
        bleu = corpus_bleu([s["reference"] for s in scores], [s["hypothesis"] for s in scores])
        return {"bleu": bleu["bleu"], "sentences": len(scores)}

    def protocol(self) -> dict[str, Any]:
        signature = corpus_bleu(["x"], ["x"])["signature"]  # sacrebleu's settings, version included
        return {**super().protocol(), "reference_file": str(self.files[1]), "shots": self.shots,
                "examples": self._split()[2], "prompt": "(source = target\\n)*K source =", "decoding": "greedy",
                "stop": "\\n", "max_new_tokens": MAX_TRANSLATION_TOKENS, "translation": "the first generated line",
                "metric": "sacrebleu corpus BLEU", "bleu_signature": signature}


@register_task("wmt14-en-fr")
class WMT14EnFr(_WMT14):
    src, tgt = "en", "fr"
    source = SOURCE


@register_task("wmt14-fr-en")
class WMT14FrEn(_WMT14):
    src, tgt = "fr", "en"
    source = SOURCE
