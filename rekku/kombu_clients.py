"""One ``redis.Redis`` per kombu connection pool instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` (``Channel._create_client``) for every message it
publishes, every acknowledgement and every flush of task events; redis-py copies its table of response
callbacks into each one, which took 8-10 % of a worker's main process in py-spy (bench (b)), for
both Rekku and plain Celery. The object holds no connection of its own (each command takes one from
the pool, and redis-py documents the client as safe to share between threads), so one per pool serves
every command; a new pool (kombu makes one after a reconnection) gets a new client.

Applied by Rekku's own processes (the ingress's app, the worker and beat's task module), not by
importing the Celery app: a program that imports Rekku's modules next to a Celery app of its own
(the benchmarks' plain-Celery baseline, a user's service) keeps kombu as it is.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

_PATCHED = "_rekku_reuses_clients"


def reuse_clients() -> None:
    """Make kombu's Redis channels (the Sentinel channel inherits it) reuse their synchronous client."""
    channel = kombu_redis.Channel
    if getattr(channel, _PATCHED, False):
        return
    build = channel._create_client

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return build(self, asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_rekku_client")
        if cached is None or cached.connection_pool is not pool:
            cached = self.__dict__["_rekku_client"] = build(self, asynchronous=False)
        return cached

    channel._create_client = _create_client
    setattr(channel, _PATCHED, True)
