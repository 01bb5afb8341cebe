"""WebText fetch stage against a real HTTP server on 127.0.0.1 (the only network these tests use).

Host names (`*.test`) reach the server through the crawler's resolver hook (`resolve=`); every
test that connects passes `allow_private` for loopback only.
"""
from __future__ import annotations

import gzip
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpt2kit.webtext import FetchConfig, Runner, WorkFolder
from gpt2kit.webtext.fetch import Fetcher, Resolver, address_allowed, fetch_pages
from gpt2kit.webtext.work import read_jsonl_zst

HOSTS = ("news.test", "blog.test", "slow.test", "mirror.test", "stall.test", "other.test")

_SENTENCES = [
    "The city council met on Tuesday to discuss the new budget for public schools and roads.",
    "Researchers at the university published a study about sleep and memory in young adults.",
    "Local farmers said the dry summer had cut their harvest by nearly a third this year.",
    "The museum will open a new exhibition of early photographs from the nineteenth century.",
    "Engineers are testing a bridge design that should survive much stronger earthquakes.",
    "Doctors recommend walking at least thirty minutes a day to keep the heart healthy.",
    "The company announced that it would hire two hundred workers for its new factory.",
    "Volunteers cleaned the river banks and collected more than a ton of plastic waste.",
    "A new library branch opened downtown with a large room for children and families.",
    "Scientists observed a rare comet that passes close to the sun only once a century.",
    "The team won the championship after a dramatic final game that went into overtime.",
    "Teachers say that reading aloud to children improves their vocabulary and attention.",
]


def article(seed: int, sentences: int = 30) -> str:
    rng = random.Random(seed)
    paras = []
    for _ in range(sentences // 5):
        paras.append(" ".join(f"{rng.choice(_SENTENCES)[:-1]} number {rng.randrange(10**6)}." for _ in range(5)))
    return "\n\n".join(paras)


def page(text: str, title: str = "News", head: str = "") -> bytes:
    body = "".join(f"<p>{p}</p>\n" for p in text.split("\n\n"))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>{head}</head><body>"
            f"<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav><article><h1>{title}</h1>\n{body}"
            "<p>Share this article</p></article><footer>All rights reserved 2017</footer></body></html>").encode()


FRENCH = ("Le conseil municipal s'est réuni mardi pour discuter du nouveau budget des écoles publiques et des routes. "
          "Les chercheurs de l'université ont publié une étude sur le sommeil et la mémoire chez les jeunes adultes. "
          "Les agriculteurs ont déclaré que l'été sec avait réduit leur récolte de près d'un tiers cette année. ") * 8


class Site:
    """Pages by (host, path): (status, headers, body) or a callable for special behaviour."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.flaky_calls = 0
        a1, a2, a3 = article(1), article(2), article(3)
        words = a2.split(" ")
        for i in range(7, len(words), 60):   # a near duplicate: a few words changed
            words[i] = "changed"
        near = " ".join(words)
        wiki_head = "<link rel='canonical' href='https://en.wikipedia.org/wiki/Bridge'>"
        html = {"Content-Type": "text/html; charset=utf-8"}
        self.routes = {
            ("news.test", "/robots.txt"): (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n"),
            ("news.test", "/a1"): (200, html, page(a1, "First")),
            ("news.test", "/a2"): (200, html, page(a2, "Second")),
            ("news.test", "/private/secret"): (200, html, page(article(9), "Secret")),
            ("news.test", "/missing"): (404, html, b"<html>not found</html>"),
            ("news.test", "/moved"): (301, {"Location": "/a3"}, b""),
            ("news.test", "/a3"): (200, html, page(a3, "Third")),
            ("news.test", "/loop"): (302, {"Location": "/loop"}, b""),
            ("news.test", "/to-private"): (302, {"Location": "http://10.1.2.3/admin"}, b""),
            ("news.test", "/to-metadata"): (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            ("news.test", "/french"): (200, html, page(FRENCH, "Nouvelles")),
            ("news.test", "/binary"): (200, html, random.Random(5).randbytes(20000)),
            ("news.test", "/big"): (200, html, b"<html><body><p>" + b"x " * 400_000 + b"</p></body></html>"),
            ("news.test", "/bomb"): (200, {**html, "Content-Encoding": "gzip"},
                                     gzip.compress(b"<html><body>" + b" " * 20_000_000, compresslevel=9)),
            ("news.test", "/paper.html"): (200, {"Content-Type": "application/pdf"}, b"%PDF-1.4 fake"),
            ("news.test", "/gz"): (200, {**html, "Content-Encoding": "gzip"}, gzip.compress(page(article(4), "Zipped"))),
            ("blog.test", "/copy-of-a1"): (200, html, page(a1, "First")),
            ("blog.test", "/near-a2"): (200, html, page(near, "Near")),
            ("blog.test", "/flaky"): self.flaky,
            ("mirror.test", "/wiki/Bridge"): (200, html, page(article(6), "Bridge - Wikipedia", wiki_head)),
            ("slow.test", "/slow"): self.slow,
            ("stall.test", "/stall"): self.stall,
            ("slow.test", "/endless"): "endless",
            ("slow.test", "/drip"): "drip",
            ("other.test", "/robots.txt"): (503, {}, b""),
            ("other.test", "/page"): (200, html, page(article(7), "Other")),
        }
        self.flaky_text = article(8)

    def flaky(self, handler):
        with self.lock:
            self.flaky_calls += 1
            first = self.flaky_calls == 1
        if first:
            return 503, {"Retry-After": "0"}, b"busy"
        return 200, {"Content-Type": "text/html"}, page(self.flaky_text, "Flaky")

    def slow(self, handler):
        time.sleep(3)
        return 200, {"Content-Type": "text/html"}, page(article(10), "Slow")

    def stall(self, handler):
        self.release.wait(60)
        return 200, {"Content-Type": "text/html"}, page(article(11), "Stalled")

    def hits(self, host=None, path=None):
        with self.lock:
            return [(h, p) for h, p in self.requests if (host is None or h == host) and (path is None or p == path)]


def start_server(site: Site):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            host = (self.headers.get("Host") or "").split(":")[0]
            with site.lock:
                site.requests.append((host, self.path))
            route = site.routes.get((host, self.path))
            if route in ("endless", "drip"):
                return self.stream(route)
            if route is None:
                status, headers, body = 404, {"Content-Type": "text/html"}, b"<html>no</html>"
            elif callable(route):
                status, headers, body = route(self)
            else:
                status, headers, body = route
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def stream(self, kind):
            """A body without a length that never ends: fast (endless) or one byte at a time (drip)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Connection", "close")
            self.end_headers()
            deadline = time.monotonic() + 15
            try:
                while time.monotonic() < deadline and not site.release.is_set():
                    self.wfile.write(b"<p>" + b"y" * 65536 if kind == "endless" else b"z")
                    self.wfile.flush()
                    if kind == "drip":
                        time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def site():
    s = Site()
    server = start_server(s)
    s.port = server.server_address[1]
    yield s
    s.release.set()
    server.shutdown()
    server.server_close()


def url(site, host, path):
    return f"http://{host}:{site.port}{path}"


def local_cfg(**kw) -> FetchConfig:
    base = dict(allow_private=("127.0.0.0/8",), resolve=tuple((h, "127.0.0.1") for h in HOSTS), host_delay=0.0,
                connect_timeout=1.0, read_timeout=0.5, total_timeout=2.0, retries=1, backoff=0.01, max_bytes=300_000)
    base.update(kw)
    return FetchConfig(**base)


def make_links(work: Path, urls: list[str]) -> None:
    """A links stage with one shard holding `urls` (as the links stage would leave it)."""
    from gpt2kit.webtext.work import write_jsonl_zst

    wf = WorkFolder(work)
    write_jsonl_zst(work / "links" / "links-00000.jsonl.zst",
                    [{"url": u, "score": 5, "created_utc": 1500000000, "subreddit": "news", "posts": 1} for u in sorted(urls)])
    wf.finish("links", [0], {"links": len(urls)})


def manifest(work: Path) -> dict[str, dict]:
    return {e["url"]: e for e in read_jsonl_zst(work / "fetch" / "fetch-00000.manifest.jsonl.zst")}


# ---------------------------------------------------------------------------------------------


def test_deflate_bodies_decode_with_or_without_their_zlib_header():
    """Content-Encoding: deflate means zlib-wrapped data, but many servers send raw deflate."""
    import zlib

    from gpt2kit.webtext.fetch import BoundedDecoder, TooLarge

    body = b"<html>" + b"the flood came " * 400 + b"</html>"
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = raw.compress(body) + raw.flush()
    for data in (zlib.compress(body), raw):
        decoder = BoundedDecoder("deflate", len(body))
        assert b"".join(decoder.feed(data[i:i + 100]) for i in range(0, len(data), 100)) == body
        with pytest.raises(TooLarge):
            BoundedDecoder("deflate", len(body) - 1).feed(data)


def test_address_policy():
    for bad in ("127.0.0.1", "10.0.0.5", "192.168.1.1", "172.16.0.1", "169.254.169.254", "::1", "fe80::1",
                "fc00::1", "::ffff:127.0.0.1", "100.64.0.1", "240.0.0.1", "0.0.0.0", "224.0.0.1"):
        assert not address_allowed(bad, None), bad
    assert address_allowed("93.184.216.34", None) and address_allowed("2606:4700::1111", None)
    nets = FetchConfig(allow_private=("127.0.0.0/8",)).networks()
    assert address_allowed("127.0.0.1", ("127.0.0.0/8",), nets)
    assert not address_allowed("10.1.2.3", ("127.0.0.0/8",), nets)
    assert address_allowed("10.1.2.3", ())                      # --allow-private with no network: all
    assert not address_allowed("224.0.0.1", ()) and not address_allowed("0.0.0.0", ())


def test_resolver_refuses_mixed_and_private_answers():
    import asyncio

    r = Resolver(FetchConfig(resolve=(("evil.test", "127.0.0.1"), ("ok.test", "93.184.216.34"))))

    async def go():
        assert await r.resolve("ok.test") == "93.184.216.34"
        with pytest.raises(Exception, match="not allowed"):
            await r.resolve("evil.test")
        with pytest.raises(Exception, match="not allowed"):
            await r.resolve("169.254.169.254")
        # a DNS answer listing a public address first and a private one after it: refused as a whole
        import socket

        answers = {"mixed.test": ["93.184.216.34", "10.0.0.7"], "mixed2.test": ["10.0.0.7", "93.184.216.34"],
                   "two.test": ["93.184.216.34", "93.184.216.35"]}

        async def getaddrinfo(host, port, **kw):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in answers[host]]

        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        for host in ("mixed.test", "mixed2.test"):
            with pytest.raises(Exception, match="10.0.0.7, which is not allowed"):
                await r.resolve(host)
        assert await r.resolve("two.test") == "93.184.216.34"

    asyncio.run(go())


def test_private_addresses_refused_without_any_connection(site, tmp_path):
    """Without allow_private, a loopback URL (by address or by a name that resolves to it) never connects."""
    make_links(tmp_path, [f"http://127.0.0.1:{site.port}/a1", url(site, "news.test", "/a1")])
    fetch_pages(tmp_path, local_cfg(allow_private=None))
    m = manifest(tmp_path)
    assert [e["status"] for e in m.values()] == ["blocked_address", "blocked_address"]
    assert "not allowed" in m[url(site, "news.test", "/a1")]["error"]
    assert site.hits() == []   # not one request reached the server (robots.txt included)


def test_redirect_to_private_address_refused_without_allow_private():
    """A public page that redirects to a private address: the second hop is never connected.
    The 'public' server is an in-memory transport, so no traffic leaves this process."""
    import asyncio

    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["host"]))
        return httpx.Response(302, headers={"Location": "http://internal.test/admin"})

    cfg = FetchConfig(resolve=(("public.test", "93.184.216.34"), ("internal.test", "10.1.2.3")), robots=False,
                      host_delay=0.0)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await Fetcher(cfg, client, 4).get("http://public.test/start")

    res = asyncio.run(go())
    assert (res.status, res.final_url, res.redirects) == ("blocked_address", "http://internal.test/admin", 1)
    assert seen == [("http://93.184.216.34/start", "public.test")]   # connected by checked address, named by Host


def test_robots_txt_answered_429_forbids_the_host():
    # a 429 is a host asking for fewer requests: read as "no robots.txt" (any other 4xx), it would
    # open the whole site to the crawler
    import asyncio

    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/robots.txt":
            return httpx.Response(429, headers={"Retry-After": "0"})
        return httpx.Response(200, headers={"Content-Type": "text/html"}, content=b"<html>page</html>")

    cfg = FetchConfig(resolve=(("busy.test", "93.184.216.34"),), host_delay=0.0, retries=1, backoff=0.01)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await Fetcher(cfg, client, 4).get("http://busy.test/page")

    res = asyncio.run(go())
    assert res.status == "robots_disallowed"
    assert seen == ["/robots.txt", "/robots.txt"]  # asked again once (retries=1), never the page


def test_redirect_to_private_address_refused_before_connecting(site, tmp_path):
    make_links(tmp_path, [url(site, "news.test", p) for p in ("/to-private", "/to-metadata", "/moved")])
    fetch_pages(tmp_path, local_cfg())
    m = manifest(tmp_path)
    for p in ("/to-private", "/to-metadata"):
        e = m[url(site, "news.test", p)]
        assert (e["status"], e["redirects"]) == ("blocked_address", 1), e
    moved = m[url(site, "news.test", "/moved")]
    assert (moved["status"], moved["final_url"], moved["redirects"]) == ("ok", url(site, "news.test", "/a3"), 1)
    assert {h for h, _ in site.hits()} == {"news.test"}


def test_fetch_statuses_robots_limits_and_warc(site, tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    paths = {"news.test": ["/a1", "/private/secret", "/missing", "/big", "/bomb", "/paper.html", "/gz", "/loop"],
             "blog.test": ["/flaky"], "slow.test": ["/slow", "/endless", "/drip"], "other.test": ["/page"]}
    import socket

    with socket.socket() as closed:          # a port where nothing listens: connection refused
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    make_links(tmp_path, [url(site, h, p) for h, ps in paths.items() for p in ps] + [f"http://news.test:{dead_port}/x"])
    totals = fetch_pages(tmp_path, local_cfg(), Runner())
    m = manifest(tmp_path)
    status = {u.split(f":{site.port}")[1] if f":{site.port}" in u else "dead": e["status"] for u, e in m.items()}
    assert status == {"dead": "connection_error", "/loop": "too_many_redirects", "/a1": "ok", "/private/secret": "robots_disallowed", "/missing": "http_error", "/big": "too_large",
                      "/bomb": "too_large", "/paper.html": "not_html", "/gz": "ok", "/flaky": "ok",
                      "/slow": "timeout", "/endless": "too_large", "/drip": "timeout", "/page": "robots_disallowed"}
    assert m[url(site, "blog.test", "/flaky")]["attempts"] == 2          # one 503, then success
    assert m[url(site, "slow.test", "/slow")]["attempts"] == 2           # timed out twice (retries=1)
    assert m[url(site, "news.test", "/missing")]["http_status"] == 404
    big = m[url(site, "news.test", "/big")]   # refused on its declared length, before its body is read
    assert (big["error"], big["bytes"]) == (f"Content-Length {len(Site().routes[('news.test', '/big')][2])}", 0)
    assert ("news.test", "/private/secret") not in site.hits()           # robots.txt obeyed
    assert len(site.hits("news.test", "/robots.txt")) == 1               # fetched once per host
    assert site.hits("other.test", "/page") == []                        # 5xx robots.txt: crawl nothing
    assert totals["status"]["ok"] == 3 and totals["urls"] == 14
    assert m[url(site, "news.test", "/loop")]["redirects"] == 5
    # the WARC file holds exactly the three good pages, decoded, with our user agent in warcinfo
    with open(tmp_path / "fetch" / "fetch-00000.warc.gz", "rb") as f:
        records = [(r.rec_type, r.rec_headers.get_header("WARC-Target-URI"), r.http_headers, r.content_stream().read())
                   for r in ArchiveIterator(f)]
    assert records[0][0] == "warcinfo"
    responses = {uri: (h, body) for t, uri, h, body in records if t == "response"}
    assert set(responses) == {url(site, "news.test", "/a1"), url(site, "news.test", "/gz"), url(site, "blog.test", "/flaky")}
    headers, body = responses[url(site, "news.test", "/gz")]
    assert headers.get_statuscode() == "200" and headers.get_header("Content-Encoding") is None
    assert body == page(article(4), "Zipped")
    ids = {e["record_id"] for e in m.values() if e["status"] == "ok"}
    assert len(ids) == 3 and None not in ids


def test_user_agent_and_per_host_delay(site, tmp_path):
    seen = []
    site.routes[("news.test", "/ua")] = lambda h: (seen.append((h.headers["User-Agent"], time.monotonic())) or
                                                   (200, {"Content-Type": "text/html"}, b"<html>ok</html>"))
    site.routes[("news.test", "/ua2")] = site.routes[("news.test", "/ua")]
    site.routes[("news.test", "/ua3")] = site.routes[("news.test", "/ua")]
    make_links(tmp_path, [url(site, "news.test", p) for p in ("/ua", "/ua2", "/ua3")])
    # (times as the server's handler threads see them: under load a late first handler shrinks a
    # gap by tens of ms, so the delay is long enough to tell from none or half of it)
    fetch_pages(tmp_path, local_cfg(host_delay=0.5, robots=False, per_host=3))
    assert len(seen) == 3 and all(ua.startswith("gpt2kit-webtext/") for ua, _ in seen)
    times = sorted(t for _, t in seen)
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.38


def test_max_redirects_is_the_number_of_redirects_followed(site, tmp_path):
    for k in range(3):   # /r0 -> /r1 -> /r2 -> /a1: three redirects
        site.routes[("news.test", f"/r{k}")] = (301, {"Location": f"/r{k + 1}" if k < 2 else "/a1"}, b"")
    for allowed, status in ((3, "ok"), (2, "too_many_redirects")):
        work = tmp_path / str(allowed)
        make_links(work, [url(site, "news.test", "/r0")])
        fetch_pages(work, local_cfg(robots=False, max_redirects=allowed))
        entry = manifest(work)[url(site, "news.test", "/r0")]
        assert entry["status"] == status, (allowed, entry)
        if status == "ok":
            assert entry["redirects"] == 3 and entry["final_url"].endswith("/a1")


def test_429_is_retried_after_its_retry_after(site, tmp_path):
    """Too Many Requests is a reason to come back later, when the server says (not after --backoff alone)."""
    seen = []

    def limited(handler):
        seen.append(time.monotonic())
        if len(seen) == 1:
            return 429, {"Retry-After": "1"}, b"slow down"
        return 200, {"Content-Type": "text/html"}, b"<html>ok</html>"

    site.routes[("news.test", "/limited")] = limited
    make_links(tmp_path, [url(site, "news.test", "/limited")])
    fetch_pages(tmp_path, local_cfg(robots=False, backoff=0.01))
    entry = manifest(tmp_path)[url(site, "news.test", "/limited")]
    assert (entry["status"], entry["attempts"], len(seen)) == ("ok", 2, 2)
    assert seen[1] - seen[0] >= 0.9


def test_robots_crawl_delay_spaces_requests_up_to_the_cap(site, tmp_path):
    """A robots.txt Crawl-delay raises the host's delay, but never above max_crawl_delay (a site asking for
    hours between requests would stall its shard)."""
    seen = []
    site.routes[("blog.test", "/robots.txt")] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nCrawl-delay: 4\n")
    for p in ("/d1", "/d2"):
        site.routes[("blog.test", p)] = lambda h: (seen.append(time.monotonic()) or
                                                   (200, {"Content-Type": "text/html"}, b"<html>ok</html>"))
    make_links(tmp_path, [url(site, "blog.test", p) for p in ("/d1", "/d2")])
    fetch_pages(tmp_path, local_cfg(host_delay=0.0, max_crawl_delay=0.4, per_host=2))
    assert len(seen) == 2 and 0.35 <= abs(seen[1] - seen[0]) < 2.0, seen


def test_fetch_resumes_without_refetching_finished_shards(site, tmp_path):
    wf = WorkFolder(tmp_path)
    from gpt2kit.webtext.work import write_jsonl_zst

    for k, path in enumerate(["/a1", "/a2"]):
        write_jsonl_zst(tmp_path / "links" / f"links-{k:05d}.jsonl.zst",
                        [{"url": url(site, "news.test", path), "score": 5, "created_utc": 1, "subreddit": "x", "posts": 1}])
    wf.finish("links", [0, 1], {"links": 2})
    wf.mark_done("fetch", "fetch-00000", {"urls": 1, "bytes": 0, "status": {"ok": 1}})   # as if a run had done it
    fetch_pages(tmp_path, local_cfg(robots=False))
    assert site.hits() == [("news.test", "/a2")]
    assert wf.complete("fetch")["totals"]["urls"] == 2
    # a rerun with other options is refused instead of mixing two configurations
    with pytest.raises(Exception, match=r"other options \(differs in: max_bytes\)"):
        fetch_pages(tmp_path, local_cfg(robots=False, max_bytes=10, concurrency=7))
    # ... but how many requests are in flight may change (a host's delay not: the shared schedule
    # keeps the one it started with as a floor, so a lower one would be recorded but not obeyed)
    with pytest.raises(Exception, match=r"other options \(differs in: host_delay\)"):
        fetch_pages(tmp_path, local_cfg(robots=False, host_delay=5.0))
    fetch_pages(tmp_path, local_cfg(robots=False, concurrency=128, per_host=4))
    assert site.hits() == [("news.test", "/a2")]  # nothing fetched again
    recorded = json.loads((tmp_path / "_state" / "fetch" / "config.json").read_text())
    assert (recorded["concurrency"], recorded["per_host"]) == (128, 4)
    with pytest.raises(Exception, match=r"other options \(differs in: retries\)"):
        fetch_pages(tmp_path, local_cfg(robots=False, retries=0))


@pytest.mark.parametrize("field, value, message", [
    ("retries", -2, "--retries: expected an integer >= 0, got -2"),
    ("read_timeout", -1.0, "--timeout: expected a finite number of seconds > 0, got -1.0"),
    ("connect_timeout", 0.0, "--timeout: expected a finite number of seconds > 0, got 0.0"),
    ("total_timeout", float("inf"), "--total-timeout: expected a finite number of seconds > 0, got inf"),
    ("host_delay", -3.0, "--host-delay: expected a finite number of seconds >= 0, got -3.0"),
    ("host_delay", float("nan"), "--host-delay: expected a finite number of seconds >= 0, got nan"),
    ("backoff", -1.0, "--backoff: expected a finite number of seconds >= 0, got -1.0"),
    ("max_redirects", -1, "--max-redirects: expected an integer >= 0, got -1"),
    ("max_crawl_delay", float("nan"), "max_crawl_delay: expected a finite number of seconds >= 0, got nan"),
    ("user_agent", "bot\r\nX-Injected: 1", "--user-agent: expected one line of printable text"),
    ("resolve", (("news.test", "localhost"),), "--resolve: expected HOST:ADDRESS with an IP address, got news.test:localhost"),
    ("concurrency", 0, "--concurrency: expected an integer >= 1, got 0"),
    ("per_host", 0, "--per-host: expected an integer >= 1, got 0"),
    ("max_bytes", 0, "--max-bytes: expected an integer >= 1, got 0"),
    ("total_timeout", 0.0, "--total-timeout: expected a finite number of seconds > 0, got 0.0"),
    ("user_agent", "   ", "--user-agent: expected one line of printable text"),
    ("allow_private", ("127.0.0.0/8", "intranet"), "--allow-private: "),
])
def test_fetch_refuses_bad_options_before_any_request_or_state(site, tmp_path, field, value, message):
    from gpt2kit.webtext import WebTextError

    make_links(tmp_path, [url(site, "news.test", "/a1")])
    with pytest.raises(WebTextError) as e:
        fetch_pages(tmp_path, local_cfg(robots=False, **{field: value}))
    assert str(e.value).startswith(message)
    assert site.hits() == [] and not (tmp_path / "_state" / "fetch").exists()


def test_cli_fetch_bad_retries_leaves_the_stage_to_a_corrected_rerun(site, tmp_path, cli):
    make_links(tmp_path, [url(site, "news.test", "/a1")])
    local = ["--no-progress", "--ignore-robots", "--allow-private", "127.0.0.0/8", "--resolve", "news.test:127.0.0.1",
             "--host-delay", "0"]
    r = cli("webtext", "fetch", str(tmp_path), *local, "--retries", "-2")
    assert r.returncode == 2 and r.stderr == "gpt2kit: error: --retries: expected an integer >= 0, got -2\n", r.stderr
    assert not (tmp_path / "_state" / "fetch").exists() and site.hits() == []
    r = cli("webtext", "fetch", str(tmp_path), *local, "--retries", "2")
    assert r.returncode == 0, r.stderr
    assert manifest(tmp_path)[url(site, "news.test", "/a1")]["status"] == "ok"


def write_dump(path: Path, rows: list, *, extra_lines: list[bytes] = ()) -> None:
    """A Reddit-style dump compressed with a long zstd window (as the public dumps are)."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"".join(extra_lines)
    from test_webtext import long_window_zst

    path.write_bytes(long_window_zst(data))


# ---------------------------------------------------------------------------------------------
# robots.txt as RFC 9309 reads it (the examples are Google's published ones for its parser, the
# reference implementation of the RFC): longest match wins, `*` and `$` are patterns, an allow
# rule wins a tie, and all the groups naming our product token are one group.

ROBOTS_CASES = [
    # (robots.txt rules for every agent, path, allowed)
    ("Allow: /\nDisallow: /private", "/private/x", False),
    ("Allow: /\nDisallow: /private", "/public/x", True),
    ("Disallow: /\nAllow: /news/", "/news/today", True),
    ("Disallow: /\nAllow: /news/", "/sports", False),
    ("Allow: /p\nDisallow: /", "/page", True),
    ("Allow: /folder\nDisallow: /folder", "/folder/page", True),
    ("Allow: /page\nDisallow: /*.htm", "/page.htm", False),
    ("Allow: /$\nDisallow: /", "/", True),
    ("Allow: /$\nDisallow: /", "/page.htm", False),
    ("Disallow: /fish*", "/fish.html", False),
    ("Disallow: /fish*", "/fishheads/yummy.html", False),
    ("Disallow: /fish*", "/fish.php?id=anything", False),
    ("Disallow: /fish*", "/Fish.asp", True),
    ("Disallow: /fish*", "/catfish", True),
    ("Disallow: /*.php$", "/folder/filename.php", False),
    ("Disallow: /*.php$", "/filename.php?parameters", True),
    ("Disallow: /*.php$", "/filename.php5", True),
    ("Disallow: /*.php$", "/windows.PHP", True),
    ("Disallow: /fish*.php", "/fishheads/catfish.php?parameters", False),
    ("Disallow: /*?", "/search?q=x", False),
    ("Disallow: /*?", "/search", True),
    ("Disallow:", "/anything", True),                         # an empty rule matches nothing
    ("Disallow: /caf%C3%A9", "/café", False),                 # compared percent-encoded (RFC 9309 §2.2.2)
    ("Disallow: /%62%61%7A", "/baz", False),
    ("Disallow: /\nAllow: /robots.txt", "/robots.txt", True),
    ("Disallow: /", "/robots.txt", True),                       # implicitly allowed (RFC 9309 §2.2.2)
    ("Disallow: /folder\nAllow: /folder", "/folder/page", True),  # a tie goes to allow in either order
    ("Disallow: /fish*", "/fish", False),                      # `*` matches no character too
    ("Disallow: /caf%c3%a9", "/café", False),                  # escapes compare without regard to case
    ("Disallow: /café", "/caf%C3%A9", False),
]


@pytest.mark.parametrize("rules, path, allowed", ROBOTS_CASES)
def test_robots_rules_follow_rfc_9309(rules, path, allowed):
    from gpt2kit.webtext.robots import RobotsRules

    robots = RobotsRules.parse(f"User-agent: *\n{rules}\n", "gpt2kit-webtext/1.0 (research)")
    assert robots.allowed(f"http://site.test{path}") is allowed


def test_robots_groups_for_our_token_are_merged_and_win_over_star():
    from gpt2kit.webtext.robots import RobotsRules

    text = ("\ufeffUser-agent: *\nDisallow: /\n\n"
            "user-agent: Gpt2kit-WebText\nDisallow: /a  # comment\nSitemap: http://site.test/map.xml\n\n"
            "User-agent: otherbot\nDisallow: /b\n\n"
            "User-agent: gpt2kit-webtext\nCrawl-delay: 7\nDisallow: /c\n")
    robots = RobotsRules.parse(text, "gpt2kit-webtext/1.0 (research)")
    assert [robots.allowed(f"http://site.test/{p}") for p in ("a", "b", "c", "d")] == [False, True, False, True]
    assert robots.crawl_delay == 7.0
    family = RobotsRules.parse("User-agent: *\nDisallow: /x\n\nUser-agent: gpt2kit\nDisallow: /\n", "gpt2kit-webtext/1.0")
    assert not family.allowed("http://site.test/any")
    other = RobotsRules.parse(text, "somebot/2.0")
    assert [other.allowed(f"http://site.test/{p}") for p in ("a", "d")] == [False, False]
    assert other.crawl_delay is None


def test_robots_group_lines_delays_and_stray_rules():
    from gpt2kit.webtext.robots import RobotsRules

    ua = "gpt2kit-webtext/1.0"
    # consecutive user-agent lines open one group: its rules are every named agent's
    for agents in ("gpt2kit-webtext\nUser-agent: otherbot", "otherbot\nUser-agent: gpt2kit-webtext"):
        robots = RobotsRules.parse(f"User-agent: {agents}\nDisallow: /x\n", ua)
        assert not robots.allowed("http://site.test/x") and robots.allowed("http://site.test/y"), agents
    # of several groups that name us, the longest Crawl-delay holds: never less polite than one asks
    two = RobotsRules.parse("User-agent: gpt2kit-webtext\nCrawl-delay: 3\n\nUser-agent: gpt2kit\nCrawl-delay: 7\n", ua)
    assert two.crawl_delay == 7.0
    for bad in ("inf", "nan", "-1", "soon"):
        assert RobotsRules.parse(f"User-agent: *\nCrawl-delay: {bad}\n", ua).crawl_delay is None, bad
    # rules before any user-agent line belong to no group
    stray = RobotsRules.parse("Disallow: /\nUser-agent: *\nDisallow: /x\n", ua)
    assert stray.allowed("http://site.test/y") and not stray.allowed("http://site.test/x")


def test_robots_allow_before_disallow_is_obeyed_by_the_fetcher(site, tmp_path):
    """`Allow: /` first and a Disallow after it: the disallowed page is never requested."""
    site.routes[("blog.test", "/robots.txt")] = (200, {"Content-Type": "text/plain"},
                                                 b"User-agent: *\nAllow: /\nDisallow: /drafts\nDisallow: /*.cgi$\n")
    for p in ("/drafts/1", "/post", "/run.cgi"):
        site.routes[("blog.test", p)] = (200, {"Content-Type": "text/html"}, page(article(12), "Post"))
    make_links(tmp_path, [url(site, "blog.test", p) for p in ("/drafts/1", "/post", "/run.cgi")])
    fetch_pages(tmp_path, local_cfg())
    m = manifest(tmp_path)
    assert {u.rsplit("/", 1)[1]: e["status"] for u, e in m.items()} == {
        "1": "robots_disallowed", "post": "ok", "run.cgi": "robots_disallowed"}
    assert site.hits("blog.test", "/drafts/1") == [] and site.hits("blog.test", "/run.cgi") == []


def test_redirect_to_an_internationalized_host_is_fetched(site, tmp_path):
    """A Location naming a host in Unicode is followed under its IDNA name (Host header, DNS, SNI)."""
    site.routes[("news.test", "/to-idn")] = (301, {"Location": f"http://bücher.test:{site.port}/buch"}, b"")
    site.routes[("xn--bcher-kva.test", "/buch")] = (200, {"Content-Type": "text/html"}, page(article(13), "Buch"))
    make_links(tmp_path, [url(site, "news.test", "/to-idn")])
    fetch_pages(tmp_path, local_cfg(robots=False, resolve=(("news.test", "127.0.0.1"), ("xn--bcher-kva.test", "127.0.0.1"))))
    e = manifest(tmp_path)[url(site, "news.test", "/to-idn")]
    assert (e["status"], e["final_url"], e["redirects"]) == ("ok", url(site, "xn--bcher-kva.test", "/buch"), 1), e
    assert site.hits("xn--bcher-kva.test", "/buch") == [("xn--bcher-kva.test", "/buch")]


def test_ipv6_literal_host_header_keeps_its_brackets():
    import asyncio

    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["host"])
        return httpx.Response(404)

    cfg = FetchConfig(robots=False, host_delay=0.0)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            fetcher = Fetcher(cfg, client, 4)
            return [await fetcher.get(f"http://[2606:4700::1111]{p}") for p in ("/a", ":8080/b")]

    assert [r.http_status for r in asyncio.run(go())] == [404, 404]
    assert seen == ["[2606:4700::1111]", "[2606:4700::1111]:8080"]   # RFC 9110 §7.2: the URI's authority


@pytest.mark.parametrize("address, allowed", [
    ("2002:7f00:1::1", False),            # 6to4 around 127.0.0.1
    ("2002:a9fe:a9fe::", False),          # 6to4 around the cloud metadata address
    ("2002:5db8:d822::1", True),          # 6to4 around a public address
    ("64:ff9b::7f00:1", False),           # NAT64 (RFC 6052) of 127.0.0.1
    ("64:ff9b::a00:5", False),
    ("64:ff9b::5db8:d822", True),         # what DNS64 answers for a public site on an IPv6-only host
    ("::ffff:93.184.216.34", True),       # IPv4-mapped (RFC 4291 §2.5.5.2): the public IPv4 host itself
    ("::ffff:10.0.0.1", False),
    ("4000::1", False),                   # reserved by IETF (outside 2000::/3), though not a private range
])
def test_ipv6_addresses_that_carry_an_ipv4_address_are_judged_by_it(address, allowed):
    assert address_allowed(address, None) is allowed


def test_host_delay_holds_when_requests_queue_for_a_global_slot(site, tmp_path):
    """Two requests to one host that both wait for the only global slot still start --host-delay apart."""
    started = {}

    def timed(name, delay=0.0):
        def route(handler):
            started[name] = time.monotonic()
            time.sleep(delay)
            return 200, {"Content-Type": "text/html"}, page(article(14), name)
        return route

    site.routes[("blog.test", "/hog")] = timed("hog", 0.6)      # holds the slot while news.test's two queue
    site.routes[("news.test", "/x")] = timed("x")
    site.routes[("news.test", "/y")] = timed("y")
    make_links(tmp_path, [url(site, "blog.test", "/hog"), url(site, "news.test", "/x"), url(site, "news.test", "/y")])
    fetch_pages(tmp_path, local_cfg(robots=False, concurrency=1, per_host=2, host_delay=0.3, read_timeout=3.0, total_timeout=5.0))
    assert {e["status"] for e in manifest(tmp_path).values()} == {"ok"}
    assert abs(started["y"] - started["x"]) >= 0.25, started


def test_a_temporary_dns_failure_is_retried_not_kept_for_the_host(site, tmp_path, monkeypatch):
    """EAI_AGAIN (a resolver that is busy) is retried like a connection error, and not remembered for
    the rest of the shard: every other link of that host would fail with it."""
    import socket

    real, calls = socket.getaddrinfo, []

    def flaky_getaddrinfo(host, *args, **kw):
        if host != "flakydns.test":
            return real(host, *args, **kw)
        calls.append(host)
        if len(calls) == 1:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", flaky_getaddrinfo)
    for p in ("/p1", "/p2"):
        site.routes[("flakydns.test", p)] = (200, {"Content-Type": "text/html"}, page(article(15), "Flaky DNS"))
    make_links(tmp_path, [url(site, "flakydns.test", p) for p in ("/p1", "/p2")])
    fetch_pages(tmp_path, local_cfg(robots=False, per_host=1))
    m = manifest(tmp_path)
    assert [(e["status"], e["attempts"]) for e in m.values()] == [("ok", 2), ("ok", 1)], m
    assert len(calls) == 2            # a good answer is still asked for once


def test_no_cookie_is_kept_or_sent(site, tmp_path):
    """Requests go to the checked address, so a cookie jar would file a site's cookies under its IP
    and send them to every other site on that IP (one CDN address serves thousands)."""
    seen = []

    def setter(handler):
        seen.append(handler.headers.get("Cookie"))
        return 200, {"Content-Type": "text/html", "Set-Cookie": "session=secret-of-news; Path=/"}, page(article(16), "C")

    def reader(handler):
        seen.append(handler.headers.get("Cookie"))
        return 200, {"Content-Type": "text/html"}, page(article(17), "R")

    site.routes[("news.test", "/set")] = setter
    site.routes[("news.test", "/then")] = reader
    site.routes[("other.test", "/read")] = reader
    make_links(tmp_path, [url(site, "news.test", "/set"), url(site, "news.test", "/then"), url(site, "other.test", "/read")])
    fetch_pages(tmp_path, local_cfg(robots=False, concurrency=1, per_host=1))
    assert site.hits()[0] == ("news.test", "/set") and len(site.hits()) == 3
    assert seen == [None, None, None]


# ---------------------------------------------------------------------------------------------
# Politeness across worker processes. Links are bucketed by host, but a redirect leads anywhere:
# here every shard's links redirect to one hub host, which several processes then reach at once.


def make_shards(work: Path, shards: list[list[str]]) -> None:
    from gpt2kit.webtext.work import write_jsonl_zst

    for k, urls in enumerate(shards):
        write_jsonl_zst(work / "links" / f"links-{k:05d}.jsonl.zst",
                        [{"url": u, "score": 5, "created_utc": 1500000000, "subreddit": "news", "posts": 1}
                         for u in sorted(urls)])
    WorkFolder(work).finish("links", list(range(len(shards))), {"links": sum(map(len, shards))})


def hub_site(site, *, hub_robots: bytes | None, answer_s: float, shards: int = 2, per_shard: int = 3):
    """Shards of links on their own hosts, each redirecting to the hub; returns (shards of URLs,
    hosts, the hub's requests as (path, start, end) in server time)."""
    hub_requests: list[tuple[str, float, float]] = []

    def timed(path, status, headers, body, pause=0.0):
        def route(handler):
            start = time.monotonic()
            time.sleep(pause)
            with site.lock:
                hub_requests.append((path, start, time.monotonic()))
            return status, headers, body
        return route

    html = {"Content-Type": "text/html"}
    if hub_robots is not None:
        site.routes[("hub.test", "/robots.txt")] = timed("/robots.txt", 200, {"Content-Type": "text/plain"}, hub_robots)
    else:
        site.routes[("hub.test", "/robots.txt")] = timed("/robots.txt", 404, html, b"")
    hosts, urls = ["hub.test"], []
    for k in range(shards):
        shard = []
        for i in range(per_shard):
            host, target = f"src{k}-{i}.test", f"/p{k}-{i}"
            hosts.append(host)
            site.routes[(host, "/go")] = (301, {"Location": f"http://hub.test:{site.port}{target}"}, b"")
            site.routes[("hub.test", target)] = timed(target, 200, html, page(article(20 + i), "Hub"), answer_s)
            shard.append(url(site, host, "/go"))
        urls.append(shard)
    return urls, hosts, hub_requests


def test_host_delay_and_crawl_delay_hold_across_processes_for_redirect_targets(site, tmp_path):
    """Two processes whose links all redirect to one host: every request to it, robots.txt
    included, starts --host-delay after the one before, and once its robots.txt has been read,
    Crawl-delay after, whichever process sends it."""
    shards, hosts, hub = hub_site(site, hub_robots=b"User-agent: *\nCrawl-delay: 0.8\n", answer_s=0.0)
    make_shards(tmp_path, shards)
    cfg = local_cfg(resolve=tuple((h, "127.0.0.1") for h in hosts), host_delay=0.4, per_host=2,
                    read_timeout=3.0, total_timeout=10.0)
    fetch_pages(tmp_path, cfg, Runner(workers=2))
    statuses = [e["status"] for k in range(2)
                for e in read_jsonl_zst(tmp_path / "fetch" / f"fetch-{k:05d}.manifest.jsonl.zst")]
    assert statuses == ["ok"] * 6
    starts = sorted(start for _, start, _ in hub)
    robots = [p for p, _, _ in hub if p == "/robots.txt"]
    assert len(starts) - len(robots) == 6 and 1 <= len(robots) <= 2  # the second shard asks too if it starts first
    gaps = [b - a for a, b in zip(starts, starts[1:])]   # as the server saw them: a little jitter
    assert min(gaps) >= 0.28, (gaps, sorted(hub, key=lambda r: r[1]))
    # a second robots.txt may start before the first one's Crawl-delay is known; nothing after it
    assert min(gaps[1:]) >= 0.68, (gaps, sorted(hub, key=lambda r: r[1]))


def test_per_host_limit_holds_across_processes_for_redirect_targets(site, tmp_path):
    """--per-host 1 and slow answers from the host every redirect leads to: never two requests in
    flight to it, although two processes follow redirects there."""
    shards, hosts, hub = hub_site(site, hub_robots=None, answer_s=0.3)
    make_shards(tmp_path, shards)
    cfg = local_cfg(resolve=tuple((h, "127.0.0.1") for h in hosts), robots=False, host_delay=0.0, per_host=1,
                    read_timeout=3.0, total_timeout=10.0)
    fetch_pages(tmp_path, cfg, Runner(workers=2))
    spans = sorted((start, end) for _, start, end in hub)
    assert len(spans) == 6
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert not overlaps, spans


def test_a_work_folder_that_cannot_lock_files_is_refused_before_any_request(site, tmp_path, monkeypatch):
    """Without POSIX locks (an NFS mount without its lock service) every request would fail with
    the shared schedule's error; the stage says so once instead, naming the file."""
    import errno
    import fcntl

    from gpt2kit.webtext import WebTextError

    def no_locks(*args, **kw):
        raise OSError(errno.ENOLCK, "No locks available")

    make_links(tmp_path, [url(site, "news.test", "/a1")])
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(WebTextError, match=r"hosts\.bin: the work folder's file system does not lock files"):
        fetch_pages(tmp_path, local_cfg(robots=False))
    assert site.hits() == []


@pytest.mark.parametrize("location", ["http://[::1/x", "http://news.test:80:80/", "/path\twith\x01control",
                                      "http://a]b/", "http://[a/"])   # the last two pass httpx, not urlsplit
def test_redirect_to_an_invalid_url_is_bad_url_after_one_request(location):
    """A redirect whose Location cannot be a URL: one request and `bad_url` (read as a connection
    error, it was retried as if the host were down, and reported so)."""
    import asyncio

    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(302, headers={"Location": location})

    cfg = FetchConfig(robots=False, host_delay=0.0, retries=2, backoff=0.01)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await Fetcher(cfg, client, 4).get("http://93.184.216.34/start")

    res = asyncio.run(go())
    assert (res.status, res.attempts, seen) == ("bad_url", 1, ["/start"]), res
    assert "location header" in res.error or location in res.error


@pytest.mark.parametrize("encoding, eol", [("identity", "\n"), ("gzip", "\n"), ("identity", "\r"), ("identity", "\r\n")],
                         ids=["LF", "LF-gzip", "CR", "CRLF"])
def test_a_robots_txt_past_the_size_limit_is_read_up_to_it(site, tmp_path, encoding, eol):
    """RFC 9309 §2.5: a crawler parses at least 500 KiB of robots.txt; what lies past its limit is
    ignored, not a reason to forbid the whole site. The line the limit cuts is dropped too: cut,
    `Allow: /bar-and-more` would become a wider `Allow: /b`. RFC 9309 §2.2 lets lines end in CR
    alone (old Mac files): cutting only at the last LF dropped all of such a file, allowing the whole site."""
    head = f"User-agent: *{eol}Disallow: /private{eol}"
    # the limit falls inside the Allow line of the next group of rules
    text = (head + "# " + "x" * (512_000 - len(head) - 30) + f"{eol}Disallow: /b{eol}Allow: /bar-and-more{eol}"
            + f"# padding{eol}" * 20_000)
    body = text.encode()
    assert body.index(b"Allow: /bar-and-more") + len("Allow: /b") < 512_000 < body.index(b"# padding")
    headers = {"Content-Type": "text/plain"}
    if encoding == "gzip":
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    site.routes[("news.test", "/robots.txt")] = (200, headers, body)
    for p in ("/public", "/private/x", "/bar-and-more"):
        site.routes[("news.test", p)] = (200, {"Content-Type": "text/html"}, page(article(18), "Big robots"))
    make_links(tmp_path, [url(site, "news.test", p) for p in ("/public", "/private/x", "/bar-and-more")])
    fetch_pages(tmp_path, local_cfg(max_bytes=5_000_000))
    m = manifest(tmp_path)
    assert {u.rsplit("/", 1)[1]: e["status"] for u, e in m.items()} == {
        "public": "ok", "x": "robots_disallowed", "bar-and-more": "robots_disallowed"}
    assert {p for _, p in site.hits()} == {"/robots.txt", "/public"}


@pytest.mark.parametrize("shared", [True, False])
def test_retry_after_holds_the_whole_host(site, tmp_path, shared):
    """A 429's Retry-After asks the client, not one URL, to wait: no request to that host starts
    before it has passed (the other links of the host went on at --host-delay). With the stage's
    shared schedule, and in a Fetcher on its own."""
    starts: list[tuple[str, float]] = []

    def route(name, limited=False):
        def answer(handler):
            starts.append((name, time.monotonic()))
            if limited and len([n for n, _ in starts if n == name]) == 1:
                return 429, {"Retry-After": "1"}, b"slow down"
            return 200, {"Content-Type": "text/html"}, page(article(19), name)
        return answer

    for name in ("h1", "h2", "h3"):
        site.routes[("news.test", f"/{name}")] = route(name, limited=name == "h1")
    links = [url(site, "news.test", f"/{name}") for name in ("h1", "h2", "h3")]
    cfg = local_cfg(robots=False, per_host=2, host_delay=0.2, backoff=0.01)
    if shared:
        make_links(tmp_path, links)
        fetch_pages(tmp_path, cfg)
        assert {e["status"] for e in manifest(tmp_path).values()} == {"ok"}
    else:
        import asyncio

        import httpx

        async def go():
            async with httpx.AsyncClient(trust_env=False) as client:
                fetcher = Fetcher(cfg, client, 4)
                first = asyncio.create_task(fetcher.get(links[0]))
                await asyncio.sleep(0.05)                      # h1 first, as the stage's queue would
                rest = asyncio.gather(*(fetcher.get(u) for u in links[1:]))
                return [await first, *await rest]

        assert [r.status for r in asyncio.run(go())] == ["ok"] * 3
    first = starts[0]
    assert first[0] == "h1" and len(starts) == 4
    assert all(t - first[1] >= 0.9 for _, t in starts[1:]), [(n, round(t - first[1], 2)) for n, t in starts]


def test_robots_txt_is_asked_once_for_all_shards(site, tmp_path):
    """Every shard whose links redirect to a host needs its robots.txt; the stage asks the host
    once (fetching it per shard spent a popular host's politeness budget on robots.txt). A 5xx
    answer is not kept: the next shard asks again, a passing outage must not forbid the host."""
    site.routes[("news.test", "/robots.txt")] = (200, {"Content-Type": "text/plain"},
                                                 b"User-agent: *\nDisallow: /private/\n")
    shards = [[url(site, "news.test", "/a1"), url(site, "other.test", "/page")],
              [url(site, "news.test", "/a2"), url(site, "other.test", "/page2")],
              [url(site, "news.test", "/private/secret")]]
    make_shards(tmp_path, shards)
    fetch_pages(tmp_path, local_cfg(retries=0))
    assert len(site.hits("news.test", "/robots.txt")) == 1
    assert len(site.hits("other.test", "/robots.txt")) == 2          # 503 each time: asked by each shard
    statuses = {e["url"].split(str(site.port))[1]: e["status"] for k in range(3)
                for e in read_jsonl_zst(tmp_path / "fetch" / f"fetch-{k:05d}.manifest.jsonl.zst")}
    assert statuses == {"/a1": "ok", "/a2": "ok", "/private/secret": "robots_disallowed",
                        "/page": "robots_disallowed", "/page2": "robots_disallowed"}


def test_a_kept_robots_txt_expires_after_a_day(site, tmp_path, monkeypatch):
    """RFC 9309 §2.4: a cached robots.txt is not used for more than 24 hours."""
    import gpt2kit.webtext.fetch as fetch_module

    make_shards(tmp_path, [[url(site, "news.test", "/a1")]])
    fetch_pages(tmp_path, local_cfg())
    WorkFolder(tmp_path).done_path("fetch", "fetch-00000").unlink()   # fetch the shard again...
    from types import SimpleNamespace

    later = SimpleNamespace(time=lambda: time.time() + 25 * 3600, monotonic=time.monotonic)
    monkeypatch.setattr(fetch_module, "time", later)                           # ...a day later
    fetch_pages(tmp_path, local_cfg())
    assert len(site.hits("news.test", "/robots.txt")) == 2


def test_concurrency_is_the_total_on_a_running_dask_cluster(site, tmp_path):
    """--concurrency is the number of requests in flight in total: on a running cluster
    (--dask-address) it is shared among the cluster's worker threads, whatever --workers says
    (it was divided by --workers, 1 unless given, so each of N workers took all of it)."""
    from distributed import LocalCluster

    in_flight, peak = [0], [0]

    def slow(handler):
        with site.lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.4)
        with site.lock:
            in_flight[0] -= 1
        return 200, {"Content-Type": "text/html"}, page(article(21), "Slow")

    hosts = [f"c{k}.test" for k in range(8)]
    for h in hosts:
        site.routes[(h, "/p")] = slow
    make_shards(tmp_path, [[url(site, h, "/p") for h in hosts[:4]], [url(site, h, "/p") for h in hosts[4:]]])
    cfg = local_cfg(robots=False, concurrency=2, resolve=tuple((h, "127.0.0.1") for h in hosts),
                    read_timeout=3.0, total_timeout=10.0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        fetch_pages(tmp_path, cfg, Runner(engine="dask", dask_address=cluster.scheduler_address))
    assert len(site.hits()) == 8 and peak[0] <= 2, peak


def test_a_host_named_with_its_final_dot_is_the_same_host(site):
    """`example.com.` is `example.com` (the resolver already says so): a redirect naming the host
    with its final dot must wait its turn behind the host's other requests."""
    import asyncio

    import httpx

    starts = []

    def route(handler):
        starts.append(time.monotonic())
        return 200, {"Content-Type": "text/html"}, b"<html>ok</html>"

    site.routes[("news.test", "/a")] = site.routes[("news.test.", "/b")] = route
    cfg = local_cfg(robots=False, host_delay=0.5)

    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            fetcher = Fetcher(cfg, client, 4)
            return await asyncio.gather(fetcher.get(url(site, "news.test", "/a")), fetcher.get(url(site, "news.test.", "/b")))

    assert [r.status for r in asyncio.run(go())] == ["ok", "ok"]
    assert abs(starts[1] - starts[0]) >= 0.38, starts  # (a late handler thread: tens of ms)


@pytest.mark.parametrize("damage", ["{not json", '{"origin": "%s", "fetched": 1e18, "http_status": 200}',
                                    '{"origin": "%s", "fetched": "%s", "http_status": 200, "final_url": null, "text": 5}'])
def test_a_damaged_kept_robots_txt_is_asked_again(site, tmp_path, damage):
    from gpt2kit.webtext.fetch import RobotsStore

    origin = f"http://news.test:{site.port}"
    store = RobotsStore(tmp_path / "_state" / "fetch" / "robots")
    path = store._path(origin)
    path.parent.mkdir(parents=True)
    path.write_text(damage.replace('"%s"', f'"{origin}"', 1).replace('"%s"', str(time.time())))
    make_shards(tmp_path, [[url(site, "news.test", "/a1"), url(site, "news.test", "/private/secret")]])
    fetch_pages(tmp_path, local_cfg())
    assert [e["status"] for e in manifest(tmp_path).values()] == ["ok", "robots_disallowed"]
    assert len(site.hits("news.test", "/robots.txt")) == 1


# Real NFS and CIFS lines as /proc/self/mountinfo shows them (options shortened).
_MOUNTINFO = """\
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
40 25 0:50 / /shared rw,relatime shared:30 - nfs fs1:/export rw,vers=3,hard,proto=tcp,nolock,local_lock=all,addr=10.0.0.2
41 25 0:51 / /locked rw,relatime shared:31 - nfs fs1:/other rw,vers=3,hard,proto=tcp,local_lock=none,addr=10.0.0.2
42 25 0:52 / /v4 rw,relatime shared:32 - nfs4 fs2:/ rw,vers=4.2,hard,proto=tcp,local_lock=posix,addr=10.0.0.3
43 25 0:53 / /smb rw,relatime shared:33 - cifs //nas/share rw,vers=3.0,nobrl,cache=strict
44 25 0:54 / /my\\040work rw,relatime shared:34 - nfs4 fs2:/w rw,vers=4.2,hard,proto=tcp,local_lock=none,addr=10.0.0.3
"""


@pytest.mark.parametrize("device, reason", [
    ((0, 50), "nfs mount /shared (fs1:/export) with nolock"), ((0, 51), None),
    ((0, 52), "nfs4 mount /v4 (fs2:/) with local_lock=posix"), ((0, 53), "cifs mount /smb (//nas/share) with nobrl"),
    ((0, 54), None), ((8, 1), None), ((9, 9), None)])
def test_mounts_whose_locks_stay_on_this_machine_are_recognized(device, reason):
    """NFS mounted with -o nolock (or local_lock=posix|all) and CIFS with nobrl lock files, so the
    schedule's lock check passes, but only among this machine's processes: fetch processes on
    other machines would silently stop sharing the per-host schedule."""
    from gpt2kit.webtext.hosts import local_lock_reason

    assert local_lock_reason(_MOUNTINFO, *device) == reason


def test_a_cluster_is_warned_when_the_schedule_locks_stay_on_one_machine(tmp_path, monkeypatch, caplog):
    from gpt2kit.webtext import fetch as fetch_module
    from gpt2kit.webtext.hosts import locks_local_only

    assert locks_local_only(tmp_path) is None            # the test machine's own disk (or tmpfs)
    monkeypatch.setattr(fetch_module, "locks_local_only", lambda path: "nfs mount /w (fs:/w) with nolock")
    for runner, warned in ((Runner(workers=4), False), (Runner(engine="dask"), False),
                           (Runner(engine="dask", dask_address="tcp://sched:8786"), True)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            fetch_module.warn_if_locks_local(str(tmp_path / "hosts.bin"), runner)
        assert bool(caplog.records) is warned, runner
    assert "hosts.bin" in caplog.text and "nolock" in caplog.text and "other machines" in caplog.text


def test_a_host_wait_is_capped_when_the_clock_went_back():
    """A start recorded 1000 s in the future (a clock set back, another machine's clock ahead) waits at
    most the longest the host can ask: its delay or the Retry-After cap, whichever is longer."""
    from gpt2kit.webtext.hosts import _wait

    assert _wait(last=10.0, delay=2.0, now=11.0, cap=5.0) == 1.0
    assert _wait(last=1000.0, delay=2.0, now=0.0, cap=5.0) == 5.0
    assert _wait(last=1000.0, delay=10.0, now=0.0, cap=5.0) == 10.0
    assert _wait(last=0.0, delay=2.0, now=5.0, cap=5.0) == 0.0


def test_a_shared_schedule_keeps_the_longest_delay_and_a_hold_from_now(tmp_path):
    from gpt2kit.webtext.hosts import open_schedule

    with open_schedule(tmp_path / "hosts.bin") as s:
        s.slow_down("slow.test", 5.0)          # a Crawl-delay one process read
        s.slow_down("slow.test", 1.0)          # a smaller one learned later does not shrink it
        assert s.claim("slow.test", 1.0, take=True, cap=60.0) == 0.0
        assert 4.5 < s.claim("slow.test", 1.0, take=False, cap=60.0) <= 5.0
        # Retry-After: 3 s from now, whatever the delay
        s.slow_down("held.test", 1.0, hold=3.0)
        assert 2.5 < s.claim("held.test", 1.0, take=False, cap=60.0) <= 3.0
        # --per-host 2: two places in flight, not a third
        places = [s.take_turn("busy.test", 2) for _ in range(3)]
        assert places[0] is not None and places[1] is not None and places[2] is None
        for p in places[:2]:
            s.end_turn(p)


def test_a_retry_after_is_held_at_most_max_hold():
    from gpt2kit.webtext.hosts import HostGate

    gate = HostGate("h.test", per_host=1, delay=0.5, max_hold=2.0)
    gate.hold(3600.0)
    assert 1.5 < gate._claim(take=False) <= 2.0


def test_retry_after_dates_are_gmt_whatever_zone_they_name(monkeypatch):
    # an HTTP-date is GMT (RFC 9110); "-0000" (which email.utils reads as "no zone") was taken as
    # this machine's local time: hours off wherever that is not UTC
    from email.utils import formatdate

    from gpt2kit.webtext.fetch import _retry_after

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        soon = time.time() + 120
        for text in (formatdate(soon, usegmt=True), formatdate(soon, usegmt=True).replace("GMT", "-0000"),
                     formatdate(soon, usegmt=True).replace("GMT", "+0000")):
            assert 100 < _retry_after(text) <= 120, text
        assert _retry_after("30") == 30.0 and _retry_after("-5") == 0.0 and _retry_after("soon") is None
        assert _retry_after(formatdate(time.time() - 3600, usegmt=True)) == 0.0     # a date already past
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# ---------------------------------------------------------------------------------------------
# One Fetcher against an in-memory transport: what each answer becomes. Names resolve through
# `resolve=` (public addresses: the transport answers them, no traffic leaves this process).

MOCK_HOSTS = (("public.test", "93.184.216.34"), ("other.test", "93.184.216.35"), ("internal.test", "10.1.2.3"))
HTML = {"Content-Type": "text/html"}


def answer(code: int, headers: dict | None = None, body: bytes = b"", *, declared: bool = True):
    """A response whose body streams as a server's would (in chunks), with its length declared or not."""
    import httpx

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):
            for k in range(0, len(body), 4096):
                yield body[k:k + 4096]

    framing = {"Content-Length": str(len(body))} if declared else {"Transfer-Encoding": "chunked"}
    return httpx.Response(code, headers={**(headers or {}), **framing}, stream=Body())


def mock_get(handler, target: str, **kw):
    """Fetcher.get(target) with `handler` answering every request, on a FetchConfig made of `kw`."""
    import asyncio

    import httpx

    cfg = FetchConfig(**{"resolve": MOCK_HOSTS, "robots": False, "host_delay": 0.0, "retries": 1, "backoff": 0.01, **kw})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await Fetcher(cfg, client, 4).get(target)

    return asyncio.run(go())


def routes(table: dict, seen: list):
    """A handler answering (Host, path?query) from `table`: a Response, or a list of them served in turn."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        key = (request.headers["host"], request.url.raw_path.decode())
        seen.append(key)
        answer = table.get(key, httpx.Response(404))
        return answer.pop(0) if isinstance(answer, list) else answer

    return handler


def test_https_goes_to_the_checked_address_with_the_name_for_tls_and_keeps_the_query():
    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["host"], request.extensions.get("sni_hostname")))
        return answer(200, HTML, b"<html>ok</html>")

    res = mock_get(handler, "https://public.test/search?q=flood&page=2")
    assert (res.status, res.body, res.address) == ("ok", b"<html>ok</html>", "93.184.216.34")
    assert seen == [("https://93.184.216.34/search?q=flood&page=2", "public.test", "public.test")]
    for bad in ("http:///no-host", "ftp://public.test/file", "http://public.test:99999/x"):   # no request at all
        res = mock_get(handler, bad)
        assert (res.status, res.attempts) == ("bad_url", 0 if "99999" not in bad else 1), (bad, res)
    assert len(seen) == 1


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_every_redirect_is_followed_and_a_relative_one_from_where_it_was_answered(code):
    import httpx

    seen = []
    handler = routes({("public.test", "/start"): httpx.Response(code, headers={"Location": "http://other.test/a/b"}),
                      ("other.test", "/a/b"): httpx.Response(302, headers={"Location": "c?x=1"}),
                      ("other.test", "/a/c?x=1"): answer(200, HTML, b"<html>c</html>")}, seen)
    res = mock_get(handler, "http://public.test/start")
    assert (res.status, res.final_url, res.redirects, res.attempts) == ("ok", "http://other.test/a/c?x=1", 2, 3), res
    assert res.url == "http://public.test/start" and res.body == b"<html>c</html>"


def test_attempts_add_up_over_the_hops_of_a_redirect():
    import httpx

    seen = []
    handler = routes({("public.test", "/start"): [httpx.Response(503), httpx.Response(302, headers={"Location": "/next"})],
                      ("public.test", "/next"): answer(200, HTML, b"<html>n</html>")}, seen)
    res = mock_get(handler, "http://public.test/start")
    assert (res.status, res.attempts, res.redirects) == ("ok", 3, 1)
    assert seen == [("public.test", "/start")] * 2 + [("public.test", "/next")]


def test_a_redirect_target_is_checked_against_its_robots_txt():
    import httpx

    seen = []
    handler = routes({("public.test", "/robots.txt"): answer(200, {}, b"User-agent: *\nDisallow: /private\n"),
                      ("public.test", "/start"): httpx.Response(302, headers={"Location": "/private/x"}),
                      ("public.test", "/private/x"): answer(200, HTML, b"<html>no</html>")}, seen)
    res = mock_get(handler, "http://public.test/start", robots=True)
    assert (res.status, res.final_url, res.redirects) == ("robots_disallowed", "http://public.test/private/x", 1), res
    assert ("public.test", "/private/x") not in seen


@pytest.mark.parametrize("code, status, attempts", [(500, "ok", 2), (503, "ok", 2), (204, "http_error", 1),
                                                    (206, "http_error", 1), (404, "http_error", 1)])
def test_5xx_is_retried_and_only_a_200_is_a_page(code, status, attempts):
    seen = []
    page_ = answer(200, HTML, b"<html>p</html>")
    handler = routes({("public.test", "/p"): [answer(code, HTML, b"<html>x</html>"), page_]}, seen)
    res = mock_get(handler, "http://public.test/p")
    assert (res.status, res.attempts) == (status, attempts)
    assert res.http_status == (200 if status == "ok" else code)


def test_after_the_last_retry_the_servers_answer_is_reported():
    import httpx

    res = mock_get(lambda request: httpx.Response(503, headers={"Retry-After": "0"}), "http://public.test/p", retries=2)
    assert (res.status, res.http_status, res.attempts) == ("http_error", 503, 3)


@pytest.mark.parametrize("ctype, status", [(None, "ok"), ("application/xhtml+xml", "ok"), ("Text/HTML; Charset=UTF-8", "ok"),
                                           ("application/pdf", "not_html"), ("text/plain", "not_html")])
def test_pages_are_told_by_their_content_type(ctype, status):
    headers = {} if ctype is None else {"Content-Type": ctype}
    res = mock_get(lambda request: answer(200, headers, b"<html>p</html>"), "http://public.test/p")
    assert res.status == status
    if status == "not_html":
        assert res.error == ctype.lower() and res.body is None


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_the_body_limit_is_inclusive(declared):
    for size, status in ((1000, "ok"), (1001, "too_large")):
        body = b"<html>" + b"x" * (size - 6)
        res = mock_get(lambda request: answer(200, HTML, body, declared=declared),
                       "http://public.test/p", max_bytes=1000)
        assert res.status == status, (size, res)
        assert res.body == (body if status == "ok" else None)


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", "deflate"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_stored_headers_describe_the_stored_body(encoding, declared):
    """The body is kept decoded: the headers say nothing of the encoding or of the chunks it came
    in, and give the length of what is stored (the WARC record's payload)."""
    import zlib

    body = page(article(22), "Encoded")
    wire = zlib.compress(body) if encoding == "deflate" else gzip.compress(body)
    headers = {**HTML, "Content-Encoding": encoding, "X-Kept": "yes"}
    res = mock_get(lambda request: answer(200, headers, wire, declared=declared),
                   "http://public.test/p")
    assert (res.status, res.body) == ("ok", body)
    framing = [(k.lower(), v) for k, v in res.headers
               if k.lower() in ("content-length", "content-encoding", "transfer-encoding")]
    assert framing == [("content-length", str(len(body)))]
    assert ("x-kept", "yes") in [(k.lower(), v) for k, v in res.headers]


@pytest.mark.parametrize("encoding, wire", [("br", b"\x1b\x03"), ("gzip", b"\x1f\x8b\x08\x00not gzip at all")])
def test_a_body_that_cannot_be_decoded_is_bad_encoding(encoding, wire):
    res = mock_get(lambda request: answer(200, {**HTML, "Content-Encoding": encoding}, wire),
                   "http://public.test/p", retries=2)
    assert (res.status, res.attempts, res.body) == ("bad_encoding", 1, None)


def test_pauses_between_attempts_double_and_follow_retry_after_up_to_the_cap(monkeypatch):
    """The pause before attempt k is --backoff * 2^(k-1), or the server's Retry-After if longer,
    capped at max_crawl_delay (an hour's Retry-After must not stall a slot for an hour)."""
    import asyncio
    from types import SimpleNamespace

    import httpx

    import gpt2kit.webtext.fetch as fetch_module

    pauses = []
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(fetch_module, "asyncio", SimpleNamespace(**{**vars(asyncio), "sleep": sleep}))
    res = mock_get(lambda request: httpx.Response(503), "http://public.test/p", retries=3, backoff=0.01)
    assert (res.status, res.attempts) == ("http_error", 4)
    assert pauses == pytest.approx([0.01, 0.02, 0.04])
    pauses.clear()
    seen = []
    handler = routes({("public.test", "/p"): [httpx.Response(429, headers={"Retry-After": "3600"}),
                                              httpx.Response(503, headers={"Retry-After": "0.03"}),
                                              answer(200, HTML, b"<html>p</html>")]}, seen)
    res = mock_get(handler, "http://public.test/p", retries=2, backoff=0.01, max_crawl_delay=0.05)
    assert (res.status, res.attempts) == ("ok", 3)
    assert pauses == pytest.approx([0.05, 0.03])


def test_a_name_that_does_not_resolve_is_not_retried():
    import asyncio
    import socket

    import httpx

    cfg = FetchConfig(robots=False, host_delay=0.0, retries=2, backoff=0.01)
    seen, lookups = [], []

    async def go():
        async def getaddrinfo(host, port, **kw):
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200))) as client:
            fetcher = Fetcher(cfg, client, 4)
            return [await fetcher.get(f"http://nowhere.test/{k}") for k in range(2)]

    results = asyncio.run(go())
    assert [(r.status, r.attempts) for r in results] == [("dns_error", 1), ("dns_error", 1)]
    assert "nowhere.test" in results[0].error and lookups == ["nowhere.test"] and seen == []   # asked once


def test_resolver_names_are_case_blind_and_an_empty_or_unencodable_answer_is_refused():
    import asyncio
    import socket

    from gpt2kit.webtext.fetch import Refused

    r = Resolver(FetchConfig(resolve=(("News.Test.", "93.184.216.34"),)))

    async def go():
        loop = asyncio.get_running_loop()
        real_getaddrinfo = loop.getaddrinfo

        async def getaddrinfo(host, port, **kw):
            if host == "empty.test":
                return []
            if len(host) > 63:
                return await real_getaddrinfo(host, port, **kw)    # IDNA refuses it before any lookup
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: not in the test's DNS")

        loop.getaddrinfo = getaddrinfo
        assert await r.resolve("news.test") == "93.184.216.34"
        assert await r.resolve("NEWS.test.") == "93.184.216.34"
        with pytest.raises(Refused, match="empty.test resolves to nothing"):
            await r.resolve("empty.test")
        with pytest.raises(socket.gaierror):
            await r.resolve("a" * 64 + ".test")

    asyncio.run(go())


@pytest.mark.parametrize("code, status", [(400, "ok"), (404, "ok"), (410, "ok"), (429, "robots_disallowed"),
                                          (500, "robots_disallowed"), (503, "robots_disallowed")])
def test_a_robots_txt_error_allows_all_unless_the_host_is_failing_or_busy(code, status):
    """RFC 9309 §2.3.1.3-4: a 4xx robots.txt means none (crawl freely), a 5xx means the host is
    unreachable (crawl nothing); a 429 is read as the host asking for fewer requests."""
    import httpx

    seen = []
    handler = routes({("public.test", "/robots.txt"): httpx.Response(code),
                      ("public.test", "/p"): answer(200, HTML, b"<html>p</html>")}, seen)
    res = mock_get(handler, "http://public.test/p", robots=True, retries=0)
    assert res.status == status
    assert (("public.test", "/p") in seen) is (status == "ok")


def test_a_robots_txt_redirected_to_a_refused_address_forbids_the_host():
    """The host answered; its robots.txt just cannot be read: its pages are robots_disallowed, not
    `blocked_address` (which says the host itself may not be reached)."""
    import httpx

    seen = []
    handler = routes({("public.test", "/robots.txt"): httpx.Response(301, headers={"Location": "http://internal.test/robots.txt"}),
                      ("public.test", "/p"): answer(200, HTML, b"<html>p</html>")}, seen)
    res = mock_get(handler, "http://public.test/p", robots=True)
    assert (res.status, res.final_url) == ("robots_disallowed", "http://public.test/p")
    assert seen == [("public.test", "/robots.txt")]


@pytest.mark.parametrize("failure", ["timeout", "connection_error", "dns_error"])
def test_a_host_unreachable_for_its_robots_txt_is_reported_as_unreachable(failure):
    """When robots.txt cannot be asked because the host cannot be reached, its pages say why
    (timeout, connection_error, dns_error), not robots_disallowed: a rerun may get them."""
    import asyncio
    import socket

    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if failure == "timeout":
            raise httpx.ReadTimeout("no answer", request=request)
        raise httpx.ConnectError("connection refused", request=request)

    cfg = FetchConfig(resolve=MOCK_HOSTS, host_delay=0.0, retries=1, backoff=0.01)

    async def go():
        async def getaddrinfo(host, port, **kw):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        asyncio.get_running_loop().getaddrinfo = getaddrinfo
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await Fetcher(cfg, client, 4).get("http://gone.test/p" if failure == "dns_error" else "http://public.test/p")

    res = asyncio.run(go())
    assert res.status == failure and res.error
    assert seen == ([] if failure == "dns_error" else ["/robots.txt", "/robots.txt"])   # never the page


# ---------------------------------------------------------------------------------------------
# The stage around the fetcher


@pytest.mark.parametrize("kept, used", [("fresh", True), ("future", False), ("other-origin", False)])
def test_a_kept_robots_txt_is_used_only_for_its_origin_and_its_day(site, tmp_path, kept, used):
    """A kept answer fetched 'in the future' (a clock set back) is not trusted for a day more, nor an
    answer filed under this origin's name for another one."""
    from gpt2kit.webtext.fetch import RobotsStore

    origin = f"http://news.test:{site.port}"
    store = RobotsStore(tmp_path / "_state" / "fetch" / "robots")
    record = {"origin": origin, "fetched": time.time(), "http_status": 200, "final_url": origin + "/robots.txt",
              "text": "User-agent: *\nAllow: /\n"}
    if kept == "future":
        record["fetched"] += 3600
    if kept == "other-origin":
        record["origin"] = f"http://blog.test:{site.port}"
    store._path(origin).parent.mkdir(parents=True)
    store._path(origin).write_text(json.dumps(record))
    make_shards(tmp_path, [[url(site, "news.test", "/a1"), url(site, "news.test", "/private/secret")]])
    fetch_pages(tmp_path, local_cfg())
    assert [e["status"] for e in manifest(tmp_path).values()] == ["ok", "ok" if used else "robots_disallowed"]
    assert len(site.hits("news.test", "/robots.txt")) == (0 if used else 1)


def test_a_missing_robots_txt_is_asked_once_for_all_shards(site, tmp_path):
    """A 404 is an answer about the host (no restrictions) and is kept like a robots.txt."""
    make_shards(tmp_path, [[url(site, "news.test", "/a1")], [url(site, "news.test", "/a2")]])
    site.routes.pop(("news.test", "/robots.txt"))
    fetch_pages(tmp_path, local_cfg())
    assert len(site.hits("news.test", "/robots.txt")) == 1
    assert {e["status"] for k in range(2) for e in read_jsonl_zst(tmp_path / "fetch" / f"fetch-{k:05d}.manifest.jsonl.zst")} == {"ok"}


def test_proxies_from_the_environment_are_ignored(site, tmp_path, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")     # nothing listens there
    make_links(tmp_path, [url(site, "news.test", "/a1")])
    fetch_pages(tmp_path, local_cfg(robots=False))
    assert manifest(tmp_path)[url(site, "news.test", "/a1")]["status"] == "ok"
    assert site.hits() == [("news.test", "/a1")]


def test_warc_records_name_the_address_and_the_robots_policy(site, tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    make_links(tmp_path, [url(site, "news.test", "/a1")])
    totals = fetch_pages(tmp_path, local_cfg(robots=False))
    with open(tmp_path / "fetch" / "fetch-00000.warc.gz", "rb") as f:
        records = [(r.rec_type, r.rec_headers.get_header("WARC-IP-Address"), r.content_stream().read())
                   for r in ArchiveIterator(f)]
    assert [(t, ip) for t, ip, _ in records] == [("warcinfo", None), ("response", "127.0.0.1")]
    assert b"robots: ignore" in records[0][2]
    entry = manifest(tmp_path)[url(site, "news.test", "/a1")]
    assert (entry["score"], entry["created_utc"], entry["subreddit"]) == (5, 1500000000, "news")
    assert totals["bytes"] == entry["bytes"] == len(records[1][2]) > 0


def test_an_unexpected_error_fails_its_url_not_the_shard(site, tmp_path, monkeypatch):
    real_get = Fetcher.get

    async def get(self, target, **kw):
        if target.endswith("/a1"):
            raise RuntimeError("a server that breaks the client")
        return await real_get(self, target, **kw)

    monkeypatch.setattr(Fetcher, "get", get)
    make_links(tmp_path, [url(site, "news.test", "/a1"), url(site, "news.test", "/a2")])
    fetch_pages(tmp_path, local_cfg(robots=False))
    m = manifest(tmp_path)
    assert m[url(site, "news.test", "/a1")]["status"] == "connection_error"
    assert "RuntimeError: a server that breaks the client" in m[url(site, "news.test", "/a1")]["error"]
    assert m[url(site, "news.test", "/a2")]["status"] == "ok"


def test_per_host_requests_to_one_host_are_in_flight_together(site, tmp_path):
    """--per-host 2: a host's second link does not wait for its first to be answered (each answer
    here waits until both requests have arrived)."""
    both = threading.Barrier(2, timeout=5)

    def together(handler):
        try:
            both.wait()
        except threading.BrokenBarrierError:
            return 503, {}, b"alone"
        return 200, {"Content-Type": "text/html"}, page(article(23), "Together")

    site.routes[("news.test", "/t1")] = site.routes[("news.test", "/t2")] = together
    make_links(tmp_path, [url(site, "news.test", "/t1"), url(site, "news.test", "/t2")])
    fetch_pages(tmp_path, local_cfg(robots=False, per_host=2, retries=0, read_timeout=10.0, total_timeout=10.0))
    assert [e["status"] for e in manifest(tmp_path).values()] == ["ok", "ok"]



def test_a_connection_is_never_reused_for_another_name(tmp_path):
    """Two names on one address, against a server that keeps connections open: every request gets
    a connection of its own (a TLS connection checked for one name must not carry another's)."""
    peers = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            peers.append((self.headers["Host"].split(":")[0], self.client_address))
            body = page(article(24), "Kept open")
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        make_links(tmp_path, [f"http://{h}:{port}/p" for h in ("news.test", "blog.test", "other.test")])
        fetch_pages(tmp_path, local_cfg(robots=False, concurrency=1, per_host=1))
    finally:
        server.shutdown()
        server.server_close()
    assert {e["status"] for e in manifest(tmp_path).values()} == {"ok"}
    assert len(peers) == 3 and len({address for _, address in peers}) == 3, peers
