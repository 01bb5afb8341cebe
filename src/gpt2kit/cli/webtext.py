"""`gpt2kit webtext links|fetch|extract|dedup|shard|run`: build a WebText-style corpus."""
from __future__ import annotations

import argparse
import logging
import time

STAGES_HELP = "links -> fetch -> extract -> dedup -> shard, each resumable; `run` chains them"
# 10,000: webtext.links.PROBE_LINES (not imported here: `--help` stays fast)
DUMPS_HELP = ("Reddit submission dumps (NDJSON, plain or .zst/.gz/.bz2/.xz), or folders of them (the files directly "
              "in a folder; subfolders and hidden files are not read). A dump cut off part-way is read up to the "
              "damage, but one with no submission line (url, score, created_utc) among its first 10,000 lines is "
              "refused before anything is written")


def _links_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("links")
    g.add_argument("--min-score", type=int, default=3, help="minimum karma of a submission (default 3, as the paper)")
    g.add_argument("--cutoff", default="2017-12-01", help="keep links created before this UTC date (default 2017-12-01)")
    g.add_argument("--shards", type=int, default=16, help="number of shards (links are bucketed by host; default 16, at most 65536)")
    g.add_argument("--block-subreddit", action="append", default=[], metavar="NAME",
                   help="drop this subreddit, named as news, not r/news (repeatable)")
    g.add_argument("--block-domain", action="append", default=[], metavar="DOMAIN",
                   help="drop links to this host name (example.com, not a URL) and its subdomains (repeatable; "
                        "adds to the built-in media list)")
    g.add_argument("--drop-over-18", action="store_true", help="drop submissions marked over_18")


def _fetch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fetch")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight in total (default 64)")
    g.add_argument("--per-host", type=int, default=2, help="requests in flight per host (default 2)")
    g.add_argument("--host-delay", type=float, default=1.0, help="seconds between requests to one host (default 1)")
    g.add_argument("--timeout", type=float, default=20.0, help="connect/read timeout in seconds (default 20)")
    g.add_argument("--total-timeout", type=float, default=60.0, help="deadline for one whole response (default 60)")
    g.add_argument("--max-bytes", type=int, default=5_000_000, help="body size limit after decompression (default 5 MB)")
    g.add_argument("--retries", type=int, default=2,
                   help="retries after a timeout, connection error, 429 or 5xx (default 2)")
    g.add_argument("--backoff", type=float, default=1.0,
                   help="seconds before the first retry, doubling after (default 1)")
    g.add_argument("--max-redirects", type=int, default=5,
                   help="redirects followed per link, each target checked anew; more are recorded as "
                        "too_many_redirects (default 5)")
    g.add_argument("--ignore-robots", action="store_true", help="do not obey robots.txt (only for your own servers)")
    g.add_argument("--user-agent", default=None, help="User-Agent header (default names gpt2kit-webtext)")
    g.add_argument("--allow-private", nargs="*", metavar="NETWORK", default=None,
                   help="allow non-public addresses: all of them, or only these networks (e.g. 127.0.0.0/8)")
    g.add_argument("--resolve", action="append", default=[], metavar="HOST:ADDRESS",
                   help="resolve HOST to ADDRESS instead of asking DNS (repeatable, like curl --resolve)")


def _extract_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("extract")
    g.add_argument("--languages", default="en",
                   help="comma-separated language codes to keep (ISO 639-1 where there is one, as py3langid names "
                        "them; an unknown code is refused with the list), or 'all' (default en)")
    g.add_argument("--min-words", type=int, default=100, help="drop documents shorter than this (default 100)")


def _dedup_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dedup")
    g.add_argument("--threshold", type=float, default=0.5, help="MinHash LSH Jaccard threshold (default 0.5)")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    g.add_argument("--engine", choices=("local", "dask"), default="local",
                   help="local processes, or a Dask cluster (see --dask-address; default local)")
    g.add_argument("--dask-address", default=None,
                   help="scheduler address of a running Dask cluster (default: with --engine dask, a local "
                        "cluster of --workers workers is started for the stage)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("webtext", help="build a WebText corpus from Reddit dumps",
                              description=f"Build the GPT-2 paper's WebText corpus from Reddit submission dumps: {STAGES_HELP}.")
    sub = p.add_subparsers(dest="webtext_command", metavar="STAGE", required=True)

    s = sub.add_parser("links", help="Reddit dumps -> canonical, de-duplicated outbound links")
    s.add_argument("work", metavar="WORK", help="work folder")
    s.add_argument("dumps", nargs="+", metavar="DUMP", help=DUMPS_HELP)
    _links_options(s)
    _run_options(s)
    s.set_defaults(func=_cmd_links)

    s = sub.add_parser("fetch", help="fetch the links politely into WARC files")
    s.add_argument("work", metavar="WORK", help="work folder")
    _fetch_options(s)
    _run_options(s)
    s.set_defaults(func=_cmd_fetch)

    s = sub.add_parser("extract", help="main text, language filter, cleaning, Wikipedia removal")
    s.add_argument("work", metavar="WORK", help="work folder")
    _extract_options(s)
    _run_options(s)
    s.set_defaults(func=_cmd_extract)

    s = sub.add_parser("dedup", help="remove exact and MinHash-LSH near duplicates")
    s.add_argument("work", metavar="WORK", help="work folder")
    _dedup_options(s)
    _run_options(s)
    s.set_defaults(func=_cmd_dedup)

    s = sub.add_parser("shard", aliases=["export"], help="write the final JSONL.zst shards and the report")
    s.add_argument("work", metavar="WORK", help="work folder")
    _run_options(s)
    s.set_defaults(func=_cmd_shard)

    s = sub.add_parser("run", help="all stages in order (resumes where a previous run stopped)")
    s.add_argument("work", metavar="WORK", help="work folder")
    s.add_argument("dumps", nargs="+", metavar="DUMP", help=DUMPS_HELP)
    for add in (_links_options, _fetch_options, _extract_options, _dedup_options, _run_options):
        add(s)
    s.set_defaults(func=_cmd_run)


# ---------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    # trafilatura and httpx log every page at INFO; the summary lines say what matters
    for name in ("trafilatura", "htmldate", "courlan", "httpx", "httpcore", "distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _runner(a):
    from ..webtext import Runner

    return Runner(workers=a.workers, engine=a.engine, dask_address=a.dask_address, progress=not a.no_progress)


def _links_cfg(a):
    from ..webtext.links import DEFAULT_BLOCKED_DOMAINS, LinksConfig

    return LinksConfig(min_score=a.min_score, cutoff=a.cutoff, shards=a.shards, blocked_subreddits=tuple(a.block_subreddit),
                       blocked_domains=DEFAULT_BLOCKED_DOMAINS + tuple(d.lower() for d in a.block_domain),
                       drop_over_18=a.drop_over_18)


def _fetch_cfg(a):
    from ..webtext import FetchConfig, WebTextError

    resolve = []
    for item in a.resolve:
        host, sep, addr = item.rpartition(":") if item.count(":") == 1 else item.partition(":")
        if not sep or not host or not addr:
            raise WebTextError(f"--resolve: expected HOST:ADDRESS, got {item!r}")
        resolve.append((host, addr))
    kw = dict(concurrency=a.concurrency, per_host=a.per_host, host_delay=a.host_delay, connect_timeout=a.timeout,
              read_timeout=a.timeout, total_timeout=a.total_timeout, max_bytes=a.max_bytes, retries=a.retries,
              backoff=a.backoff, max_redirects=a.max_redirects, robots=not a.ignore_robots,
              allow_private=None if a.allow_private is None else tuple(a.allow_private), resolve=tuple(resolve))
    if a.user_agent:
        kw["user_agent"] = a.user_agent
    return FetchConfig(**kw)


def _extract_cfg(a):
    from ..webtext import ExtractConfig, WebTextError

    if a.languages.strip().lower() == "all":
        langs = ()
    else:
        # () would mean every language: an empty list must not pass for 'all'
        langs = tuple(x.strip().lower() for x in a.languages.split(",") if x.strip())
        if not langs:
            raise WebTextError(f"--languages: expected comma-separated language codes or 'all', got {a.languages!r}")
    return ExtractConfig(languages=langs, min_words=a.min_words)


def _dedup_cfg(a):
    from ..webtext import DedupConfig

    return DedupConfig(threshold=a.threshold, num_perm=a.num_perm)


def _resumed(totals: dict) -> str:
    n = totals.get("skipped_tasks", 0)
    return f" ({_n(n, 'task')} already done, skipped)" if n else ""


def _n(count: int, noun: str) -> str:
    """'1 page', '2 pages', '1,000 pages'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def summary(stage: str, t: dict, work) -> str:
    """The one line a stage ends with."""
    g = lambda key: t.get(key, 0)  # noqa: E731
    if stage == "links":
        return (f"links: {_n(g('dump_files'), 'dump')}, {_n(g('lines'), 'line')} ({g('bad_lines'):,} bad, "
                f"{_n(g('truncated_files'), 'truncated file')}), {_n(g('kept'), 'post')} kept, "
                f"{_n(g('links'), 'unique link')} -> {work}/links{_resumed(t)}")
    if stage == "fetch":
        st = ", ".join(f"{k} {v:,}" for k, v in t.get("status", {}).items() if v) or "none"
        return f"fetch: {_n(g('urls'), 'URL')} ({st}), {_n(g('bytes'), 'byte')} -> {work}/fetch{_resumed(t)}"
    if stage == "extract":
        dropped = ", ".join(f"{k} {v:,}" for k, v in t.get("dropped", {}).items() if v) or "none"
        return (f"extract: {_n(g('pages'), 'page')} -> {_n(g('docs'), 'document')} "
                f"(dropped: {dropped}) -> {work}/extract{_resumed(t)}")
    if stage == "dedup":
        return (f"dedup: {_n(g('docs_in'), 'document')}, {g('exact_duplicates'):,} exact and "
                f"{g('near_duplicates'):,} near duplicates removed, {g('docs'):,} left -> {work}/dedup{_resumed(t)}")
    return (f"shard: {_n(g('docs'), 'document')}, {_n(g('bytes'), 'byte')} -> {work}/shards; "
            f"report {work}/report.md, chart {work}/funnel.png{_resumed(t)}")


def _finish(stage: str, totals: dict, a, t0: float) -> int:
    print(summary(stage, totals, a.work) + f" [{time.perf_counter() - t0:.1f} s]", flush=True)
    return 0


def _cmd_links(a) -> int:
    from ..webtext import collect_links

    t0 = time.perf_counter()
    return _finish("links", collect_links(a.work, a.dumps, _links_cfg(a), _runner(a)), a, t0)


def _cmd_fetch(a) -> int:
    from ..webtext import fetch_pages

    _quiet_libraries()
    t0 = time.perf_counter()
    return _finish("fetch", fetch_pages(a.work, _fetch_cfg(a), _runner(a)), a, t0)


def _cmd_extract(a) -> int:
    from ..webtext import extract_texts

    _quiet_libraries()
    t0 = time.perf_counter()
    return _finish("extract", extract_texts(a.work, _extract_cfg(a), _runner(a)), a, t0)


def _cmd_dedup(a) -> int:
    from ..webtext import dedup_documents

    t0 = time.perf_counter()
    return _finish("dedup", dedup_documents(a.work, _dedup_cfg(a), _runner(a)), a, t0)


def _cmd_shard(a) -> int:
    from ..webtext import write_shards

    t0 = time.perf_counter()
    return _finish("shard", write_shards(a.work, runner=_runner(a)), a, t0)


def _cmd_run(a) -> int:
    from ..webtext import run

    _quiet_libraries()
    t0 = last = time.perf_counter()

    def report(stage: str, totals: dict) -> None:
        nonlocal last
        now = time.perf_counter()
        print(summary(stage, totals, a.work) + f" [{now - last:.1f} s]", flush=True)
        last = now

    run(a.work, a.dumps, links_cfg=_links_cfg(a), fetch_cfg=_fetch_cfg(a), extract_cfg=_extract_cfg(a),
        dedup_cfg=_dedup_cfg(a), runner=_runner(a), on_stage=report)
    print(f"webtext: done in {time.perf_counter() - t0:.1f} s; corpus in {a.work}/shards", flush=True)
    return 0
