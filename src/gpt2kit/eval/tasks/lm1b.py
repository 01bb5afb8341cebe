"""One Billion Word benchmark (Chelba et al., 2013): per-word perplexity on the held-out shard.

`news.en.heldout-00000-of-00050` holds one tokenized news sentence per line, shuffled, so every
sentence is scored on its own (conditioned only on <|endoftext|>), with its end of line; words
are counted with one end-of-sentence per line, as the benchmark's `</S>`.
"""
from __future__ import annotations

from ...corpus import read_text
from ..perplexity import PerplexityTask
from ..registry import register_task
from ._jsonl import split_lines


@register_task("1bw")
class OneBillionWord(PerplexityTask):
    data_files = ("news.en.heldout-00000-of-00050",
                  "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",
                  "1-billion-word-language-modeling-benchmark-r13output/heldout-monolingual.tokenized.shuffled/"
                  "news.en.heldout-00000-of-00050")
    source = ("the benchmark's release (https://www.statmt.org/lm-benchmark/, "
              "1-billion-word-language-modeling-benchmark-r13output.tar.gz, heldout-monolingual.tokenized.shuffled/)")
    table3 = (("1BW (PPL)", "ppl"),)
    detokenizer = "lm1b"

    def read_documents(self) -> list[str]:
        return [line for line in split_lines(read_text(self.path), keepends=True) if line.strip()]
