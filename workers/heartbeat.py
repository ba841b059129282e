"""A worker node's heartbeat.

Each start of a worker is an *incarnation* (rekku.worker_identity); it beats its own key and its node's
(rekku.reconciler says how the reconciler reads them), and writes its name into every unacknowledged
delivery it holds, so what a dead incarnation held is told from a live one's at once; that tag, and the
acknowledgements that count the action's message down (rekku.held), are rekku_workers.owned_qos's.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from rekku.broker import broker_client
from rekku.reconciler import HEARTBEAT_PREFIX
from rekku.settings import Settings, get_settings
from rekku.worker_identity import WORKERS_KEPT_SECONDS, WORKERS_KEY

log = logging.getLogger(__name__)

#: Longest time between two heartbeats of a worker (a third of the TTL when that is shorter): a node
#: restarted under the same name watches its predecessor's key this long (times 1.5) to tell a dead
#: predecessor from a live process wrongly sharing its name.
MAX_BEAT_INTERVAL = 2.0


def beat_interval(ttl: float) -> float:
    return min(ttl / 3, MAX_BEAT_INTERVAL)


# ----------------------------------------------------------------------------- worker heartbeat
def beat(client: redis.Redis, hostname: str, incarnation: str | None, ttl: int) -> None:
    """One heartbeat: the node's key (holding the incarnation) and the incarnation's own key; and the
    node's name in the set of recent workers, where the metrics find it (rekku/metrics_gauges.py)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(HEARTBEAT_PREFIX + hostname, incarnation or "1", ex=ttl)
    if incarnation:
        pipe.set(f"{HEARTBEAT_PREFIX}{hostname}#{incarnation}", "1", ex=ttl)
    pipe.zadd(WORKERS_KEY, {hostname: now})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - WORKERS_KEPT_SECONDS)
    pipe.execute()


def heartbeat_forever(hostname: str, stop: threading.Event, settings: Settings | None = None,
                      incarnation: str | None = None) -> None:
    """Refresh the worker's heartbeat (every :func:`beat_interval`) until ``stop`` is set (a daemon thread)."""
    settings = settings or get_settings()
    ttl = max(3, int(settings.worker_heartbeat_ttl))
    client = broker_client(settings)
    while not stop.is_set():
        try:
            beat(client, hostname, incarnation, ttl)
        except redis.RedisError:
            log.warning("could not refresh the worker heartbeat", exc_info=True)
        stop.wait(beat_interval(ttl))
    try:
        if incarnation:
            client.delete(f"{HEARTBEAT_PREFIX}{hostname}#{incarnation}")
        if client.get(HEARTBEAT_PREFIX + hostname) in (None, (incarnation or "1").encode()):
            client.delete(HEARTBEAT_PREFIX + hostname)  # not a successor's
    except redis.RedisError:
        pass
