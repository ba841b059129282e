"""A worker node's heartbeat and the tag it puts on what it takes from the broker.

Each start of a worker is an *incarnation* (rekku.worker_identity); it beats its own key and its node's
(rekku.reconciler says how the reconciler reads them), and writes its name into every unacknowledged
delivery it holds, so what a dead incarnation held is told from a live one's at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from rekku.broker import broker_client
from rekku.reconciler import HEARTBEAT_PREFIX, OWNER_PROPERTY
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Longest time between two heartbeats of a worker (a third of the TTL when that is shorter): a node
#: restarted under the same name watches its predecessor's key this long (times 1.5) to tell a dead
#: predecessor from a live process wrongly sharing its name.
MAX_BEAT_INTERVAL = 2.0


def beat_interval(ttl: float) -> float:
    return min(ttl / 3, MAX_BEAT_INTERVAL)


def tag_deliveries(owner: str) -> None:
    """Make this process's Redis consumers write ``owner`` into each unacknowledged entry they add
    (a property of the stored message, in kombu's own write: no extra round trip), so the deliveries
    a dead worker held can be told from a live one's at once rather than after the visibility timeout.
    The same QoS class serves kombu's Sentinel channel (a subclass of its Redis channel)."""
    base = getattr(kombu_redis.Channel.QoS, "rekku_base", kombu_redis.Channel.QoS)

    class OwnedQoS(base):  # type: ignore[misc, valid-type]
        rekku_base = base

        def append(self, message: Any, delivery_tag: Any) -> None:
            raw = message._raw
            try:
                message._raw = {**raw, "properties": {**raw["properties"], OWNER_PROPERTY: owner}}
            except (TypeError, KeyError):
                return super().append(message, delivery_tag)
            try:
                super().append(message, delivery_tag)
            finally:
                message._raw = raw

        def restore_unacked(self, client: Any = None) -> Any:
            # When the broker connection breaks, Celery collects the connection (which detaches its
            # transport) before closing it; closing the channel then restores what it holds through the
            # detached transport, and kombu's AttributeError ('NoneType' ... 'hostname') is not a
            # connection error: the worker died of it ("Unrecoverable error") in a Sentinel failover.
            # Nothing can be restored through that connection: the consumer gives these deliveries back
            # once it is connected again (rekku_workers.reconnect).
            if client is None and getattr(self.channel.connection, "client", None) is None:
                log.warning("the broker connection is gone: %d deliveries are given back once it is "
                            "connected again", len(self._delivered))
                self._delivered.clear()
                return None
            return super().restore_unacked(client)

    kombu_redis.Channel.QoS = OwnedQoS


# ----------------------------------------------------------------------------- worker heartbeat
def beat(client: redis.Redis, hostname: str, incarnation: str | None, ttl: int) -> None:
    """One heartbeat: the node's key (holding the incarnation) and the incarnation's own key."""
    pipe = client.pipeline(transaction=False)
    pipe.set(HEARTBEAT_PREFIX + hostname, incarnation or "1", ex=ttl)
    if incarnation:
        pipe.set(f"{HEARTBEAT_PREFIX}{hostname}#{incarnation}", "1", ex=ttl)
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
