"""Nothing lost: re-enqueue what the action log says should run but no broker or worker holds.

Redis on these machines keeps nothing on disk, so a broker restart loses every queued message;
a worker node that dies holds its unacknowledged messages until the visibility timeout (an hour
by default). Every ``REKKU_RECONCILE_SECONDS`` beat runs :func:`reconcile`, which

* re-enqueues ``queued`` actions older than ``REKKU_RECONCILE_GRACE`` whose message is in no
  queue and in no worker's unacknowledged set (the grace covers the ingress between its commit and
  its publish), and
* recovers what dead worker incarnations held: ``running`` actions whose worker stopped its
  heartbeat are moved back to ``queued`` and re-enqueued, and the messages such a worker had taken
  (running or prefetched: each unacknowledged entry names the incarnation holding it) leave the
  unacknowledged set at once, an action's to be re-enqueued, any other task's back to its queue;
* moves actions waiting in a dead node's own queue (``terminal.<node>``: nobody else consumes it)
  to where their plugin routes them now.

Worker identity: each start of a worker process is an *incarnation* (a random id made at start): the
action log's ``worker`` column says ``pool@node#incarnation`` and each incarnation beats its own key
(``rekku:worker:pool@node#incarnation``, a TTL of ``REKKU_WORKER_HEARTBEAT_TTL``) besides the node's
(``rekku:worker:pool@node``, holding the newest incarnation). A node restarted under the same name
(systemd, compose, Kubernetes) therefore does not keep its dead predecessor "alive": it recovers the
predecessor's running and unacknowledged actions as soon as it starts (workers/recovery.py),
and a node that never returns is recovered once its key expires, by the next reconciler pass: within
the TTL plus ``REKKU_RECONCILE_SECONDS`` of its death.

A finished action is never re-enqueued, and the worker's claim refuses a delivery of an action
that is already final, so a re-enqueue can never run finished work twice. A re-enqueued action
carries exactly the payload and the context the action log recorded when it was accepted (the
verified request context, never anything a payload said), and the worker authorizes it again.
A run lost with its worker is counted (``lost_runs``); at ``REKKU_MAX_ATTEMPTS`` the action fails
instead of being re-enqueued (a poison message that kills its process every time).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
import sqlalchemy as sa

from rekku import dispatch, held
from rekku.action_log import NewRun, run_as_dict, shared_log, stuck_condition
from rekku.broker import broker_client
from rekku.celery_app import app
from rekku.db import get_engine
from rekku.ingest import default_ingress
from rekku.models import QUEUED, RUNNING, ActionRun, utcnow
from rekku.registry import get_registry
from rekku.settings import Settings, get_settings
from rekku.worker_identity import HEARTBEAT_PREFIX

log = logging.getLogger(__name__)

#: Kombu's Redis transport keeps delivered-but-unacknowledged messages in this hash.
UNACKED_KEY = "unacked"
#: Kombu's index of unacknowledged deliveries (delivery tag → time), restored after the visibility timeout.
UNACKED_INDEX_KEY = "unacked_index"
#: Message property naming the worker incarnation that holds an unacknowledged delivery.
OWNER_PROPERTY = "rekku_owner"
#: When the reconciler first saw this Redis (no expiry): right after a Redis restart every heartbeat is
#: missing for a moment, which says nothing about the workers; dead ones are named only a TTL later.
SINCE_KEY = "rekku:reconciler:since"
#: Held while a pass recovers or re-enqueues anything (the reconciler's, or a starting worker's): two at
#: once would both read a dead node's running action before either moved it, and publish it twice.
LOCK_KEY = "rekku:reconciler:lock"
#: Seconds the lock lives if its holder dies mid-pass; a starting worker waits at most this for it.
LOCK_SECONDS = 120
#: Kombu's priority sub-queues are ``<queue>\x06\x16<priority>`` for these priorities.
PRIORITY_STEPS = ("", "\x06\x163", "\x06\x166", "\x06\x169")
#: Most actions re-enqueued per run (the next run takes the rest).
BATCH = 5000
#: Action tasks' names start with this.
ACTION_TASK_PREFIX = "rekku.action."


# ----------------------------------------------------------------------------- what the broker holds
@dataclass(frozen=True)
class Delivery:
    """One unacknowledged message in kombu's hash."""

    tag: str
    task_id: str | None
    task: str | None
    #: The worker incarnation holding it (None: an entry written by a consumer that does not say).
    owner: str | None


def _message(raw: bytes) -> dict | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        return message if isinstance(message, dict) else None
    except ValueError:
        return None


def ids_in(payloads: list[bytes]) -> set[str]:
    ids = set()
    for raw in payloads:
        try:
            ids.add((_message(raw) or {})["headers"]["id"])
        except (KeyError, TypeError):
            continue
    return ids


def unacked(client: redis.Redis) -> list[Delivery]:
    """Every unacknowledged delivery, with the task it carries and the incarnation holding it."""
    deliveries = []
    for tag, raw in client.hgetall(UNACKED_KEY).items():
        message = _message(raw) or {}
        headers = message.get("headers") if isinstance(message.get("headers"), dict) else {}
        properties = message.get("properties") if isinstance(message.get("properties"), dict) else {}
        owner = properties.get(OWNER_PROPERTY)
        deliveries.append(Delivery(tag.decode(), headers.get("id"), headers.get("task"),
                                   owner if isinstance(owner, str) else None))
    return deliveries


def forget_unacked(client: redis.Redis, ids: set[str]) -> set[str]:
    """Drop dead workers' unacknowledged copies of ``ids``, so Redis does not hand them out again after
    the visibility timeout (possibly while the re-enqueued copy runs); returns the ids dropped."""
    dropped: set[str] = set()
    for tag, raw in client.hgetall(UNACKED_KEY).items():
        if found := ids_in([raw]) & ids:
            if _drop(client, tag):
                dropped |= found
    return dropped


def _drop(client: redis.Redis, tag: str | bytes) -> bool:
    pipe = client.pipeline()
    pipe.hdel(UNACKED_KEY, tag)
    pipe.zrem(UNACKED_INDEX_KEY, tag)
    return bool(pipe.execute()[0])


def take_from_queue(client: redis.Redis, queue: str, ids: set[str]) -> set[str]:
    """Remove the waiting messages of ``ids`` from ``queue``; returns the ids removed (a consumer that
    took one first wins, and that one is not re-enqueued)."""
    taken: set[str] = set()
    for step in PRIORITY_STEPS:
        for raw in client.lrange(queue + step, 0, -1):
            if (found := ids_in([raw]) & ids) and client.lrem(queue + step, 1, raw):
                taken |= found
    return taken


def queued_ids(client: redis.Redis, queues: set[str]) -> set[str]:
    held: set[str] = set()
    for queue in queues:
        for step in PRIORITY_STEPS:
            held |= ids_in(client.lrange(queue + step, 0, -1))
    return held


def held_by_broker(client: redis.Redis, queues: set[str]) -> set[str]:
    """Task ids waiting in ``queues`` or delivered to a worker and not yet acknowledged."""
    return ids_in(list(client.hvals(UNACKED_KEY))) | queued_ids(client, queues)


def _unacked_by_queue(client: redis.Redis) -> dict[str, set[str]]:
    """Task ids of the unacknowledged deliveries, by the queue they came from."""
    found: dict[str, set[str]] = {}
    for raw in client.hvals(UNACKED_KEY):
        try:
            entry = json.loads(raw)
            found.setdefault(entry[2], set()).add(entry[0]["headers"]["id"])
        except (ValueError, LookupError, TypeError):
            continue
    return found


def queue_length(client: redis.Redis, queue: str) -> int:
    pipe = client.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        pipe.llen(queue + step)
    return sum(pipe.execute())


def held_of(client: redis.Redis, rows: list[Any]) -> set[str]:
    """Which of these queued actions (action log rows) the broker holds: waiting in their queue or
    delivered and not yet acknowledged.

    A queue of at most rekku.held.SCAN_LIMIT messages is read whole (exact). A longer one is judged by
    the held counts (rekku.held): one round trip for the rows asked about, whatever the backlog, as
    long as the queue holds at least as many messages as the rows its counts say it holds; when it
    does not, messages left behind Rekku's back (a purge) and the queue is read whole after all."""
    unacked = _unacked_by_queue(client)
    found: set[str] = set().union(*unacked.values()) if unacked else set()
    by_queue: dict[str, list[str]] = {}
    for r in rows:
        by_queue.setdefault(r.queue, []).append(r.id)
    for queue, ids in by_queue.items():
        length = queue_length(client, queue)
        if length > held.SCAN_LIMIT:
            counted = held.held(client, queue, ids)
            if len(counted - found) <= length:
                found |= counted
                continue
            log.warning("queue %s holds %d messages, fewer than the %d due actions counted in it: some were "
                        "removed behind Rekku's back; reading the queue", queue, length, len(counted - found))
        found |= queued_ids(client, {queue})
    return found & {r.id for r in rows}


def _alive(client: redis.Redis, workers: Iterable[str]) -> set[str]:
    """The workers (``pool@node`` or ``pool@node#incarnation``) whose heartbeat key exists."""
    workers = sorted(set(workers))
    if not workers:
        return set()
    pipe = client.pipeline(transaction=False)
    for worker in workers:
        pipe.exists(HEARTBEAT_PREFIX + worker)
    return {w for w, exists in zip(workers, pipe.execute()) if exists}


# ----------------------------------------------------------------------------- nodes' own queues
def node_of(queue: str) -> str | None:
    """The worker whose own queue this is (``terminal.<node>`` → ``terminal@<node>``), or None for a
    pool's shared queue."""
    from rekku.pools import POOLS

    pool, dot, node = queue.partition(".")
    spec = POOLS.get(pool)
    return f"{pool}@{node}" if dot and node and spec is not None and spec.node_queue else None


def reroute_stranded(client: redis.Redis, rows: list[Any], held: set[str]) -> dict[str, str]:
    """Actions waiting for a node whose worker stopped (its own queue, ``terminal.<node>``, has no
    consumer any more): their plugin routes them again (a terminal session moves to a live node,
    which answers that the session was lost) and their messages leave the dead node's queue and
    unacknowledged set. Returns action id → new queue, for the ones to enqueue there. One the plugin
    still routes to the dead node (its session registry has not noticed yet) waits for a later pass."""

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


# ----------------------------------------------------------------------------- dead incarnations
@dataclass
class Recovered:
    """What :func:`recover_dead` did for some dead worker incarnations."""

    #: Actions now ``queued`` whose message is gone: to re-enqueue.
    requeue: set[str]
    #: Actions failed: their runs were lost REKKU_MAX_ATTEMPTS times.
    failed: set[str]
    #: Unacknowledged deliveries taken off the dead incarnations.
    freed: set[str]


def recover_dead(client: redis.Redis, dead: set[str], deliveries: list[Delivery],
                 settings: Settings) -> Recovered:
    """Take back what the dead worker incarnations ``dead`` held: their ``running`` actions go back to
    ``queued`` with the lost run counted (``failed`` at REKKU_MAX_ATTEMPTS, ``cancelled`` when a cancel
    was asked) and their unacknowledged copies are dropped; the deliveries they had taken but not
    started (prefetched, or waiting for a retry's countdown) leave the unacknowledged set too: an
    action's to be re-enqueued through the one dispatch path, any other task's restored to its queue
    as kombu would after the visibility timeout. Returns the actions to re-enqueue."""
    runs = ActionRun.__table__
    engine = get_engine()
    limit = settings.max_attempts
    out = Recovered(set(), set(), set())
    if not dead:
        return out

    with engine.connect() as conn:
        running = conn.execute(sa.select(runs.c.id, runs.c.worker)
                               .where(runs.c.status == RUNNING, runs.c.worker.in_(sorted(dead)))).all()
    if running:
        ids = [r.id for r in running]
        by_worker: dict[str, list[str]] = {}
        for r in running:
            by_worker.setdefault(r.worker, []).append(r.id)
        queued, out.failed = shared_log().take_back_lost_runs(by_worker, limit)
        if out.failed:
            log.error("failed %d actions whose worker process died %d times running them: %s",
                      len(out.failed), limit, ", ".join(sorted(out.failed)))
        out.requeue |= queued
        forget_unacked(client, set(ids))  # their copies, whoever's entry they are in

    others = []
    taken: dict[str, list[str]] = {}
    for d in deliveries:
        if d.owner not in dead:
            continue
        if d.task and d.task.startswith(ACTION_TASK_PREFIX) and d.task_id:
            if _drop(client, d.tag):
                out.freed.add(d.task_id)
                taken.setdefault(d.owner, []).append(d.task_id)
        else:
            others.append(d.tag)
    if out.freed:
        # never claimed (a prefetched delivery, or one whose process died before its claim): say it was
        # delivered, so its next delivery writes its claim before running (rekku_workers.claim)
        for worker, ids in taken.items():
            shared_log().mark_taken(ids, worker)
        out.requeue |= out.freed
    if others:
        with app.connection_for_write() as connection:
            qos = connection.default_channel.qos
            for tag in others:
                qos.restore_by_tag(tag, leftmost=True)
        log.warning("restored %d tasks a dead worker had taken to their queues", len(others))
    return out


def enqueue_rows(rows: list[Any], moved: dict[str, str] | None = None, client: redis.Redis | None = None) -> list[str]:
    """Re-enqueue ``rows`` (action log rows) through the one dispatch path; returns the unsent ids.
    Their messages are known gone, so their held counts (rekku.held) start again from the new one."""
    moved = moved or {}
    if client is not None:
        by_queue: dict[str, list[str]] = {}
        for r in rows:
            by_queue.setdefault(r.queue, []).append(r.id)
        for queue, ids in by_queue.items():
            held.forget(client, queue, ids)
    by_batch: dict[str, list[NewRun]] = {}
    for r in rows:
        context = {k: v for k, v in (r.context or {}).items() if k != "batch_id"}
        by_batch.setdefault(r.batch_id, []).append(NewRun(r.id, r.position, r.type, moved.get(r.id, r.queue),
                                                          r.payload, context))
    unsent: list[str] = []
    for batch_id, batch_runs in by_batch.items():
        unsent += dispatch.enqueue(batch_runs, batch_id)
    if rows:
        shared_log().restart_grace([r.id for r in rows])
    return unsent


@contextmanager
def one_at_a_time(client: redis.Redis, *, wait: bool) -> Iterator[bool]:
    """Hold :data:`LOCK_KEY` for the block; yields False (and holds nothing) when another holder has it
    and ``wait`` is off, or it stayed taken for :data:`LOCK_SECONDS`."""
    lock = client.lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking=wait, blocking_timeout=LOCK_SECONDS)
    if not lock.acquire():
        yield False
        return
    try:
        yield True
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # it expired (a pass longer than LOCK_SECONDS): nothing to free
            log.warning("the reconciler's lock expired before its pass ended")


# ----------------------------------------------------------------------------- the reconciler
@dataclass
class Outcome:
    requeued_lost: int = 0
    requeued_orphaned: int = 0
    rerouted_from_dead_nodes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requeued_lost": self.requeued_lost, "requeued_orphaned": self.requeued_orphaned,
                "rerouted_from_dead_nodes": self.rerouted_from_dead_nodes}


def _heartbeats_trusted(client: redis.Redis, ttl: float) -> bool:
    """False for a TTL after this Redis first met the reconciler (started empty, or restarted and lost
    every heartbeat): until then a missing heartbeat may be a live worker's not yet beaten again."""
    client.set(SINCE_KEY, time.time(), nx=True)
    since = client.get(SINCE_KEY)
    return since is not None and time.time() - float(since) >= ttl


def reconcile(settings: Settings | None = None) -> dict[str, int]:
    """One pass; returns how many actions were re-enqueued, by reason. A pass that finds another one
    (a second beat, a slow pass, a starting worker's recovery) under way does nothing: that one does it."""
    settings = settings or get_settings()
    client = broker_client(settings)
    with one_at_a_time(client, wait=False) as held_lock:
        if not held_lock:
            return Outcome().as_dict()
        return _pass(settings, client)


def _pass(settings: Settings, client: redis.Redis) -> dict[str, int]:
    runs = ActionRun.__table__
    cutoff = utcnow() - timedelta(seconds=settings.reconcile_grace)
    outcome = Outcome()
    engine = get_engine()

    # Dead worker incarnations: running actions' holders and unacknowledged deliveries' owners whose
    # heartbeat expired (a TTL after their last beat: detection takes the TTL, recovery this pass).
    deliveries = unacked(client)
    with engine.connect() as conn:
        workers = {w for (w,) in conn.execute(sa.select(runs.c.worker).where(runs.c.status == RUNNING).distinct())
                   if w}
    workers |= {d.owner for d in deliveries if d.owner}
    dead: set[str] = set()
    if workers and _heartbeats_trusted(client, settings.worker_heartbeat_ttl):
        dead = workers - _alive(client, workers)
    recovered = recover_dead(client, dead, deliveries, settings)
    orphaned = recovered.requeue

    # The due actions, judged on id and queue alone (read along the status/updated_at index, no sort of
    # the backlog); whole rows only for those that may be re-enqueued or moved.
    waiting = (runs.c.status == QUEUED, runs.c.cancel_requested.is_(False))
    with engine.connect() as conn:
        due = conn.execute(sa.select(runs.c.id, runs.c.queue).where(*waiting, runs.c.updated_at < cutoff)
                           .order_by(runs.c.updated_at).limit(BATCH)).all()
        if orphaned:
            due += conn.execute(sa.select(runs.c.id, runs.c.queue)
                                .where(*waiting, runs.c.id.in_(sorted(orphaned)))).all()
    if not due:
        return outcome.as_dict()
    held_now = held_of(client, due)
    wanted = sorted({r.id for r in due if r.id not in held_now or node_of(r.queue)})
    if not wanted:
        return outcome.as_dict()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(runs).where(*waiting, runs.c.id.in_(wanted)).order_by(runs.c.created_at)).all()
    moved = reroute_stranded(client, rows, held_now)
    if moved:
        shared_log().move_to_queues(moved)
    lost = [r for r in rows if r.id not in held_now or r.id in moved]
    unpublished = set(enqueue_rows(lost, moved, client))  # once, not per action counted
    outcome.requeued_orphaned = sum(1 for r in lost if r.id in orphaned and r.id not in unpublished)
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

    settings = settings or get_settings()
    runs = ActionRun.__table__
    with get_engine().connect() as conn:
        rows = conn.execute(sa.select(runs).where(stuck_condition(settings.reconcile_grace))
                            .order_by(runs.c.updated_at).limit(limit)).all()
    return [run_as_dict(r) for r in rows]
