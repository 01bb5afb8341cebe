"""WebText: the training corpus of the GPT-2 paper (§2.1), built from Reddit dumps of your own.

Stages, each a function over the shard files of a work folder (see `work.py` for the layout):
`links` (Reddit submissions -> canonical outbound links), `fetch` (polite, safe HTTP into WARC),
`extract` (main text, language, cleaning, Wikipedia removal), `dedup` (exact + MinHash LSH) and
`shard` (the final JSONL.zst corpus and a report); `run` chains them.
"""
from __future__ import annotations

from .dedup import DedupConfig, dedup
from .extract import ExtractConfig, extract
from .fetch import FetchConfig, fetch
from .links import LinksConfig, canonicalize_url, links
from .pipeline import run
from .shards import ShardConfig, read_corpus, shard
from .work import Runner, WebTextError, WorkFolder

__all__ = ["DedupConfig", "ExtractConfig", "FetchConfig", "LinksConfig", "Runner", "ShardConfig", "WebTextError",
           "WorkFolder", "canonicalize_url", "dedup", "extract", "fetch", "links", "read_corpus", "run", "shard"]
