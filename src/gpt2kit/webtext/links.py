"""Stage 1: the outbound links of Reddit submission dumps (paper §2.1).

Reads monthly submission dumps (NDJSON, plain or compressed with zstd using a long window as the
public dumps are, or gzip/bz2/xz), keeps link posts with at least `min_score` karma created before
the cutoff, drops self posts, blocked subreddits and domains, non-HTML targets and every Wikipedia
domain, canonicalizes the URLs and keeps each once, with its highest karma.

Two steps, both resumable: each dump is filtered into one part file per output shard (the shard
of a link is a hash of its host, so all the links of one host land in one shard and the fetch
stage's per-host politeness holds across processes); then each shard merges its parts.
A corrupt line or a truncated dump is counted and reported, never fatal; a dump that holds no
submission at all (not NDJSON, another kind of dump, unreadable, empty) is an error before anything
is written, since later stages would otherwise run on a corpus that silently lacks it.
"""
from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import logging
import lzma
import math
import os
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote_plus, urlsplit, urlunsplit

from .work import (Runner, WebTextError, WorkFolder, check_int, config_dict, read_jsonl_zst, run_tasks, shard_name,
                   stable_hash, write_jsonl_zst)

log = logging.getLogger(__name__)

# The paper: links "created before Dec 2017".
DEFAULT_CUTOFF = "2017-12-01"

WIKIPEDIA_DOMAINS = ("wikipedia.org", "wikipedia.com", "wikiwand.com")

# Hosts whose links are media, not articles (images, video, audio, social posts without text).
DEFAULT_BLOCKED_DOMAINS = (
    "reddit.com", "redd.it", "redditmedia.com", "imgur.com", "gfycat.com", "giphy.com", "youtube.com",
    "youtu.be", "vimeo.com", "twitch.tv", "streamable.com", "instagram.com", "flickr.com",
    "soundcloud.com", "spotify.com", "vine.co", "tinypic.com", "photobucket.com",
)

NON_HTML_EXTENSIONS = frozenset(
    "jpg jpeg png gif gifv webp bmp svg tif tiff ico heic mp4 webm mov avi mkv flv wmv m4v mpg mpeg "
    "mp3 wav ogg oga flac m4a aac pdf ps eps djvu epub mobi zip gz tgz bz2 xz 7z rar tar exe msi dmg "
    "apk iso bin deb rpm doc docx ppt pptx xls xlsx odt ods odp csv json xml rss swf torrent".split()
)

# Query parameters that only track who clicked; they never change the page.
TRACKING_PARAMS = frozenset(
    "fbclid gclid dclid gbraid wbraid msclkid yclid mc_cid mc_eid igshid _ga _gl ref ref_src ref_url "
    "cmpid ncid ocid sr_share share mkt_tok spm smid".split()
)


MAX_SHARDS = 65536  # a part file per shard per dump: 10^8 of them ran the file system out of inodes


@dataclass(frozen=True)
class LinksConfig:
    min_score: int = 3
    cutoff: str = DEFAULT_CUTOFF          # ISO date or time (UTC): links created before it are kept
    shards: int = 16
    blocked_subreddits: tuple[str, ...] = ()
    blocked_domains: tuple[str, ...] = DEFAULT_BLOCKED_DOMAINS
    drop_over_18: bool = False

    def __post_init__(self):
        check_int("--shards", self.shards, 1, MAX_SHARDS)
        self.cutoff_timestamp()
        # a URL or an upper-case name here would match no post, and the option would do nothing
        for d in self.blocked_domains:
            if not isinstance(d, str) or not _HOST.fullmatch(d):
                raise WebTextError(f"--block-domain: expected a host name like example.com, got {d!r}")
        for sub in self.blocked_subreddits:
            if not isinstance(sub, str) or not _SUBREDDIT.fullmatch(sub):
                raise WebTextError(f"--block-subreddit: expected a subreddit name like news (letters, digits, _), got {sub!r}")

    def cutoff_timestamp(self) -> float:
        try:
            dt = datetime.fromisoformat(self.cutoff)
        except ValueError:
            raise WebTextError(f"--cutoff: expected an ISO date like 2017-12-01, got {self.cutoff!r}") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()


# ---------------------------------------------------------------------------------------------
# URLs


class BadURL(ValueError):
    pass


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def domain_matches(host: str, domains) -> bool:
    """True when `host` is one of `domains` or a subdomain of one.

    >>> domain_matches("en.m.wikipedia.org", {"wikipedia.org"}), domain_matches("notwikipedia.org", {"wikipedia.org"})
    (True, False)
    """
    if not isinstance(domains, (set, frozenset)):
        domains = frozenset(domains)
    while True:
        if host in domains:
            return True
        dot = host.find(".")
        if dot < 0:
            return False
        host = host[dot + 1:]


def canonicalize_url(url: str) -> str:
    """One spelling per page: lower-case scheme and host, IDNA host, no default port, no user info,
    no fragment, no tracking parameters, the other parameters sorted; raises `BadURL`.

    >>> canonicalize_url("HTTP://Example.COM:80/a b?utm_source=x&b=2&a=1#top")
    'http://example.com/a%20b?a=1&b=2'
    """
    return _canonical(url)[0]


def _canonical(url: str) -> tuple[str, str, str]:
    """(canonical URL, host, path)."""
    url = url.strip().replace("&amp;", "&")  # Reddit's API HTML-escapes '&' in link URLs
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadURL(str(e)) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BadURL(f"scheme {scheme!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise BadURL("no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise BadURL(f"host {host!r}") from None
    if not _HOST.fullmatch(host):
        raise BadURL(f"host {host!r}")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    netloc = host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    try:
        path = _upper_escapes(quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~"))
        query = _canonical_query(parts.query)
    except UnicodeEncodeError:
        raise BadURL("half a UTF-16 surrogate pair") from None   # JSON's "\ud800": no bytes to send
    return urlunsplit((scheme, netloc, path, query, "")), host, path


def _canonical_query(query: str) -> str:
    """The query without tracking parameters, the others sorted and each kept as sent: decoding and
    re-encoding would turn a Latin-1 escape into U+FFFD, `?id` into `?id=` and `%zz` into `%25zz`,
    so another page would be fetched."""
    kept = []
    for param in query.split("&"):
        key = unquote_plus(param.partition("=")[0]).lower()
        if param and not (key.startswith("utm_") or key in TRACKING_PARAMS):
            kept.append(_upper_escapes(quote(param, safe="/%:@!$'()*+,;=-._~?[]")))
    return "&".join(sorted(kept))


_ESCAPE = re.compile(r"%[0-9a-f]{2}", re.IGNORECASE)


def _upper_escapes(text: str) -> str:
    # %2f and %2F are one URL (RFC 3986 §6.2.2.1); one spelling, so that the link is kept once
    return _ESCAPE.sub(lambda m: m.group().upper(), text)


_HOST = re.compile(r"[a-z0-9._\-]+|\[[0-9a-f:.]+\]|[0-9a-f:.]+")
_SUBREDDIT = re.compile(r"[A-Za-z0-9_]+")


def is_non_html(path: str) -> bool:
    """Whether a URL path names a file that is not a web page, by its extension."""
    ext = posixpath.splitext(path)[1].lower().lstrip(".")
    return ext in NON_HTML_EXTENSIONS


def shard_of(url: str, shards: int) -> int:
    return host_shard(host_of(url), shards)


def host_shard(host: str, shards: int) -> int:
    return stable_hash(host.strip("[]")) % shards


# ---------------------------------------------------------------------------------------------
# Dumps


class TruncatedDump(Exception):
    pass


def _zst_lines(path: Path, on_position) -> Iterator[bytes]:
    """Lines of a zstd file (any number of frames). The stream reader of `zstandard` ends quietly
    at a cut-off frame; a decompression object tells a complete frame from a truncated one."""
    import zstandard

    # The public monthly dumps are compressed with --long=31: allow that window.
    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
    obj, pending, rest = dctx.decompressobj(), False, b""
    with open(path, "rb") as f:
        while raw := f.read(1 << 20):
            on_position(f.tell())
            while raw:
                pending = True
                data = rest + obj.decompress(raw)
                raw = b""
                if obj.eof:
                    raw, obj, pending = obj.unused_data, dctx.decompressobj(), False
                *lines, rest = data.split(b"\n")
                yield from lines
    if pending:
        raise TruncatedDump("the last zstd frame is cut off")
    if rest:
        yield rest


def _stream_lines(path: Path, on_position=None) -> Iterator[bytes]:
    """The lines of a dump; `on_position(bytes of the file read)` is called as reading goes on."""
    on_position = on_position or (lambda _: None)
    name = path.name.lower()
    if name.endswith(".zst"):
        yield from _zst_lines(path, on_position)
        return
    # the compressed file is opened here, so that its position says how far reading has come
    with open(path, "rb") as raw, _decompressed(raw, Path(name).suffix) as f:
        for i, line in enumerate(f):
            if not i & 0xFFFF:
                on_position(raw.tell())
            yield line
        on_position(raw.tell())


def _decompressed(raw, suffix: str):
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if suffix in (".bz2", ".xz"):
        return (bz2.BZ2File if suffix == ".bz2" else lzma.LZMAFile)(raw)
    return contextlib.nullcontext(raw)


def iter_dump(path: Path, counts: dict, problems: list[str] | None = None, limit: int | None = None,
              on_position=None) -> Iterator[dict]:
    """The JSON objects of a dump; bad lines and a truncated end are counted in `counts`. Why reading
    stopped early is logged, or appended to `problems` when given. Stops after `limit` lines.
    `on_position` is called with how many bytes of the file have been read."""
    try:
        for raw in _stream_lines(path, on_position):
            if not raw.strip():
                continue
            if limit is not None and counts["lines"] >= limit:
                return
            counts["lines"] += 1
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                counts["bad_lines"] += 1
                continue
            if not isinstance(obj, dict):
                counts["bad_lines"] += 1
                continue
            yield obj
    except FileNotFoundError:
        raise WebTextError(f"{path}: no such dump file") from None
    except (TruncatedDump, OSError, EOFError, lzma.LZMAError, ValueError) as e:
        _stopped(path, counts, problems, e)
    except Exception as e:
        if type(e).__name__ != "ZstdError":
            raise
        _stopped(path, counts, problems, e)


def _stopped(path: Path, counts: dict, problems: list[str] | None, e: Exception) -> None:
    counts["truncated_files"] += 1
    if problems is None:
        log.warning("%s: stopped reading after line %d: %s", path, counts["lines"], e)
    else:
        problems.append(str(e) or type(e).__name__)


# A submissions dump has a submission on (nearly) every line; this many lines without one is
# another kind of file (a comments dump, a text corpus), and reading a 30 GB one to its end would
# only delay the error.
PROBE_LINES = 10_000
EXPECTED_DUMP = "expected NDJSON with url/score/created_utc, plain or .zst/.gz/.bz2/.xz"


def probe_dump(path: Path) -> str | None:
    """None when a dump holds a submission among its first `PROBE_LINES` lines, else what it holds."""
    counts = dict.fromkeys(_REASONS, 0)
    problems: list[str] = []
    for obj in iter_dump(path, counts, problems, limit=PROBE_LINES):
        if _fields(obj) is not None:
            return None
    n = counts["lines"]
    if n >= PROBE_LINES:
        return f"none of its first {n:,} lines is a submission"
    if problems:
        return f"cannot read it: {problems[0]}" if n == 0 else f"{_lines(n)}, none a submission, then {problems[0]}"
    return "it is empty" if n == 0 else f"{_lines(n)}, none a submission"


def _lines(n: int) -> str:
    return "1 line" if n == 1 else f"{n:,} lines"


def _number(value) -> float | None:
    # json.loads reads NaN and Infinity; as a score or a time they would crash int() (or pass
    # every comparison), so they make the line a bad one like any other non-number
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return value if isinstance(value, float) and math.isfinite(value) else None


def _fields(obj: dict) -> tuple[str, float, float] | None:
    """(url, score, created_utc) of a submission; None when a line is not one."""
    url = obj.get("url")
    score = _number(obj.get("score"))
    created = _number(obj.get("created_utc"))
    if not isinstance(url, str) or score is None or created is None:
        return None
    return url, score, created


def filter_post(obj: dict, cfg: LinksConfig, cutoff: float, blocked_subs: frozenset,
                blocked_domains: frozenset) -> tuple[str, dict | None, str]:
    """(reason, link record, host): reason is "kept" or why the post was dropped."""
    fields = _fields(obj)
    if fields is None:
        return "bad_lines", None, ""
    url, score, created = fields
    if obj.get("is_self"):
        return "self_post", None, ""
    if score < cfg.min_score:
        return "low_score", None, ""
    if created >= cutoff:
        return "after_cutoff", None, ""
    sub = obj.get("subreddit") if isinstance(obj.get("subreddit"), str) else ""
    if not sub.isascii() and _SURROGATE.search(sub):
        return "bad_lines", None, ""     # it could not be written to the links shard
    if sub.lower() in blocked_subs:
        return "blocked_subreddit", None, ""
    if cfg.drop_over_18 and obj.get("over_18"):
        return "over_18", None, ""
    try:
        canon, host, path = _canonical(url)
    except BadURL:
        return "bad_url", None, ""
    if domain_matches(host, _WIKIPEDIA):
        return "wikipedia", None, host
    domain = obj.get("domain") if isinstance(obj.get("domain"), str) else ""
    if domain_matches(host, blocked_domains) or domain_matches(domain.lower(), blocked_domains):
        return "blocked_domain", None, host
    if is_non_html(path):
        return "not_html", None, host
    return "kept", {"url": canon, "score": int(score), "created_utc": int(created), "subreddit": sub, "posts": 1}, host


_WIKIPEDIA = frozenset(WIKIPEDIA_DOMAINS)

_SURROGATE = re.compile("[\ud800-\udfff]")   # JSON's "\ud800" escapes: text UTF-8 cannot encode


def better(a: dict, b: dict) -> dict:
    """Of two posts of one URL, the one to keep: highest karma, then the earliest, then by name."""
    return min(a, b, key=lambda r: (-r["score"], r["created_utc"], r["subreddit"]))


def merge_into(best: dict[str, dict], rec: dict) -> None:
    old = best.get(rec["url"])
    if old is None:
        best[rec["url"]] = rec
    else:
        keep = dict(better(old, rec))
        keep["posts"] = old["posts"] + rec["posts"]
        best[rec["url"]] = keep


_REASONS = ("lines", "bad_lines", "truncated_files", "self_post", "low_score", "after_cutoff", "blocked_subreddit",
            "over_18", "bad_url", "wikipedia", "blocked_domain", "not_html", "kept")


def dump_task_name(path: Path) -> str:
    return "dump-" + format(stable_hash(str(path.resolve())), "016x")


def split_dump(path: str, parts_dir: str, task: str, cfg: LinksConfig, progress: bool = False) -> dict:
    """Filter one dump into one part file per shard (links de-duplicated within the dump)."""
    from tqdm.auto import tqdm

    counts = dict.fromkeys(_REASONS, 0)
    counts["dump_bytes"] = os.path.getsize(path)    # before reading: a rerun tells a replaced dump by it
    cutoff = cfg.cutoff_timestamp()
    blocked_subs = frozenset(s.lower() for s in cfg.blocked_subreddits)
    blocked_domains = frozenset(cfg.blocked_domains)
    buckets: list[dict[str, dict]] = [{} for _ in range(cfg.shards)]
    with tqdm(total=counts["dump_bytes"], desc=Path(path).name, unit="B", unit_scale=True, leave=False,
              disable=not progress, dynamic_ncols=True) as bar:
        for obj in iter_dump(Path(path), counts, on_position=lambda n: bar.update(n - bar.n)):
            reason, rec, host = filter_post(obj, cfg, cutoff, blocked_subs, blocked_domains)
            counts[reason] += 1
            if rec is not None:
                merge_into(buckets[host_shard(host, cfg.shards)], rec)
        bar.update(bar.total - bar.n)
    for k, bucket in enumerate(buckets):
        write_jsonl_zst(Path(parts_dir) / f"{task}.{k:05d}.jsonl.zst", sorted(bucket.values(), key=lambda r: r["url"]))
    counts["dump_files"] = 1
    return counts


def merge_shard(k: int, part_files: list[str], out: str) -> dict:
    best: dict[str, dict] = {}
    for p in part_files:
        for rec in read_jsonl_zst(p):
            merge_into(best, rec)
    n = write_jsonl_zst(out, sorted(best.values(), key=lambda r: r["url"]))
    return {"links": n}


def dump_files(dumps: list[str | os.PathLike]) -> dict[Path, Path]:
    """Resolved path -> the path as named, of every dump: the files given, and the files directly in
    the folders given (hidden files and subfolders are not read)."""
    named: dict[Path, Path] = {}
    for d in map(Path, dumps):
        if d.is_dir():
            found = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
            if not found:
                raise WebTextError(f"{d}: a folder without dump files in it (subfolders and hidden files are not "
                                   f"read); expected Reddit submission dumps, NDJSON, plain or .zst/.gz/.bz2/.xz")
        elif d.is_file():
            found = [d]
        else:
            raise WebTextError(f"{d}: no such dump file or folder")
        for p in found:
            named.setdefault(p.resolve(), p)
    if not named:
        raise WebTextError("links: no dump files given")
    return named


def _check_unchanged(wf: WorkFolder, path: Path, name: Path) -> None:
    """Refuse a dump whose size differs from when it was split (a cut-off download replaced by the
    full file): its finished task would otherwise keep the links of the old copy."""
    if not wf.is_done("links", dump_task_name(path)):
        return
    then = wf.task_stats("links", dump_task_name(path)).get("dump_bytes")   # absent in older markers
    now = path.stat().st_size
    if then is not None and then != now:
        raise WebTextError(f"{name}: changed since the links stage read it ({then:,} bytes then, {now:,} now); "
                           f"delete {wf.state_dir('links')} and {wf.stage_dir('links')} (and the later stages) "
                           "to build from the new file")


def collect_links(work: str | os.PathLike, dumps: list[str | os.PathLike], cfg: LinksConfig = LinksConfig(),
          runner: Runner = Runner()) -> dict:
    """Run the links stage; returns the stage's totals (also in WORK/_state/links/COMPLETE.json)."""
    wf = WorkFolder(work)
    named = dump_files(dumps)
    paths = sorted(named)
    for p in paths:
        _check_unchanged(wf, p, named[p])
    # before any state is written, so that a corrected rerun is not refused as "other options";
    # a dump split on an earlier run was readable then and is not read again
    bad = [(named[p], why) for p in paths if not wf.is_done("links", dump_task_name(p)) and (why := probe_dump(p))]
    if len(bad) == 1:
        raise WebTextError(f"{bad[0][0]}: no valid submission lines ({bad[0][1]}); {EXPECTED_DUMP}")
    if bad:
        listed = ", ".join(f"{p} ({why})" for p, why in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise WebTextError(f"{len(bad)} dumps hold no valid submission lines: {listed}; {EXPECTED_DUMP}")
    wf.check_config("links", {**config_dict(cfg), "dumps": [str(p) for p in paths]})
    parts_dir = wf.stage_dir("links") / "_parts"
    # a bar over each dump's bytes, where it can be drawn: in this process
    inline_progress = runner.progress and runner.workers == 1 and runner.engine == "local"
    tasks = [(dump_task_name(p), (str(p), str(parts_dir), dump_task_name(p), cfg, inline_progress)) for p in paths]
    counts, skipped = run_tasks(wf, "links", split_dump, tasks, runner, desc="links: dumps")
    merges = []
    for k in range(cfg.shards):
        parts = [str(parts_dir / f"{name}.{k:05d}.jsonl.zst") for name, _ in tasks]
        name = shard_name("links", k)
        merges.append((name, (k, parts, str(wf.stage_dir("links") / f"{name}.jsonl.zst"))))
    merged, skipped2 = run_tasks(wf, "links", merge_shard, merges, runner, desc="links: shards")
    totals = {**counts, **merged}
    wf.finish("links", range(cfg.shards), totals)
    return {**totals, "skipped_tasks": skipped + skipped2}
