"""WebText: the training corpus of the GPT-2 paper (§2.1), built from Reddit dumps of your own.

Stages, each a function over the shard files of a work folder (see `work.py` for the layout):
`links` (Reddit submissions -> canonical outbound links), `fetch` (polite, safe HTTP into WARC),
`extract` (main text, language, cleaning, Wikipedia removal), `dedup` (exact + MinHash LSH) and
`shard` (the final JSONL.zst corpus and a report); `run` chains them.
"""
from __future__ import annotations

from .dedup import DedupConfig, dedup_documents
from .extract import ExtractConfig, extract_texts
from .fetch import FetchConfig, fetch_pages
from .links import LinksConfig, canonicalize_url, collect_links
from .pipeline import run
from .shards import ShardConfig, read_corpus, write_shards
from .work import Runner, WebTextError, WorkFolder

__all__ = ["DedupConfig", "ExtractConfig", "FetchConfig", "LinksConfig", "Runner", "ShardConfig", "WebTextError",
           "WorkFolder", "canonicalize_url", "collect_links", "dedup_documents", "extract_texts", "fetch_pages",
           "read_corpus", "run", "write_shards"]
