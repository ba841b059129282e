"""Nothing lost: re-enqueue what the action log says should run but no broker or worker holds.

Redis on these machines keeps nothing on disk, so a broker restart loses every queued message;
a worker node that dies holds its unacknowledged messages until the visibility timeout (an hour
by default). Every ``REKKU_RECONCILE_SECONDS`` beat runs :func:`reconcile`, which

* re-enqueues ``queued`` actions older than ``REKKU_RECONCILE_GRACE`` whose message is in no
  queue and in no worker's unacknowledged set (the grace covers the ingress between its commit and
  its publish), and
* re-enqueues ``running`` actions whose worker node stopped its heartbeat (a Redis key each worker
  refreshes, :data:`HEARTBEAT_PREFIX`), after moving them back to ``queued``.

A finished action is never re-enqueued, and the worker's claim refuses a delivery of an action
that is already final, so a re-enqueue can never run finished work twice.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
import sqlalchemy as sa

from rekku.action_log import NewRun
from rekku.db import get_engine
from rekku.models import QUEUED, RUNNING, ActionRun, utcnow
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Redis key of a worker node's heartbeat: ``rekku:worker:<hostname>`` (expires when it stops beating).
HEARTBEAT_PREFIX = "rekku:worker:"
#: Kombu's Redis transport keeps delivered-but-unacknowledged messages in this hash.
UNACKED_KEY = "unacked"
#: Kombu's index of unacknowledged deliveries (delivery tag → time), restored after the visibility timeout.
UNACKED_INDEX_KEY = "unacked_index"
#: Kombu's priority sub-queues are ``<queue>\x06\x16<priority>`` for these priorities.
PRIORITY_STEPS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
#: Most actions re-enqueued per run (the next run takes the rest).
BATCH = 5000


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.resolved_broker_url(), socket_timeout=10)


# ----------------------------------------------------------------------------- worker heartbeat
def heartbeat_forever(hostname: str, stop: threading.Event, settings: Settings | None = None) -> None:
    """Refresh ``rekku:worker:<hostname>`` until ``stop`` is set (run in a daemon thread)."""
    settings = settings or get_settings()
    ttl = max(3, int(settings.worker_heartbeat_ttl))
    client = _redis(settings)
    while not stop.is_set():
        try:
            client.set(HEARTBEAT_PREFIX + hostname, "1", ex=ttl)
        except redis.RedisError:
            log.warning("could not refresh the worker heartbeat", exc_info=True)
        stop.wait(ttl / 3)
    try:
        client.delete(HEARTBEAT_PREFIX + hostname)
    except redis.RedisError:
        pass


# ----------------------------------------------------------------------------- what the broker holds
def _ids_in(payloads: list[bytes]) -> set[str]:
    ids = set()
    for raw in payloads:
        try:
            message = json.loads(raw)
            if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
                message = message[0]
            ids.add(message["headers"]["id"])
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return ids


def forget_unacked(client: redis.Redis, ids: set[str]) -> int:
    """Drop dead workers' unacknowledged copies of ``ids``, so Redis does not hand them out again after
    the visibility timeout (possibly while the re-enqueued copy runs)."""
    dropped = 0
    for tag, raw in client.hgetall(UNACKED_KEY).items():
        if _ids_in([raw]) & ids:
            pipe = client.pipeline()
            pipe.hdel(UNACKED_KEY, tag)
            pipe.zrem(UNACKED_INDEX_KEY, tag)
            pipe.execute()
            dropped += 1
    return dropped


def held_by_broker(client: redis.Redis, queues: set[str]) -> set[str]:
    """Task ids waiting in ``queues`` or delivered to a worker and not yet acknowledged."""
    held = _ids_in(list(client.hvals(UNACKED_KEY)))
    for queue in queues:
        for step in PRIORITY_STEPS:
            held |= _ids_in(client.lrange(queue + step, 0, -1))
    return held


# ----------------------------------------------------------------------------- the reconciler
@dataclass
class Outcome:
    requeued_lost: int = 0
    requeued_orphaned: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requeued_lost": self.requeued_lost, "requeued_orphaned": self.requeued_orphaned}


def reconcile(settings: Settings | None = None) -> dict[str, int]:
    """One pass; returns how many actions were re-enqueued, by reason."""
    from rekku import dispatch

    settings = settings or get_settings()
    client = _redis(settings)
    runs = ActionRun.__table__
    cutoff = utcnow() - timedelta(seconds=settings.reconcile_grace)
    outcome = Outcome()
    engine = get_engine()

    with engine.connect() as conn:
        orphans = conn.execute(sa.select(runs.c.id, runs.c.worker).where(runs.c.status == RUNNING,
                                                                           runs.c.updated_at < cutoff)).all()
    dead = [r.id for r in orphans if r.worker and not client.exists(HEARTBEAT_PREFIX + r.worker)]
    if dead:
        with engine.begin() as conn:
            conn.execute(sa.update(runs).where(runs.c.id.in_(dead), runs.c.status == RUNNING)
                         .values(status=QUEUED, updated_at=utcnow(),
                                 error="its worker stopped; re-enqueued by the reconciler"))
        outcome.requeued_orphaned = len(dead)

    with engine.connect() as conn:
        rows = conn.execute(sa.select(runs).where(runs.c.status == QUEUED, runs.c.cancel_requested.is_(False),
                                                  (runs.c.updated_at < cutoff) | runs.c.id.in_(dead or [""]))
                            .order_by(runs.c.created_at).limit(BATCH)).all()
    if not rows:
        return outcome.as_dict()
    if dead:
        forget_unacked(client, set(dead))
    held = held_by_broker(client, {r.queue for r in rows})
    lost = [r for r in rows if r.id not in held]
    by_batch: dict[str, list[NewRun]] = {}
    for r in lost:
        context = {k: v for k, v in (r.context or {}).items() if k != "batch_id"}
        by_batch.setdefault(r.batch_id, []).append(NewRun(r.id, r.position, r.type, r.queue, r.payload, context))
    unsent = []
    for batch_id, batch_runs in by_batch.items():
        unsent += dispatch.enqueue(batch_runs, batch_id)
    if lost:
        with engine.begin() as conn:  # so the next pass gives them a fresh grace period
            conn.execute(sa.update(runs).where(runs.c.id.in_([r.id for r in lost]), runs.c.status == QUEUED)
                         .values(updated_at=utcnow()))
    outcome.requeued_lost = sum(1 for r in lost if r.id not in set(dead) and r.id not in set(unsent))
    if lost:
        log.warning("reconciler re-enqueued %d actions the broker had lost and %d whose worker stopped",
                    outcome.requeued_lost, outcome.requeued_orphaned)
    return outcome.as_dict()


def stuck(settings: Settings | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Actions not finished and not touched for longer than the grace: what `rekku status --stuck` shows."""
    from rekku.action_log import run_as_dict

    settings = settings or get_settings()
    runs = ActionRun.__table__
    cutoff = utcnow() - timedelta(seconds=settings.reconcile_grace)
    with get_engine().connect() as conn:
        rows = conn.execute(sa.select(runs).where(runs.c.status.in_((QUEUED, RUNNING)), runs.c.updated_at < cutoff)
                            .order_by(runs.c.updated_at).limit(limit)).all()
    return [run_as_dict(r) for r in rows]
