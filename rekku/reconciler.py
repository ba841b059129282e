"""Nothing lost: re-enqueue what the action log says should run but no broker or worker holds.

Redis on these machines keeps nothing on disk, so a broker restart loses every queued message;
a worker node that dies holds its unacknowledged messages until the visibility timeout (an hour
by default). Every ``REKKU_RECONCILE_SECONDS`` beat runs :func:`reconcile`, which

* re-enqueues ``queued`` actions older than ``REKKU_RECONCILE_GRACE`` whose message is in no
  queue and in no worker's unacknowledged set (the grace covers the ingress between its commit and
  its publish), and
* re-enqueues ``running`` actions whose worker node stopped its heartbeat (a Redis key each worker
  refreshes, :data:`HEARTBEAT_PREFIX`), after moving them back to ``queued``, and
* moves actions waiting in a dead node's own queue (``terminal.<node>``: nobody else consumes it)
  to where their plugin routes them now.

A finished action is never re-enqueued, and the worker's claim refuses a delivery of an action
that is already final, so a re-enqueue can never run finished work twice. A re-enqueued action
carries exactly the payload and the context the action log recorded when it was accepted (the
verified request context, never anything a payload said), and the worker authorizes it again.
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


def forget_unacked(client: redis.Redis, ids: set[str]) -> set[str]:
    """Drop dead workers' unacknowledged copies of ``ids``, so Redis does not hand them out again after
    the visibility timeout (possibly while the re-enqueued copy runs); returns the ids dropped."""
    dropped: set[str] = set()
    for tag, raw in client.hgetall(UNACKED_KEY).items():
        if found := _ids_in([raw]) & ids:
            pipe = client.pipeline()
            pipe.hdel(UNACKED_KEY, tag)
            pipe.zrem(UNACKED_INDEX_KEY, tag)
            if pipe.execute()[0]:
                dropped |= found
    return dropped


def take_from_queue(client: redis.Redis, queue: str, ids: set[str]) -> set[str]:
    """Remove the waiting messages of ``ids`` from ``queue``; returns the ids removed (a consumer that
    took one first wins, and that one is not re-enqueued)."""
    taken: set[str] = set()
    for step in PRIORITY_STEPS:
        for raw in client.lrange(queue + step, 0, -1):
            if (found := _ids_in([raw]) & ids) and client.lrem(queue + step, 1, raw):
                taken |= found
    return taken


def held_by_broker(client: redis.Redis, queues: set[str]) -> set[str]:
    """Task ids waiting in ``queues`` or delivered to a worker and not yet acknowledged."""
    held = _ids_in(list(client.hvals(UNACKED_KEY)))
    for queue in queues:
        for step in PRIORITY_STEPS:
            held |= _ids_in(client.lrange(queue + step, 0, -1))
    return held


# ----------------------------------------------------------------------------- nodes' own queues
def node_of(queue: str) -> str | None:
    """The worker whose own queue this is (``terminal.<node>`` → ``terminal@<node>``), or None for a
    pool's shared queue."""
    from workers.pools import POOLS

    pool, dot, node = queue.partition(".")
    spec = POOLS.get(pool)
    return f"{pool}@{node}" if dot and node and spec is not None and spec.node_queue else None


def reroute_stranded(client: redis.Redis, rows: list[Any], held: set[str]) -> dict[str, str]:
    """Actions waiting for a node whose worker stopped (its own queue, ``terminal.<node>``, has no
    consumer any more): their plugin routes them again (a terminal session moves to a live node,
    which answers that the session was lost) and their messages leave the dead node's queue and
    unacknowledged set. Returns action id → new queue, for the ones to enqueue there. One the plugin
    still routes to the dead node (its session registry has not noticed yet) waits for a later pass."""
    from rekku.ingest import default_ingress
    from rekku.registry import get_registry

    dead = {r.queue for r in rows if (worker := node_of(r.queue)) and not client.exists(HEARTBEAT_PREFIX + worker)}
    if not dead:
        return {}
    ingress, actions = default_ingress(), get_registry().actions
    wanted: dict[str, tuple[str, str]] = {}  # id → (dead queue, new queue)
    for r in rows:
        if r.queue in dead and (spec := actions.get(r.type)) is not None:
            queue = ingress.queue_for(spec, r.payload, r.context or {})
            if queue != r.queue:
                wanted[r.id] = (r.queue, queue)
    if not wanted:  # nothing can move yet: no need to read the unacknowledged set again
        return {}
    freed = forget_unacked(client, set(wanted))
    for queue in dead:
        freed |= take_from_queue(client, queue, {i for i, (old, _) in wanted.items() if old == queue})
    return {i: new for i, (_, new) in wanted.items() if i in freed or i not in held}


# ----------------------------------------------------------------------------- the reconciler
@dataclass
class Outcome:
    requeued_lost: int = 0
    requeued_orphaned: int = 0
    rerouted_from_dead_nodes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requeued_lost": self.requeued_lost, "requeued_orphaned": self.requeued_orphaned,
                "rerouted_from_dead_nodes": self.rerouted_from_dead_nodes}


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
    moved = reroute_stranded(client, rows, held)
    if moved:
        with engine.begin() as conn:
            for queue in set(moved.values()):
                conn.execute(sa.update(runs).where(runs.c.id.in_([i for i, q in moved.items() if q == queue]))
                             .values(queue=queue))
    lost = [r for r in rows if r.id not in held or r.id in moved]
    by_batch: dict[str, list[NewRun]] = {}
    for r in lost:
        context = {k: v for k, v in (r.context or {}).items() if k != "batch_id"}
        by_batch.setdefault(r.batch_id, []).append(NewRun(r.id, r.position, r.type, moved.get(r.id, r.queue),
                                                          r.payload, context))
    unsent = []
    for batch_id, batch_runs in by_batch.items():
        unsent += dispatch.enqueue(batch_runs, batch_id)
    if lost:
        with engine.begin() as conn:  # so the next pass gives them a fresh grace period
            conn.execute(sa.update(runs).where(runs.c.id.in_([r.id for r in lost]), runs.c.status == QUEUED)
                         .values(updated_at=utcnow()))
    orphaned, unpublished = set(dead), set(unsent)  # once, not per action counted
    outcome.rerouted_from_dead_nodes = sum(1 for i in moved if i not in unpublished and i not in orphaned)
    outcome.requeued_lost = sum(1 for r in lost if r.id not in orphaned and r.id not in unpublished
                                and r.id not in moved)
    if lost:
        log.warning("reconciler re-enqueued %d actions the broker had lost and %d whose worker stopped, "
                    "and moved %d off dead nodes' queues", outcome.requeued_lost, outcome.requeued_orphaned,
                    outcome.rerouted_from_dead_nodes)
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
