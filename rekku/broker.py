"""The one way Rekku talks to the broker's Redis outside Celery: :func:`broker_client`.

Heartbeats, kombu's unacknowledged set (the reconciler), run metrics, the model loop's turn locks, the
feed pusher's lock, correction counters, plugin caches and the terminal's session map all live in the
broker's Redis, next to the messages. When the broker is a Redis Sentinel group
(``REKKU_BROKER_URL=sentinel://...`` with ``REKKU_SENTINEL_MASTER``: docs/contracts.md §6) each of
them must follow the master through a failover exactly as Celery's Sentinel transport does, or a
worker would beat its heartbeat into a demoted replica (read-only) while its messages come from the
new primary. So every such client comes from here: a plain client for ``redis://``/``rediss://``/
``unix://`` URLs, and ``Sentinel(...).master_for(name)`` for ``sentinel://`` ones, which asks the
Sentinels for the master on every (re)connection. What a sentinel URL may say: rekku/broker_url.py.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.sentinel import Sentinel

from rekku.broker_url import is_sentinel_url, parse_sentinel_url
from rekku.settings import Settings, get_settings

#: Longest wait, in seconds, for a TCP connection to a Sentinel or a data node (whatever the read timeout).
CONNECT_TIMEOUT = 5.0


def client_for(url: str, *, master: str | None = None, sentinel_password: str | None = None,
               timeout: float = 10.0) -> redis.Redis:
    """A new client of the Redis behind ``url``: the current master of ``master`` for a sentinel URL
    (asked of the Sentinels on each connection, so it follows failovers), else that server. ``timeout``
    is the read timeout in seconds; connecting waits at most :data:`CONNECT_TIMEOUT`."""
    connect = min(timeout, CONNECT_TIMEOUT)
    if is_sentinel_url(url):
        if not master:
            raise ValueError("a sentinel:// broker URL needs REKKU_SENTINEL_MASTER (the master's name "
                             "in the Sentinels' configuration)")
        target = parse_sentinel_url(url)
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": connect, "socket_connect_timeout": connect}
        if sentinel_password:
            sentinel_kwargs["password"] = sentinel_password
        group = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs,
                         socket_timeout=timeout, socket_connect_timeout=connect,
                         username=target.username, password=target.password, db=target.db)
        return group.master_for(master)
    return redis.Redis.from_url(url.replace("redis+socket://", "unix://", 1), socket_timeout=timeout,
                                socket_connect_timeout=connect)


_clients: dict[tuple[Any, ...], redis.Redis] = {}
_clients_lock = threading.Lock()


def broker_client(settings: Settings | None = None, *, timeout: float = 10.0) -> redis.Redis:
    """The process's client of the broker's Redis (REKKU_BROKER_URL, or the embedded one; its Sentinel
    master with REKKU_SENTINEL_MASTER), one per process and timeout: a client is a connection pool,
    safe to share between threads, and a forked child gets its own."""
    settings = settings or get_settings()
    url = settings.resolved_broker_url()
    key = (os.getpid(), url, settings.sentinel_master, settings.sentinel_password, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = client_for(url, master=settings.sentinel_master,
                                                sentinel_password=settings.sentinel_password, timeout=timeout)
        return client


def transport_options(settings: Settings) -> dict[str, Any]:
    """What Celery's broker and result backend need besides the URL to use a Sentinel group (kombu's
    ``master_name`` and ``sentinel_kwargs``); empty for a plain Redis."""
    if not is_sentinel_url(settings.resolved_broker_url()):
        return {}
    # timeouts written out: Celery's result backend passes ``{}`` when none are given, and redis-py then
    # talks to the Sentinels with none at all (a Sentinel that stops answering would hang the caller)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": CONNECT_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT}
    if settings.sentinel_password:
        sentinel_kwargs["password"] = settings.sentinel_password
    return {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs}
