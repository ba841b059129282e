"""Retention: what the action log and the conversation keep, and the pruner that deletes the rest.

Without it nothing is ever deleted and the SQLite file (or the MariaDB schema) grows forever. Each kind
of record has its retention in days (docs/contracts.md §6, ``REKKU_RETAIN_*``; 0 keeps it forever); the
pruner deletes what is older, and never

* an action that is not final (``queued``, ``running``), nor a batch while one of its actions is kept
  (a batch is also the idempotency record of its request);
* a delivery record of an action that is not final (it is what stops a redelivered send from sending a
  part twice);
* the newest row of any table it prunes by id: SQLite gives a new row the largest id plus one, so
  deleting the newest would hand its id out again, and a reader polling ``after`` (the outbox, the feed)
  would skip the new row. Ids are never reused, and a reader with an old ``after`` still gets every
  remaining row, in order: only rows below a bound are deleted, never anything in between it and the
  newest row;
* a feed item the model webhook has not been given yet (its push cursor, rekku/feed_push.py);
* an artifact a kept action (by its id: ``<action id>.mp3``, or named in its payload or result), a kept
  outbox message or a kept delivery record names.

What is not pruned, on purpose: plugins' tables are user data (the diary, bios, the blocklist, chat
links, scheduled events, the trainer's message map, recent chats), and the one-row-per-chat or
per-receiver cursors (model_turns, receiver_offsets, feed_push, the order locks). A plugin whose table
*is* a log of things done offers it through the optional hook ``prunable() -> [SerialLog]`` (the
event plugin's ``event_deliveries``).

**Small transactions.** Rows go ``REKKU_PRUNE_BATCH`` at a time (500 by default), each batch its own
short transaction that reads one window of the primary key (or of an index on time) and deletes by
primary key, so no statement scans the table and MariaDB locks only the rows it deletes (no gap lock in
front of new inserts). On SQLite, whose one writer lock every writer shares, the pruner pauses after each
batch as long as the batch took, so the lock is free at least half of the time for the ingress and the
workers.

**One pass at a time** across every node: a Redis lock on the broker (:data:`LOCK_KEY`), renewed after
every batch. Beat runs a pass every ``REKKU_PRUNE_SECONDS`` (task :data:`TASK_NAME`, registered by the
worker side); ``rekku prune`` runs one by hand (``--dry-run`` counts and deletes nothing).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
import sqlalchemy as sa

from rekku.artifacts import NAME as ARTIFACT_NAME
from rekku.artifacts import artifact_dir
from rekku.db import get_engine
from rekku.feed import FeedItem
from rekku.feed_push import FeedPush
from rekku.interfaces.models import Delivery, OutboxMessage
from rekku.messages import Message
from rekku.models import FINAL_STATES, QUEUED, RUNNING, ActionRun, Batch, utcnow
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The Celery task beat sends every REKKU_PRUNE_SECONDS (on the default queue).
TASK_NAME, TASK_QUEUE = "rekku.retention.prune", "default"
#: Held by the one pass running, on the broker's Redis.
LOCK_KEY = "rekku:retention:lock"
#: Seconds the lock lives without renewal (it is renewed after every batch): a dead holder frees it then.
LOCK_SECONDS = 120
#: Longest beat pass, in seconds (at most REKKU_PRUNE_SECONDS): a backlog is worked off over several
#: passes rather than holding a default worker for long.
PASS_SECONDS = 300.0
#: Artifact names checked against the action log per query.
ARTIFACT_CHUNK = 50
#: A partial artifact left behind by a writer that died (rekku.artifacts.keep writes ``.<name>.<rnd>.part``).
PARTIAL_SUFFIX = ".part"


class Busy(Exception):
    """Another pruning pass holds the lock."""


@dataclass(frozen=True)
class SerialLog:
    """A table that only grows, with an auto-increment ``id`` in insertion order and a time column:
    pruned by walking the id, oldest first. ``final`` (a SQL condition) says which old rows may go at all;
    ``keep`` (given the connection and the old rows read) names the ids of rows to keep besides; ``ceiling`` gives
    the highest id that may go (default: below the newest row, which is never deleted)."""

    kind: str
    table: sa.Table
    time_column: str
    days: float
    final: sa.ColumnElement[bool] | None = None
    keep: Callable[[sa.Connection, list[Any]], set[int]] | None = None
    ceiling: Callable[[sa.Connection], int | None] | None = None
    #: Columns ``keep`` reads, besides the id.
    columns: tuple[str, ...] = ()


@dataclass
class Tally:
    """One kind's outcome: how many rows (or files) went, or would go with ``--dry-run``."""

    kind: str
    days: float
    cutoff: datetime | None
    count: int = 0
    kept: int = 0  # old rows kept because something still needs them
    longest: float = 0.0  # seconds of this kind's longest batch transaction

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "retain_days": self.days,
                "older_than": self.cutoff.isoformat() if self.cutoff else None, "count": self.count,
                "kept_referenced": self.kept, "longest_batch_seconds": round(self.longest, 4)}


@dataclass
class Report:
    """A pass: per kind, and the longest single batch transaction (seconds)."""

    dry_run: bool
    kinds: list[Tally] = field(default_factory=list)
    batches: int = 0
    longest_batch: float = 0.0
    seconds: float = 0.0
    complete: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "complete": self.complete, "batches": self.batches,
                "longest_batch_seconds": round(self.longest_batch, 4), "seconds": round(self.seconds, 3),
                "kinds": [t.as_dict() for t in self.kinds]}

    @property
    def total(self) -> int:
        return sum(t.count for t in self.kinds)


class _Pass:
    """One pass's clock and lock: each batch is timed, the lock renewed, and the pass stops at its deadline."""

    def __init__(self, report: Report, lock: Any, deadline: float | None, pause: bool) -> None:
        self.report, self.lock, self.deadline, self.pause = report, lock, deadline, pause

    @contextmanager
    def batch(self, tally: Tally) -> Iterator[None]:
        started = time.monotonic()
        yield
        took = time.monotonic() - started
        self.report.batches += 1
        self.report.longest_batch = max(self.report.longest_batch, took)
        tally.longest = max(tally.longest, took)
        if self.lock is not None:
            try:
                self.lock.reacquire()
            except redis.exceptions.LockError:
                raise Busy("the pruning lock expired mid-pass; another pass may have started") from None
        if self.pause and not self.report.dry_run:
            time.sleep(took)  # SQLite's one writer lock is free at least half of the time for everyone else

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.report.complete = False
            return True
        return False


def _cutoff(days: float, now: datetime) -> datetime | None:
    return None if days <= 0 else now - timedelta(days=days)


# ----------------------------------------------------------------------------- the kinds
def _not_final_actions(connection: sa.Connection, action_ids: list[str]) -> set[str]:
    runs = ActionRun.__table__
    if not action_ids:
        return set()
    return set(connection.scalars(sa.select(runs.c.id).where(runs.c.id.in_(action_ids),
                                                             runs.c.status.in_((QUEUED, RUNNING)))))


def _deliveries_kept(connection: sa.Connection, rows: list[Any]) -> set[int]:
    busy = _not_final_actions(connection, sorted({r.action_id for r in rows}))
    return {r.id for r in rows if r.action_id in busy}


def _feed_ceiling(settings: Settings) -> Callable[[sa.Connection], int | None]:
    def ceiling(connection: sa.Connection) -> int | None:
        if not settings.model_webhook_url:
            return None  # nothing is pushed: no cursor to respect
        cursor = FeedPush.__table__
        return connection.scalar(sa.select(cursor.c.last_id).where(cursor.c.id == 1)) or 0
    return ceiling


def core_logs(settings: Settings) -> list[SerialLog]:
    """The core's tables pruned by id (the action log is pruned by status and time: :func:`_prune_actions`)."""
    return [
        SerialLog("deliveries", Delivery.__table__, "created_at", settings.retain_deliveries_days,
                  keep=_deliveries_kept, columns=("action_id",)),
        SerialLog("outbox", OutboxMessage.__table__, "created_at", settings.retain_outbox_days),
        SerialLog("feed", FeedItem.__table__, "created_at", settings.retain_feed_days,
                  ceiling=_feed_ceiling(settings)),
        SerialLog("messages", Message.__table__, "received_at", settings.retain_messages_days),
    ]


def plugin_logs() -> list[SerialLog]:
    """What enabled plugins offer through ``prunable()``."""
    from rekku.registry import get_registry

    found: list[SerialLog] = []
    for name, plugin in get_registry().plugins.items():
        offer = getattr(plugin, "prunable", None)
        if offer is None:
            continue
        try:
            found += list(offer() or [])
        except Exception as exc:
            log.error("plugin %s: prunable() failed (%s); its tables are not pruned", name, exc)
    return found


def _prune_serial(engine: sa.Engine, spec: SerialLog, now: datetime, size: int, run: _Pass) -> Tally:
    tally = Tally(spec.kind, spec.days, _cutoff(spec.days, now))
    if tally.cutoff is None:
        return tally
    table = spec.table
    pk, when = table.c.id, table.c[spec.time_column]
    with engine.connect() as connection:
        newest = connection.scalar(sa.select(sa.func.max(pk)))
        bound = None if spec.ceiling is None else spec.ceiling(connection)
    if newest is None:
        return tally
    top = newest - 1 if bound is None else min(newest - 1, bound)
    last = 0
    while last < top and not run.out_of_time():
        with run.batch(tally), engine.begin() as connection:
            window = connection.execute(sa.select(pk, when, *(table.c[c] for c in spec.columns))
                                        .where(pk > last, pk <= top).order_by(pk).limit(size)).all()
            if not window:
                break
            last = window[-1].id
            old = [r for r in window if r[1] < tally.cutoff]
            if old and spec.final is not None:
                allowed = set(connection.scalars(sa.select(pk).where(pk.in_([r.id for r in old]), spec.final)))
                tally.kept += sum(1 for r in old if r.id not in allowed)
                old = [r for r in old if r.id in allowed]
            if old and spec.keep is not None:
                kept = spec.keep(connection, old)
                tally.kept += len(kept)
                old = [r for r in old if r.id not in kept]
            if old:
                tally.count += _delete(connection, table, pk.in_([r.id for r in old]), spec.final, run.report.dry_run,
                                       len(old))
        if not any(r[1] < tally.cutoff for r in window):
            break  # ids follow time: past the cutoff, everything further is newer
    return tally


def _delete(connection: sa.Connection, table: sa.Table, where: sa.ColumnElement[bool],
            guard: sa.ColumnElement[bool] | None, dry_run: bool, planned: int) -> int:
    if dry_run:
        return planned
    condition = where if guard is None else sa.and_(where, guard)
    return connection.execute(sa.delete(table).where(condition)).rowcount


def _prune_actions(engine: sa.Engine, days: float, now: datetime, size: int, run: _Pass) -> Tally:
    """Final actions whose last change is older than the cutoff, oldest first, a status at a time along
    the index (status, updated_at); the delete says the status again, so an action retried meanwhile
    stays. Every batch deletes what it read, so the next starts at the index's beginning again."""
    runs = ActionRun.__table__
    tally = Tally("actions", days, _cutoff(days, now))
    if tally.cutoff is None:
        return tally
    for status in FINAL_STATES:
        old = sa.and_(runs.c.status == status, runs.c.updated_at < tally.cutoff)
        if run.report.dry_run:
            with run.batch(tally), engine.connect() as connection:
                tally.count += connection.scalar(sa.select(sa.func.count()).select_from(runs).where(old))
            continue
        while not run.out_of_time():
            with run.batch(tally), engine.begin() as connection:
                found = list(connection.scalars(sa.select(runs.c.id).where(old).order_by(runs.c.updated_at)
                                                .limit(size)))
                deleted = connection.execute(sa.delete(runs).where(runs.c.id.in_(found), old)).rowcount \
                    if found else 0
            tally.count += deleted
            if len(found) < size or not deleted:
                break
    return tally


def _prune_batches(engine: sa.Engine, days: float, now: datetime, size: int, run: _Pass,
                   action_days: float) -> Tally:
    """Batches older than the cutoff none of whose actions is left, along ix_action_batches_created."""
    batches, runs = Batch.__table__, ActionRun.__table__
    tally = Tally("batches", days, _cutoff(days, now))
    if tally.cutoff is None:
        return tally
    old = batches.c.created_at < tally.cutoff
    if run.report.dry_run:  # the actions a real pass deletes first are still there: count as if they were gone
        action_cutoff = _cutoff(action_days, now)
        staying = sa.true() if action_cutoff is None else \
            sa.not_(sa.and_(runs.c.status.in_(FINAL_STATES), runs.c.updated_at < action_cutoff))
        has_runs = sa.exists().where(runs.c.batch_id == batches.c.id)
        keeps = sa.exists().where(runs.c.batch_id == batches.c.id, staying)
        with run.batch(tally), engine.connect() as connection:
            tally.count = connection.scalar(sa.select(sa.func.count()).select_from(batches).where(old, ~keeps))
            tally.kept = connection.scalar(sa.select(sa.func.count()).select_from(batches).where(old, has_runs, keeps))
        return tally
    after: tuple[datetime, str] | None = None
    while not run.out_of_time():
        query = sa.select(batches.c.id, batches.c.created_at).where(old)
        if after is not None:
            query = query.where(batches.c.created_at >= after[0],
                                sa.or_(batches.c.created_at > after[0], batches.c.id > after[1]))
        with run.batch(tally), engine.begin() as connection:
            rows = connection.execute(query.order_by(batches.c.created_at, batches.c.id).limit(size)).all()
            if not rows:
                break
            after = (rows[-1].created_at, rows[-1].id)
            ids = [r.id for r in rows]
            busy = set(connection.scalars(sa.select(runs.c.batch_id).where(runs.c.batch_id.in_(ids)).distinct()))
            tally.kept += len(busy)
            gone = [i for i in ids if i not in busy]
            if gone:
                tally.count += connection.execute(sa.delete(batches).where(batches.c.id.in_(gone))).rowcount
        if len(rows) < size:
            break
    return tally


def _actions_going(engine: sa.Engine, cutoff: datetime | None) -> set[str]:
    """For a dry run: the ids of the actions a real pass would delete (what they name keeps no artifact)."""
    if cutoff is None:
        return set()
    runs = ActionRun.__table__
    with engine.connect() as connection:
        return set(connection.scalars(sa.select(runs.c.id).where(runs.c.status.in_(FINAL_STATES),
                                                                  runs.c.updated_at < cutoff)))


# ----------------------------------------------------------------------------- artifacts
def _artifacts_named(connection: sa.Connection, names: list[str], actions_going: set[str]) -> set[str]:
    """The names among ``names`` that a kept row names: an action by its id (``<id>.<ext>``) or in its
    payload or result, an outbox message's audio link, a delivery record's audio. ``actions_going``: in a
    dry run, the actions the pass would delete (they keep nothing)."""
    runs = ActionRun.__table__
    stems = {n: n.split(".", 1)[0] for n in names}
    named = set(connection.scalars(sa.select(runs.c.id).where(runs.c.id.in_(sorted(set(stems.values()))))))
    found = {n for n, stem in stems.items() if stem in named - actions_going}
    rest = [n for n in names if n not in found]
    outbox, deliveries = OutboxMessage.__table__, Delivery.__table__
    texts = [(runs.c.id, sa.cast(runs.c.payload, sa.Text)), (runs.c.id, sa.cast(runs.c.result, sa.Text)),
             (outbox.c.id, outbox.c.audio_url), (deliveries.c.id, deliveries.c.audio)]
    for key, column in texts:
        if not rest:
            break
        rows = connection.execute(sa.select(key, column).where(sa.or_(
            *(column.contains(n, autoescape=True) for n in rest)))).all()
        for row_id, text in rows:
            if text and not (key is runs.c.id and row_id in actions_going):
                found.update(n for n in rest if n in text)
        rest = [n for n in rest if n not in found]
    return found


def _prune_artifacts(engine: sa.Engine, settings: Settings, now: datetime, run: _Pass,
                     actions_going: set[str] | None = None) -> Tally:
    days = settings.retain_artifacts_days
    tally = Tally("artifacts", days, _cutoff(days, now))
    if tally.cutoff is None:
        return tally
    directory = artifact_dir(settings)
    limit = tally.cutoff.timestamp()
    old: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or info.st_mtime >= limit:
                continue  # a link, a directory or a new file: not ours to delete
            partial = entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX)
            if partial or ARTIFACT_NAME.fullmatch(entry.name):
                old.append(entry.name)
    for start in range(0, len(old), ARTIFACT_CHUNK):
        if run.out_of_time():
            break
        chunk = old[start:start + ARTIFACT_CHUNK]
        with run.batch(tally), engine.connect() as connection:
            named = _artifacts_named(connection, [n for n in chunk if not n.startswith(".")], actions_going or set())
        tally.kept += len(named)
        for name in chunk:
            if name in named:
                continue
            if not run.report.dry_run:
                try:
                    os.unlink(directory / name)
                except FileNotFoundError:
                    continue
            tally.count += 1
    return tally


# ----------------------------------------------------------------------------- a pass
def prune(settings: Settings | None = None, *, dry_run: bool = False, lock: Any = None,
          max_seconds: float | None = None, engine: sa.Engine | None = None) -> Report:
    """Prune every kind once (count only with ``dry_run``); ``lock`` (held by the caller) is renewed
    after each batch; past ``max_seconds`` the pass stops (``complete`` False) and the next goes on."""
    settings = settings or get_settings()
    engine = engine or get_engine()
    size = settings.prune_batch
    report = Report(dry_run)
    run = _Pass(report, lock, None if max_seconds is None else time.monotonic() + max_seconds,
                pause=engine.dialect.name == "sqlite")
    started, now = time.monotonic(), utcnow()
    actions = _prune_actions(engine, settings.retain_actions_days, now, size, run)
    report.kinds.append(actions)
    report.kinds.append(_prune_batches(engine, settings.retain_actions_days, now, size, run,
                                       settings.retain_actions_days))
    for spec in [*core_logs(settings), *plugin_logs()]:
        report.kinds.append(_prune_serial(engine, spec, now, size, run))
    going = _actions_going(engine, actions.cutoff) if dry_run else None
    report.kinds.append(_prune_artifacts(engine, settings, now, run, going))
    report.seconds = time.monotonic() - started
    return report


def redis_client(settings: Settings) -> redis.Redis:
    url = settings.resolved_broker_url().replace("redis+socket://", "unix://")
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


@contextmanager
def holding_lock(settings: Settings) -> Iterator[Any]:
    """Hold :data:`LOCK_KEY` for the block (yields the lock, to renew); :class:`Busy` when another pass has it."""
    lock = redis_client(settings).lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        raise Busy("another pruning pass is running")
    try:
        yield lock
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("the pruning lock expired before the pass ended")


def prune_pass(settings: Settings | None = None) -> dict[str, Any]:
    """The beat task's pass: under the lock, at most :data:`PASS_SECONDS` (and REKKU_PRUNE_SECONDS) long;
    the next pass goes on where it stopped."""
    settings = settings or get_settings()
    try:
        with holding_lock(settings) as lock:
            report = prune(settings, lock=lock, max_seconds=min(settings.prune_seconds or PASS_SECONDS, PASS_SECONDS))
    except Busy as exc:
        return {"state": "busy", "reason": str(exc)}
    if report.total:
        log.info("pruned %d rows and files in %.1f s (%s)", report.total, report.seconds,
                 ", ".join(f"{t.kind} {t.count}" for t in report.kinds if t.count))
    return report.as_dict()
