"""`gpt2kit webtext ...`: the options each stage's config is built from, the summary lines, and a
stage run end to end in-process. No network: the configs are compared, the links stage reads a
plain NDJSON dump."""
from __future__ import annotations

import json

import pytest

from gpt2kit.cli import build_parser, main
from gpt2kit.cli import webtext as cli_webtext
from gpt2kit.webtext import DedupConfig, ExtractConfig, FetchConfig, LinksConfig, Runner
from gpt2kit.webtext.links import DEFAULT_BLOCKED_DOMAINS

JULY_2017 = 1499000000


def _args(*argv: str):
    return build_parser().parse_args(["webtext", *argv])


def _configs(a):
    return (cli_webtext._links_cfg(a), cli_webtext._fetch_cfg(a), cli_webtext._extract_cfg(a),
            cli_webtext._dedup_cfg(a), cli_webtext._runner(a))


def test_run_defaults_are_the_papers_and_the_apis():
    links, fetch, extract, dedup, runner = _configs(_args("run", "W", "D"))
    assert links == LinksConfig() and extract == ExtractConfig() and dedup == DedupConfig()
    # --timeout (default 20) sets both the connect and the read timeout
    assert fetch == FetchConfig(connect_timeout=20.0, read_timeout=20.0)
    assert runner == Runner(workers=1, engine="local", dask_address=None, progress=True)


def test_every_run_option_reaches_its_stage():
    a = _args("run", "W", "D1", "D2", "--min-score", "5", "--cutoff", "2016-01-01", "--shards", "3",
              "--block-subreddit", "spam", "--block-subreddit", "ads", "--block-domain", "Ads.Example.com",
              "--drop-over-18", "--concurrency", "7", "--per-host", "3", "--host-delay", "0.5", "--timeout", "4",
              "--total-timeout", "9", "--max-bytes", "1000", "--retries", "4", "--backoff", "0.25",
              "--max-redirects", "1", "--ignore-robots", "--user-agent", "ua/1", "--allow-private", "10.0.0.0/8",
              "--resolve", "a.test:127.0.0.1", "--languages", "EN,de", "--min-words", "20", "--threshold", "0.8",
              "--num-perm", "64", "--workers", "2", "--engine", "dask", "--dask-address", "tcp://h:8786",
              "--no-progress")
    assert (a.work, a.dumps) == ("W", ["D1", "D2"])
    links, fetch, extract, dedup, runner = _configs(a)
    assert links == LinksConfig(min_score=5, cutoff="2016-01-01", shards=3, blocked_subreddits=("spam", "ads"),
                                blocked_domains=DEFAULT_BLOCKED_DOMAINS + ("ads.example.com",), drop_over_18=True)
    assert fetch == FetchConfig(concurrency=7, per_host=3, host_delay=0.5, connect_timeout=4.0, read_timeout=4.0,
                                total_timeout=9.0, max_bytes=1000, retries=4, backoff=0.25, max_redirects=1,
                                robots=False, user_agent="ua/1", allow_private=("10.0.0.0/8",),
                                resolve=(("a.test", "127.0.0.1"),))
    assert extract == ExtractConfig(languages=("en", "de"), min_words=20)
    assert dedup == DedupConfig(threshold=0.8, num_perm=64)
    assert runner == Runner(workers=2, engine="dask", dask_address="tcp://h:8786", progress=False)


def test_allow_private_alone_allows_every_network_and_user_agent_keeps_its_default():
    fetch = cli_webtext._fetch_cfg(_args("fetch", "W", "--allow-private"))
    assert fetch.allow_private == () and fetch.user_agent == FetchConfig().user_agent
    assert cli_webtext._fetch_cfg(_args("fetch", "W")).allow_private is None


@pytest.mark.parametrize("item, pair", [
    ("news.test:127.0.0.1", ("news.test", "127.0.0.1")),
    ("v6.test:::1", ("v6.test", "::1")),                  # an IPv6 address: the host ends at the first colon
    ("v6.test:2001:db8::5", ("v6.test", "2001:db8::5")),
])
def test_resolve_splits_host_from_address(item, pair):
    assert cli_webtext._fetch_cfg(_args("fetch", "W", "--resolve", item)).resolve == (pair,)


@pytest.mark.parametrize("item", ["news.test", "news.test:", ":127.0.0.1", ":::1"])
def test_a_bad_resolve_is_a_one_line_error_before_the_stage(tmp_path, capsys, item):
    # the work folder has no links stage: the option is refused first
    assert main(["webtext", "fetch", str(tmp_path), f"--resolve={item}"]) == 2
    assert capsys.readouterr().err == f"gpt2kit: error: --resolve: expected HOST:ADDRESS, got {item!r}\n"
    assert not (tmp_path / "_state").exists()


def test_summary_lines():
    s = cli_webtext.summary
    assert s("links", {"dump_files": 2, "lines": 12345, "bad_lines": 1000, "truncated_files": 1, "kept": 2000,
                       "links": 1500}, "W") == \
        "links: 2 dumps, 12,345 lines (1,000 bad, 1 truncated file), 2,000 posts kept, 1,500 unique links -> W/links"
    assert s("links", {}, "W") == \
        "links: 0 dumps, 0 lines (0 bad, 0 truncated files), 0 posts kept, 0 unique links -> W/links"
    assert s("fetch", {"urls": 3000, "status": {"ok": 2500, "robots": 0, "http_404": 500}, "bytes": 1234567,
                       "skipped_tasks": 4}, "W") == \
        "fetch: 3,000 URLs (ok 2,500, http_404 500), 1,234,567 bytes -> W/fetch (4 tasks already done, skipped)"
    assert s("extract", {"pages": 2000, "docs": 1500, "dropped": {"language": 400, "short": 100, "empty": 0}}, "W") == \
        "extract: 2,000 pages -> 1,500 documents (dropped: language 400, short 100) -> W/extract"
    assert s("extract", {"pages": 1, "docs": 1, "dropped": {"short": 0}}, "W") == \
        "extract: 1 page -> 1 document (dropped: none) -> W/extract"
    assert s("fetch", {"urls": 1, "status": {"ok": 0}, "bytes": 1}, "W") == "fetch: 1 URL (none), 1 byte -> W/fetch"
    assert s("links", {"dump_files": 1, "lines": 1, "truncated_files": 1, "kept": 1, "links": 1}, "W") == \
        "links: 1 dump, 1 line (0 bad, 1 truncated file), 1 post kept, 1 unique link -> W/links"
    assert s("dedup", {"docs_in": 5000, "exact_duplicates": 1200, "near_duplicates": 300, "docs": 3500,
                       "skipped_tasks": 0}, "W") == \
        "dedup: 5,000 documents, 1,200 exact and 300 near duplicates removed, 3,500 left -> W/dedup"
    assert s("shard", {"docs": 3500, "bytes": 10_000_000, "skipped_tasks": 1}, "W") == \
        ("shard: 3,500 documents, 10,000,000 bytes -> W/shards; report W/report.md, chart W/funnel.png "
         "(1 task already done, skipped)")


def test_links_stage_end_to_end_prints_its_summary(tmp_path, capsys):
    rows = [{"url": f"http://site{i}.example/a", "score": score, "created_utc": JULY_2017, "subreddit": sub,
             "is_self": False, "over_18": False, "domain": "x"}
            for i, (score, sub) in enumerate([(10, "news"), (2, "news"), (5, "spam"), (4, "news")])]
    dump = tmp_path / "RS_2017-07.ndjson"
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad\n")
    work = tmp_path / "w"
    assert main(["webtext", "links", str(work), str(dump), "--shards", "2", "--block-subreddit", "spam",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("links: 1 dump, 5 lines (1 bad, 0 truncated files), 2 posts kept, "
                          f"2 unique links -> {work}/links ["), out
    assert out.endswith(" s]\n") and out.count("\n") == 1
    # again: the stage is complete, nothing is redone, and the line says so
    assert main(["webtext", "links", str(work), str(dump), "--shards", "2", "--block-subreddit", "spam",
                 "--no-progress"]) == 0
    assert "2 unique links" in capsys.readouterr().out


def test_export_is_the_shard_stage():
    a = _args("export", "W", "--workers", "3")
    assert a.func is cli_webtext._cmd_shard and a.workers == 3



def test_run_prints_each_stage_and_where_the_corpus_is(tmp_path, capsys, monkeypatch):
    # the stages themselves are the API's (tests/test_webtext_e2e.py runs them): here, what the
    # command hands them and prints of what they report
    import gpt2kit.webtext

    seen = {}

    def fake_run(work, dumps, *, on_stage, **kw):
        seen.update(work=work, dumps=dumps, **kw)
        for stage in ("links", "fetch", "extract", "dedup", "shard"):
            on_stage(stage, {"docs": 7})

    monkeypatch.setattr(gpt2kit.webtext, "run", fake_run)
    assert main(["webtext", "run", "W", "D1", "D2", "--min-words", "5", "--num-perm", "32", "--workers", "2"]) == 0
    assert (seen["work"], seen["dumps"]) == ("W", ["D1", "D2"])
    assert seen["links_cfg"] == LinksConfig() and seen["fetch_cfg"] == FetchConfig(connect_timeout=20.0)
    assert seen["extract_cfg"] == ExtractConfig(min_words=5) and seen["dedup_cfg"] == DedupConfig(num_perm=32)
    assert seen["runner"] == Runner(workers=2, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["links", "fetch", "extract", "dedup", "shard", "webtext"], lines
    assert lines[4].startswith("shard: 7 documents, 0 bytes -> W/shards;")
    assert all(line.endswith(" s]") for line in lines[:5]), lines
    assert lines[-1].startswith("webtext: done in ") and lines[-1].endswith(" s; corpus in W/shards"), lines
