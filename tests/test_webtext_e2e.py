"""`gpt2kit webtext run` end to end, through the CLI, against the loopback test server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from types import SimpleNamespace

import pytest
from conftest import run_cli
from test_webtext_fetch import HOSTS, Site, article, start_server, write_dump

from gpt2kit.webtext import WorkFolder, read_corpus
from gpt2kit.webtext.work import read_jsonl_zst

CUTOFF_OK, CUTOFF_LATE = 1_500_000_000, 1_515_000_000  # July 2017, January 2018


def dump_rows(port: int) -> list[dict]:
    def post(host, path, score=10, **kw):
        row = {"url": f"http://{host}:{port}{path}", "score": score, "created_utc": CUTOFF_OK, "subreddit": "news",
               "is_self": False, "over_18": False, "domain": host}
        row.update(kw)
        return row

    return [
        post("news.test", "/a1", 10),
        post("NEWS.test", "/a1?utm_source=reddit&fbclid=abc#comments", 50, subreddit="worldnews"),  # same page
        post("blog.test", "/copy-of-a1", 5),             # exact duplicate text under another URL
        post("news.test", "/a2", 20),
        post("blog.test", "/near-a2", 4),                # near duplicate
        post("news.test", "/moved", 7),                  # 301 -> /a3
        post("news.test", "/gz", 6),                     # gzip-encoded page
        post("blog.test", "/flaky", 9),                  # 503 once, then fine
        post("stall.test", "/stall", 8),
        post("mirror.test", "/wiki/Bridge", 12),         # Wikipedia copy under another domain
        post("news.test", "/private/secret", 30),        # robots.txt disallows
        post("news.test", "/to-private", 11),            # redirect to 10.1.2.3
        post("news.test", "/to-metadata", 11),           # redirect to 169.254.169.254
        post("slow.test", "/slow", 13),                  # never answers in time
        post("news.test", "/big", 14),                   # oversized body
        post("news.test", "/bomb", 14),                  # gzip bomb
        post("news.test", "/missing", 15),               # 404
        post("news.test", "/french", 16),                # not English
        post("news.test", "/binary", 17),                # binary served as text/html
        post("news.test", "/paper.html", 3),             # served as application/pdf
        post("other.test", "/page", 18),                 # robots.txt answers 503
        post("news.test", "/photo.jpg", 40),             # image by extension
        post("news.test", "/paper.pdf", 40),             # PDF by extension
        post("i.imgur.com", "/x.png", 40),               # media domain
        post("en.wikipedia.org", "/wiki/Bridge", 99),    # Wikipedia
        post("news.test", "/a9", 2),                     # karma below 3
        post("news.test", "/a9", 99, created_utc=CUTOFF_LATE),   # after the cutoff
        post("news.test", "/a9", 99, is_self=True),      # self post
        post("news.test", "/a9", 99, subreddit="spam"),  # blocked subreddit
    ]


def cli_args(work: Path, dump: Path, port: int) -> list[str]:
    args = ["webtext", "run", str(work), str(dump), "--shards", "6", "--block-subreddit", "spam",
            "--host-delay", "0", "--timeout", "0.5", "--total-timeout", "2", "--retries", "1", "--backoff", "0.01",
            "--max-bytes", "300000", "--min-words", "50", "--no-progress", "--allow-private", "127.0.0.0/8"]
    for h in HOSTS:
        args += ["--resolve", f"{h}:127.0.0.1"]
    return args


def expected_docs(port: int) -> dict[str, str]:
    """url -> a sentence of the page that must be in the document."""
    first = lambda seed: article(seed).split(". ")[0]  # noqa: E731
    return {f"http://news.test:{port}/a1": first(1), f"http://news.test:{port}/a2": first(2),
            f"http://news.test:{port}/moved": first(3), f"http://news.test:{port}/gz": first(4),
            f"http://blog.test:{port}/flaky": first(8), f"http://stall.test:{port}/stall": first(11)}


def make_dump(tmp_path: Path, port: int) -> Path:
    dump = tmp_path / "RS_2017-07.zst"
    write_dump(dump, dump_rows(port), extra_lines=[b"{not json\n", b"[1, 2]\n"])
    return dump


def comparable(docs: list[dict]) -> list[tuple]:
    return sorted((d["url"], d["text"], d["score"], d["subreddit"], d["created_utc"]) for d in docs)


@pytest.fixture(scope="module")
def shared_site():
    s = Site()
    server = start_server(s)
    s.port = server.server_address[1]
    yield s
    s.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def reference(shared_site, tmp_path_factory):
    """One uninterrupted `gpt2kit webtext run` on the synthetic dump."""
    shared_site.release.set()
    tmp = tmp_path_factory.mktemp("webtext")
    dump = make_dump(tmp, shared_site.port)
    work = tmp / "work"
    r = run_cli(*cli_args(work, dump, shared_site.port), timeout=240)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(work=work, dump=dump, stdout=r.stdout)


def test_webtext_run_end_to_end(shared_site, reference, cli):
    site, work, dump = shared_site, reference.work, reference.dump
    assert "links: 1 dump, 31 lines (2 bad" in reference.stdout and "shard: 6 documents" in reference.stdout, reference.stdout

    docs = read_corpus(work)
    want = expected_docs(site.port)
    assert sorted(d["url"] for d in docs) == sorted(want)
    for d in docs:
        assert set(d) == {"text", "url", "subreddit", "score", "created_utc", "fetched_at"}
        assert want[d["url"]] in d["text"]
        assert "Share this article" not in d["text"] and "All rights reserved" not in d["text"]
    a1 = next(d for d in docs if d["url"].endswith("/a1"))
    assert (a1["score"], a1["subreddit"]) == (50, "worldnews")       # the highest-karma post of the URL

    wf = WorkFolder(work)
    links_t = wf.complete("links")["totals"]
    assert {k: links_t[k] for k in ("lines", "bad_lines", "kept", "links", "self_post", "low_score", "after_cutoff",
                                    "blocked_subreddit", "blocked_domain", "wikipedia", "not_html")} == {
        "lines": 31, "bad_lines": 2, "kept": 21, "links": 20, "self_post": 1, "low_score": 1, "after_cutoff": 1,
        "blocked_subreddit": 1, "blocked_domain": 1, "wikipedia": 1, "not_html": 2}
    status = wf.complete("fetch")["totals"]["status"]
    assert {k: v for k, v in status.items() if v} == {
        "ok": 11, "robots_disallowed": 2, "blocked_address": 2, "timeout": 1, "too_large": 2, "http_error": 1,
        "not_html": 1}
    dropped = wf.complete("extract")["totals"]["dropped"]
    assert {k: v for k, v in dropped.items() if v} == {"wikipedia_mirror": 1, "not_language": 1, "binary": 1}
    dd = wf.complete("dedup")["totals"]
    assert (dd["docs_in"], dd["exact_duplicates"], dd["near_duplicates"], dd["docs"]) == (8, 1, 1, 6)
    dups = {d["url"]: (d["kind"], d["duplicate_of"]) for d in read_jsonl_zst(work / "dedup" / "duplicates.jsonl.zst")}
    assert dups == {f"http://blog.test:{site.port}/copy-of-a1": ("exact", f"http://news.test:{site.port}/a1"),
                    f"http://blog.test:{site.port}/near-a2": ("near", f"http://news.test:{site.port}/a2")}

    # the WARC records: one response per fetched page, named by its final URL
    from warcio.archiveiterator import ArchiveIterator

    uris = []
    for warc in sorted((work / "fetch").glob("fetch-*.warc.gz")):
        with open(warc, "rb") as f:
            uris += [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(f) if r.rec_type == "response"]
    assert len(uris) == 11 and f"http://news.test:{site.port}/a3" in uris and not any("/moved" in u for u in uris)

    report = json.loads((work / "report.json").read_text())
    assert list(report["funnel"].values()) == [31, 21, 20, 11, 8, 7, 6, 6]
    assert (work / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| final documents | 6 |" in (work / "report.md").read_text()
    # nothing outside the dump's allowed links was ever requested
    assert not any(h in ("en.wikipedia.org", "i.imgur.com") for h, _ in site.hits())

    # a second run has nothing left to do and changes nothing
    before = comparable(docs)
    hits = len(site.hits())
    r2 = cli(*cli_args(work, dump, site.port), timeout=120)
    assert r2.returncode == 0, r2.stderr
    assert "tasks already done, skipped" in r2.stdout
    assert len(site.hits()) == hits and comparable(read_corpus(work)) == before


def test_webtext_run_killed_mid_fetch_resumes_to_the_same_corpus(shared_site, reference, tmp_path):
    site = shared_site
    site.release.clear()          # the stall host now holds its answer until released
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "gpt2kit", *cli_args(work, reference.dump, site.port)]
    stalls = len(site.hits("stall.test", "/stall"))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(site.hits("stall.test", "/stall")) == stalls and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert len(site.hits("stall.test", "/stall")) > stalls, "the run never reached the stalled host"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wf = WorkFolder(work)
    assert list((work / "fetch").glob(".fetch-00004.warc.gz.*.tmp"))   # killed while writing shard 4
    assert wf.is_done("fetch", "fetch-00002") and not wf.is_done("fetch", "fetch-00004")
    assert not wf.is_complete("fetch")
    news_hits = len(site.hits("news.test"))

    site.release.set()
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert len(site.hits("news.test")) == news_hits          # the finished shard was not fetched again
    assert "fetch:" in r.stdout and "tasks already done, skipped" in r.stdout
    assert not list(work.rglob("*.tmp"))                       # the killed run's partial files are gone
    # the same corpus as the uninterrupted run
    assert comparable(read_corpus(work)) == comparable(read_corpus(reference.work))
    assert sorted(d["url"] for d in read_corpus(work)) == sorted(expected_docs(site.port))


def test_ctrl_c_with_workers_starts_no_queued_task(tmp_path):
    """Ctrl-C during a stage run by a process pool: the run stops at once, and no task that was
    still queued starts (a links task reads a whole monthly dump: minutes)."""
    (tmp_path / "slowtask.py").write_text(textwrap.dedent("""
        import os, time
        def slow(folder, name):
            open(os.path.join(folder, "started-" + name), "w").close()
            time.sleep(6)
            return {"n": 1}
    """))
    script = textwrap.dedent("""
        import sys
        folder = sys.argv[1]
        sys.path.insert(0, folder)
        from slowtask import slow
        from gpt2kit.webtext.work import Runner, WorkFolder, run_tasks
        tasks = [(f"t{i}", (folder, f"t{i}")) for i in range(8)]
        try:
            run_tasks(WorkFolder(folder + "/work"), "stage", slow, tasks, Runner(workers=2))
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("started-*"))) < 2:  # both workers busy
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # the pool has queued the next task by now
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-t0", "started-t1"]
    assert took < 4, f"{took:.1f} s after Ctrl-C"
    assert "Traceback" not in err, err
