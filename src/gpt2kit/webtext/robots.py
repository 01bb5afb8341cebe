"""robots.txt as RFC 9309 defines it.

`urllib.robotparser` applies the first rule that matches in file order and reads `*` and `$`
literally, so `Allow: /` followed by `Disallow: /private` lets a crawler into /private, and
`Disallow: /*.php$` stops nothing. RFC 9309 instead takes the rule with the longest pattern (an
allow rule wins a tie), treats `*` as any run of characters and a final `$` as the end of the
path, compares paths percent-encoded, and merges every group that names the crawler's product
token (else every `*` group).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters that stand for themselves in a URI path and query (RFC 3986 reserved + unreserved).
_LITERAL = _UNRESERVED | frozenset(":/?#[]@!$&'()*+,;=")
_HEX = frozenset("0123456789abcdefABCDEF")
_TOKEN = re.compile(r"[A-Za-z0-9_-]*")


def encode_path(path: str) -> str:
    """The one spelling RFC 9309 §2.2.2 compares: non-ASCII and unsafe characters percent-encoded,
    escapes in upper case, escapes of unreserved characters decoded.

    >>> encode_path("/café/%62%61%7a?q=%2f")
    '/caf%C3%A9/baz?q=%2F'
    """
    out: list[str] = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%" and i + 2 < len(path) and path[i + 1] in _HEX and path[i + 2] in _HEX:
            decoded = chr(int(path[i + 1:i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + path[i + 1:i + 3].upper())
            i += 3
            continue
        if c in _LITERAL:
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8"))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str                       # encoded; may hold `*` and a final `$`
    regex: re.Pattern | None           # None: a plain prefix

    @classmethod
    def make(cls, allow: bool, value: str) -> "Rule":
        pattern = encode_path(value)
        if "*" not in pattern and not pattern.endswith("$"):
            return cls(allow, pattern, None)
        body, anchored = (pattern[:-1], True) if pattern.endswith("$") else (pattern, False)
        regex = ".*".join(re.escape(part) for part in body.split("*")) + (r"\Z" if anchored else "")
        return cls(allow, pattern, re.compile(regex))

    def matches(self, path: str) -> bool:
        return path.startswith(self.pattern) if self.regex is None else self.regex.match(path) is not None


@dataclass
class _Group:
    agents: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    crawl_delay: float | None = None


def product_token(user_agent: str) -> str:
    """`gpt2kit-webtext/1.0 (research)` -> `gpt2kit-webtext`: the name robots.txt groups use."""
    return _TOKEN.match(user_agent.strip()).group().lower()


@dataclass
class RobotsRules:
    rules: list[Rule] = field(default_factory=list)
    crawl_delay: float | None = None
    disallow_all: bool = False

    @classmethod
    def parse(cls, text: str, user_agent: str) -> "RobotsRules":
        """The rules of `text` that apply to a crawler sending `user_agent`."""
        groups: list[_Group] = []
        current: _Group | None = None
        for line in text.lstrip("\ufeff").splitlines():
            key, sep, value = line.split("#", 1)[0].partition(":")
            if not sep:
                continue
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if current is None or current.rules or current.crawl_delay is not None:
                    current = _Group()
                    groups.append(current)
                current.agents.append("*" if value.startswith("*") else product_token(value))
            elif current is None:
                continue                    # rules before any user-agent line belong to no group
            elif key in ("allow", "disallow") and value:
                current.rules.append(Rule.make(key == "allow", value))
            elif key == "crawl-delay":
                current.crawl_delay = _seconds(value, current.crawl_delay)
        token = product_token(user_agent)
        chosen = ([g for g in groups if any(_names(agent, token) for agent in g.agents)]
                  or [g for g in groups if "*" in g.agents])
        delays = [g.crawl_delay for g in chosen if g.crawl_delay is not None]
        return cls([r for g in chosen for r in g.rules], max(delays) if delays else None)

    def allowed(self, url: str) -> bool:
        if self.disallow_all:
            return False
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if path == "/robots.txt":
            return True
        path = encode_path(path)
        best: Rule | None = None
        for rule in self.rules:
            if rule.matches(path) and (best is None or (len(rule.pattern), rule.allow) > (len(best.pattern), best.allow)):
                best = rule
        return best is None or best.allow


def _names(agent: str, token: str) -> bool:
    # `gpt2kit` names us too (`gpt2kit-webtext`): a site that blocks the family blocks this crawler
    return agent == token or token.startswith(agent + "-")


def _seconds(value: str, previous: float | None) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return previous
    return seconds if math.isfinite(seconds) and seconds >= 0 else previous
