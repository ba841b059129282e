"""Due events: the tables, the dispatcher beat runs every ``EVENT_TICK_SECONDS``, and the delivery task.

Exactly once, end to end:

1. **Claim.** :func:`dispatch_due` takes the rows of ``scheduled_events`` due within the next
   :data:`LOOKAHEAD_TICKS` ticks (MariaDB: ``SELECT … FOR UPDATE SKIP LOCKED``, so two dispatchers
   started by two beats split the rows; SQLite: a
   conditional ``UPDATE … WHERE next_run = :seen`` under its single writer). In the same
   transaction it inserts one ``event_deliveries`` row per occurrence — unique on (event, occurrence
   time) — and advances the event to its next occurrence (or ends it), all rows in a few statements
   (:func:`update_rows`). Only then, after the commit, are deliveries enqueued, with the due time as
   their ETA; a delivery task never sends an occurrence before it is due.
2. **Deliver.** ``rekku.event.deliver`` (io pool) sends the reminder through the target interface
   under a deterministic message id (``event:<id>:<occurrence>:reminder``) that the interface layer
   records per part, so a redelivered or retried delivery never sends twice, and puts the
   ``event_reminder`` system message on the model's feed (never in the human chat) under the
   dedupe key ``event:<id>:<occurrence>:system``; scheduled actions go through
   :meth:`Ingress.submit` with the idempotency key ``event:<id>:<occurrence>:actions``.
   When the reminder goes to the outbox (no scheduled actions, a chat without forwards) a chunk's
   messages with their delivery records, then its feed items, then its ``delivered`` marks are
   written in three transactions (:func:`_deliver_to_outbox`) instead; on any error it falls back
   to the one-by-one path, which finds what is already sent.
   The row becomes ``delivered`` only when all of that succeeded; a failure leaves it ``failed``
   with the error and is retried with backoff up to :data:`MAX_ATTEMPTS`.
3. **Recover.** A delivery whose message was lost (broker, or a worker killed while the row was
   ``pending``) is enqueued again by the next tick once it sat untouched for
   ``REKKU_EVENT_REDELIVER_SECONDS``; that is safe because step 2 is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from celery import shared_task

from rekku.plugin import (
    FEED_EVENT_REMINDER,
    Chat,
    ChatForward,
    JSONType,
    NewFeedItem,
    Rule,
    UTCDateTime,
    default_ingress,
    deliver,
    feed_announce,
    feed_append_now,
    feed_prepare,
    get_engine,
    get_interfaces,
    literal_renderer,
    next_occurrence,
    normalize_context,
    prepare_outbox_at_once,
    retry_delay,
    run_rendered,
    session_factory,
    utcnow,
)
from rekku.plugin import celery_app as app

from .settings import EventSettings

log = logging.getLogger(__name__)

#: Event states: waiting for its next occurrence, series over, cancelled by ``cancel_event``.
ACTIVE, DONE, CANCELLED = "active", "done", "cancelled"
#: Delivery states; ``failed`` rows are retried while attempts remain and are never ``delivered`` unless sent;
#: ``cancelled``: ``cancel_event`` came after the claim but before the occurrence was due.
PENDING, DELIVERED, FAILED, CANCELLED_DELIVERY = "pending", "delivered", "failed", "cancelled"
#: Deliveries still to be made.
OPEN = (PENDING, FAILED)
#: Delivery attempts before a failed occurrence is left failed for good.
MAX_ATTEMPTS = 6
#: Longest wait between delivery retries, in seconds.
MAX_BACKOFF = 300.0
#: Events claimed per dispatcher transaction.
CLAIM_BATCH = 500
#: Occurrences per delivery task message (those for the outbox are written a chunk per statement, the
#: others delivered and recorded one by one).
DELIVERY_CHUNK = 250
#: How far ahead of its due time, in ticks, an occurrence is claimed and published with that time as
#: its ETA: the delivery starts on the due second instead of up to a tick (plus the claim) later, and a
#: burst is claimed before it is due. Four ticks (20 s at the default 5 s tick): claiming 100,000
#: occurrences took two ticks of ~5 s on a loaded 2-core machine, and with a two-tick look-ahead those
#: claims were still running, competing for the same CPU and database, when the burst fell due
#: (bench/README.md, events); one late tick still claims in time.
LOOKAHEAD_TICKS = 4.0
#: Task name of the delivery task (queue ``io``).
DELIVER_TASK = "rekku.event.deliver"
#: Namespace of the deterministic message ids of an occurrence.
_NAMESPACE = uuid.UUID("5b1f3c1e-7a0e-4d8e-9c55-2f0b6f1f0e11")
_NAMESPACE_BYTES = _NAMESPACE.bytes

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
metadata = sa.MetaData()
events = sa.Table(
    "scheduled_events", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("date", sa.String(10)),
    sa.Column("time", sa.String(8)),
    sa.Column("recurrence_type", sa.String(16), nullable=False),
    sa.Column("next_run", UTCDateTime),
    sa.Column("description", sa.String(500), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("delivered", sa.Boolean, nullable=False),
    sa.Column("created_by", sa.String(191)),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("rule", JSONType, nullable=False),
    sa.Column("occurrence_index", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("interface", sa.String(64), nullable=False),
    sa.Column("chat_id", sa.String(191), nullable=False),
    sa.Column("thread_id", sa.String(191), nullable=False),
    sa.Column("actions", JSONType),
    sa.Column("action_id", sa.String(36)),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    #: The verified context of the request that created the event (migration event_0002): its scheduled
    #: actions run with it. NULL on rows made before it was recorded: their actions are not run.
    sa.Column("requester", JSONType),
)
deliveries = sa.Table(
    "event_deliveries", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("event_id", BigId, nullable=False),
    sa.Column("occurrence", UTCDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("result", JSONType),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("delivered_at", UTCDateTime),
    #: When the backoff retry of a failed attempt is due (recovery leaves the row alone until then).
    sa.Column("retry_at", UTCDateTime),
    sa.UniqueConstraint("event_id", "occurrence", name="uq_event_deliveries_occurrence"),
)


def occurrence_key(event_id: int, occurrence: datetime) -> str:
    """``event:<id>:<occurrence iso UTC>``: the stem of every idempotency key of one occurrence."""
    return f"event:{event_id}:{occurrence.isoformat()}"


def message_id(event_id: int, occurrence: datetime, part: str) -> str:
    """A deterministic action id (a UUID, 36 chars) for one message of one occurrence: exactly
    ``str(uuid.uuid5(_NAMESPACE, "<occurrence key>:<part>"))``, computed without building UUID objects
    (a burst computes hundreds of thousands of them)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{occurrence_key(event_id, occurrence)}:{part}".encode())
                       .digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: The request context keys an event keeps for its scheduled actions (not ``message_id``: a scheduled
#: action is not a reply to the message that asked for it).
REQUESTER_KEYS = ("interface", "chat_id", "thread_id", "user_id", "username")
#: Why a row without a recorded requester does not run its scheduled actions.
NO_REQUESTER = ("not run: this event was created before its requester was recorded, so there is nobody "
                "to run its scheduled actions as (its 'created_by' is only a label); create the event again")


def requester_of(context: Any) -> dict[str, str]:
    """The verified requester an event keeps, from a request context (a dict or an ActionContext):
    only what the API token holder said, never anything from a payload."""

    fields = context if isinstance(context, dict) else vars(context)
    return {k: v for k, v in normalize_context(fields).items() if k in REQUESTER_KEYS}


def new_event(rule: Rule, first: datetime, description: str, interface: str, chat_id: str,
              thread_id: str | None = None, *, created_by: str | None = None, actions: list | None = None,
              action_id: str | None = None, requester: dict[str, str] | None = None,
              now: datetime | None = None) -> dict[str, Any]:
    """The ``scheduled_events`` row of a new event whose first occurrence is ``first``.

    ``requester`` is the verified context of the request that made it (see :func:`requester_of`); its
    scheduled actions run with it. ``created_by`` is a label and is never used as the user."""
    now = now or utcnow()
    local = first.astimezone(rule.zone)
    return {"date": local.date().isoformat(), "time": local.time().isoformat(timespec="seconds"),
            "recurrence_type": rule.repeat, "next_run": first, "description": description, "created_at": now,
            "delivered": False, "created_by": created_by, "timezone": rule.tz, "rule": rule.as_dict(),
            "occurrence_index": 0, "status": ACTIVE, "interface": interface, "chat_id": str(chat_id),
            "thread_id": str(thread_id or ""), "actions": actions or None, "action_id": action_id,
            "requester": requester, "updated_at": now}


# ----------------------------------------------------------------------------- dispatcher
def _advance(row: Any, now: datetime) -> dict[str, Any]:
    """The event's new columns once its occurrence at ``row.next_run`` is claimed."""
    rule = Rule.from_dict(row.rule)
    found = next_occurrence(rule, max(now, row.next_run), row.occurrence_index)
    if found is None:
        return {"status": DONE, "delivered": True, "next_run": row.next_run, "occurrence_index": row.occurrence_index,
                "updated_at": now}
    return {"status": ACTIVE, "delivered": False, "next_run": found[0], "occurrence_index": found[1],
            "updated_at": now}


def update_rows(conn: sa.Connection, table: sa.Table, changes: dict[int, dict[str, Any]], *,
                only_status: tuple[str, ...] = ()) -> int:
    """Give each row (by id) its own new values in ONE statement (``CASE WHEN id = …``), not one round
    trip per row: a burst claims and delivers thousands of rows, and per-row UPDATEs were most of its
    time. Every change sets the same columns; a column all rows set alike is set plainly. The statement
    is built once per shape and cached, so a chunk costs only its parameters. ``only_status``: leave
    rows in other states alone."""
    if not changes:
        return 0
    rows = list(changes.values())
    columns = tuple(sorted(rows[0]))
    if any(len(change) != len(columns) or any(c not in change for c in columns) for change in rows):
        raise ValueError("update_rows: every change must set the same columns")
    uniform = tuple(c for c in columns if all(change[c] == rows[0][c] for change in rows))
    varying = tuple(c for c in columns if c not in uniform)
    params: dict[str, Any] = {"ids": list(changes)}
    params.update({f"u_{c}": rows[0][c] for c in uniform})
    for n, (row_id, change) in enumerate(changes.items()):
        params[f"k{n}"] = row_id
        params.update({f"{c}_{n}": change[c] for c in varying})
    statement = _rows_update(table.name, varying, uniform, len(rows) if varying else 0, only_status)
    return conn.execute(statement, params).rowcount


@lru_cache(maxsize=64)
def _rows_update(table_name: str, varying: tuple[str, ...], uniform: tuple[str, ...], size: int,
                 only_status: tuple[str, ...]) -> sa.Update:
    table = metadata.tables[table_name]
    values: dict[str, Any] = {c: sa.bindparam(f"u_{c}", type_=table.c[c].type) for c in uniform}
    for c in varying:
        values[c] = sa.case(*[(table.c.id == sa.bindparam(f"k{n}", type_=table.c.id.type),
                               sa.bindparam(f"{c}_{n}", type_=table.c[c].type)) for n in range(size)],
                            else_=table.c[c])
    where = [table.c.id.in_(sa.bindparam("ids", expanding=True))]
    if only_status:
        where.append(table.c.status.in_(only_status))
    return sa.update(table).where(*where).values(**values)


def _claim_batch(now: datetime, until: datetime, limit: int) -> list[tuple[int, datetime]]:
    """Claim up to ``limit`` occurrences due by ``until`` in one transaction; returns (event id, occurrence)."""
    engine = get_engine()
    mysql = engine.dialect.name == "mysql"
    claimed: list[tuple[int, datetime]] = []
    # READ COMMITTED: the locking read takes no gap locks, so dispatchers racing on MariaDB skip each
    # other's rows instead of deadlocking on the index ranges they scanned.
    options = {"isolation_level": "READ COMMITTED"} if mysql else {}
    with engine.connect().execution_options(**options) as conn, conn.begin():
        query = (sa.select(events.c.id, events.c.next_run, events.c.rule, events.c.occurrence_index)
                 .where(events.c.status == ACTIVE, events.c.next_run <= until)
                 .order_by(events.c.next_run).limit(limit))
        if mysql:
            query = query.with_for_update(skip_locked=True)
        rows = conn.execute(query).all()
        if not rows:
            return []
        if mysql:  # the rows are locked: nobody else can claim them
            update_rows(conn, events, {row.id: _advance(row, now) for row in rows})
            claimed = [(row.id, row.next_run) for row in rows]
        else:  # SQLite: one writer, but another dispatcher may have claimed a row since our read
            for row in rows:
                done = conn.execute(sa.update(events).where(events.c.id == row.id, events.c.status == ACTIVE,
                                                            events.c.next_run == row.next_run)
                                    .values(**_advance(row, now)))
                if done.rowcount == 1:
                    claimed.append((row.id, row.next_run))
        if claimed:
            conn.execute(sa.insert(deliveries), [
                {"event_id": event_id, "occurrence": at, "status": PENDING, "attempts": 0,
                 "created_at": now, "updated_at": now} for event_id, at in claimed])
    return claimed


def _stale(now: datetime, lease: float) -> list[tuple[int, datetime]]:
    """Deliveries not finished and untouched for ``lease`` seconds past their due time (their message was lost)."""
    cutoff = now - timedelta(seconds=lease)
    with get_engine().connect() as conn:
        rows = conn.execute(sa.select(deliveries.c.event_id, deliveries.c.occurrence)
                            .where(deliveries.c.status.in_(OPEN), deliveries.c.attempts < MAX_ATTEMPTS,
                                   deliveries.c.updated_at <= cutoff, deliveries.c.occurrence <= cutoff,
                                   sa.or_(deliveries.c.retry_at.is_(None), deliveries.c.retry_at <= cutoff))
                            .limit(CLAIM_BATCH)).all()
    return [(r.event_id, r.occurrence) for r in rows]


def _touch(keys: list[tuple[int, datetime]], now: datetime) -> None:
    with get_engine().begin() as conn:
        for event_id, at in keys:
            conn.execute(sa.update(deliveries).where(deliveries.c.event_id == event_id,
                                                     deliveries.c.occurrence == at).values(updated_at=now))


def enqueue_deliveries(keys: list[tuple[int, datetime]], countdown: float | None = None) -> None:
    """Publish delivery tasks for these occurrences, :data:`DELIVERY_CHUNK` per message; an occurrence
    not due yet is published with its due time as ETA (the worker holds it until then)."""
    now = utcnow()
    by_eta: dict[datetime | None, list[list[Any]]] = {}
    for event_id, at in keys:
        by_eta.setdefault(at if countdown is None and at > now else None, []).append([event_id, at.isoformat()])
    with app.producer_or_acquire() as producer:
        for eta, items in by_eta.items():
            for start in range(0, len(items), DELIVERY_CHUNK):
                app.send_task(DELIVER_TASK, kwargs={"items": items[start:start + DELIVERY_CHUNK]}, queue="io",
                              countdown=countdown, eta=eta, producer=producer)


def dispatch_due(now: datetime | None = None, enqueue: Any = None, lookahead: float | None = None) -> int:
    """Claim every occurrence due within ``lookahead`` seconds (default :data:`LOOKAHEAD_TICKS` ticks),
    record it, advance its event, then enqueue its delivery; returns how many.

    ``now`` and ``enqueue`` are injectable: a test drives the scheduler with its own clock and
    collects what would be enqueued."""
    now = now or utcnow()
    enqueue = enqueue or enqueue_deliveries
    if lookahead is None:
        lookahead = LOOKAHEAD_TICKS * EventSettings.get().tick_seconds
    until = now + timedelta(seconds=lookahead)
    claimed, deadlocks = 0, 0
    while True:
        try:
            batch = _claim_batch(now, until, CLAIM_BATCH)
        except sa.exc.OperationalError as exc:  # MariaDB: two dispatchers' inserts deadlocked; ours rolled back
            deadlocks += 1
            if getattr(exc.orig, "args", (None,))[0] not in (1213, 1205) or deadlocks > 5:
                raise
            continue
        if not batch:
            return claimed
        claimed += len(batch)
        enqueue(batch)
        if len(batch) < CLAIM_BATCH:
            return claimed


def _give_up_interrupted(now: datetime, lease: float) -> int:
    """Occurrences whose every attempt was cut short (their worker killed mid-delivery each time) end
    ``failed`` with a reason instead of staying ``pending`` forever, never retried and never explained."""
    cutoff = now - timedelta(seconds=lease)
    with get_engine().begin() as conn:
        return conn.execute(sa.update(deliveries)
                            .where(deliveries.c.status == PENDING, deliveries.c.attempts >= MAX_ATTEMPTS,
                                   deliveries.c.updated_at <= cutoff)
                            .values(status=FAILED, updated_at=now,
                                    error=f"delivery interrupted {MAX_ATTEMPTS} times (its worker was lost "
                                          "each time); not retried")).rowcount


def recover_lost(now: datetime | None = None, enqueue: Any = None) -> int:
    """Enqueue again the deliveries left unfinished and untouched for ``REKKU_EVENT_REDELIVER_SECONDS``."""
    now = now or utcnow()
    lease = EventSettings.get().redeliver_seconds
    if given_up := _give_up_interrupted(now, lease):
        log.error("%d event deliveries were interrupted %d times each; left failed", given_up, MAX_ATTEMPTS)
    stale = _stale(now, lease)
    if stale:
        _touch(stale, now)
        log.warning("re-enqueuing %d event deliveries whose message was lost", len(stale))
        (enqueue or enqueue_deliveries)(stale)
    return len(stale)


def tick() -> dict[str, int]:
    """What beat runs every EVENT_TICK_SECONDS (``rekku.periodic.event.tick``)."""
    return {"claimed": dispatch_due(), "redelivered": recover_lost()}


# ----------------------------------------------------------------------------- delivery
def reminder_text(description: str) -> str:
    return f"⏰ Reminder: {description}"


def system_message(event: Any, occurrence: datetime) -> NewFeedItem:
    """The occurrence as the model hears it: an ``event_reminder`` item of the feed (upstream's
    ``system_message`` of that type), once per occurrence, never a message in the human chat."""
    zone = ZoneInfo(event.timezone)  # the rule's zone (new_event stores rule.tz there); ZoneInfo caches it
    target = {"interface": event.interface, "chat_id": event.chat_id, "thread_id": event.thread_id or None}
    data = {"type": "event_reminder", "event_id": event.id, "description": event.description,
            "scheduled": occurrence.astimezone(zone).isoformat(), "scheduled_utc": occurrence.isoformat(),
            "timezone": event.timezone, "recurrence": event.recurrence_type, "created_by": event.created_by,
            "requested_by": _requested_by(event), "target": target}
    return NewFeedItem.about(FEED_EVENT_REMINDER, target, data,
                             dedupe_key=message_id(event.id, occurrence, "system"))


def _requested_by(event: Any) -> dict[str, str] | None:
    """Who really asked for the event (verified), as the system message shows it; ``created_by`` is
    what the model wrote and may name anyone."""
    requester = getattr(event, "requester", None)
    if not requester:
        return None
    return {k: requester[k] for k in ("interface", "user_id", "username") if requester.get(k)} or None


def run_scheduled_actions(event: Any, occurrence: datetime) -> dict[str, Any]:
    """Submit the event's scheduled actions through the ingress with the STORED requester context, so
    they are validated and authorized again as the person who asked (a trainer demoted since is
    refused now). A row without a recorded requester runs nothing: running its actions with its
    target chat or its ``created_by`` would let the payload choose who they run as."""

    requester = getattr(event, "requester", None)
    if not isinstance(requester, dict):  # NULL: a row from before event_0002 ({} is a request with no context)
        log.warning("event %s occurrence %s: %d scheduled actions %s", event.id, occurrence.isoformat(),
                    len(event.actions), NO_REQUESTER)
        return {"not_run": NO_REQUESTER, "count": len(event.actions)}
    answer = default_ingress().submit({"actions": event.actions}, context=requester_of(requester),
                                      idempotency_key=f"{occurrence_key(event.id, occurrence)}:actions")
    return {"batch_id": answer.batch_id, "accepted": answer.accepted, "rejected": answer.rejected}


def deliver_occurrence(event: Any, occurrence: datetime) -> dict[str, Any]:
    """Send one occurrence of ``event`` (a scheduled_events row): reminder, system message, scheduled
    actions. Idempotent (deterministic message ids and idempotency key); raises on failure."""

    event_id = event.id
    target = Chat(event.interface, event.chat_id, event.thread_id or None)
    result: dict[str, Any] = {"reminder": deliver(target, message_id(event_id, occurrence, "reminder"),
                                                  text=reminder_text(event.description))}
    result["system_message"] = {"feed_item": feed_append_now([system_message(event, occurrence)])[0]}
    if event.actions:
        result["actions"] = run_scheduled_actions(event, occurrence)
    return result


#: The event columns a delivery reads (not the rule, dates or bookkeeping: a burst reads thousands).
_DELIVERY_COLUMNS = [events.c[name] for name in ("id", "description", "timezone", "recurrence_type", "created_by",
                                                 "interface", "chat_id", "thread_id", "actions", "requester")]


def _open_deliveries(items: list[list[Any]]) -> tuple[list[tuple[Any, datetime]], dict[int, Any]]:
    """The still-undelivered occurrences among ``items`` (their rows) and their events: two reads for the
    whole chunk."""
    if not items:
        return [], {}
    wanted = {(int(event_id), datetime.fromisoformat(at)) for event_id, at in items}
    ids = sorted({event_id for event_id, _ in wanted})
    with get_engine().connect() as conn:
        rows = [r for r in conn.execute(sa.select(deliveries.c.id, deliveries.c.event_id, deliveries.c.occurrence,
                                                  deliveries.c.attempts)
                                        .where(deliveries.c.event_id.in_(ids), deliveries.c.status.in_(OPEN),
                                               deliveries.c.attempts < MAX_ATTEMPTS)).all()
                if (r.event_id, r.occurrence) in wanted]
        if not rows:
            return [], {}
        found = {e.id: e for e in conn.execute(sa.select(*_DELIVERY_COLUMNS).where(events.c.id.in_(ids))).all()}
    return [(r, r.occurrence) for r in rows], found


def _count_attempt(rows: list[tuple[Any, datetime]]) -> None:
    """Count an attempt on these rows, in its own transaction, before any of them is sent: a worker
    killed mid-delivery (even inside the outbox chunk's transaction) has used one, so a chunk that
    kills its worker every time ends after MAX_ATTEMPTS instead of being recovered forever."""
    if rows:
        with get_engine().begin() as conn:
            conn.execute(sa.update(deliveries).where(deliveries.c.id.in_([row.id for row, _ in rows]))
                         .values(attempts=deliveries.c.attempts + 1, updated_at=utcnow()))


def _outbox_batchable(rows: list[tuple[Any, datetime]], found: dict[int, Any]) -> list[tuple[Any, datetime]]:
    """The occurrences of a chunk that :func:`_deliver_to_outbox` may write in one transaction: target the
    outbox, no scheduled actions, and a chat with no cross-platform forwards (those take the
    per-occurrence path, which honours them)."""

    outbox = get_interfaces().get("outbox")
    if outbox is None or not outbox.stored:
        return []
    picked = [(row, at) for row, at in rows if (event := found.get(row.event_id)) is not None
              and event.interface == "outbox" and not event.actions]
    if not picked:
        return []
    chats = sorted({found[row.event_id].chat_id for row, _ in picked})
    with get_engine().connect() as conn:
        linked = set(conn.scalars(sa.select(ChatForward.source_chat_id).distinct()
                                  .where(ChatForward.source_interface == "outbox",
                                         ChatForward.source_chat_id.in_(chats))).all())
    return [(row, at) for row, at in picked if found[row.event_id].chat_id not in linked]


def _deliver_to_outbox(rows: list[tuple[Any, datetime]], found: dict[int, Any]) -> int:
    """Deliver these outbox occurrences a chunk at a time, in three short transactions instead of one
    per occurrence: (1) the reminders with their delivery records (rekku.interfaces.delivery.
    prepare_outbox_at_once, the same records as any delivery), (2) the ``event_reminder`` system
    messages on the feed, (3) the ``delivered`` marks. Each part is exactly once on its own: a reminder
    is never stored without its record, nor a feed item twice (its dedupe key), and (1) raises
    (nothing written) if any reminder of the chunk was already recorded. Anything raising sends the
    caller to the per-occurrence path, which finds what is already sent and finishes the rest, as it
    does when a worker died between two of these.

    Why three: (1) holds the outbox's order lock and (2) the feed's from their first insert to their
    commit, and every writer of either waits on them (rekku/ordering.py). In one transaction a chunk
    held the outbox's lock through all of it and a burst of reminders was as fast as that one lock
    allowed (bench/README.md, events); split, a chunk holds each lock for one insert (two for the
    outbox) while another chunk holds the other, and the marks take no order lock at all. All the
    checks, rows and statement texts are made before either lock is taken."""

    messages, items = [], []
    for row, at in rows:
        event = found[row.event_id]
        messages.append((message_id(row.event_id, at, "reminder"),
                         Chat("outbox", event.chat_id, event.thread_id or None), reminder_text(event.description)))
        items.append(system_message(event, at))
    engine = get_engine()
    with engine.begin() as conn:
        outbox = prepare_outbox_at_once(conn, messages)
        summaries = outbox.write()  # the outbox order lock, held from here to the commit
    with engine.begin() as conn:
        feed = feed_prepare(conn, items, strict=True)
        added = feed.append()  # the feed's order lock, held from here to the commit
    feed_announce(items, added)
    results = [{"reminder": {**summary, "forwarded": []}, "system_message": {"feed_item": item}}
               for summary, item in zip(summaries, added, strict=True)]
    with engine.begin() as conn:
        marked = _mark_delivered(conn, {row.id: result for (row, _), result in zip(rows, results, strict=True)})
    if marked != len(rows):  # sent, and recorded as sent; the rows were cancelled or marked meanwhile
        log.warning("event delivery: %d of %d occurrences sent were no longer open to mark delivered",
                    len(rows) - marked, len(rows))
    return len(rows)


def _mark_delivered(conn: sa.Connection, results: dict[int, dict[str, Any]]) -> int:
    """Mark these delivery rows (id → result) delivered, unless one is no longer open; returns how many.

    On MariaDB the statement is rendered here and sent to the driver as it is, like the chunk's inserts
    (rekku.ordering): SQLAlchemy's building and binding of the ``CASE`` with 250 JSON results cost a
    little more CPU (about 2.4 against 1.9 ms a chunk, one writer), and a burst is CPU-bound."""
    now = utcnow()
    render = literal_renderer(conn)
    if render is not None and results:
        c = deliveries.c
        quote = conn.dialect.identifier_preparer.quote
        when = " ".join(f"WHEN {int(row_id)} THEN {render(c.result, result)}" for row_id, result in results.items())
        at = render(c.updated_at, now)
        sql = (f"UPDATE {quote(deliveries.name)} SET status = {render(c.status, DELIVERED)}, error = NULL, "
               f"delivered_at = {at}, updated_at = {at}, result = CASE id {when} END "
               f"WHERE id IN ({', '.join(str(int(row_id)) for row_id in results)}) "
               f"AND status IN ({', '.join(render(c.status, s) for s in OPEN)})")
        return run_rendered(conn, sql)
    return update_rows(conn, deliveries, {row_id: {"status": DELIVERED, "error": None, "result": result,
                                                   "delivered_at": now, "updated_at": now}
                                          for row_id, result in results.items()}, only_status=OPEN)


def _not_due_yet(items: list[list[Any]]) -> list[list[Any]]:
    """Publish again, with their ETA, the items that are not due yet (a message that came early: recovery
    after a short lease, a clock ahead on the dispatcher's node); returns the items due now."""
    now = utcnow() + timedelta(seconds=0.5)
    due, early = [], []
    for event_id, at in items:
        when = datetime.fromisoformat(at)
        if when > now:
            early.append((int(event_id), when))
        else:
            due.append([event_id, at])
    if early:
        enqueue_deliveries(early)
    return due


@shared_task(name=DELIVER_TASK, queue="io", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_task(items: list[list[Any]]) -> dict[str, int]:
    """Deliver each (event id, occurrence iso) once, not before it is due; a failed one is retried alone,
    with backoff."""
    rows, found = _open_deliveries(_not_due_yet(items))
    _count_attempt(rows)  # before any of it is sent: a worker killed mid-delivery has still used an attempt
    done: dict[int, dict[str, Any]] = {}
    failed = fast = 0
    try:
        batch = _outbox_batchable(rows, found)
        if batch:
            fast = _deliver_to_outbox(batch, found)
            sent = {row.id for row, _ in batch}
            rows = [(row, at) for row, at in rows if row.id not in sent]
    except Exception:  # nothing of the batch was written: every occurrence takes the per-occurrence path
        log.warning("event delivery: the outbox batch of %d failed; delivering one by one", len(rows), exc_info=True)
    for row, occurrence in rows:
        attempts = row.attempts + 1
        event = found.get(row.event_id)
        try:
            result = (_json_safe(deliver_occurrence(event, occurrence)) if event is not None
                      else {"skipped": "event deleted"})
        except Exception as exc:
            failed += 1
            error = f"{type(exc).__name__}: {exc}"[:2000]
            log.warning("event %s occurrence %s: delivery attempt %d failed: %s", row.event_id,
                        occurrence.isoformat(), attempts, error)
            countdown = retry_delay(attempts, MAX_BACKOFF, minimum=1.0)
            _record(row.event_id, occurrence, status=FAILED, error=error, updated_at=utcnow(),
                    retry_at=utcnow() + timedelta(seconds=countdown))
            if attempts < MAX_ATTEMPTS:
                try:
                    enqueue_deliveries([(row.event_id, occurrence)], countdown=countdown)
                except Exception:  # the next tick's recovery re-enqueues it
                    log.exception("could not schedule the retry of event %s at %s", row.event_id, occurrence)
            continue
        done[row.id] = result
    if done:
        with get_engine().begin() as conn:
            _mark_delivered(conn, done)
    return {"delivered": len(done) + fast, "failed": failed}


def _record(event_id: int, occurrence: datetime, **values: Any) -> None:
    with session_factory().begin() as s:
        s.execute(sa.update(deliveries).where(deliveries.c.event_id == event_id,
                                              deliveries.c.occurrence == occurrence,
                                              deliveries.c.status.in_(OPEN)).values(**values))


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
