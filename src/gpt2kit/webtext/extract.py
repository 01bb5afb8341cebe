"""Stage 3: the main text of every fetched page.

The paper extracted text with Dragnet and Newspaper; trafilatura is their maintained successor
and wins the public extraction benchmarks. After extraction: heuristic cleaning (boilerplate lines,
whitespace), a minimum length in words (OpenWebText dropped documents under 128 GPT-2 tokens;
100 words is about that), language identification with py3langid (its model ships inside the
package: nothing is downloaded), and Wikipedia removed also where it arrives under another domain
(mirrors, link shorteners that redirect to it), recognized by the markers that Wikipedia's own
pages and licensed copies carry.
"""
from __future__ import annotations

import codecs
import logging
import re
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from .links import WIKIPEDIA_DOMAINS, domain_matches
from .work import (Runner, WebTextError, WorkFolder, check_int, config_dict, read_jsonl_zst, run_tasks, shard_name,
                   write_jsonl_zst)

log = logging.getLogger(__name__)

REASONS = ("binary", "wikipedia", "wikipedia_mirror", "no_text", "extract_error", "too_short", "not_language")


@dataclass(frozen=True)
class ExtractConfig:
    languages: tuple[str, ...] = ("en",)   # ISO 639-1 codes to keep; () keeps every language
    min_words: int = 100
    max_boilerplate_words: int = 12         # only lines this short can be dropped as boilerplate

    def __post_init__(self):
        check_int("--min-words", self.min_words, 0)
        check_int("max_boilerplate_words", self.max_boilerplate_words, 0)
        if isinstance(self.languages, str) or not all(isinstance(x, str) and x for x in self.languages):
            raise WebTextError(f"--languages: expected a tuple of language codes, got {self.languages!r}")

    def check_languages(self) -> None:
        """Refuse a code the language identifier never returns: it would drop every page.
        Not done at construction because it loads the identifier's model (about half a second)."""
        known = known_languages()
        unknown = [x for x in self.languages if x not in known]
        if unknown:
            raise WebTextError(f"--languages: unknown language code{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                               f"expected 'all' or codes among: {', '.join(sorted(known))}")


def known_languages() -> frozenset[str]:
    """The codes that `identify_language` can return."""
    import py3langid

    # rank() scores every language of the model, so its labels are the model's classes
    return frozenset(code for code, _ in py3langid.rank(""))


# Lines that are page furniture, not article text (matched on short lines, case-insensitively).
_BOILERPLATE = re.compile(
    r"^(share( this)?( article| story| post| on \w+)?|tweet|email|print|advertisement|sponsored( content)?|"
    r"related( articles| stories| posts)?|read more|continue reading|loading\.*|skip to (main )?content|"
    r"(please )?enable javascript.*|.*\bjavascript (is )?(required|disabled).*|.*\ball rights reserved\b.*|"
    r"(©|\(c\)|copyright)\s.*|.*\b(sign up|subscribe) (for|to) (our|the) newsletter\b.*|"
    r".*\bwe use cookies\b.*|.*\bcookie (policy|settings)\b.*|follow us( on .*)?|"
    r"click here.*|image( credit)?:.*|photo( credit)?:.*|(posted|written) by .{0,60}|"
    r"(leave a |post a |\d+ )?comments?|log ?in|sign ?in|sign up|register|menu|search|home)[\s.:!|]*$",
    re.IGNORECASE,
)

_WIKI_TEXT = re.compile(
    r"from wikipedia, the free encyclopedia|wikipedia\.org/w/index\.php|retrieved from \"?https?://\w+\.wikipedia\.org|"
    r"uses material from the wikipedia article|wikipedia®|"
    r"this article is licensed under the gnu free documentation license.{0,80}wikipedia",
    re.IGNORECASE,
)
_WIKI_HTML = re.compile(
    rb"<link[^>]+rel=[\"']?canonical[\"']?[^>]+href=[\"']?https?://[a-z\-]+\.(?:m\.)?wikipedia\.org|"
    rb"<meta[^>]+property=[\"']?og:url[\"']?[^>]+content=[\"']?https?://[a-z\-]+\.(?:m\.)?wikipedia\.org|"
    rb"<meta[^>]+property=[\"']?og:site_name[\"']?[^>]+content=[\"']?wikipedia[\"' ]",
    re.IGNORECASE,
)


_LEADING_SPACE = re.compile(rb"\s*")


def looks_binary(body: bytes) -> bool:
    r"""A body served as HTML that is not markup (NUL bytes, many control characters, no tag).

    >>> looks_binary(b"<html>hi</html>"), looks_binary(bytes(range(256))), looks_binary(b"\x82" * 100)
    (False, True, True)
    """
    start = _LEADING_SPACE.match(body).end()   # blank lines a template emitted are not content
    head = body[start:start + 4096]
    if not head:
        return False
    if b"\x00" in head or b"<" not in head:
        return True
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    return controls > 0.05 * len(head)


# What browsers do (WHATWG Encoding): these labels mean a superset, and a page labelled with one of
# them is written in the superset (curly quotes in "ISO-8859-1" pages are windows-1252 bytes).
_SUPERSETS = {"iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252", "l1": "cp1252",
              "us-ascii": "cp1252", "ascii": "cp1252", "iso-8859-9": "cp1254", "latin5": "cp1254",
              "iso-8859-11": "cp874", "tis-620": "cp874", "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030",
              "ks_c_5601-1987": "cp949", "euc-kr": "cp949", "shift_jis": "cp932", "x-sjis": "cp932"}
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?\s*([\w.:\-]+)", re.IGNORECASE)
_META_CHARSET = re.compile(rb"<meta[^>]+?charset\s*=\s*[\"']?\s*([\w.:\-]+)", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _codec(label: str, *, from_meta: bool = False) -> str | None:
    label = label.strip().lower()
    if from_meta and label.startswith("utf-16"):
        return None             # a page that could be read far enough to find its meta tag is not UTF-16
    try:
        return codecs.lookup(_SUPERSETS.get(label, label)).name
    except LookupError:
        return None


def decode_html(body: bytes, content_type: str | None = None) -> str | bytes:
    """The page as text: by its byte-order mark; as UTF-8 when it is valid UTF-8, whatever it declares
    (text in another encoding practically never is, and a server's default ISO-8859-1 over UTF-8
    pages is common); else in the encoding it declares, the Content-Type header's charset before a
    meta tag (the browsers' order). Undeclared, or declared wrongly (the bytes do not decode), the
    bytes are returned for trafilatura to guess from.

    >>> decode_html("café".encode("cp1252"), "text/html; charset=ISO-8859-1"), decode_html(b"caf\\xe9")
    ('café', b'caf\\xe9')
    """
    for bom, name in _BOMS:
        if body.startswith(bom):
            return body[len(bom):].decode(name, "replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    declared = []
    if content_type and (m := _HEADER_CHARSET.search(content_type)):
        declared.append(_codec(m.group(1)))
    if m := _META_CHARSET.search(body[:4096]):
        declared.append(_codec(m.group(1).decode("ascii"), from_meta=True))
    for name in declared:
        if name is not None:
            try:
                return body.decode(name)
            except UnicodeDecodeError:
                continue
    return body


# The same markers in a copy's markup: text extraction drops the page furniture that holds them
# (MediaWiki's "siteSub" line, the "Retrieved from" print footer, the licence footer). A bare link
# to wikipedia.org/w/index.php is a citation, not a copy, so the footer must be the "Retrieved from" one.
_WIKI_FURNITURE = re.compile(
    rb"from wikipedia, the free encyclopedia|"
    rb"retrieved from\s*(?:\"|&quot;|&#34;|\xe2\x80\x9c)?\s*(?:<a\b[^>]*>)?\s*https?://[a-z\-]+\.(?:m\.)?wikipedia\.org|"
    rb"wikipedia(?:\xc2\xae|&reg;|&#174;)(?:</a>)?\s+is\s+a\s+registered\s+trademark|"
    rb"uses material from the (?:<a\b[^>]*>)?\s*wikipedia",
    re.IGNORECASE,
)


def is_wikipedia_copy(html: bytes, text: str) -> bool:
    # every furniture marker names Wikipedia; a plain substring test spares most pages the regex
    names_it = b"ikipedia" in html or b"IKIPEDIA" in html
    return bool(_WIKI_HTML.search(html[:300_000]) or _WIKI_TEXT.search(text) or (names_it and _WIKI_FURNITURE.search(html)))


def clean_text(text: str, max_boilerplate_words: int = 12) -> str:
    """Drop boilerplate lines, normalize whitespace, collapse runs of blank lines.

    >>> clean_text("Share this article\\nReal   text here.\\n\\n\\n\\nMore.\\nAll rights reserved 2017")
    'Real text here.\\n\\nMore.'
    """
    out: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = re.sub(r"[ \t\u00a0\u200b]+", " ", line).strip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if len(line.split()) <= max_boilerplate_words and _BOILERPLATE.match(line):
            continue
        out.append(line)
    return "\n".join(out).strip()


def word_count(text: str) -> int:
    return len(text.split())


def extract_page(body: bytes, url: str, cfg: ExtractConfig,
                 content_type: str | None = None) -> tuple[str, str | None, str | None]:
    """(verdict, text, language) for one page (`content_type`: its Content-Type header, whose
    charset says how to read it): verdict is "kept" or one of `REASONS`."""
    import trafilatura

    if looks_binary(body):
        return "binary", None, None
    if domain_matches(urlsplit(url).hostname or "", WIKIPEDIA_DOMAINS):
        return "wikipedia", None, None
    try:
        text = trafilatura.extract(decode_html(body, content_type), url=url, include_comments=False, include_tables=False, deduplicate=False)
    except Exception as e:  # malformed HTML must not stop a shard
        log.debug("%s: extraction failed: %s", url, e)
        return "extract_error", None, None
    if not text:
        return "no_text", None, None
    if is_wikipedia_copy(body, text):
        return "wikipedia_mirror", None, None
    text = clean_text(text, cfg.max_boilerplate_words)
    if word_count(text) < cfg.min_words:
        return "too_short", None, None
    lang = identify_language(text)
    if cfg.languages and lang not in cfg.languages:
        return "not_language", None, lang
    return "kept", text, lang


def identify_language(text: str) -> str:
    import py3langid

    return py3langid.classify(text[:20_000])[0]


def extract_shard(warc_path: str, manifest_path: str, out_path: str, cfg: ExtractConfig) -> dict:
    from warcio.archiveiterator import ArchiveIterator

    meta = {e["record_id"]: e for e in read_jsonl_zst(manifest_path) if e["status"] == "ok"}
    counts: Counter = Counter()
    docs = []
    with open(warc_path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type != "response":
                continue
            entry = meta.get(record.rec_headers.get_header("WARC-Record-ID"))
            if entry is None:
                continue
            counts["pages"] += 1
            body = record.content_stream().read()
            content_type = record.http_headers.get_header("Content-Type") if record.http_headers else None
            verdict, text, lang = extract_page(body, entry["final_url"], cfg, content_type)
            counts[verdict] += 1
            if text is not None:
                docs.append({"text": text, "url": entry["url"], "final_url": entry["final_url"],
                             "subreddit": entry["subreddit"], "score": entry["score"],
                             "created_utc": entry["created_utc"], "fetched_at": entry["fetched_at"], "lang": lang})
    docs.sort(key=lambda d: d["url"])
    write_jsonl_zst(out_path, docs)
    return {"pages": counts["pages"], "docs": len(docs), "bytes": sum(len(d["text"].encode()) for d in docs),
            "dropped": {r: counts[r] for r in REASONS}}


def extract_texts(work, cfg: ExtractConfig = ExtractConfig(), runner: Runner = Runner()) -> dict:
    """Run the extract stage over all fetched shards; returns its totals."""
    cfg.check_languages()
    wf = WorkFolder(work)
    ids = wf.shard_ids("fetch")
    wf.check_config("extract", {**config_dict(cfg), "upstream": wf.fingerprint("fetch")})
    fetch_dir, out = wf.stage_dir("fetch"), wf.stage_dir("extract")
    tasks = []
    for k in ids:
        name, src = shard_name("extract", k), shard_name("fetch", k)
        tasks.append((name, (str(fetch_dir / f"{src}.warc.gz"), str(fetch_dir / f"{src}.manifest.jsonl.zst"),
                             str(out / f"{name}.jsonl.zst"), cfg)))
    totals, skipped = run_tasks(wf, "extract", extract_shard, tasks, runner, desc="extract")
    wf.finish("extract", ids, totals)
    return {**totals, "skipped_tasks": skipped}
