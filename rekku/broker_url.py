"""What a broker URL says, read without connecting: plain Redis, or a Redis Sentinel group.

A sentinel URL is kombu's: one ``sentinel://[:password@]host:port[/db]`` per Sentinel, joined by ``;``
(docs/contracts.md §6). The password (the data nodes' ``requirepass``) and the db must be the same on
every part: kombu reconnects through the next part after a connection error and takes *its* password
and db (kombu.connection.Connection.switch), so a URL that names them once works until the first
failover, then fails to authenticate or writes to db 0. :func:`parse_sentinel_url` refuses such a URL,
and Settings calls it, so the mistake stops every process at start with the variable named.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

#: URL schemes of a Sentinel-managed broker (kombu's transport and Celery's result backend alias).
SENTINEL_SCHEMES = ("sentinel",)
#: Schemes a plain Redis client reads (kombu's ``redis+socket://`` is redis-py's ``unix://``).
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket")


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``sentinel://`` broker URL says: where the Sentinels are, and the data nodes' credentials and db."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def is_redis_url(url: str) -> bool:
    """A broker URL Rekku can open a Redis client on (plain or Sentinel-managed)."""
    return url.strip().lower().partition("://")[0] in REDIS_SCHEMES + SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of kombu's ``sentinel://...;sentinel://...`` URL; ValueError saying what is wrong (never
    showing the password)."""
    parts = [p.strip() for p in url.split(";") if p.strip()]
    if not parts:
        raise ValueError("a sentinel:// URL names no Sentinel")
    sentinels: list[tuple[str, int]] = []
    found: set[tuple[str | None, str | None, int]] = set()
    for number, part in enumerate(parts, 1):
        split = urlsplit(part)
        if split.scheme.lower() != "sentinel" or not split.hostname:
            raise ValueError(f"part {number} of the sentinel URL is not sentinel://host:port[/db]")
        try:
            port = split.port or 26379
            db_text = split.path.strip("/")
            db = int(db_text) if db_text else 0
        except ValueError:
            raise ValueError(f"part {number} of the sentinel URL has a malformed port or db") from None
        sentinels.append((split.hostname, port))
        found.add((unquote(split.username) if split.username else None,
                   unquote(split.password) if split.password else None, db))
    if len(found) > 1:
        raise ValueError("every sentinel:// part of the broker URL must carry the same password and db "
                         "(kombu reconnects through the next part with its own): write "
                         "sentinel://:password@host1:26379/0;sentinel://:password@host2:26379/0")
    username, password, db = found.pop()
    return SentinelTarget(tuple(sentinels), username, password, db)
