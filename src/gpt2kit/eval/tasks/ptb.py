"""Penn Treebank, Mikolov's version (`ptb.test.txt`): per-word perplexity.

One lower-cased sentence per line, no punctuation, `N` for every number, `<unk>` for the words
outside its 10k vocabulary. The sentences come from consecutive WSJ articles, so the test set is
scored as one stream (sliding window); a document for `--limit` is a sentence.
"""
from __future__ import annotations

from ...corpus import read_text
from ..perplexity import PerplexityTask
from ..registry import register_task


@register_task("ptb")
class PTB(PerplexityTask):
    data_files = ("ptb.test.txt", "simple-examples/data/ptb.test.txt")
    source = ("Mikolov's simple-examples.tgz (http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz, "
              "data/ptb.test.txt)")
    table3 = (("PTB (PPL)", "ppl"),)
    detokenizer = "ptb"
    stream = True

    def read_documents(self) -> list[str]:
        return read_text(self.path).splitlines(keepends=True)
