"""A starting worker recovers what earlier starts of its own node name left behind.

A node killed with its whole process group and restarted under the same name (systemd, compose,
Kubernetes) would otherwise wait for its predecessor's heartbeat to expire before the reconciler takes
back that predecessor's running and prefetched actions. Runs in the worker's main process before the
pool forks (workers/node.py).
"""

from __future__ import annotations

import logging
import time

import redis
import sqlalchemy as sa
from rekku_workers.heartbeat import MAX_BEAT_INTERVAL

from rekku.broker import broker_client
from rekku.db import get_engine
from rekku.models import QUEUED, RUNNING, ActionRun
from rekku.reconciler import (
    HEARTBEAT_PREFIX,
    enqueue_rows,
    held_of,
    one_at_a_time,
    recover_dead,
    unacked,
)
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _gone(client: redis.Redis, worker: str, ttl: float) -> bool:
    """Whether the incarnation ``worker`` (of this node's name) is dead. Its key outlives it by up to a
    TTL, so one still there is watched for a heartbeat period and a half: a live one refreshes it (another
    process runs under the same name: nothing of its is touched), a dead one does not."""
    key = HEARTBEAT_PREFIX + worker
    last = client.pttl(key)
    if last == -2:
        return True
    deadline = time.monotonic() + MAX_BEAT_INTERVAL * 1.5  # the longest any worker waits between beats
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = client.pttl(key)
        if now == -2:
            return True
        if now > last:
            log.error("worker %s is alive and uses this node's name: two workers must not share a name "
                      "(its actions are left to it)", worker)
            return False
        last = now
    client.delete(key)
    return True


def recover_predecessors(hostname: str, incarnation: str, settings: Settings | None = None) -> int:
    """Run by a worker as it starts: recover what earlier incarnations of the same node name (a process
    killed with its whole group, then restarted under the same name) left ``running`` or unacknowledged,
    at once instead of after their heartbeat expires. Returns how many actions were re-enqueued."""
    settings = settings or get_settings()
    client = broker_client(settings)
    runs = ActionRun.__table__
    me, prefix = f"{hostname}#{incarnation}", hostname + "#"
    deliveries = unacked(client)
    with get_engine().connect() as conn:
        workers = {w for (w,) in conn.execute(sa.select(runs.c.worker).where(runs.c.status == RUNNING).distinct())}
    candidates = {w for w in workers if w and (w == hostname or w.startswith(prefix))}
    candidates |= {d.owner for d in deliveries if d.owner and d.owner.startswith(prefix)}
    candidates.discard(me)
    ttl = max(3, int(settings.worker_heartbeat_ttl))
    # ``hostname`` alone: a run recorded before incarnations existed, by an earlier start of this node
    dead = {w for w in sorted(candidates) if w == hostname or _gone(client, w, ttl)}
    if not dead:
        return 0
    with one_at_a_time(client, wait=True) as held_lock:
        if not held_lock:
            log.warning("could not recover %s's earlier runs now: a reconciler pass holds the lock; the "
                        "reconciler recovers them", hostname)
            return 0
        recovered = recover_dead(client, dead, unacked(client), settings)  # the unacked set as it is now
        with get_engine().connect() as conn:
            rows = conn.execute(sa.select(runs).where(runs.c.id.in_(sorted(recovered.requeue)),
                                                      runs.c.status == QUEUED,
                                                      runs.c.cancel_requested.is_(False))).all()
        held = held_of(client, rows)  # the reconciler's judgement: queued or delivered, whatever the backlog
        rows = [r for r in rows if r.id not in held]
        unsent = enqueue_rows(rows, client=client)
    log.warning("recovered %d actions from earlier starts of %s (%s); %d failed as poison messages",
                len(rows) - len(unsent), hostname, ", ".join(sorted(dead)), len(recovered.failed))
    return len(rows) - len(unsent)
