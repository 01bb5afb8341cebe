"""The extract stage's pieces one by one (boilerplate lines, Wikipedia markers, charsets, binary bodies)
and the dedup stage's (normalization, MinHash options, decisions across shards)."""
from __future__ import annotations

import codecs
import random
from pathlib import Path

import numpy as np
import pytest

from gpt2kit.webtext import DedupConfig, ExtractConfig, WebTextError, WorkFolder, dedup_documents, extract_texts
from gpt2kit.webtext.dedup import minhash_signature, minhash_signatures, normalize, shingles, text_hash
from gpt2kit.webtext.extract import clean_text, decode_html, extract_page, is_wikipedia_copy, looks_binary
from gpt2kit.webtext.work import read_jsonl_zst, write_jsonl_zst

ENGLISH = ("The river flooded the old town after three days of heavy rain, and the people who lived near the water "
           "moved their furniture to the upper floors. ") * 12


def html(body: str, head: str = "") -> bytes:
    return f"<html><head><title>T</title>{head}</head><body><article>{body}</article></body></html>".encode()


# ---------------------------------------------------------------------------------------------
# options


def test_extract_config_refuses_an_empty_language_code():
    with pytest.raises(WebTextError, match=r"^--languages: expected a tuple of language codes, got \('en', ''\)$"):
        ExtractConfig(languages=("en", ""))


def test_check_languages_names_every_unknown_code():
    with pytest.raises(WebTextError, match="^--languages: unknown language codes xx, yy; expected 'all' or codes among: "):
        ExtractConfig(languages=("xx", "en", "yy")).check_languages()
    ExtractConfig(languages=("en", "de")).check_languages()


def test_extract_page_uses_the_configured_boilerplate_length():
    page = html(f"<p>{ENGLISH}</p><p>Share this article</p>")
    assert "Share this article" not in extract_page(page, "http://n.example/a", ExtractConfig(min_words=40))[1]
    # no line is short enough to be furniture: every line is text
    kept = extract_page(page, "http://n.example/a", ExtractConfig(min_words=40, max_boilerplate_words=0))[1]
    assert kept.endswith("\nShare this article")


# ---------------------------------------------------------------------------------------------
# boilerplate lines


@pytest.mark.parametrize("line", [
    "Share", "Share this", "Share this story", "Share on Facebook", "Tweet", "Email", "Print", "Advertisement",
    "Sponsored content", "Related", "Related posts", "Read more", "Continue reading...", "Loading...",
    "Skip to main content", "Please enable JavaScript to view the comments", "JavaScript is disabled in your browser",
    "© 2017 Example Media", "(c) 2017 Example Media", "Copyright 2017 Example Media",
    "Example Media 2017. All rights reserved.", "Sign up for our newsletter today", "Subscribe to the newsletter",
    "We use cookies to improve your experience", "Read our cookie policy", "Follow us", "Follow us on Twitter",
    "Click here", "Image credit: Reuters", "Image: Reuters", "Photo: AP", "Photo credit: AP",
    "Posted by Jane Doe on July 3", "Written by Jane Doe", "Comments", "Leave a comment", "Post a comment",
    "12 comments", "Log in", "Login", "Sign in", "Sign up", "Register", "Menu", "Search", "Home", "HOME",
    # trailing punctuation and separators of a menu do not save a line
    "Home |", "Share:", "Read more...", "Menu !",
])
def test_clean_text_drops_every_kind_of_boilerplate_line(line):
    assert clean_text(f"{line}\nThe flood reached the town.") == "The flood reached the town."


@pytest.mark.parametrize("line", [
    # a line that only starts like page furniture is text
    "Home prices rose again this year.", "Search teams found the missing hikers.", "Email still rules the office.",
    "Print sales fell for a decade.", "Register offices opened late.", "Comments from the mayor were brief.",
    "Tweet storms are a modern habit.", "Menu prices doubled.", "Share prices fell sharply.",
    # "posted by" and a name, not any short sentence
    "Posted by registered mail, thousands of applications overwhelmed understaffed municipal offices",
])
def test_clean_text_keeps_lines_that_merely_start_like_boilerplate(line):
    assert clean_text(line) == line


def test_clean_text_line_endings_and_a_trailing_blank_line():
    # Windows and old Mac line endings are line breaks, and a CRLF is one break, not two
    assert clean_text("First line.\r\nSecond line.\rThird line.") == "First line.\nSecond line.\nThird line."
    assert clean_text("Advertisement\rThe flood.") == "The flood."
    # a paragraph break before dropped furniture at the end leaves no trailing blank line
    assert clean_text("The flood.\n\nShare this article") == "The flood."
    assert clean_text("\n\nThe flood.\n\n") == "The flood."


# ---------------------------------------------------------------------------------------------
# Wikipedia copies


@pytest.mark.parametrize("text", [
    "Flood\nFrom Wikipedia, the free encyclopedia\nA flood is water.",
    "Source: https://en.wikipedia.org/w/index.php?title=Flood&oldid=8123",
    'Retrieved from "https://en.wikipedia.org/wiki/Flood"',
    "Retrieved from https://de.wikipedia.org/wiki/Flut",
    "This article uses material from the Wikipedia article Flood.",
    "Wikipedia® is a registered trademark of the Wikimedia Foundation.",
    "This article is licensed under the GNU Free Documentation License. The source is the Flood entry of Wikipedia.",
])
def test_wikipedia_markers_in_the_extracted_text(text):
    assert is_wikipedia_copy(b"<p>a copy</p>", text)


@pytest.mark.parametrize("markup", [
    b"<div id='siteSub'>From Wikipedia, the free encyclopedia</div>",
    b"<div id='siteSub'>FROM WIKIPEDIA, THE FREE ENCYCLOPEDIA</div>",      # no lower-case "ikipedia" in the page
    b"Retrieved from \"<a href='https://en.wikipedia.org/wiki/Flood'>https://en.wikipedia.org/wiki/Flood</a>\"",
    b"Retrieved from &quot;https://en.wikipedia.org/wiki/Flood&quot;",
    b"Retrieved from &#34;https://en.m.wikipedia.org/wiki/Flood&#34;",
    "Retrieved from “https://en.wikipedia.org/wiki/Flood”".encode(),
    b"Wikipedia&reg; is a registered trademark of the Wikimedia Foundation",
    b"Wikipedia&#174; is a registered trademark of the Wikimedia Foundation",
    "Wikipedia® is a registered trademark of the Wikimedia Foundation".encode(),
    b"<a href='https://wikimediafoundation.org/'>Wikipedia&reg;</a> is a registered trademark",
    b"This page uses material from the <a href='https://en.wikipedia.org/wiki/Flood'>Wikipedia</a> article Flood",
    b"<meta property='og:site_name' content='Wikipedia'>",
])
def test_wikipedia_markers_in_the_markup_extraction_drops(markup):
    page = b"<html><body><p>A flood is water where it is not wanted.</p>" + markup + b"</body></html>"
    assert is_wikipedia_copy(page, "A flood is water where it is not wanted.")


def test_wikipedia_markers_anywhere_in_a_long_text_or_a_long_head():
    # the licence line closes a long copied text
    assert is_wikipedia_copy(b"<p>a copy</p>", ENGLISH * 5 + "\nRetrieved from https://en.wikipedia.org/wiki/Flood")
    # a head of inline styles before the canonical link of another language edition
    style = "<style>" + ".mw-body { margin: 0 } " * 1000 + "</style>"
    for host in ("en.wikipedia.org", "zh-min-nan.wikipedia.org", "be-tarask.m.wikipedia.org"):
        page = html(f"<p>{ENGLISH}</p>", f"{style}<link rel='canonical' href='https://{host}/wiki/Flood'>")
        assert len(page) > 20_000 and is_wikipedia_copy(page, ENGLISH), host


@pytest.mark.parametrize("markup", [
    b"<p>Retrieved from <a href='https://example.org/flood'>the archive</a> in 2017.</p>",
    b"<p>Read <a href='https://en.wikipedia.org/wiki/Flood'>the Wikipedia article</a>.</p>",
    b"<meta property='og:site_name' content='Wikipedians Weekly'>",
])
def test_a_page_that_mentions_wikipedia_is_no_copy(markup):
    assert not is_wikipedia_copy(b"<html><head>" + markup + b"</head><body><p>Text.</p></body></html>", "Text.")


# ---------------------------------------------------------------------------------------------
# charsets


@pytest.mark.parametrize("label, superset, text", [
    ("us-ascii", "cp1252", "“quoted”"), ("ascii", "cp1252", "“quoted”"), ("ISO-8859-1", "cp1252", "“quoted”"),
    ("latin1", "cp1252", "“quoted”"), ("latin-1", "cp1252", "“quoted”"), ("l1", "cp1252", "“quoted”"),
    ("iso8859-1", "cp1252", "“quoted”"),
    ("iso-8859-9", "cp1254", "€ İstanbul"), ("latin5", "cp1254", "€ İstanbul"),
    ("iso-8859-11", "cp874", "€ ภาษาไทย"), ("tis-620", "cp874", "€ ภาษาไทย"),
    ("gb2312", "gb18030", "€ 中文 😀"), ("gbk", "gb18030", "€ 中文 😀"), ("x-gbk", "gb18030", "€ 中文 😀"),
    ("ks_c_5601-1987", "cp949", "똠 한국어"), ("euc-kr", "cp949", "똠 한국어"),
    ("shift_jis", "cp932", "① 日本語"), ("x-sjis", "cp932", "① 日本語"),
])
def test_decode_html_reads_a_label_as_the_superset_browsers_use(label, superset, text):
    body = f"<p>{text}</p>".encode(superset)
    try:    # the label's own codec (where Python has one) reads these bytes otherwise, or not at all
        own = body.decode(label)
    except (UnicodeDecodeError, LookupError):
        own = None
    assert own != f"<p>{text}</p>"
    assert decode_html(body, f"text/html; charset={label}") == f"<p>{text}</p>"
    assert decode_html(f"<meta charset='{label}'><p>{text}</p>".encode(superset)) == f"<meta charset='{label}'><p>{text}</p>"


def test_a_wikipedia_footer_far_below_the_article_marks_a_copy():
    """The trademark line sits in the footer, after the whole article, and extraction drops the footer:
    the markup is searched to its end."""
    article = "".join(f"<p>{ENGLISH}</p>" for _ in range(8))
    page = (f"<html><head><title>Flood</title></head><body><article>{article}</article><div id='footer'><ul>"
            "<li id='footer-info-copyright'>Text is available under the Creative Commons Attribution-ShareAlike License. "
            "Wikipedia&reg; is a registered trademark of the Wikimedia Foundation, Inc.</li></ul></div></body></html>").encode()
    assert len(page) > 10_000
    assert extract_page(page, "http://wikimirror.example/Flood", ExtractConfig(min_words=40))[0] == "wikipedia_mirror"


@pytest.mark.parametrize("url, verdict", [
    ("https://en.m.wikipedia.org/wiki/Flood", "wikipedia"), ("http://www.wikiwand.com/en/Flood", "wikipedia"),
    ("http://wikipedia.com/wiki/Flood", "wikipedia"),
    # Wikipedia named elsewhere in the URL, or a look-alike host, is another site
    ("http://blog.example/why-i-stopped-editing-wikipedia.org", "kept"), ("http://n.example/a?from=en.wikipedia.org", "kept"),
    ("http://notwikipedia.org/Flood", "kept"),
])
def test_extract_page_drops_wikipedia_by_the_host_of_the_url(url, verdict):
    assert extract_page(html(f"<p>{ENGLISH}</p>"), url, ExtractConfig(min_words=40))[0] == verdict


@pytest.mark.parametrize("content_type", ["text/html; charset=windows-1252", 'text/html; charset="windows-1252"',
                                          "text/html; charset='windows-1252'", "text/html;charset = windows-1252"])
def test_decode_html_reads_the_header_charset_quoted_or_not(content_type):
    assert decode_html("<p>“café”</p>".encode("cp1252"), content_type) == "<p>“café”</p>"


def test_decode_html_falls_back_from_a_wrong_or_unknown_header_to_the_meta_tag():
    page = "<html><head><meta charset='windows-1252'></head><body>café ®</body></html>"
    body = page.encode("cp1252")
    # ISO-8859-7 has no byte 0xAE: the header is wrong, the meta tag is right
    assert decode_html(body, "text/html; charset=iso-8859-7") == page
    assert decode_html(body, "text/html; charset=x-no-such-charset") == page
    # no declaration decodes the bytes: they go to trafilatura as they are
    assert decode_html(b"<p>caf\xe9 \xae</p>", "text/html; charset=iso-8859-7") == b"<p>caf\xe9 \xae</p>"


def test_decode_html_finds_a_meta_tag_after_a_long_head():
    page = "<html><head>" + "<script>var x = 1;</script>" * 40 + "<meta charset='windows-1252'></head><body>café</body>"
    assert 1000 < len(page) < 4000 and decode_html(page.encode("cp1252")) == page


def test_decode_html_a_byte_order_mark_before_bytes_that_do_not_decode():
    assert decode_html(codecs.BOM_UTF8 + b"<p>caf\xe9</p>") == "<p>caf\ufffd</p>"


# ---------------------------------------------------------------------------------------------
# binary bodies and the extraction call


@pytest.mark.parametrize("byte", [*range(0, 9), *range(14, 32)])
def test_looks_binary_counts_every_control_byte(byte):
    # 10 control bytes of 100 is over the 5% limit
    assert looks_binary(b"<html>" + bytes([byte]) * 10 + b"a" * 84)


@pytest.mark.parametrize("byte", [9, 10, 11, 12, 13, 32, 0x80, 0xFF])
def test_looks_binary_does_not_count_whitespace_or_high_bytes(byte):
    assert not looks_binary(b"<html>" + bytes([byte]) * 10 + b"a" * 84)


def test_looks_binary_a_single_nul_byte_in_markup():
    assert looks_binary(b"<html><body>" + b"text " * 100 + b"\x00</body></html>")
    assert not looks_binary(b"<html><body>" + b"text " * 100 + b"</body></html>")


def test_extract_page_leaves_out_tables_and_comment_sections():
    page = (f"<html><body><article><p>{ENGLISH}</p><table><tr><td>Tabular cell alpha beta gamma</td>"
            "<td>second cell delta</td></tr></table></article><div id='comments' class='comments'>"
            "<p>Great reader comment about the weather in town.</p></div></body></html>").encode()
    verdict, text, _ = extract_page(page, "http://n.example/a", ExtractConfig(min_words=40))
    assert verdict == "kept" and "The river flooded" in text
    assert "Tabular cell" not in text and "reader comment" not in text


def test_extract_page_judges_the_language_of_the_whole_text():
    opening = ("This story was first published in English by our partners at the regional newspaper, and it was "
               "translated with their kind permission for the readers of this site in the spring.")
    german = "Der Fluss trat nach drei Tagen starken Regens über die Ufer, und die Menschen brachten ihre Möbel nach oben. " * 10
    verdict, _, lang = extract_page(html(f"<p>{opening}</p><p>{german}</p>"), "http://n.example/a", ExtractConfig(min_words=40))
    assert (verdict, lang) == ("not_language", "de")


def test_extract_page_a_failing_extractor_is_a_verdict_not_a_crash(monkeypatch):
    import trafilatura

    def broken(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded while parsing")

    monkeypatch.setattr(trafilatura, "extract", broken)
    assert extract_page(html(f"<p>{ENGLISH}</p>"), "http://n.example/a", ExtractConfig()) == ("extract_error", None, None)


# ---------------------------------------------------------------------------------------------
# the stage


def write_fetch_shard(warc: Path, manifest: Path, pages: list[tuple[str, str, bytes]]) -> None:
    """A fetch shard as the fetch stage writes it: a warcinfo record, one response record per page
    (posted URL, final URL, body), a manifest entry per page, and one for a link that timed out."""
    from warcio.warcwriter import WARCWriter

    from gpt2kit.webtext.fetch import Result, _write_response

    entries = []
    with open(warc, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record(warc.name, {"software": "test"}))
        for k, (url, final, body) in enumerate(pages):
            res = Result("ok", url, final, http_status=200, reason="OK", headers=[("Content-Type", "text/html")], body=body)
            entries.append({"url": url, "final_url": final, "status": "ok", "subreddit": f"sub{k}", "score": 10 + k,
                            "created_utc": 1_500_000_000 + k, "fetched_at": f"2026-01-0{k + 1}T00:00:00Z",
                            "record_id": _write_response(writer, res, "2026-01-01T00:00:00Z")})
    entries.append({"url": "http://d.example/4", "final_url": None, "status": "timeout", "subreddit": "s", "score": 3,
                    "created_utc": 1_500_000_000, "fetched_at": "2026-01-01T00:00:00Z", "record_id": None})
    write_jsonl_zst(manifest, entries)


def test_extract_shard_keeps_each_pages_post_fields_sorted_by_url_and_counts_bytes(tmp_path):
    from gpt2kit.webtext.extract import REASONS, extract_shard

    accented = ENGLISH.replace("old town", "naïve café “old town”")
    pages = [   # (posted URL, final URL, body), not in URL order
        ("http://b.example/2", "https://www.b.example/2", html(f"<p>{accented}</p>")),
        ("http://a.example/1", "http://a.example/1", html(f"<p>{ENGLISH}</p>")),
        ("http://c.example/3", "http://c.example/3", html("<p>Too short to keep.</p>")),
    ]
    write_fetch_shard(tmp_path / "f.warc.gz", tmp_path / "m.jsonl.zst", pages)
    totals = extract_shard(str(tmp_path / "f.warc.gz"), str(tmp_path / "m.jsonl.zst"), str(tmp_path / "out.jsonl.zst"),
                           ExtractConfig(min_words=40))
    docs = list(read_jsonl_zst(tmp_path / "out.jsonl.zst"))
    assert [{k: v for k, v in d.items() if k != "text"} for d in docs] == [
        {"url": "http://a.example/1", "final_url": "http://a.example/1", "subreddit": "sub1", "score": 11,
         "created_utc": 1_500_000_001, "fetched_at": "2026-01-02T00:00:00Z", "lang": "en"},
        {"url": "http://b.example/2", "final_url": "https://www.b.example/2", "subreddit": "sub0", "score": 10,
         "created_utc": 1_500_000_000, "fetched_at": "2026-01-01T00:00:00Z", "lang": "en"}]
    assert "naïve café “old town”" in docs[1]["text"]
    assert totals == {"pages": 3, "docs": 2, "bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
                      "dropped": {r: int(r == "too_short") for r in REASONS}}
    assert totals["bytes"] > sum(len(d["text"]) for d in docs)     # bytes, not characters


def test_extract_rerun_skips_done_shards_and_refuses_a_redone_fetch_stage(tmp_path):
    (tmp_path / "fetch").mkdir()
    write_fetch_shard(tmp_path / "fetch" / "fetch-00000.warc.gz", tmp_path / "fetch" / "fetch-00000.manifest.jsonl.zst",
                      [("http://a.example/1", "http://a.example/1", html(f"<p>{ENGLISH}</p>"))])
    WorkFolder(tmp_path).finish("fetch", [0], {"pages": 1})
    first = extract_texts(tmp_path, ExtractConfig(min_words=40))
    assert (first["docs"], first["skipped_tasks"]) == (1, 0)
    again = extract_texts(tmp_path, ExtractConfig(min_words=40))
    assert (again["docs"], again["skipped_tasks"]) == (1, 1)
    # the fetch stage was redone since: the extracted shards are of pages no longer there
    WorkFolder(tmp_path).finish("fetch", [0], {"pages": 2})
    with pytest.raises(WebTextError, match=r"this stage was started with other options \(differs in: upstream\)"):
        extract_texts(tmp_path, ExtractConfig(min_words=40))


# ---------------------------------------------------------------------------------------------
# dedup


@pytest.mark.parametrize("kwargs", [{"threshold": 1}, {"threshold": 1.0}, {"threshold": 1e-9}, {"seed": 0},
                                    {"seed": 2**32 - 1}, {"num_perm": 1, "ngram": 1}])
def test_dedup_config_accepts_the_edges_of_each_range(kwargs):
    DedupConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": True}, "--threshold: expected a Jaccard similarity in (0, 1], got True"),
    ({"threshold": 1.01}, "--threshold: expected a Jaccard similarity in (0, 1], got 1.01"),
    ({"threshold": "0.5"}, "--threshold: expected a Jaccard similarity in (0, 1], got '0.5'"),
    ({"seed": True}, "seed: expected an integer in [0, 2**32), got True"),
    ({"seed": 2**32}, "seed: expected an integer in [0, 2**32), got 4294967296"),
])
def test_dedup_config_refuses(kwargs, message):
    with pytest.raises(WebTextError) as e:
        DedupConfig(**kwargs)
    assert str(e.value) == message


def test_normalize_keeps_whole_words_of_every_script():
    assert normalize("Hello,  World!\n") == "hello world"
    assert normalize("Déjà vu: l'ÉTÉ 2017 — Москва, 東京!") == "déjà vu l été 2017 москва 東京"
    # near duplicates compare the same normalized words
    assert shingles("The FLOOD, again!  The end.", 2) == {b"the flood", b"flood again", b"again the", b"the end"}


def _words(rng: random.Random, n: int) -> list[str]:
    vocab = [f"w{i}" for i in range(3000)]
    return [rng.choice(vocab) for _ in range(n)]


def test_minhash_of_other_options_and_in_chunks_matches_datasketch():
    """--num-perm and the shingle length reach the signature; a shard computed a few shingles at a
    time (the memory bound) gives the same values."""
    from datasketch import MinHash

    rng = random.Random(5)
    texts = [" ".join(_words(rng, n)) for n in (40, 7, 2)]
    for cfg in (DedupConfig(num_perm=64, ngram=3, seed=7), DedupConfig()):
        for i, t in enumerate(texts):
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
            m.update_batch(list(shingles(t, cfg.ngram)))
            assert np.array_equal(minhash_signature(t, cfg), m.hashvalues.astype(np.uint32)), (cfg, i)
        assert np.array_equal(minhash_signatures(texts, cfg, chunk=3), minhash_signatures(texts, cfg))


def test_candidate_pairs_match_a_reference_on_many_interleaved_buckets():
    """Each row pairs with its bucket's first row and the 8 rows of its bucket just before it, in row
    (priority) order, however the buckets interleave: here 200 rows in 3 buckets per band."""
    from gpt2kit.webtext.dedup import MAX_BUCKET_NEIGHBOURS, candidate_pairs

    keys = np.random.default_rng(0).integers(0, 3, size=(200, 2)).astype(np.uint64)
    want = set()
    for b in range(keys.shape[1]):
        buckets: dict[int, list[int]] = {}
        for row, key in enumerate(keys[:, b].tolist()):
            buckets.setdefault(key, []).append(row)
        for rows in buckets.values():
            for p, row in enumerate(rows):
                want |= {(rows[0], row)} if p else set()
                want |= {(rows[q], row) for q in range(max(0, p - MAX_BUCKET_NEIGHBOURS), p)}
    assert {tuple(p) for p in candidate_pairs(keys).tolist()} == want


def _doc(url: str, text: str, score: int) -> dict:
    return {"text": text, "url": url, "final_url": url, "subreddit": "s", "score": score, "created_utc": 1_500_000_000,
            "fetched_at": "2026-01-01T00:00:00Z", "lang": "en"}


def test_signature_files_hold_the_configured_signatures(tmp_path):
    from gpt2kit.webtext.dedup import signature_shard

    rng = random.Random(6)
    docs = [_doc(f"http://a.example/{i}", " ".join(_words(rng, 30)), 3 - i) for i in range(3)]
    write_jsonl_zst(tmp_path / "in.jsonl.zst", docs)
    cfg = DedupConfig(num_perm=64, ngram=3)
    assert signature_shard(str(tmp_path / "in.jsonl.zst"), str(tmp_path / "sig.npz"), cfg) == {"docs": 3}
    with np.load(tmp_path / "sig.npz") as z:
        assert np.array_equal(z["sigs"], minhash_signatures([d["text"] for d in docs], cfg)) and z["sigs"].shape == (3, 64)
        assert z["hashes"].tolist() == [text_hash(d["text"]) for d in docs] and z["scores"].tolist() == [3, 2, 1]


def test_dedup_across_shards_with_another_threshold(tmp_path):
    """Duplicates found across shards are named by their URLs; --threshold decides both which pairs
    are candidates (the LSH bands) and which are duplicates; a rerun skips every done task, and a
    redone extract stage is refused."""
    rng = random.Random(7)
    base = _words(rng, 300)
    near = [("zz" if i % 12 == 0 else w) for i, w in enumerate(base)]    # about 0.37 alike: below 0.5, above 0.3
    t1, t3 = " ".join(_words(rng, 80)), " ".join(_words(rng, 80)) + " naïve café “déjà vu”"
    shards = [[_doc("http://a.example/1", " ".join(base), 1), _doc("http://a.example/2", t1, 5)],
              [_doc("http://b.example/1", t1.upper() + "!", 200), _doc("http://b.example/2", " ".join(near), 3),
               _doc("http://b.example/3", t3, 2)]]
    for work in (tmp_path / "default", tmp_path):
        for k, docs in enumerate(shards):
            write_jsonl_zst(work / "extract" / f"extract-{k:05d}.jsonl.zst", docs)
        WorkFolder(work).finish("extract", [0, 1], {"docs": 5})
    # at the default threshold the two are not alike enough
    assert dedup_documents(tmp_path / "default", DedupConfig())["near_duplicates"] == 0
    totals = dedup_documents(tmp_path, DedupConfig(threshold=0.3))
    kept = [d for k in (0, 1) for d in read_jsonl_zst(tmp_path / "dedup" / f"dedup-{k:05d}.jsonl.zst")]
    assert [d["url"] for d in kept] == ["http://b.example/1", "http://b.example/2", "http://b.example/3"]
    assert totals == {"docs_in": 5, "exact_duplicates": 1, "near_duplicates": 1, "kept": 3, "docs": 3,
                      "bytes": sum(len(d["text"].encode("utf-8")) for d in kept), "skipped_tasks": 0}
    assert list(read_jsonl_zst(tmp_path / "dedup" / "duplicates.jsonl.zst")) == [    # by URL, whatever the kind
        {"url": "http://a.example/1", "duplicate_of": "http://b.example/2", "kind": "near"},
        {"url": "http://a.example/2", "duplicate_of": "http://b.example/1", "kind": "exact"}]
    assert dedup_documents(tmp_path, DedupConfig(threshold=0.3))["skipped_tasks"] == 5   # 2 signatures, decide, 2 writes
    WorkFolder(tmp_path).finish("extract", [0, 1], {"docs": 6})
    with pytest.raises(WebTextError, match=r"differs in: upstream\)"):
        dedup_documents(tmp_path, DedupConfig(threshold=0.3))
