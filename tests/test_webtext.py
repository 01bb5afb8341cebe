"""WebText stages without the network: links, extraction, de-duplication, shards, parallel runners."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2kit.webtext import (DedupConfig, ExtractConfig, LinksConfig, Runner, WebTextError, WorkFolder, canonicalize_url,
                             collect_links, dedup_documents, extract_texts, read_corpus, write_shards)
from gpt2kit.webtext.dedup import (band_keys, candidate_pairs, lsh_params, minhash_signature, minhash_signatures,
                                   near_duplicates, shingles, text_hash)
from gpt2kit.webtext.extract import clean_text, extract_page, identify_language, is_wikipedia_copy
from gpt2kit.webtext.links import BadURL, shard_of
from gpt2kit.webtext.work import read_jsonl_zst, write_jsonl_zst

JULY_2017 = 1_500_000_000


def post(url, score=10, **kw):
    return {"url": url, "score": score, "created_utc": JULY_2017, "subreddit": "news", "is_self": False,
            "over_18": False, "domain": "x", **kw}


def zst_dump(path: Path, rows, extra: bytes = b"") -> Path:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + extra
    path.write_bytes(long_window_zst(data))
    return path


def long_window_zst(data: bytes) -> bytes:
    """zstd as the public dumps are made (`zstd --long=28`): streamed, so the frame keeps a 256 MiB
    window that a default decompressor refuses."""
    import io

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28, enable_ldm=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(data)
    out = buf.getvalue()
    assert zstandard.get_frame_parameters(out).window_size == 2**28
    return out


# ---------------------------------------------------------------------------------------------
# links


@pytest.mark.parametrize("raw, canon", [
    ("HTTPS://WWW.Example.com:443/Path?b=2&a=1#frag", "https://www.example.com/Path?a=1&b=2"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com:8080/x?utm_source=r&utm_medium=s&id=7&fbclid=z", "http://example.com:8080/x?id=7"),
    ("http://user:pw@example.com./a b", "http://example.com/a%20b"),
    ("http://example.com/?q=a&amp;r=b", "http://example.com/?q=a&r=b"),
    ("http://BÜCHER.de/ü", "http://xn--bcher-kva.de/%C3%BC"),
    ("http://ex.com/x?UTM_Source=r&FBCLID=z&id=7", "http://ex.com/x?id=7"),     # tracking names in any case
    ("http://[2001:DB8::1]:8080/x", "http://[2001:db8::1]:8080/x"),             # an IPv6 literal keeps its brackets
    ("https://[2001:db8::1]:443/", "https://[2001:db8::1]/"),
])
def test_canonicalize_url(raw, canon):
    assert canonicalize_url(raw) == canon


@pytest.mark.parametrize("raw, canon", [
    ("http://ex.fr/search?q=caf%E9&a=1", "http://ex.fr/search?a=1&q=caf%E9"),     # a Latin-1 escape is not UTF-8
    ("http://ex.com/page?12345", "http://ex.com/page?12345"),                      # a bare key is not "12345="
    ("http://ex.com/x?a=%zz&b=%2f", "http://ex.com/x?a=%zz&b=%2F"),                # bad escapes kept as sent
    ("http://ex.com/x?next=/a%26b%3Dc&utm_source=x", "http://ex.com/x?next=/a%26b%3Dc"),
    ("http://ex.com/x?q=caf\u00e9 au lait&fbclid=1&", "http://ex.com/x?q=caf%C3%A9%20au%20lait"),
    ("http://ex.com/a%2fb/%7e", "http://ex.com/a%2Fb/%7E"),
    ("http://ex.com/%aB/%Cd?q=%eF", "http://ex.com/%AB/%CD?q=%EF"),                  # escapes of mixed case too
    ("http://ex.com/wiki/Talk:A_(b),c;d=e@f!$&'*+", "http://ex.com/wiki/Talk:A_(b),c;d=e@f!$&'*+"),   # sub-delims
    ("http://ex.com/x?a[]=1&b=/c?d", "http://ex.com/x?a[]=1&b=/c?d"),
    ("http://ex.com/x?utm%5Fsource=r&%66bclid=z&id=7", "http://ex.com/x?id=7"),      # a tracking name escaped
    (" http://ex.com/x \n", "http://ex.com/x"),                                         # space around the URL
])
def test_canonicalize_url_keeps_the_query_the_server_gets(raw, canon):
    """Only tracking parameters go and the rest is sorted: what the server receives is unchanged."""
    assert canonicalize_url(raw) == canon
    assert canonicalize_url(canon) == canon


@pytest.mark.parametrize("bad", ["ftp://example.com/x", "javascript:alert(1)", "http://", "http://exa mple.com/",
                                 "http://example.com:99999/"])
def test_canonicalize_url_rejects(bad):
    with pytest.raises(BadURL):
        canonicalize_url(bad)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["http", "HTTP", "https"]), st.sampled_from(["example.com", "Example.COM", "a.b.org"]),
       st.text(alphabet="abc/-_.~%20", max_size=12), st.lists(st.tuples(st.sampled_from(["a", "b", "utm_x", "ref"]),
                                                                         st.text(alphabet="xyz", max_size=3)), max_size=4))
def test_canonicalize_url_is_idempotent(scheme, host, path, query):
    url = f"{scheme}://{host}/{path}?" + "&".join(f"{k}={v}" for k, v in query)
    once = canonicalize_url(url)
    assert canonicalize_url(once) == once
    assert "utm_" not in once and "#" not in once


def test_links_filters_dedups_and_keeps_highest_karma(tmp_path):
    rows = [
        post("http://news.example/a", 5, subreddit="a"),
        post("http://NEWS.example/a?utm_source=x#c", 50, subreddit="b"),      # same page, more karma
        post("http://news.example/a", 50, subreddit="c", created_utc=JULY_2017 - 10),   # same karma, earlier: kept
        post("http://news.example/b", 2),                                     # low karma
        post("http://news.example/c", 3, created_utc="1512086400"),           # 2017-12-01: not before the cutoff
        post("http://news.example/d", "3", created_utc="1512086399"),         # string numbers (old dumps)
        post("https://www.reddit.com/r/x/comments/1/", 99, is_self=True),     # self post
        post("https://en.m.wikipedia.org/wiki/X", 99),                       # Wikipedia
        post("https://i.imgur.com/x.jpg", 99),                               # blocked media domain
        post("http://news.example/pic.PNG", 99),                             # image by extension
        post("http://news.example/doc.pdf?dl=1", 99),                        # PDF
        post("http://news.example/e", 99, subreddit="Spam"),                 # blocked subreddit
        post("http://news.example/f", 99, over_18=True),                     # kept: NSFW is not dropped by default
        post("mailto:someone@example.com", 99),                              # bad URL
        {"url": "http://news.example/g", "score": 9},                        # no created_utc: a bad line
    ]
    plain = tmp_path / "RS_2017-07.ndjson"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n\n", encoding="utf-8")
    zst = zst_dump(tmp_path / "RS_2017-08.zst", [post("http://news.example/a", 70, subreddit="z"),
                                                 post("http://other.example/x", 4)])
    totals = collect_links(tmp_path / "w", [plain, zst], LinksConfig(shards=3, blocked_subreddits=("spam",)))
    got = {r["url"]: r for k in range(3) for r in read_jsonl_zst(tmp_path / "w" / "links" / f"links-{k:05d}.jsonl.zst")}
    assert sorted(got) == ["http://news.example/a", "http://news.example/d", "http://news.example/f",
                           "http://other.example/x"]
    a = got["http://news.example/a"]
    assert (a["score"], a["subreddit"], a["posts"]) == (70, "z", 4)
    d = got["http://news.example/d"]
    assert (d["score"], d["created_utc"]) == (3, 1512086399) and type(d["score"]) is type(d["created_utc"]) is int
    expect = {"lines": 18, "bad_lines": 2, "dump_files": 2, "kept": 7, "links": 4, "low_score": 1, "after_cutoff": 1,
              "self_post": 1, "wikipedia": 1, "blocked_domain": 1, "not_html": 2, "blocked_subreddit": 1, "bad_url": 1}
    assert {k: totals[k] for k in expect} == expect
    # every host's links sit in one shard, the one its hash names
    for k in range(3):
        for r in read_jsonl_zst(tmp_path / "w" / "links" / f"links-{k:05d}.jsonl.zst"):
            assert shard_of(r["url"], 3) == k


def test_links_of_one_url_keep_the_best_post_and_count_every_post(tmp_path):
    """Of posts of one URL: the highest karma, then the earliest, then the smallest subreddit name, in
    whichever order the posts come; `posts` counts them all, within and across dumps."""
    from gpt2kit.webtext.links import better

    hi, lo = {"score": 9, "created_utc": 5, "subreddit": "b"}, {"score": 8, "created_utc": 1, "subreddit": "a"}
    early, late = {"score": 9, "created_utc": 4, "subreddit": "z"}, {"score": 9, "created_utc": 6, "subreddit": "a"}
    tie_a, tie_b = {"score": 9, "created_utc": 5, "subreddit": "alpha"}, {"score": 9, "created_utc": 5, "subreddit": "beta"}
    for x, y, best in ((hi, lo, hi), (early, late, early), (tie_a, tie_b, tie_a)):
        assert better(x, y) is best and better(y, x) is best
    dumps = [tmp_path / f"RS_2017-0{m}.ndjson" for m in (7, 8)]
    for d, rows in zip(dumps, ([post("http://a.example/1", 5, subreddit="s"), post("http://a.example/1", 6, subreddit="t")],
                               [post("http://a.example/1", 4, subreddit="u"), post("http://a.example/1", 7, subreddit="v")])):
        d.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for order in (dumps, dumps[::-1]):
        work = tmp_path / f"w-{order[0].stem}"
        collect_links(work, order, LinksConfig(shards=1))
        [rec] = read_jsonl_zst(work / "links" / "links-00000.jsonl.zst")
        assert (rec["score"], rec["subreddit"], rec["posts"]) == (7, "v", 4)


def test_links_block_by_the_posts_domain_field_and_drop_over_18_when_asked(tmp_path):
    rows = [post("http://a.example/1", domain="YouTube.com"),      # Reddit's domain field names a blocked host
            post("http://a.example/2", over_18=True), post("http://a.example/3")]
    dump = tmp_path / "d.ndjson"
    dump.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    kept = collect_links(tmp_path / "w1", [dump], LinksConfig(shards=1))
    assert (kept["blocked_domain"], kept["over_18"], kept["links"]) == (1, 0, 2)
    dropped = collect_links(tmp_path / "w2", [dump], LinksConfig(shards=1, drop_over_18=True))
    assert (dropped["blocked_domain"], dropped["over_18"], dropped["links"]) == (1, 1, 1)


def test_links_of_ipv6_hosts_sit_in_the_shard_their_host_names(tmp_path):
    hosts = [f"[2001:db8::{i:x}]" for i in range(1, 9)]
    dump = zst_dump(tmp_path / "d.zst", [post(f"http://{h}/p") for h in hosts])
    assert collect_links(tmp_path / "w", [dump], LinksConfig(shards=4))["links"] == 8
    for k in range(4):
        for r in read_jsonl_zst(tmp_path / "w" / "links" / f"links-{k:05d}.jsonl.zst"):
            assert shard_of(r["url"], 4) == k, r["url"]


def test_links_cutoff_is_utc_whatever_the_machines_time_zone():
    """--cutoff 2017-12-01 is midnight UTC (1512086400), not midnight where the crawl happens to run."""
    import os
    import time

    saved = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        assert LinksConfig(cutoff="2017-12-01").cutoff_timestamp() == 1512086400
        assert LinksConfig(cutoff="2017-12-01T00:00:00+01:00").cutoff_timestamp() == 1512086400 - 3600
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_links_truncated_and_corrupt_dumps_are_counted_not_fatal(tmp_path):
    rows = [post(f"http://site{i}.example/p") for i in range(3000)]   # several zstd blocks
    full = zst_dump(tmp_path / "full.zst", rows)
    cut = tmp_path / "cut.zst"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])   # a download that stopped half-way
    bz = tmp_path / "old.bz2"
    bz.write_bytes(bz2.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows[:5]) + b"\xff\xfe garbage\n"))
    totals = collect_links(tmp_path / "w", [cut, bz], LinksConfig(shards=2))
    assert totals["truncated_files"] == 1 and totals["bad_lines"] == 1
    assert 5 < totals["links"] < 3000     # whatever came before the damage is kept


def links_of_lines(tmp_path: Path, lines: list[bytes]) -> dict:
    """The links stage's totals for a plain NDJSON dump of these raw lines."""
    dump = tmp_path / "d.ndjson"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    return collect_links(tmp_path / "w", [dump], LinksConfig(shards=1))


def test_links_a_lone_surrogate_in_a_url_is_a_bad_url_not_a_crash(tmp_path):
    """JSON can escape half a UTF-16 pair ("\\ud800"); such a URL cannot be encoded, so it is not one."""
    lines = [b'{"url": "http://a.example/\\ud800x", "score": 5, "created_utc": 1500000000}',
             b'{"url": "http://a.example/?q=\\udc80", "score": 5, "created_utc": 1500000000}',
             b'{"url": "http://a.example/s", "score": 5, "created_utc": 1500000000, "subreddit": "x\\udc80"}',
             json.dumps(post("http://a.example/ok")).encode()]
    totals = links_of_lines(tmp_path, lines)
    assert (totals["bad_url"], totals["bad_lines"], totals["kept"], totals["links"]) == (2, 1, 1, 1)


@pytest.mark.parametrize("name", ["RS_2017-07.zst", "RS_2017-07.ndjson", "RS_2017-07.gz", "RS_2017-07.ZST"])
def test_links_a_dump_without_a_final_newline_keeps_its_last_post(tmp_path, name):
    data = b"\n".join(json.dumps(post(f"http://site{i}.example/p")).encode() for i in range(3))
    packed = {".zst": long_window_zst, ".gz": gzip.compress}.get(Path(name).suffix.lower(), lambda d: d)(data)
    (tmp_path / name).write_bytes(packed)
    totals = collect_links(tmp_path / "w", [tmp_path / name], LinksConfig(shards=1))
    assert (totals["lines"], totals["kept"], totals["links"], totals["truncated_files"]) == (3, 3, 3, 0)


def test_links_read_every_frame_of_a_multi_frame_zstd_dump(tmp_path):
    """Dumps compressed in parts (or joined with `cat a.zst b.zst`) hold several frames: all are read."""
    frames = [long_window_zst(b"".join(json.dumps(post(f"http://s{k}-{i}.example/p")).encode() + b"\n" for i in range(3)))
              for k in range(3)]
    (tmp_path / "RS_2017-07.zst").write_bytes(b"".join(frames))
    totals = collect_links(tmp_path / "w", [tmp_path / "RS_2017-07.zst"], LinksConfig(shards=1))
    assert (totals["lines"], totals["links"], totals["truncated_files"]) == (9, 9, 0)


@pytest.mark.parametrize("name, damage", [("RS.gz", "cut"), ("RS.bz2", "cut"), ("RS.xz", "cut"), ("RS.xz", "corrupt")])
def test_links_a_damaged_compressed_dump_is_counted_not_fatal(tmp_path, name, damage):
    """gzip, bz2 and xz end a cut-off stream with EOFError and xz corrupt data with LZMAError: counted, as for zstd."""
    data = b"".join(json.dumps(post(f"http://site{i}.example/p")).encode() + b"\n" for i in range(3000))
    pack = {".gz": gzip.compress, ".bz2": lambda d: bz2.compress(d, 1), ".xz": lzma.compress}[Path(name).suffix]
    packed = pack(data)
    k = len(packed) * 3 // 4
    packed = packed[:k] if damage == "cut" else packed[:k] + bytes(b ^ 0x55 for b in packed[k:k + 64]) + packed[k + 64:]
    (tmp_path / name).write_bytes(packed)
    totals = collect_links(tmp_path / "w", [tmp_path / name], LinksConfig(shards=1))
    assert totals["truncated_files"] == 1 and 0 < totals["links"] < 3000     # what came before the damage is kept


def test_links_shards_are_sorted_by_url(tmp_path):
    urls = [f"http://a.example/{c}" for c in "qwertyuiopasdfghjkl"]
    dumps = [zst_dump(tmp_path / f"RS_2017-0{m}.zst", [post(u) for u in part]) for m, part in ((7, urls[:10]), (8, urls[10:]))]
    collect_links(tmp_path / "w", dumps, LinksConfig(shards=1))
    assert [r["url"] for r in read_jsonl_zst(tmp_path / "w" / "links" / "links-00000.jsonl.zst")] == sorted(urls)


def test_a_shard_write_that_fails_leaves_the_previous_shard_whole(tmp_path):
    """A killed or failing writer must not leave a half shard under the final name (a rerun or the next
    stage would read it as complete)."""
    path = tmp_path / "links-00000.jsonl.zst"
    write_jsonl_zst(path, [{"n": 1}, {"n": 2}])

    def failing():
        yield {"n": 3}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_jsonl_zst(path, failing())
    assert list(read_jsonl_zst(path)) == [{"n": 1}, {"n": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # no temporary file left behind


def test_links_drop_every_wikipedia_domain_and_no_other(tmp_path):
    lines = [json.dumps(post(u)).encode() for u in (
        "https://www.wikiwand.com/en/Flood", "http://en.wikipedia.com/wiki/Flood", "https://de.m.wikipedia.org/wiki/Flut",
        "https://WIKIPEDIA.org/", "http://notwikipedia.org/a", "http://wikipedia.org.example/a")]
    totals = links_of_lines(tmp_path, lines)
    assert (totals["wikipedia"], totals["kept"]) == (4, 2)


def test_links_non_finite_numbers_are_bad_lines_not_a_crash(tmp_path):
    """JSON's NaN/Infinity (Python writes them) and their string forms are not a score or a time."""
    lines = [b'{"url": "http://a.example/1", "score": NaN, "created_utc": 1500000000}',
             b'{"url": "http://a.example/2", "score": "inf", "created_utc": 1500000000}',
             b'{"url": "http://a.example/3", "score": 5, "created_utc": -Infinity}',
             b'{"url": "http://a.example/4", "score": 5, "created_utc": "nan"}',
             b'{"url": "http://a.example/5", "score": 5, "created_utc": true}',      # booleans are not numbers either
             b'{"url": "http://a.example/6", "score": true, "created_utc": 1500000000}',
             json.dumps(post("http://a.example/ok")).encode()]
    totals = links_of_lines(tmp_path, lines)
    assert (totals["lines"], totals["bad_lines"], totals["kept"], totals["links"]) == (7, 6, 1, 1)


def _no_submissions(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A dump that yields no submission line, and the words of the reason the error must give."""
    if kind == "text":
        p = tmp_path / "corpus.txt"
        p.write_text("A line of plain prose, not JSON.\n" * 3000, encoding="utf-8")
        return p, "(3,000 lines, none a submission)"
    if kind == "not_zstd":
        p = tmp_path / "RS_2017-09.zst"
        p.write_bytes(b"<html>404 Not Found</html>\n" * 10)   # what a failed download saves
        return p, "(cannot read it: zstd decompressor error: Unknown frame descriptor)"
    if kind == "not_gzip":
        p = tmp_path / "RS_2011-01.gz"
        p.write_bytes(b"not gzip at all\n")
        return p, "(cannot read it: Not a gzipped file"
    if kind == "empty":
        p = tmp_path / "empty.ndjson"
        p.write_bytes(b"\n \n")
        return p, "(it is empty)"
    if kind == "comments":   # a comments dump: JSON objects, none with url/score/created_utc
        p = tmp_path / "RC_2017-07.ndjson"
        p.write_text("".join(json.dumps({"body": "hi", "ups": 3}) + "\n" for _ in range(7)), encoding="utf-8")
        return p, "(7 lines, none a submission)"
    if kind == "one_comment":   # "1 line", not "1 lines"
        p = tmp_path / "RC_2017-09.ndjson"
        p.write_text(json.dumps({"body": "hi", "ups": 3}) + "\n", encoding="utf-8")
        return p, "(1 line, none a submission)"
    if kind == "urls_only":   # links without karma or time: no submissions either
        p = tmp_path / "links.ndjson"
        p.write_text("".join(json.dumps({"url": f"http://a.example/{i}"}) + "\n" for i in range(5)), encoding="utf-8")
        return p, "(5 lines, none a submission)"
    if kind == "cut_after_comments":   # a few lines, none a submission, then the end of a cut-off download
        p = tmp_path / "RC_2017-08.gz"
        p.write_bytes(gzip.compress(b"".join(json.dumps({"body": "hi", "ups": 3}).encode() + b"\n" for _ in range(3)))[:-8])
        return p, "(3 lines, none a submission, then Compressed file ended before the end-of-stream marker was reached)"
    assert kind == "cut_first_block"    # a download that stopped inside its first zstd block
    p = tmp_path / "RS_2017-10.zst"
    p.write_bytes(long_window_zst(b"".join(json.dumps(post(f"http://s{i}.example/")).encode() + b"\n"
                                           for i in range(300)))[:500])
    return p, "(cannot read it: the last zstd frame is cut off)"


@pytest.mark.parametrize("kind", ["text", "not_zstd", "not_gzip", "empty", "comments", "one_comment", "urls_only",
                                  "cut_after_comments",
                                  "cut_first_block"])
def test_links_refuses_a_dump_without_submissions_before_writing_state(tmp_path, kind):
    bad, why = _no_submissions(tmp_path, kind)
    work = tmp_path / "w"
    with pytest.raises(WebTextError) as e:
        collect_links(work, [bad], LinksConfig(shards=2))
    assert str(e.value).startswith(f"{bad}: no valid submission lines {why}")
    assert "expected NDJSON with url/score/created_utc" in str(e.value)
    assert not (work / "_state").exists()     # neither marked complete nor holding the options of a failed start
    # ... so the corrected command runs, instead of being refused as "started with other options"
    good = zst_dump(tmp_path / "good.zst", [post("http://a.example/1")])
    assert collect_links(work, [good], LinksConfig(shards=2))["links"] == 1


def test_links_a_bad_dump_among_good_ones_is_named(tmp_path):
    good = zst_dump(tmp_path / "RS_2017-07.zst", [post("http://a.example/1")])
    bad, _ = _no_submissions(tmp_path, "not_zstd")
    with pytest.raises(WebTextError, match=rf"^{bad}: no valid submission lines \(cannot read it"):
        collect_links(tmp_path / "w", [good, bad], LinksConfig(shards=1))
    assert not (tmp_path / "w" / "_state").exists()
    # several: one line that names the first three and counts the rest
    bads = [_no_submissions(tmp_path / k, k)[0] for k in ("text", "empty", "comments", "not_gzip", "not_zstd")
            if (tmp_path / k).mkdir() is None]
    with pytest.raises(WebTextError) as e:
        collect_links(tmp_path / "w", [good, *bads], LinksConfig(shards=1))
    msg = str(e.value)
    assert msg.startswith("5 dumps hold no valid submission lines: ") and msg.endswith(" and 2 more; expected NDJSON "
                                                                                       "with url/score/created_utc, "
                                                                                       "plain or .zst/.gz/.bz2/.xz")
    assert f"{tmp_path / 'comments' / 'RC_2017-07.ndjson'} (7 lines, none a submission)" in msg and "\n" not in msg
    assert f"{tmp_path / 'not_gzip' / 'RS_2011-01.gz'} (cannot read it" in msg and "not_zstd" not in msg   # the third, no more
    with pytest.raises(WebTextError) as e:    # three: all named, none left to count
        collect_links(tmp_path / "w", [good, *bads[:3]], LinksConfig(shards=1))
    assert str(e.value).startswith("3 dumps hold no valid submission lines: ") and " more" not in str(e.value)
    assert all(str(b) in str(e.value) for b in bads[:3])


def test_links_stops_reading_a_dump_that_is_another_kind_of_file(tmp_path):
    from gpt2kit.webtext.links import PROBE_LINES

    comments = tmp_path / "RC_2017-07.ndjson"
    comments.write_text("".join(json.dumps({"body": f"c{i}", "ups": 1}) + "\n" for i in range(PROBE_LINES))
                        + json.dumps(post("http://a.example/late")) + "\n", encoding="utf-8")
    with pytest.raises(WebTextError, match=f"none of its first {PROBE_LINES:,} lines is a submission"):
        collect_links(tmp_path / "w", [comments], LinksConfig(shards=1))
    # bad lines before the first submission are counted, as ever, when a submission comes in time
    ok = tmp_path / "RS_2017-07.ndjson"
    ok.write_text("{broken\n" * (PROBE_LINES - 1) + json.dumps(post("http://a.example/1")) + "\n", encoding="utf-8")
    totals = collect_links(tmp_path / "w", [ok], LinksConfig(shards=1))
    assert (totals["bad_lines"], totals["links"]) == (PROBE_LINES - 1, 1)
    # a dump already split is not read again on a resumed run (its results are recorded; only its
    # size is compared, see test_links_rerun_refuses_a_dump_replaced_since_it_was_read)
    ok.write_bytes(b"x" * ok.stat().st_size)
    assert collect_links(tmp_path / "w", [ok], LinksConfig(shards=1))["skipped_tasks"] == 2


def test_links_a_dump_named_twice_is_read_once(tmp_path):
    """A dump named as a file and again through its folder (or by another spelling) is one dump."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    dump = zst_dump(folder / "RS_2017-07.zst", [post("http://a.example/1"), post("http://a.example/1", 7)])
    totals = collect_links(tmp_path / "w", [folder, dump, folder / ".." / "dumps" / dump.name], LinksConfig(shards=1))
    assert (totals["dump_files"], totals["lines"], totals["links"]) == (1, 2, 1)
    assert [r["posts"] for r in read_jsonl_zst(tmp_path / "w" / "links" / "links-00000.jsonl.zst")] == [2]
    with pytest.raises(WebTextError, match="^links: no dump files given$"):
        collect_links(tmp_path / "w2", [], LinksConfig(shards=1))


def test_links_blocked_subreddits_match_in_any_case(tmp_path):
    lines = [json.dumps(post(f"http://a.example/{i}", subreddit=s)).encode() for i, s in enumerate(("news", "NEWS", "pics"))]
    dump = tmp_path / "d.ndjson"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    totals = collect_links(tmp_path / "w", [dump], LinksConfig(shards=1, blocked_subreddits=("News",)))
    assert (totals["blocked_subreddit"], totals["links"]) == (2, 1)


def test_links_folder_without_dump_files_is_named(tmp_path):
    empty = tmp_path / "dumps"
    (empty / "2017").mkdir(parents=True)      # dumps one level down are not read
    zst_dump(empty / "2017" / "RS_2017-07.zst", [post("http://a.example/1")])
    (empty / ".RS_2017-08.zst.part").write_bytes(b"")
    with pytest.raises(WebTextError, match=rf"^{empty}: a folder without dump files in it \(subfolders and hidden "
                                           r"files are not read\); expected Reddit submission dumps"):
        collect_links(tmp_path / "w", [empty], LinksConfig(shards=1))
    assert collect_links(tmp_path / "w", [empty / "2017"], LinksConfig(shards=1))["links"] == 1


def test_links_rerun_is_resumable_and_guards_options(tmp_path):
    dump = zst_dump(tmp_path / "d.zst", [post("http://a.example/1"), post("http://b.example/2")])
    collect_links(tmp_path / "w", [dump], LinksConfig(shards=2))
    done = sorted(p.name for p in (tmp_path / "w" / "_state" / "links" / "done").iterdir())
    assert len(done) == 3   # one dump task and two shard tasks
    again = collect_links(tmp_path / "w", [dump], LinksConfig(shards=2))
    assert again["skipped_tasks"] == 3 and again["links"] == 2
    with pytest.raises(WebTextError, match="other options .*min_score"):
        collect_links(tmp_path / "w", [dump], LinksConfig(shards=2, min_score=10))
    other = zst_dump(tmp_path / "e.zst", [post("http://c.example/3")])    # a links stage of other dumps is another one
    with pytest.raises(WebTextError, match=r"other options \(differs in: dumps\)"):
        collect_links(tmp_path / "w", [dump, other], LinksConfig(shards=2))
    with pytest.raises(WebTextError, match="no such dump"):
        collect_links(tmp_path / "w2", [tmp_path / "nope.zst"])
    with pytest.raises(WebTextError, match="stage 'fetch' has not finished; run `gpt2kit webtext fetch"):
        extract_texts(tmp_path / "empty")
    with pytest.raises(WebTextError,
                       match=rf"stage 'shards' has not finished; run `gpt2kit webtext shard {re.escape(str(tmp_path))}` first"):
        WorkFolder(tmp_path).complete("shards")     # the stage is named shards, its command shard
    with pytest.raises(WebTextError,   # the command as it runs: links needs the dumps it reads
                       match=rf"stage 'links' has not finished; run `gpt2kit webtext links {re.escape(str(tmp_path))} DUMP\.\.\.` first"):
        WorkFolder(tmp_path).complete("links")


def test_links_shows_progress_inside_a_dump(tmp_path, capsys):
    """One monthly dump takes many minutes: a bar over the dump's bytes moves while it is read."""
    dump = zst_dump(tmp_path / "RS_2017-11.zst", [post(f"http://site{i}.example/p") for i in range(3000)])
    collect_links(tmp_path / "w", [dump], LinksConfig(shards=2), Runner(progress=True))
    err = capsys.readouterr().err
    assert "RS_2017-11.zst:" in err and "B/s" in err, err[-2000:]
    # the bar follows the bytes of the file read, in every format, up to its end
    from gpt2kit.webtext.links import iter_dump

    data = b"".join(json.dumps(post(f"http://s{i}.example/p")).encode() + b"\n" for i in range(70_000))
    for name, pack in (("d.zst", long_window_zst), ("d.gz", gzip.compress), ("d.bz2", bz2.compress),
                       ("d.xz", lzma.compress), ("d.ndjson", bytes)):
        (tmp_path / name).write_bytes(pack(data))
        positions: list[int] = []
        counts = dict.fromkeys(("lines", "bad_lines", "truncated_files"), 0)
        assert sum(1 for _ in iter_dump(tmp_path / name, counts, on_position=positions.append)) == 70_000
        assert positions == sorted(positions), (name, positions)
        assert positions[-1] == (tmp_path / name).stat().st_size, name


def test_links_rerun_refuses_a_dump_replaced_since_it_was_read(tmp_path):
    """A cut-off download re-downloaded in place must not leave the corpus built from the cut-off copy."""
    rows = [post(f"http://site{i}.example/p") for i in range(3000)]
    dump = zst_dump(tmp_path / "RS_2017-11.zst", rows)
    full = dump.read_bytes()
    dump.write_bytes(full[: len(full) // 2])
    first = collect_links(tmp_path / "w", [dump], LinksConfig(shards=2))
    assert first["truncated_files"] == 1
    dump.write_bytes(full)
    with pytest.raises(WebTextError) as e:
        collect_links(tmp_path / "w", [dump], LinksConfig(shards=2))
    assert str(e.value).startswith(f"{dump}: changed since the links stage read it ({len(full) // 2:,} bytes then, "
                                   f"{len(full):,} now); delete {tmp_path / 'w' / '_state' / 'links'} and ")
    dump.write_bytes(full[: len(full) // 4])     # a smaller file is another file too
    with pytest.raises(WebTextError, match="changed since the links stage read it"):
        collect_links(tmp_path / "w", [dump], LinksConfig(shards=2))


# ---------------------------------------------------------------------------------------------
# robots.txt (the RFC 9309 cases are in test_webtext_fetch.py)

UA = "gpt2kit-webtext/1.0 (research)"


@pytest.mark.parametrize("robots, url, allowed", [
    ("User-agent: *\nDisallow: /fish*\n", "http://site.test/shop/fish", True),     # a pattern matches from the start
    ("User-agent: *\nDisallow: /\n", "http://site.test", False),                   # no path is the path /
    ("User-agent: *\nDisallow: /\n", "http://site.test?q=1", False),
    ("User-agent: gpt\nDisallow: /\n", "http://site.test/a", True),                # `gpt` is no name of ours
    ("User-agent: gpt2kit\nDisallow: /\n", "http://site.test/a", False),           # `gpt2kit` is our family's
])
def test_robots_rules_match_from_the_path_start_and_name_our_family(robots, url, allowed):
    from gpt2kit.webtext.robots import RobotsRules

    assert RobotsRules.parse(robots, UA).allowed(url) is allowed


def test_robots_crawl_delay_closes_a_group_and_a_bad_one_keeps_the_last_good():
    from gpt2kit.webtext.robots import RobotsRules

    # a Crawl-delay ends the other bot's group as a rule would: the next user-agent line opens ours
    after = RobotsRules.parse("User-agent: otherbot\nCrawl-delay: 5\nUser-agent: gpt2kit-webtext\nDisallow: /x\n", UA)
    assert after.crawl_delay is None and not after.allowed("http://site.test/x")
    assert RobotsRules.parse("User-agent: *\nCrawl-delay: 4\nCrawl-delay: soon\n", UA).crawl_delay == 4.0


# ---------------------------------------------------------------------------------------------
# extract


ENGLISH = ("The river flooded the old town after three days of heavy rain, and the people who lived near the water "
           "moved their furniture to the upper floors. ") * 12


def html(body: str, head: str = "") -> bytes:
    return (f"<html><head><title>T</title>{head}</head><body><nav>Home</nav><article>"
            f"{body}<p>Share this article</p></article></body></html>").encode()


def test_extract_page_verdicts():
    cfg = ExtractConfig(min_words=40)
    verdict, text, lang = extract_page(html(f"<p>{ENGLISH}</p>"), "http://n.example/a", cfg)
    assert (verdict, lang) == ("kept", "en") and "The river flooded" in text and "Share this" not in text
    assert extract_page(html("<p>Too short to keep.</p>"), "http://n.example/a", cfg)[0] == "too_short"
    n = len(text.split())   # --min-words N keeps a text of exactly N words
    assert extract_page(html(f"<p>{ENGLISH}</p>"), "http://n.example/a", ExtractConfig(min_words=n))[0] == "kept"
    assert extract_page(html(f"<p>{ENGLISH}</p>"), "http://n.example/a", ExtractConfig(min_words=n + 1))[0] == "too_short"
    german = "Der Fluss trat nach drei Tagen starken Regens über die Ufer, und die Menschen brachten ihre Möbel nach oben. " * 10
    assert extract_page(html(f"<p>{german}</p>"), "http://n.example/a", cfg)[:3:2] == ("not_language", "de")
    assert extract_page(html(f"<p>{german}</p>"), "http://n.example/a", ExtractConfig(min_words=40, languages=()))[0] == "kept"
    assert extract_page(b"\x00\x01binary" * 500, "http://n.example/a", cfg)[0] == "binary"
    assert extract_page(html(f"<p>{ENGLISH}</p>"), "https://en.wikipedia.org/wiki/X", cfg)[0] == "wikipedia"
    canon = "<link rel='canonical' href='https://en.wikipedia.org/wiki/Flood'>"
    assert extract_page(html(f"<p>{ENGLISH}</p>", canon), "http://mirror.example/Flood", cfg)[0] == "wikipedia_mirror"
    mobile = "<link rel='canonical' href='https://en.m.wikipedia.org/wiki/Flood'>"   # a copy of the mobile site
    assert extract_page(html(f"<p>{ENGLISH}</p>", mobile), "http://mirror.example/Flood", cfg)[0] == "wikipedia_mirror"
    og = "<meta property='og:url' content='https://de.m.wikipedia.org/wiki/Flut'>"
    assert extract_page(html(f"<p>{ENGLISH}</p>", og), "http://mirror.example/Flut", cfg)[0] == "wikipedia_mirror"
    copy = f"<p>From Wikipedia, the free encyclopedia</p><p>{ENGLISH}</p>"
    assert extract_page(html(copy), "http://mirror.example/Flood", cfg)[0] == "wikipedia_mirror"
    assert extract_page(b"<html><body><div><p>unclosed <b>tags <<>> &bogus;", "http://n.example/a", cfg)[0] in (
        "no_text", "too_short")
    assert not is_wikipedia_copy(html(f"<p>{ENGLISH} See the Wikipedia article for more.</p>"), ENGLISH)


def test_extract_keeps_pages_of_at_least_100_words_by_default():
    """OpenWebText's 128-token minimum, as the default --min-words 100."""
    pages = {n: html("<p>" + " ".join(ENGLISH.split()[:n]) + "</p>") for n in (99, 100)}
    for n, page in pages.items():   # the fixture: every word of the paragraph is extracted, nothing more
        assert len(extract_page(page, "http://n.example/a", ExtractConfig(min_words=0))[1].split()) == n
    assert extract_page(pages[100], "http://n.example/a", ExtractConfig())[0] == "kept"
    assert extract_page(pages[99], "http://n.example/a", ExtractConfig())[0] == "too_short"


def test_looks_binary_counts_control_bytes_other_than_whitespace():
    from gpt2kit.webtext.extract import looks_binary

    # escape bytes (0x1b, between 13 and 32) in markup: 10 of 100 bytes is over 5%, 5 of 100 is not
    assert looks_binary(b"<html>" + b"\x1b" * 10 + b"a" * 84)
    assert not looks_binary(b"<html>" + b"\x1b" * 5 + b"a" * 89)
    assert not looks_binary(b"<p>" + b"\t\n\x0b\x0c\r" * 40)     # tab, LF, VT, FF, CR are text
    assert not looks_binary(b"") and not looks_binary(b" \r\n ")     # nothing at all is not binary


def test_decode_html_byte_order_marks_and_a_utf16_meta_tag():
    import codecs

    from gpt2kit.webtext.extract import decode_html

    text = "<p>café</p>"
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        assert decode_html(bom + text.encode(codec), "text/html; charset=windows-1252") == text, codec
    # a page whose ASCII meta tag could be read is not UTF-16: undeclared, its bytes go to trafilatura
    latin = "<html><head><meta charset='utf-16'></head><body>café au lait</body></html>".encode("cp1252")
    assert len(latin) % 2 == 0 and decode_html(latin) == latin


def test_clean_text_boilerplate_length_limit_and_whitespace():
    twelve = "Click here to read the whole story of the flood in town"
    assert len(twelve.split()) == 12
    assert clean_text(twelve) == ""                              # 12 words: short enough to be furniture
    assert clean_text(twelve + " today") == twelve + " today"    # 13: text
    assert clean_text("Copyright 2017 Example Media Group\nReal\u00a0\u00a0text\u200bhere.") == "Real text here."
    # ... and the stage's default limit is that one
    page = html(f"<p>{ENGLISH}</p><p>{twelve}</p><p>{twelve} today</p>")
    verdict, text, _ = extract_page(page, "http://n.example/a", ExtractConfig())
    assert verdict == "kept" and text.endswith(f"floors.\n{twelve} today"), text[-200:]


ACCENTED = ENGLISH.replace("old town", "naïve café “old town” — résumé")


def _fetch_stage(work: Path, pages: list[tuple[str, dict, bytes]]) -> None:
    """A finished fetch stage holding `pages` (url, HTTP headers, body) as the fetch stage writes them."""
    from warcio.warcwriter import WARCWriter

    from gpt2kit.webtext.fetch import Result, _write_response

    entries = []
    with open(work / "fetch-00000.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for u, headers, body in pages:
            res = Result("ok", u, u, http_status=200, reason="OK", headers=list(headers.items()), body=body)
            entries.append({"url": u, "final_url": u, "status": "ok", "subreddit": "s", "score": 5,
                            "created_utc": JULY_2017, "fetched_at": "2026-01-01T00:00:00Z",
                            "record_id": _write_response(writer, res, "2026-01-01T00:00:00Z")})
    (work / "fetch").mkdir(parents=True)
    (work / "fetch-00000.warc.gz").rename(work / "fetch" / "fetch-00000.warc.gz")
    write_jsonl_zst(work / "fetch" / "fetch-00000.manifest.jsonl.zst", entries)
    WorkFolder(work).finish("fetch", [0], {})


def test_extract_decodes_pages_by_their_declared_charset(tmp_path):
    """A page in windows-1252 is read as the server (or its meta tag) says, not as a guess; ISO-8859-1
    labels mean windows-1252 as in browsers, so curly quotes survive. Bytes that are valid UTF-8 are
    UTF-8 whatever the label: Latin-1 text is practically never valid UTF-8, mislabelled UTF-8 often is."""
    body = f"<p>{ACCENTED}</p>"
    pages = [("http://a.example/header", {"Content-Type": "text/html; charset=windows-1252"}, html(body).decode().encode("cp1252")),
             ("http://a.example/meta", {"Content-Type": "text/html"},
              html(body, "<meta http-equiv='Content-Type' content='text/html; charset=ISO-8859-1'>").decode().encode("cp1252")),
             ("http://a.example/bom", {"Content-Type": "text/html; charset=iso-8859-1"}, b"\xef\xbb\xbf" + html(body)),
             ("http://a.example/utf8", {"Content-Type": "text/html"}, html(body)),
             # a server default (Apache's AddDefaultCharset) over a UTF-8 page: valid UTF-8 is UTF-8
             ("http://a.example/default", {"Content-Type": "text/html; charset=ISO-8859-1"},
              html(body.replace("”", "“")))]   # (U+201D's UTF-8 holds 0x9D, which windows-1252 lacks)
    _fetch_stage(tmp_path, pages)
    extract_texts(tmp_path, ExtractConfig(min_words=40))
    docs = {d["url"]: d["text"] for d in read_jsonl_zst(tmp_path / "extract" / "extract-00000.jsonl.zst")}
    assert set(docs) == {u for u, _, _ in pages}
    for u, text in docs.items():
        assert "naïve café “old town” — résumé".replace("”", "“" if u.endswith("default") else "”") in text, (u, text[:200])


def test_the_content_type_charset_wins_over_a_meta_tag():
    """As in browsers: a server's charset header overrides what the page's meta tag claims."""
    from gpt2kit.webtext.extract import decode_html

    body = "<html><head><meta charset='iso-8859-7'></head><body>café</body></html>".encode("cp1252")
    assert "café" in decode_html(body, "text/html; charset=windows-1252")
    assert "cafι" in decode_html(body, "text/html")   # no header: the meta tag's Greek


def mediawiki_copy(body: str) -> bytes:
    """A Wikipedia article as a mirror serves it: MediaWiki's skin, its own canonical link."""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='UTF-8'><title>Flood - Wikipedia</title>"
            "<link rel='canonical' href='http://wikimirror.example/wiki/Flood'></head><body class='mediawiki skin-vector'>"
            "<div id='content' class='mw-body'><h1 id='firstHeading'>Flood</h1><div id='bodyContent'>"
            "<div id='siteSub' class='noprint'>From Wikipedia, the free encyclopedia</div>"
            f"<div id='mw-content-text'><div class='mw-parser-output'>{body}</div></div>"
            "<div class='printfooter'>Retrieved from \"<a dir='ltr' href='https://en.wikipedia.org/w/index.php?title=Flood"
            "&amp;oldid=8123'>https://en.wikipedia.org/w/index.php?title=Flood&amp;oldid=8123</a>\"</div></div></div>"
            "<div id='footer'><ul><li id='footer-info-copyright'>Text is available under the Creative Commons "
            "Attribution-ShareAlike License; additional terms may apply. Wikipedia&reg; is a registered trademark of the "
            "Wikimedia Foundation, Inc.</li></ul></div></body></html>").encode()


def test_a_page_after_a_long_run_of_blank_lines_is_not_binary():
    """Template engines can emit thousands of blank lines before the markup starts."""
    page = b"\r\n" * 3000 + html(f"<p>{ENGLISH}</p>")
    assert extract_page(page, "http://n.example/a", ExtractConfig(min_words=40))[0] == "kept"


def test_wikipedia_copies_are_recognized_by_the_page_furniture_extraction_drops():
    """The markers of a copied Wikipedia page sit in its furniture (the "From Wikipedia" line, the
    "Retrieved from" footer, the trademark line), which text extraction removes."""
    cfg = ExtractConfig(min_words=40)
    body = "".join(f"<p>{ENGLISH}</p>" for _ in range(2))
    assert extract_page(mediawiki_copy(body), "http://wikimirror.example/wiki/Flood", cfg)[0] == "wikipedia_mirror"
    # a page that merely links to a Wikipedia revision is not a copy
    cites = html(f"<p>{ENGLISH}</p><p>See <a href='https://en.wikipedia.org/w/index.php?title=Flood&amp;oldid=8123'>"
                 "the Wikipedia article as it was then</a>.</p>")
    assert extract_page(cites, "http://n.example/a", cfg)[0] == "kept"


def test_clean_text_and_language_model_is_packaged():
    assert clean_text("Advertisement\nA real line of text.\n\n\n\nCookie policy\nFollow us on Twitter\nEnd.") == \
        "A real line of text.\n\nEnd."
    long_line = "Click here " + "to read the whole long story about the flood that we wrote " * 3
    assert clean_text(long_line) == long_line.strip()   # only short lines can be boilerplate
    import py3langid

    assert (Path(py3langid.__file__).parent / "data").is_dir()   # the model ships inside the package
    assert identify_language(ENGLISH) == "en"


# ---------------------------------------------------------------------------------------------
# dedup


def test_exact_hash_normalizes_case_space_punctuation():
    assert text_hash("Hello,   World!") == text_hash("hello world") != text_hash("hello there world")


def _words(rng, n):
    vocab = [f"w{i}" for i in range(3000)]
    return [rng.choice(vocab) for _ in range(n)]


def test_exact_hash_uses_compatibility_normalization():
    # NFKC folds ligatures, circled and full-width forms into their plain letters and digits
    assert text_hash("\ufb01nance \u2460 \uff21BC") == text_hash("finance 1 abc")


def test_dedup_defaults_are_openwebtexts():
    cfg = DedupConfig()
    assert (cfg.threshold, cfg.num_perm, cfg.ngram) == (0.5, 128, 5)
    assert lsh_params(cfg.threshold, cfg.num_perm) == (25, 5)


def test_band_keys_differ_exactly_where_a_bands_rows_differ():
    sigs = np.tile(np.arange(128, dtype=np.uint32), (4, 1))
    for row, column in ((1, 0), (2, 4), (3, 5)):        # the first and last rows of band 0, the first of band 1
        sigs[row, column] += 7
    keys = band_keys(sigs, 25, 5)
    assert [[b for b in range(25) if keys[row, b] != keys[0, b]] for row in (1, 2, 3)] == [[0], [0], [1]]


def test_candidate_pairs_of_a_large_bucket_pair_each_row_with_its_leader_and_its_neighbours():
    keys = np.zeros((12, 1), dtype=np.uint64)      # one band, every row in one bucket
    want = {(0, j) for j in range(1, 12)} | {(i, j) for j in range(12) for i in range(max(0, j - 8), j)}
    assert {tuple(p) for p in candidate_pairs(keys).tolist()} == want


def test_near_duplicates_a_row_similar_only_to_a_dropped_row_is_kept():
    """A ~ B and B ~ C but not A ~ C: B goes as A's duplicate, and C stays, since no kept row is like it."""
    a = np.arange(128, dtype=np.uint32)
    b = np.where(np.arange(128) < 80, a, a + 1000).astype(np.uint32)             # 80/128 like A
    c = np.where(np.arange(128) < 32, a, np.where(np.arange(128) < 80, a + 2000, b)).astype(np.uint32)
    assert [(x == y).sum() for x, y in ((a, b), (b, c), (a, c))] == [80, 80, 32]
    assert near_duplicates(np.stack([a, b, c]), 0.5, 25, 5).tolist() == [-1, 0, -1]
    # a row like two kept rows is the duplicate of the first of them, the one of the highest priority
    assert near_duplicates(np.stack([a, c, b]), 0.5, 25, 5).tolist() == [-1, -1, 0]


def test_minhash_estimates_jaccard_and_lsh_matches_datasketch():
    from datasketch import MinHash, MinHashLSH

    cfg = DedupConfig()
    rng = random.Random(0)
    base = [_words(rng, 200) for _ in range(30)]
    texts = []
    for w in base:
        texts.append(" ".join(w))
        v = list(w)
        for i in rng.sample(range(200), rng.choice([2, 8, 20, 60])):
            v[i] = "x"
        texts.append(" ".join(v))
    sigs = minhash_signatures(texts, cfg)
    assert np.array_equal(sigs[3], minhash_signature(texts[3], cfg))
    # the signature agrees with the true Jaccard similarity of the shingle sets
    for i in range(0, 20, 2):
        a, b = shingles(texts[i]), shingles(texts[i + 1])
        assert abs((sigs[i] == sigs[i + 1]).mean() - len(a & b) / len(a | b)) < 0.15
    # the banded candidates are exactly the pairs datasketch's MinHashLSH returns
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    for threshold, num_perm in ((0.3, 64), (0.5, 128), (0.8, 128), (0.9, 256)):
        peer = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert lsh_params(threshold, num_perm) == (peer.b, peer.r)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    hashes = []
    for i, t in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch(list(shingles(t)))
        assert np.array_equal(m.hashvalues.astype(np.uint32), sigs[i])
        lsh.insert(i, m)
        hashes.append(m)
    theirs = {tuple(sorted((i, j))) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}
    ours = {tuple(p) for p in candidate_pairs(band_keys(sigs, bands, rows)).tolist()}
    assert ours == theirs and len(ours) >= 20


def test_near_duplicates_greedy_keeps_first_of_each_group():
    cfg = DedupConfig()
    rng = random.Random(1)
    a, b = _words(rng, 300), _words(rng, 300)
    a2 = list(a)
    a2[150] = "changed"
    far = list(a)
    for i in range(0, 300, 3):
        far[i] = "zz"
    texts = [" ".join(x) for x in (a, b, a2, far)]
    sigs = np.stack([minhash_signature(t, cfg) for t in texts])
    bands, rows = lsh_params(0.5, 128)
    assert near_duplicates(sigs, 0.5, bands, rows).tolist() == [-1, -1, 0, -1]
    # an estimated similarity exactly at the threshold (64 of 128 values agree) is a duplicate
    half = np.stack([np.arange(128, dtype=np.uint32), np.r_[np.arange(64), np.arange(1000, 1064)].astype(np.uint32)])
    assert near_duplicates(half, 0.5, bands, rows).tolist() == [-1, 0]
    assert near_duplicates(half, 0.51, bands, rows).tolist() == [-1, -1]


def _extract_stage(work: Path, shards: list[list[dict]]) -> None:
    wf = WorkFolder(work)
    for k, docs in enumerate(shards):
        write_jsonl_zst(work / "extract" / f"extract-{k:05d}.jsonl.zst", docs)
    wf.finish("extract", range(len(shards)), {"docs": sum(map(len, shards))})
    for stage in ("links", "fetch"):   # the report reads the upstream totals
        wf.finish(stage, range(len(shards)), {})


def doc(url, text, score):
    return {"text": text, "url": url, "final_url": url, "subreddit": "s", "score": score, "created_utc": JULY_2017,
            "fetched_at": "2026-01-01T00:00:00Z", "lang": "en"}


@pytest.mark.parametrize("runner", [Runner(), Runner(workers=2), Runner(engine="dask")], ids=["inline", "processes", "dask"])
def test_dedup_and_shard_stages(tmp_path, runner):
    rng = random.Random(2)
    t1, t2, t3 = (" ".join(_words(rng, 120)) for _ in range(3))
    near = t2.replace(t2.split()[60], "different", 1)
    shards = [[doc("http://a.example/1", t1, 5), doc("http://a.example/2", t2, 9)],
              [doc("http://b.example/1", t1.upper() + " !", 7),      # exact duplicate after normalization
               doc("http://b.example/2", near, 20),                 # near duplicate, more karma: it stays
               doc("http://b.example/3", t3, 1)], []]
    _extract_stage(tmp_path, shards)
    totals = dedup_documents(tmp_path, DedupConfig(), runner)
    assert (totals["docs_in"], totals["exact_duplicates"], totals["near_duplicates"], totals["docs"]) == (5, 1, 1, 3)
    dups = {d["url"]: (d["kind"], d["duplicate_of"]) for d in read_jsonl_zst(tmp_path / "dedup" / "duplicates.jsonl.zst")}
    assert dups == {"http://a.example/1": ("exact", "http://b.example/1"), "http://a.example/2": ("near", "http://b.example/2")}
    out = write_shards(tmp_path, runner=runner)
    assert out["docs"] == 3
    docs = read_corpus(tmp_path)
    assert [d["url"] for d in docs] == ["http://b.example/1", "http://b.example/2", "http://b.example/3"]
    assert all(list(d) == ["text", "url", "subreddit", "score", "created_utc", "fetched_at"] for d in docs)
    # the corpus folder holds only corpus files, readable by the reader `gpt2kit prepare` uses
    from gpt2kit.corpus import iter_documents

    assert [text for _, text in iter_documents([tmp_path / "shards"])] == [d["text"] for d in docs]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["top_domains"] == [["b.example", 3]]
    assert (tmp_path / "funnel.png").stat().st_size > 1000


def test_task_slots_count_every_thread_of_a_running_cluster(monkeypatch):
    """A limit shared by all tasks (--concurrency) is divided by the cluster's threads. They were
    counted from scheduler_info(), which on distributed 2025.5-2026.6 lists only 5 workers unless
    asked for more: on 12 workers each task took 12/5 times its share. nthreads() lists them all."""
    from gpt2kit.webtext import work as work_module

    threads = {f"tcp://10.0.0.{k}:4000": 2 for k in range(12)}

    class FakeClient:
        def __init__(self, address):
            assert address == "tcp://sched:8786"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def scheduler_info(self, n_workers=5, **kw):   # the default of those releases
            shown = list(threads)[:n_workers] if n_workers >= 0 else list(threads)
            return {"workers": {a: {"nthreads": threads[a]} for a in shown}}

        def nthreads(self, workers=None):
            return dict(threads)

    monkeypatch.setattr(work_module, "_dask_client", lambda: FakeClient)
    assert Runner(workers=3, engine="dask", dask_address="tcp://sched:8786").task_slots() == 24
    assert Runner(workers=3, engine="dask").task_slots() == 3    # its own LocalCluster: --workers of 1 thread
    threads.clear()     # no worker has joined the cluster yet: still one slot, not a division by zero
    assert Runner(workers=3, engine="dask", dask_address="tcp://sched:8786").task_slots() == 1

    def unreachable(address):  # what distributed raises after its connect timeout
        raise OSError(f"Timed out trying to connect to {address} after 30 s")

    monkeypatch.setattr(work_module, "_dask_client", lambda: unreachable)
    with pytest.raises(WebTextError, match=r"^--dask-address tcp://bogus:1: no Dask scheduler reached there \(Timed "
                                           r"out trying to connect to tcp://bogus:1 after 30 s\)$"):
        Runner(engine="dask", dask_address="tcp://bogus:1").task_slots()


def test_dedup_memory_does_not_grow_with_the_longest_url(tmp_path):
    """URLs are not held as a fixed-width array: one 20,000-character URL among 1,000 documents
    must not cost 1,000 x 20,000 x 4 bytes on disk and again in memory."""
    import tracemalloc

    from gpt2kit.webtext.dedup import decide

    rng = random.Random(3)
    texts = [" ".join(_words(rng, 30)) for _ in range(1000)]
    docs = [doc(f"http://a.example/{i:04d}", t, 5) for i, t in enumerate(texts)]
    docs[7]["url"] = "http://a.example/long?" + "q" * 20_000
    twin = " ".join(_words(rng, 30))
    docs += [doc("http://x.example/z", twin, 5), doc("http://x.example/\u00e9", twin, 5)]   # a tie: the smaller URL stays
    docs.sort(key=lambda d: d["url"])
    _extract_stage(tmp_path, [docs])
    totals = dedup_documents(tmp_path, DedupConfig())
    sig = tmp_path / "dedup" / "_sig" / "sig-00000.npz"
    assert sig.stat().st_size < 2_000_000, sig.stat().st_size
    tracemalloc.start()
    decide([str(sig)], str(tmp_path / "keep.npz"), str(tmp_path / "dups.jsonl.zst"), DedupConfig())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000, peak
    assert totals["exact_duplicates"] == 1
    dups = {d["url"]: d["duplicate_of"] for d in read_jsonl_zst(tmp_path / "dups.jsonl.zst")}
    assert dups == {"http://x.example/\u00e9": "http://x.example/z"}
    assert "http://a.example/long?" + "q" * 20_000 in {d["url"] for d in read_jsonl_zst(tmp_path / "dedup" / "dedup-00000.jsonl.zst")}


def test_dedup_decides_alike_from_signature_files_of_the_earlier_format(tmp_path):
    """A dedup stage resumed after an upgrade reads the signature files the earlier version wrote."""
    from gpt2kit.webtext.dedup import decide, signature_shard

    rng = random.Random(4)
    t = [" ".join(_words(rng, 40)) for _ in range(3)]
    docs = [doc("http://b.example/1", t[0], 3), doc("http://a.example/\u00e9", t[1], 3), doc("http://a.example/z", t[1], 3),
            doc("http://c.example/1", t[0], 9), doc("http://d.example/1", t[2], 1)]
    write_jsonl_zst(tmp_path / "in.jsonl.zst", docs)
    signature_shard(str(tmp_path / "in.jsonl.zst"), str(tmp_path / "new.npz"), DedupConfig())
    with np.load(tmp_path / "new.npz") as z:
        np.savez(tmp_path / "old.npz", sigs=z["sigs"], hashes=z["hashes"], scores=z["scores"],
                 urls=np.array([d["url"] for d in docs], dtype=str))
    for name in ("new", "old"):
        decide([str(tmp_path / f"{name}.npz")], str(tmp_path / f"keep-{name}.npz"), str(tmp_path / f"dups-{name}.jsonl.zst"),
               DedupConfig())
    assert list(read_jsonl_zst(tmp_path / "dups-new.jsonl.zst")) == list(read_jsonl_zst(tmp_path / "dups-old.jsonl.zst")) == [
        {"url": "http://a.example/\u00e9", "duplicate_of": "http://a.example/z", "kind": "exact"},
        {"url": "http://b.example/1", "duplicate_of": "http://c.example/1", "kind": "exact"}]


def test_cli_block_options_are_not_silently_ignored(tmp_path, cli):
    dump = zst_dump(tmp_path / "d.zst", [post("http://www.example.com/1"), post("http://other.example/2")])
    r = cli("webtext", "links", str(tmp_path / "w"), str(dump), "--block-domain", "http://www.example.com/")
    assert r.returncode == 2 and r.stderr.startswith("gpt2kit: error: --block-domain: expected a host name"), r.stderr
    r = cli("webtext", "links", str(tmp_path / "w"), str(dump), "--block-domain", "WWW.Example.com")   # case is no error
    assert r.returncode == 0 and "1 unique link " in r.stdout, r.stderr


def test_cli_work_folder_that_is_a_file_is_named_as_such(tmp_path, cli):
    dump = zst_dump(tmp_path / "d.zst", [post("http://a.example/1")])
    (tmp_path / "afile").write_text("x")
    for work, why in ((tmp_path / "afile", "exists and is not a folder"),
                      (tmp_path / "afile" / "w", f"{tmp_path / 'afile'} is a file, not a folder")):
        r = cli("webtext", "links", str(work), str(dump))
        assert (r.returncode, r.stderr) == (2, f"gpt2kit: error: work folder {work}: {why}\n")


def test_cli_bad_input_is_one_line_error(tmp_path, cli):
    r = cli("webtext", "fetch", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.strip().startswith("gpt2kit: error:") and "webtext links" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    dump = zst_dump(tmp_path / "d.zst", [post("http://a.example/1")])
    r = cli("webtext", "links", str(tmp_path / "w"), str(dump), "--cutoff", "last tuesday")
    assert r.returncode == 2 and "--cutoff" in r.stderr
    r = cli("webtext", "links", str(tmp_path / "w"), str(dump), "--shards", "2")
    assert r.returncode == 0 and "1 unique link " in r.stdout, r.stderr


def test_cli_links_refuses_a_dump_without_submissions(tmp_path, cli):
    corpus, _ = _no_submissions(tmp_path, "text")
    r = cli("webtext", "links", "--no-progress", str(tmp_path / "w"), str(corpus))
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.strip() == (f"gpt2kit: error: {corpus}: no valid submission lines (3,000 lines, none a submission); "
                                "expected NDJSON with url/score/created_utc, plain or .zst/.gz/.bz2/.xz")
    assert not (tmp_path / "w" / "_state").exists()
    (tmp_path / "nothing").mkdir()
    r = cli("webtext", "links", str(tmp_path / "w"), str(tmp_path / "nothing"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'nothing'}: a folder without dump files in it" in r.stderr
    from gpt2kit.webtext.links import PROBE_LINES

    for stage in ("links", "run"):
        usage = " ".join(cli("webtext", stage, "--help").stdout.split())
        assert "subfolders and hidden files are not read" in usage and f"first {PROBE_LINES:,} lines" in usage


@pytest.mark.parametrize("cls, kwargs, message", [
    (LinksConfig, {"shards": 0}, "--shards: expected an integer >= 1, got 0"),
    # a part file per shard per task: 10^8 wrote files until the inodes ran out
    (LinksConfig, {"shards": 65537}, "--shards: expected at most 65536, got 65537"),
    (LinksConfig, {"cutoff": "yesterday"}, "--cutoff: expected an ISO date"),
    # values that would match no post at all, so the option would do nothing
    (LinksConfig, {"blocked_domains": ("https://example.com/",)},
     "--block-domain: expected a host name like example.com, got 'https://example.com/'"),
    (LinksConfig, {"blocked_domains": ("Example.com",)}, "--block-domain: expected a host name like example.com"),
    (LinksConfig, {"blocked_subreddits": ("r/news",)},
     "--block-subreddit: expected a subreddit name like news (letters, digits, _), got 'r/news'"),
    (ExtractConfig, {"min_words": -1}, "--min-words: expected an integer >= 0, got -1"),
    (ExtractConfig, {"max_boilerplate_words": -1}, "max_boilerplate_words: expected an integer >= 0"),
    (ExtractConfig, {"languages": "en"}, "--languages: expected a tuple of language codes, got 'en'"),
    (DedupConfig, {"threshold": float("nan")}, "--threshold: expected a Jaccard similarity in (0, 1], got nan"),
    (DedupConfig, {"threshold": 0.0}, "--threshold: expected a Jaccard similarity in (0, 1], got 0.0"),
    (DedupConfig, {"num_perm": 0}, "--num-perm: expected an integer >= 1, got 0"),
    (DedupConfig, {"num_perm": -4}, "--num-perm: expected an integer >= 1, got -4"),
    (DedupConfig, {"ngram": 0}, "ngram: expected an integer >= 1, got 0"),
    (DedupConfig, {"seed": -1}, "seed: expected an integer in [0, 2**32), got -1"),
    (Runner, {"workers": True}, "--workers: expected an integer >= 1, got True"),   # a bool is no count
    (Runner, {"workers": 0}, "--workers: expected an integer >= 1, got 0"),
    (Runner, {"engine": "spark"}, "--engine: expected 'local' or 'dask', got 'spark'"),
])
def test_configs_refuse_bad_values_when_made(cls, kwargs, message):
    # when made: `run` builds every config first, so a bad value of a late stage costs no fetching
    with pytest.raises(WebTextError) as e:
        cls(**kwargs)
    assert str(e.value).startswith(message)


def test_extract_refuses_unknown_language_codes(tmp_path):
    WorkFolder(tmp_path).finish("fetch", [], {})
    with pytest.raises(WebTextError) as e:
        extract_texts(tmp_path, ExtractConfig(languages=("en", "xx")))
    msg = str(e.value)
    assert msg.startswith("--languages: unknown language code xx; expected 'all' or codes among: ")
    assert {"en", "de", "fr", "zh"} <= set(msg.split(": ", 2)[2].split(", "))
    assert not (tmp_path / "_state" / "extract").exists()
    extract_texts(tmp_path, ExtractConfig(languages=("en", "de")))
    assert WorkFolder(tmp_path).is_complete("extract")


def test_cli_languages_are_lower_case_and_not_empty():
    from types import SimpleNamespace

    from gpt2kit.cli.webtext import _extract_cfg

    assert _extract_cfg(SimpleNamespace(languages="EN, De", min_words=100)).languages == ("en", "de")
    assert _extract_cfg(SimpleNamespace(languages="All", min_words=100)).languages == ()
    with pytest.raises(WebTextError, match="--languages: expected comma-separated language codes or 'all', got ' , '"):
        _extract_cfg(SimpleNamespace(languages=" , ", min_words=100))   # () would keep every language


@pytest.mark.parametrize("kw", [{"extract_cfg": {"languages": ("xx",)}}, {"extract_cfg": {"min_words": -1}},
                                {"dedup_cfg": {"num_perm": 0}}], ids=["languages", "min_words", "num_perm"])
def test_run_refuses_a_late_stage_option_before_the_first_stage(tmp_path, kw):
    from gpt2kit.webtext import run

    dump = zst_dump(tmp_path / "d.zst", [post("http://a.example/1", score=0)])   # no link survives: no network
    with pytest.raises(WebTextError):
        run(tmp_path / "w", [dump], links_cfg=LinksConfig(shards=1),
            **{name: {"extract_cfg": ExtractConfig, "dedup_cfg": DedupConfig}[name](**v) for name, v in kw.items()})
    assert not (tmp_path / "w" / "_state").exists()


def test_run_hands_each_stage_its_own_options(tmp_path, monkeypatch):
    from gpt2kit.webtext import FetchConfig, ShardConfig, pipeline, run

    shard_cfgs = []
    write = pipeline.write_shards
    monkeypatch.setattr(pipeline, "write_shards", lambda work, cfg, runner: shard_cfgs.append(cfg) or write(work, cfg, runner))
    dump = zst_dump(tmp_path / "d.zst", [post("http://a.example/1", score=0)])   # no link survives: no network
    seen = []
    results = run(tmp_path / "w", [dump], links_cfg=LinksConfig(shards=1), fetch_cfg=FetchConfig(retries=5),
                  extract_cfg=ExtractConfig(min_words=7), dedup_cfg=DedupConfig(threshold=0.8),
                  shard_cfg=ShardConfig(top_domains=3), on_stage=lambda name, totals: seen.append(name))
    assert seen == list(results) == ["links", "fetch", "extract", "dedup", "shard"]
    recorded = {st: json.loads((tmp_path / "w" / "_state" / st / "config.json").read_text())
                for st in ("fetch", "extract", "dedup")}
    assert (recorded["fetch"]["retries"], recorded["extract"]["min_words"], recorded["dedup"]["threshold"]) == (5, 7, 0.8)
    assert shard_cfgs == [ShardConfig(top_domains=3)]     # recorded nowhere: it shapes only the report


def test_the_report_lists_as_many_top_domains_as_asked(tmp_path):
    from gpt2kit.webtext import ShardConfig

    rng = random.Random(5)
    docs = [doc(f"http://{h}.example{port}/{i}", " ".join(_words(rng, 60)), 5)
            for h, n, port in (("a", 3, ":8080"), ("b", 2, ""), ("c", 1, "")) for i in range(n)]
    for d in docs[3:5]:     # b's links redirect elsewhere: the domains counted are those of the links posted
        d["final_url"] = d["url"].replace("b.example", "b-cdn.example")
    docs[0]["text"] = "Caf\u00e9 cr\u00e8me. " + docs[0]["text"]
    docs.append(doc("http://d.example/1", docs[5]["text"], 1))     # an exact duplicate of c's page, with less karma
    _extract_stage(tmp_path, [docs])
    WorkFolder(tmp_path).finish("fetch", [0], {"status": {"ok": 9, "timeout": 0, "http_error": 2}})
    dedup_documents(tmp_path, DedupConfig())
    write_shards(tmp_path, ShardConfig(top_domains=2))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["top_domains"] == [["a.example", 3], ["b.example", 2]]     # host names, without the port
    assert report["funnel"]["after exact dedup"] == report["funnel"]["final documents"] == 6
    assert (report["funnel"]["extracted documents"], report["funnel"]["fetched HTML"]) == (7, 9)
    text_bytes = sum(len(d["text"].encode("utf-8")) for d in read_corpus(tmp_path))      # bytes, not characters
    assert report["bytes"] == text_bytes > sum(len(d["text"]) for d in read_corpus(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert f"Final corpus: 6 documents, {text_bytes:,} bytes of text." in md
    assert "Fetch statuses: ok 9, http_error 2\n" in md and "Pages dropped in extraction: none\n" in md
    assert md.endswith("| domain | documents |\n|---|---:|\n| a.example | 3 |\n| b.example | 2 |\n")
    # the final shards were made from this de-duplication: another one is not mixed into them
    WorkFolder(tmp_path).finish("dedup", [0], {"docs": 1})
    with pytest.raises(WebTextError, match=r"other options \(differs in: upstream\)"):
        write_shards(tmp_path, ShardConfig(top_domains=2))


def test_long_window_dumps_need_the_long_window(tmp_path):
    dump = zst_dump(tmp_path / "RS.zst", [post("http://a.example/1")])
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        zstandard.ZstdDecompressor().decompressobj().decompress(dump.read_bytes())
    assert collect_links(tmp_path / "w", [dump], LinksConfig(shards=1))["links"] == 1


def test_one_run_per_work_folder(tmp_path):
    import subprocess
    import sys

    dump = zst_dump(tmp_path / "d.zst", [post("http://a.example/1")])
    collect_links(tmp_path / "w", [dump], LinksConfig(shards=1))      # this process now holds the folder's lock
    code = ("import sys; from gpt2kit.webtext import collect_links, LinksConfig; "
            "collect_links(sys.argv[1], [sys.argv[2]], LinksConfig(shards=1))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w"), str(dump)], capture_output=True, text=True)
    assert r.returncode != 0 and "another `gpt2kit webtext` run is using this work folder" in r.stderr


def test_the_examples_in_the_webtext_docstrings_hold():
    import doctest

    from gpt2kit.webtext import dedup, extract, fetch, links, robots

    for module in (dedup, extract, fetch, links, robots):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_a_missing_or_damaged_shard_is_named(tmp_path):
    path = tmp_path / "s.jsonl.zst"
    with pytest.raises(WebTextError, match=rf"^{re.escape(str(path))}: no such shard$"):
        list(read_jsonl_zst(path))
    path.write_bytes(b"not zstd at all")
    with pytest.raises(WebTextError, match=rf"^{re.escape(str(path))}: damaged zstd shard"):
        list(read_jsonl_zst(path))
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"n": 1}\n{"n": \n'))
    with pytest.raises(WebTextError, match=rf"^{re.escape(str(path))}: line 2: not valid JSON"):
        list(read_jsonl_zst(path))


def test_a_stage_start_removes_a_killed_runs_temporary_files_and_guards_its_options(tmp_path):
    wf = WorkFolder(tmp_path / "w")
    (tmp_path / "w" / "links" / "sub").mkdir(parents=True)
    left = [tmp_path / "w" / "links" / ".links-00000.jsonl.zst.x1.tmp", tmp_path / "w" / "links" / "sub" / ".a.x2.tmp"]
    for p in left + [tmp_path / "w" / "links" / "links-00001.jsonl.zst"]:
        p.write_bytes(b"x")
    wf.check_config("links", {"a": 1, "b": [1, 2]})
    assert not any(p.exists() for p in left) and (tmp_path / "w" / "links" / "links-00001.jsonl.zst").exists()
    wf.check_config("links", {"a": 1, "b": [1, 2]})     # the same options: a rerun goes on
    with pytest.raises(WebTextError, match=r"config.json: this stage was started with other options \(differs in: a, c\)"):
        wf.check_config("links", {"a": 2, "b": [1, 2], "c": 0})
    # options named as pacing may change (and are recorded anew); the others are still guarded
    wf.check_config("links", {"a": 5, "b": [1, 2]}, pacing=("a",))
    assert json.loads((tmp_path / "w" / "_state" / "links" / "config.json").read_text()) == {"a": 5, "b": [1, 2]}
    with pytest.raises(WebTextError, match=r"\(differs in: b\); delete"):
        wf.check_config("links", {"a": 6, "b": [1]}, pacing=("a",))
    with pytest.raises(WebTextError, match=r"\(differs in: b\); delete"):    # an option gone is a change too
        wf.check_config("links", {"a": 5})


def _count_task(parent_pid, n):
    return {"tasks": 1, "n": n, "in_worker": int(os.getpid() != parent_pid), "ok": True, "status": {"a": n, "b": 0}}


@pytest.mark.parametrize("workers", [1, 2])
def test_run_tasks_skips_done_tasks_and_sums_the_counts_of_all(tmp_path, workers):
    from gpt2kit.webtext.work import run_tasks

    wf = WorkFolder(tmp_path)
    wf.mark_done("stage", "t0", {"tasks": 1, "n": 0, "in_worker": 0, "status": {"a": 5}})   # done by an earlier run
    tasks = [(f"t{n}", (os.getpid(), n)) for n in range(4)]
    totals, skipped = run_tasks(wf, "stage", _count_task, tasks, Runner(workers=workers))
    # the totals count the skipped task too; flags are not counted; more than one worker: other processes
    assert skipped == 1
    assert totals == {"tasks": 4, "n": 6, "in_worker": 3 if workers > 1 else 0, "status": {"a": 11}}


def test_the_shard_of_a_host_is_the_same_everywhere_and_in_every_version():
    """Links are bucketed by a hash of their host, and a resumed or distributed run must bucket alike:
    the hash depends on neither the process (PYTHONHASHSEED) nor the byte order, nor may it change."""
    from gpt2kit.webtext.links import host_shard
    from gpt2kit.webtext.work import stable_hash

    assert stable_hash("example.com") == 7360799068904473875
    assert [host_shard(h, 16) for h in ("example.com", "news.test", "a.example")] == [3, 10, 12]


def test_run_hands_every_stage_the_work_folder_and_the_runner(tmp_path, monkeypatch):
    from gpt2kit.webtext import pipeline, run

    calls = []
    for name in ("collect_links", "fetch_pages", "extract_texts", "dedup_documents", "write_shards"):
        monkeypatch.setattr(pipeline, name, lambda work, *rest, _name=name: calls.append((_name, work, rest[-1])) or
                            {"by": _name})
    runner = Runner(workers=3)
    results = run(tmp_path / "w", [tmp_path / "d.zst"], runner=runner)
    assert [c[0] for c in calls] == ["collect_links", "fetch_pages", "extract_texts", "dedup_documents", "write_shards"]
    assert all(work == tmp_path / "w" and r is runner for _, work, r in calls)
    assert results == {stage: {"by": by} for stage, (by, _, _) in zip(["links", "fetch", "extract", "dedup", "shard"], calls)}
