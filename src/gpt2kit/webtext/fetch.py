"""Stage 2: fetch every link, politely and safely, into WARC files.

Politeness: a global limit on concurrent requests, a per-host limit and a minimum delay between
two requests to one host (raised to the host's robots.txt Crawl-delay, up to a cap), both kept
across all the stage's processes by a shared schedule (`hosts.py`: redirects cross shards), robots.txt
obeyed (RFC 9309: a 4xx robots.txt allows everything, an unreachable one, a 5xx or a 429 forbids
everything), timeouts (connect, read, and a total deadline per request so that a slowly dripping
server cannot hold a slot), a maximum body size counted after decompression (a gzip bomb stops at
the limit), retries with exponential back-off on timeouts, connection errors, 429 and 5xx, and a
user agent that says who we are.

Security: the crawler resolves every host itself, before connecting and again for every redirect
target, and refuses private, loopback, link-local, multicast and reserved addresses unless
`allow_private` says otherwise. It then connects to the address it checked (the URL carries the
IP; the Host header and TLS SNI carry the name), so a DNS answer cannot change between the check
and the connection. Connections are not kept alive: a TLS connection verified for one name is
never reused for another name on the same address. Proxies and .netrc from the environment are
ignored.

Output per shard: `fetch-K.warc.gz` with a warcinfo record and one response record per HTML page
(the body decoded from its Content-Encoding, which is therefore removed from the stored headers),
and `fetch-K.manifest.jsonl.zst` with the status of every URL.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import time
import zlib
from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from io import BytesIO
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

from .. import __version__
from ..io import atomic_path, write_json
from .hosts import HostGate, SharedSchedule, locks_local_only, open_schedule
from .robots import RobotsRules
from .work import (Runner, WebTextError, WorkFolder, check_int, check_seconds, config_dict, read_jsonl_zst, run_tasks,
                   shard_name, stable_hash, write_jsonl_zst)

log = logging.getLogger(__name__)

USER_AGENT = f"gpt2kit-webtext/{__version__} (research corpus builder; obeys robots.txt)"
HTML_TYPES = ("text/html", "application/xhtml+xml")
ROBOTS_TTL_S = 24 * 3600
ROBOTS_LIMIT = 500 * 1024   # RFC 9309 §2.5: parse at least 500 KiB; the rest of a larger file is ignored
STATUSES = ("ok", "not_html", "http_error", "too_large", "timeout", "connection_error", "dns_error",
            "blocked_address", "robots_disallowed", "too_many_redirects", "bad_url", "bad_encoding")


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int = 64                 # requests in flight, over all processes
    per_host: int = 2                     # requests in flight to one host
    host_delay: float = 1.0               # seconds between two request starts to one host
    max_crawl_delay: float = 30.0         # cap on a robots.txt Crawl-delay
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0           # one request, headers and body
    max_bytes: int = 5_000_000            # body limit after decompression
    retries: int = 2
    backoff: float = 1.0                  # first retry after this many seconds, then doubling
    max_redirects: int = 5
    robots: bool = True
    user_agent: str = USER_AGENT
    # None: refuse every non-public address. (): allow them all. Else allow only these networks.
    allow_private: tuple[str, ...] | None = None
    resolve: tuple[tuple[str, str], ...] = ()   # (host, address) overrides, like curl --resolve

    def __post_init__(self):
        # A bad value here would not stop the stage: every URL would fail (or never be tried), the
        # stage would be marked complete, and a rerun with the right value refused as other options.
        for flag, value, minimum in (("--concurrency", self.concurrency, 1), ("--per-host", self.per_host, 1),
                                     ("--max-bytes", self.max_bytes, 1), ("--retries", self.retries, 0),
                                     ("--max-redirects", self.max_redirects, 0)):
            check_int(flag, value, minimum)
        # --timeout sets both the connect and the read timeout; max_crawl_delay has no flag
        for flag, value, zero_ok in (("--host-delay", self.host_delay, True), ("--backoff", self.backoff, True),
                                     ("max_crawl_delay", self.max_crawl_delay, True),
                                     ("--timeout", self.connect_timeout, False), ("--timeout", self.read_timeout, False),
                                     ("--total-timeout", self.total_timeout, False)):
            check_seconds(flag, value, zero_ok=zero_ok)
        if not isinstance(self.user_agent, str) or not self.user_agent.strip() or not self.user_agent.isprintable():
            raise WebTextError(f"--user-agent: expected one line of printable text, got {self.user_agent!r}")
        self.networks()
        for host, address in self.resolve:
            try:
                ipaddress.ip_address(address.split("%")[0])     # as `address_allowed` will read it
            except ValueError:
                raise WebTextError(f"--resolve: expected HOST:ADDRESS with an IP address, got {host}:{address}") from None

    def networks(self):
        try:
            return [ipaddress.ip_network(n, strict=False) for n in self.allow_private or ()]
        except ValueError as e:
            raise WebTextError(f"--allow-private: {e}") from None


# ---------------------------------------------------------------------------------------------
# Addresses


class Refused(Exception):
    """The host resolves to an address we may not connect to."""


def address_allowed(address: str, allow_private: tuple[str, ...] | None, networks=()) -> bool:
    """Whether the crawler may connect to `address`.

    >>> address_allowed("93.184.216.34", None), address_allowed("127.0.0.1", None), address_allowed("127.0.0.1", ())
    (True, False, True)
    """
    ip = _carried_ipv4(ipaddress.ip_address(address.split("%")[0]))
    if ip.is_multicast or ip.is_unspecified:
        return False                      # never a web server, whatever the options
    public = ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved)
    if public:
        return True
    if allow_private is None:
        return False
    return not networks or any(ip in n for n in networks)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _carried_ipv4(ip):
    """The IPv4 address an IPv6 address leads to, where it carries one: IPv4-mapped, 6to4 (a relay
    delivers 2002:7f00:1:: to 127.0.0.1) and NAT64 (an IPv6-only host's DNS64 answers every IPv4
    site with one); else `ip` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


class TemporaryDNSError(socket.gaierror):
    """The resolver could not answer now (EAI_AGAIN): worth a retry, not worth remembering."""


class Resolver:
    """Host -> one checked address. Every address of the answer must be allowed (an answer that
    mixes public and private addresses is refused)."""

    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.networks = cfg.networks()
        self.overrides = {h.lower().rstrip("."): a for h, a in cfg.resolve}
        self.cache: dict[str, str | Exception] = {}

    async def resolve(self, host: str) -> str:
        host = host.lower().rstrip(".")
        hit = self.cache.get(host)
        if hit is None:
            hit = await self._lookup(host)
            if not isinstance(hit, TemporaryDNSError):
                self.cache[host] = hit
        if isinstance(hit, Exception):
            raise hit
        return hit

    async def _lookup(self, host: str) -> str | Exception:
        try:
            ipaddress.ip_address(host.strip("[]"))
            addresses = [host.strip("[]")]
        except ValueError:
            if host in self.overrides:
                addresses = [self.overrides[host]]
            else:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
                except (socket.gaierror, UnicodeError) as e:
                    error = TemporaryDNSError if getattr(e, "errno", None) == socket.EAI_AGAIN else socket.gaierror
                    return error(f"cannot resolve {host}: {e}")
                addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not address_allowed(a, self.cfg.allow_private, self.networks)]
        if refused or not addresses:
            return Refused(f"{host} resolves to {', '.join(refused) or 'nothing'}, which is not allowed"
                           " (see --allow-private)")
        return addresses[0]


# ---------------------------------------------------------------------------------------------
# Bodies


class TooLarge(Exception):
    pass


class BadEncoding(Exception):
    pass


class BoundedDecoder:
    """Undo a gzip/deflate Content-Encoding without ever producing more than `limit` bytes."""

    def __init__(self, encoding: str, limit: int, cut: bool = False):
        self.limit = limit
        self.size = 0
        self.cut = cut           # past the limit: keep what fits (`full`) instead of raising TooLarge
        self.full = False
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self.z = None
        elif enc in ("gzip", "x-gzip"):
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self.z = zlib.decompressobj(zlib.MAX_WBITS)
            self.deflate_probe = True
        else:
            raise BadEncoding(f"unsupported Content-Encoding {encoding!r}")

    def _count(self, data: bytes) -> bytes:
        room = self.limit - self.size
        if len(data) > room:
            if not self.cut:
                raise TooLarge(f"body larger than {self.limit} bytes")
            data, self.full = data[:room], True
        self.size += len(data)
        return data

    def feed(self, chunk: bytes) -> bytes:
        if self.z is None:
            return self._count(chunk)
        out = []
        data = chunk
        try:
            while data and not self.full:
                piece = self.z.decompress(data, self.limit - self.size + 1)
                out.append(self._count(piece))
                data = self.z.unconsumed_tail
        except zlib.error as e:
            if getattr(self, "deflate_probe", False) and self.size == 0:
                # "deflate" is often sent without its zlib header
                self.z, self.deflate_probe = zlib.decompressobj(-zlib.MAX_WBITS), False
                return self.feed(chunk)
            raise BadEncoding(f"corrupt compressed body: {e}") from None
        self.deflate_probe = False
        return b"".join(out)


# ---------------------------------------------------------------------------------------------
# The fetcher


@dataclass
class Result:
    status: str
    url: str
    final_url: str | None = None
    http_status: int | None = None
    reason: str = ""
    headers: list | None = None
    body: bytes | None = None
    address: str | None = None
    error: str | None = None
    attempts: int = 0
    redirects: int = 0
    truncated: bool = False      # the body was cut at the limit (asked for with `cut`)


def _ascii_host(url: str) -> str:
    """`url` with its host in IDNA form: a redirect may name a host in Unicode, which can go
    neither into a Host header nor into TLS SNI. A host IDNA refuses is left for the caller to refuse."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        if not host or host.isascii():
            return url
        ascii_host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        return url
    netloc = ascii_host if port is None else f"{ascii_host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Retryable(Exception):
    def __init__(self, status: str, message: str, retry_after: float | None = None, result: Result | None = None):
        super().__init__(message)
        self.status, self.retry_after, self.result = status, retry_after, result


_UNREACHABLE = ("blocked_address", "dns_error", "connection_error", "timeout")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP-date is GMT whatever it says (RFC 9110 5.6.7)
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, when.timestamp() - time.time())


class Fetcher:
    def __init__(self, cfg: FetchConfig, client, concurrency: int, shared: SharedSchedule | None = None,
                 robots_store: RobotsStore | None = None):
        self.cfg = cfg
        self.client = client
        self.shared = shared
        self.robots_store = robots_store
        self.resolver = Resolver(cfg)
        self.global_slots = asyncio.Semaphore(concurrency)
        self.gates: dict[str, HostGate] = {}
        self.robots: dict[str, tuple[RobotsRules, Result]] = {}
        self.robots_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def gate(self, host: str) -> HostGate:
        host = host.rstrip(".")     # `example.com.` names `example.com`: one host, one schedule
        if host not in self.gates:
            self.gates[host] = HostGate(host, self.cfg.per_host, self.cfg.host_delay, self.shared,
                                        max_hold=self.cfg.max_crawl_delay)
        return self.gates[host]

    async def get(self, url: str, *, check_robots: bool = True, html_only: bool = True,
                  max_bytes: int | None = None, cut: bool = False) -> Result:
        """GET `url`, following redirects; every hop is resolved, checked and (optionally) robots-checked.
        A body over `max_bytes` is `too_large`, or with `cut` kept up to it (`truncated`)."""
        current, attempts = url, 0
        for hop in range(self.cfg.max_redirects + 1):
            current = _ascii_host(current)
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return Result("bad_url", url, current, error=f"cannot fetch {current!r}", attempts=attempts, redirects=hop)
            if check_robots and self.cfg.robots:
                verdict, error = await self.robots_allow(current)
                if verdict != "ok":
                    return Result(verdict, url, current, error=error, attempts=attempts, redirects=hop)
            res = await self._with_retries(current, html_only, max_bytes or self.cfg.max_bytes, cut)
            attempts += res.attempts
            res.url, res.attempts, res.redirects = url, attempts, hop
            location = dict((k.lower(), v) for k, v in res.headers or []).get("location")
            if res.status == "http_error" and res.http_status in (301, 302, 303, 307, 308) and location:
                try:
                    current = urljoin(current, location.strip())
                except ValueError:    # httpx lets some through that urllib cannot split ("http://[a/")
                    return Result("bad_url", url, current, error=f"redirect to {location!r}, which is not a URL",
                                  attempts=attempts, redirects=hop)
                continue
            return res
        return Result("too_many_redirects", url, current, attempts=attempts, redirects=self.cfg.max_redirects)

    async def _with_retries(self, url: str, html_only: bool, max_bytes: int, cut: bool = False) -> Result:
        host = urlsplit(url).hostname or ""
        gate = self.gate(host)
        last: Retryable | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                pause = self.cfg.backoff * 2 ** (attempt - 1)
                if last is not None and last.retry_after is not None:
                    pause = max(pause, min(last.retry_after, self.cfg.max_crawl_delay))
                await asyncio.sleep(pause)
            try:
                async with gate.turn(self.global_slots):
                    res = await self._request(url, html_only, max_bytes, cut)
                res.attempts = attempt + 1
                return res
            except Retryable as e:
                last = e
                if e.retry_after is not None:
                    gate.hold(e.retry_after)     # the host's answer to us, not to this URL alone
                log.debug("%s: attempt %d: %s", url, attempt + 1, e)
        assert last is not None
        res = last.result or Result(last.status, url, url, error=str(last))
        res.attempts = self.cfg.retries + 1
        return res

    async def _request(self, url: str, html_only: bool, max_bytes: int, cut: bool = False) -> Result:
        import httpx

        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            address = await self.resolver.resolve(host)
        except Refused as e:
            return Result("blocked_address", url, url, error=str(e))
        except TemporaryDNSError as e:
            raise Retryable("dns_error", str(e)) from None
        except socket.gaierror as e:
            return Result("dns_error", url, url, error=str(e))
        try:
            port = parts.port
        except ValueError:
            return Result("bad_url", url, url, error="bad port")
        ip_host = f"[{address}]" if ":" in address else address
        netloc = ip_host if port is None else f"{ip_host}:{port}"
        named = f"[{host}]" if ":" in host else host
        host_header = named if port is None else f"{named}:{port}"
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {"Host": host_header, "User-Agent": self.cfg.user_agent, "Accept-Encoding": "gzip, deflate",
                   "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.5"}
        request = self.client.build_request("GET", target, headers=headers, extensions={"sni_hostname": host})
        async def exchange() -> Result:
            try:
                response = await self.client.send(request, stream=True)
            except httpx.RemoteProtocolError as e:
                # httpx parses a redirect's Location even when not following it, and fails the
                # exchange on one that is not a URL: the server answered, the link is what is bad
                if str(e).startswith("Invalid URL in location header"):
                    return Result("bad_url", url, url, error=str(e))
                raise
            try:
                return await self._read(url, address, response, html_only, max_bytes, cut)
            finally:
                await response.aclose()

        try:
            return await asyncio.wait_for(exchange(), self.cfg.total_timeout)
        except asyncio.TimeoutError:
            raise Retryable("timeout", f"no complete answer within {self.cfg.total_timeout} s") from None
        except httpx.TimeoutException as e:
            raise Retryable("timeout", f"{type(e).__name__}") from None
        except (httpx.TransportError, ssl.SSLError, OSError) as e:
            raise Retryable("connection_error", f"{type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:
            return Result("connection_error", url, url, error=f"{type(e).__name__}: {e}")

    async def _read(self, url: str, address: str, response, html_only: bool, max_bytes: int,
                    cut: bool = False) -> Result:
        code = response.status_code
        raw_headers = response.headers.multi_items()
        res = Result("ok", url, url, http_status=code, reason=response.reason_phrase, address=address,
                     headers=[(k, v) for k, v in raw_headers if k.lower() not in ("content-encoding", "transfer-encoding",
                                                                                   "content-length")])
        if code == 429 or code >= 500:
            res.status = "http_error"
            raise Retryable("http_error", f"HTTP {code}", _retry_after(response.headers.get("retry-after")), res)
        if code != 200:
            res.status = "http_error"
            res.headers = raw_headers
            return res
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if html_only and ctype and ctype not in HTML_TYPES:
            res.status, res.error = "not_html", ctype
            return res
        try:
            length = int(response.headers.get("content-length", "0"))
        except ValueError:
            length = 0
        if length > max_bytes and not cut:
            res.status, res.error = "too_large", f"Content-Length {length}"
            return res
        try:
            decoder = BoundedDecoder(response.headers.get("content-encoding", ""), max_bytes, cut)
            chunks, raw = [], 0
            async for chunk in response.aiter_raw():
                raw += len(chunk)
                if raw > max_bytes and not cut:
                    raise TooLarge(f"more than {max_bytes} bytes on the wire")
                chunks.append(decoder.feed(chunk))
                if decoder.full or raw > max_bytes:
                    res.truncated = True
                    break
        except TooLarge as e:
            res.status, res.error = "too_large", str(e)
            return res
        except BadEncoding as e:
            res.status, res.error = "bad_encoding", str(e)
            return res
        res.body = b"".join(chunks)
        res.headers.append(("Content-Length", str(len(res.body))))
        return res

    async def robots_allow(self, url: str) -> tuple[str, str | None]:
        """("ok", None) when robots.txt lets us fetch `url`, else (status, error) saying why not."""
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc.lower()}"
        async with self.robots_locks[key]:
            if key not in self.robots:
                self.robots[key] = await self._load_robots(key)
        rules, res = self.robots[key]
        if res.status in _UNREACHABLE and res.final_url == key + "/robots.txt":
            return res.status, res.error     # the host itself is unreachable: say so, not "robots"
        return ("ok", None) if rules.allowed(url) else ("robots_disallowed", None)

    async def _load_robots(self, origin: str) -> tuple[RobotsRules, Result]:
        kept = self.robots_store.load(origin) if self.robots_store is not None else None
        if kept is not None:
            res, text = kept
        else:
            res, text = await self._fetch_robots(origin)
            if self.robots_store is not None:
                self.robots_store.save(origin, res, text)
        if res.status == "ok":
            rules = RobotsRules.parse(text, self.cfg.user_agent)
            if rules.crawl_delay:
                self.gate(urlsplit(origin).hostname or "").raise_delay(min(rules.crawl_delay, self.cfg.max_crawl_delay))
        elif _no_robots_txt(res):
            rules = RobotsRules()         # RFC 9309 §2.3.1.3: "unavailable" means no restrictions
        else:
            rules = RobotsRules(disallow_all=True)   # unreachable (5xx, network, refused address): crawl nothing
        res.body = None
        return rules, res

    async def _fetch_robots(self, origin: str) -> tuple[Result, str]:
        res = await self.get(origin + "/robots.txt", check_robots=False, html_only=False, max_bytes=ROBOTS_LIMIT,
                             cut=True)
        text = (res.body or b"").decode("utf-8", "replace") if res.status == "ok" else ""
        if res.truncated:     # the line the limit cut could read wider than written: drop it
            # A line may end in CR alone (RFC 9309 §2.2, as RobotsRules.parse's splitlines() reads
            # it): cutting at the last LF only would drop all of a CR-only file, i.e. allow everything.
            text = text[:max(text.rfind("\n"), text.rfind("\r")) + 1]
        return res, text


class RobotsStore:
    """robots.txt answers kept for every shard of the stage (`WORK/_state/fetch/robots/`): a host
    that the links of many shards redirect to is asked once, not once per shard. Only answers about
    the host are kept, for a day (RFC 9309 §2.4): a robots.txt, or a 4xx (no restrictions). An
    unreachable one is asked again by the next shard: a passing outage must not forbid the host."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, origin: str) -> Path:
        name = f"{stable_hash(origin):016x}"
        return self.folder / name[:2] / f"{name}.json"    # 256 folders: millions of hosts in one is slow to list

    def load(self, origin: str) -> tuple[Result, str] | None:
        try:
            rec = json.loads(self._path(origin).read_text(encoding="utf-8"))
            fetched, code, text = rec["fetched"], rec["http_status"], rec["text"]
            if (rec["origin"] != origin or not isinstance(text, str)
                    or not 0 <= time.time() - fetched < ROBOTS_TTL_S):
                return None
        except (OSError, ValueError, KeyError, TypeError):   # none yet, or a damaged one: ask the host
            return None
        res = Result("ok" if code == 200 else "http_error", origin + "/robots.txt", rec["final_url"], http_status=code)
        return res, text

    def save(self, origin: str, res: Result, text: str) -> None:
        if res.status == "ok" or _no_robots_txt(res):
            write_json(self._path(origin), {"origin": origin, "fetched": time.time(), "http_status": res.http_status,
                                            "final_url": res.final_url, "text": text}, indent=None)


def _no_robots_txt(res: Result) -> bool:
    """Whether a robots.txt answer says the host has none: a 4xx, but not a 429 (after the retries),
    which is a host asking for fewer requests: read as "no restrictions", it would be crawled freely."""
    code = res.http_status
    return res.status == "http_error" and code is not None and 400 <= code < 500 and code != 429


# ---------------------------------------------------------------------------------------------
# One shard


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _fetch_all(links: list[dict], cfg: FetchConfig, concurrency: int, writer, bar,
                     shared: SharedSchedule | None = None, robots_store: RobotsStore | None = None) -> list[dict]:
    import httpx

    ssl_ctx = ssl.create_default_context()
    timeout = httpx.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout, write=cfg.read_timeout,
                            pool=cfg.total_timeout)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    manifest: list[dict] = []
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout, limits=limits,
                                 verify=ssl_ctx, cookies=_no_cookies()) as client:
        fetcher = Fetcher(cfg, client, concurrency, shared, robots_store)
        by_host: dict[str, list[dict]] = defaultdict(list)
        for link in links:
            by_host[urlsplit(link["url"]).hostname or ""].append(link)

        async def one(link: dict) -> None:
            try:
                res = await fetcher.get(link["url"])
            except Exception as e:  # one odd server must not stop the shard
                log.warning("%s: unexpected %s: %s", link["url"], type(e).__name__, e)
                res = Result("connection_error", link["url"], error=f"{type(e).__name__}: {e}")
            entry = {"url": link["url"], "status": res.status, "http_status": res.http_status,
                     "final_url": res.final_url, "redirects": res.redirects, "attempts": res.attempts,
                     "bytes": len(res.body) if res.body is not None else 0, "error": res.error,
                     "fetched_at": _now(), "record_id": None,
                     **{k: link.get(k) for k in ("score", "created_utc", "subreddit")}}
            if res.status == "ok":
                entry["record_id"] = _write_response(writer, res, entry["fetched_at"])
            manifest.append(entry)
            bar.update()

        async def host_worker(queue: deque) -> None:
            while queue:
                await one(queue.popleft())

        jobs = []
        for host_links in by_host.values():
            queue = deque(host_links)
            jobs.extend(host_worker(queue) for _ in range(min(cfg.per_host, len(host_links))))
        await asyncio.gather(*jobs)
    return manifest


def _no_cookies():
    """A cookie jar that stores and sends nothing. Requests name the checked address, not the host,
    so a jar would file one site's cookies under an IP that a CDN shares with thousands of others
    and send them there; and a crawler has no session to keep."""
    from http.cookiejar import CookieJar, DefaultCookiePolicy

    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _write_response(writer, res: Result, fetched_at: str) -> str:
    from warcio.statusandheaders import StatusAndHeaders

    http_headers = StatusAndHeaders(f"{res.http_status} {res.reason}".strip(), res.headers or [], protocol="HTTP/1.1")
    warc_headers = {"WARC-Date": fetched_at}
    if res.address:
        warc_headers["WARC-IP-Address"] = res.address
    record = writer.create_warc_record(res.final_url, "response", payload=BytesIO(res.body or b""),
                                       http_headers=http_headers, warc_headers_dict=warc_headers)
    writer.write_record(record)
    return record.rec_headers.get_header("WARC-Record-ID")


def fetch_shard(links_path: str, warc_path: str, manifest_path: str, cfg: FetchConfig, concurrency: int,
                progress: bool = False, state: str | None = None) -> dict:
    """Fetch the links of one shard; write its WARC file and manifest (both atomically). With
    `state` (the stage's `_state` folder), per-host politeness holds with every process sharing its
    schedule (`hosts.py`), and robots.txt answers are shared by the shards (`RobotsStore`)."""
    from tqdm.auto import tqdm
    from warcio.warcwriter import WARCWriter

    links = list(read_jsonl_zst(links_path))
    with atomic_path(warc_path) as tmp, open(tmp, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record(
            Path(warc_path).name, {"software": f"gpt2kit/{__version__}", "format": "WARC File Format 1.0",
                                   "http-header-user-agent": cfg.user_agent, "robots": "obey" if cfg.robots else "ignore"}))
        with tqdm(total=len(links), desc=Path(warc_path).name.split('.')[0], unit="url", leave=False,
                  disable=not progress, dynamic_ncols=True) as bar:
            store = RobotsStore(Path(state) / "robots") if state is not None else None
            with open_schedule(_schedule_path(state)) as shared:
                manifest = asyncio.run(_fetch_all(links, cfg, concurrency, writer, bar, shared, store))
    manifest.sort(key=lambda e: e["url"])
    write_jsonl_zst(manifest_path, manifest)
    counts = Counter(e["status"] for e in manifest)
    return {"urls": len(manifest), "bytes": sum(e["bytes"] for e in manifest),
            "status": {s: counts.get(s, 0) for s in STATUSES}}


def _schedule_path(state: str | None) -> str | None:
    return None if state is None else str(Path(state) / "hosts.bin")


def warn_if_locks_local(schedule: str, runner: Runner) -> None:
    """Say so when a running cluster's processes may sit on other machines and the schedule's file
    system keeps its locks on each machine (NFS -o nolock): every machine would keep its own
    schedule and hosts get each machine's share of requests. A warning, not an error: a cluster can
    run on one machine, and this reads only this machine's mount (the workers' may differ)."""
    if runner.engine != "dask" or not runner.dask_address:
        return              # every process runs on this machine: local locks are shared locks
    reason = locks_local_only(schedule)
    if reason:
        log.warning("%s: the work folder's file system (%s) keeps its locks on each machine: fetch "
                    "processes on other machines will not share the per-host schedule (remount it "
                    "with locking, or run the stage on one machine)", schedule, reason)


def fetch_pages(work, cfg: FetchConfig = FetchConfig(), runner: Runner = Runner()) -> dict:
    """Run the fetch stage over all links shards; returns its totals."""
    wf = WorkFolder(work)
    ids = wf.shard_ids("links")
    wf.check_config("fetch", {**config_dict(cfg), "upstream": wf.fingerprint("links")},
                    pacing=("concurrency", "per_host"))  # (host_delay not: hosts.bin keeps the old as a floor)
    per_process = max(1, -(-cfg.concurrency // runner.task_slots()))
    # a second bar, per URL, where it can be drawn: in this process
    inline_progress = runner.progress and runner.workers == 1 and runner.engine == "local"
    out = wf.stage_dir("fetch")
    # one per-host schedule for every process of the stage: a redirect can lead any shard to any host
    state = str(wf.state_dir("fetch"))
    with open_schedule(_schedule_path(state)):
        pass                    # a file system that cannot lock it is refused here, before any request
    warn_if_locks_local(_schedule_path(state), runner)
    tasks = []
    for k in ids:
        name = shard_name("fetch", k)
        tasks.append((name, (str(wf.stage_dir("links") / f"{shard_name('links', k)}.jsonl.zst"),
                             str(out / f"{name}.warc.gz"), str(out / f"{name}.manifest.jsonl.zst"), cfg, per_process,
                             inline_progress, state)))
    totals, skipped = run_tasks(wf, "fetch", fetch_shard, tasks, runner, desc="fetch")
    wf.finish("fetch", ids, totals)
    return {**totals, "skipped_tasks": skipped}
