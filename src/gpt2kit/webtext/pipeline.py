"""`webtext run`: every stage in order over one work folder; each resumes where it stopped."""
from __future__ import annotations

import os
from typing import Callable

from .dedup import DedupConfig, dedup_documents
from .extract import ExtractConfig, extract_texts
from .fetch import FetchConfig, fetch_pages
from .links import LinksConfig, collect_links
from .shards import ShardConfig, write_shards
from .work import Runner


def run(work: str | os.PathLike, dumps: list[str | os.PathLike], *, links_cfg: LinksConfig = LinksConfig(),
        fetch_cfg: FetchConfig = FetchConfig(), extract_cfg: ExtractConfig = ExtractConfig(),
        dedup_cfg: DedupConfig = DedupConfig(), shard_cfg: ShardConfig = ShardConfig(), runner: Runner = Runner(),
        on_stage: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Build a WebText-style corpus from Reddit dumps into `work`; returns each stage's totals."""
    extract_cfg.check_languages()   # here, not after hours of fetching
    results: dict[str, dict] = {}
    steps = [("links", lambda: collect_links(work, dumps, links_cfg, runner)),
             ("fetch", lambda: fetch_pages(work, fetch_cfg, runner)),
             ("extract", lambda: extract_texts(work, extract_cfg, runner)),
             ("dedup", lambda: dedup_documents(work, dedup_cfg, runner)),
             ("shard", lambda: write_shards(work, shard_cfg, runner))]
    for name, step in steps:
        results[name] = step()
        if on_stage is not None:
            on_stage(name, results[name])
    return results
