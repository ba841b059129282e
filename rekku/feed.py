"""The feed: one ordered stream of what is meant for the model and not for a person.

Incoming messages ready for a turn, query and terminal outputs, due reminders' ``event_reminder``
system messages, corrections of rejected actions and failures the model should know about are items
here (docs/contracts.md, "The conversation"); a human chat gets only human text. Readers follow the
ids: ``GET /v1/feed?after=`` (long poll), ``GET /v1/feed/stream`` (server-sent events) and the model
webhook.

Ids become visible in commit order, so a reader that saw id N and asks for ``after=N`` never misses
an item committed later with a smaller id: every transaction that adds items first locks the one
``feed_order`` row (:func:`rekku.ordering.hold`), as the outbox does. Each item may carry a
``dedupe_key`` (``output:<action id>``, ``failure:<action id>``, ...): a query re-run after a
redelivery, or a reminder delivered twice, adds its item once.

With ``REKKU_MODEL_WEBHOOK_URL`` (and its secret) set, the pusher (rekku/feed_push.py, the task
:data:`PUSH_TASK`) POSTs every item there in id order. It is woken from here, once the connection
that added items goes back to its pool, so after the commit (:func:`_wake_pusher`): whoever adds
items, through :func:`append` or :func:`append_now`, wakes it; beat wakes it every second besides.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from rekku.celery_app import app
from rekku.context import current_action
from rekku.db import get_engine
from rekku.models import Base, BigId, JSONType, UTCDateTime, utcnow
from rekku.ordering import Rendered, hold
from rekku.settings import Settings, get_settings
from rekku.turns import request_turns_for

log = logging.getLogger(__name__)


#: The kinds of item the feed carries.
MESSAGE, OUTPUT, EVENT_REMINDER, CORRECTION, FAILURE = "message", "output", "event_reminder", "correction", "failure"
KINDS = (MESSAGE, OUTPUT, EVENT_REMINDER, CORRECTION, FAILURE)
#: Kinds of item that start a model turn of their chat when the model loop is on (rekku/model_loop.py);
#: a message starts one from rekku.messages, after its own transaction.
TURN_KINDS = (OUTPUT, EVENT_REMINDER, CORRECTION, FAILURE)
#: The dedupe key of a correction of the model loop's own reply: the loop sends it back to the model in
#: the same turn, so it starts no turn and the next turn does not send it again.
LOOP_CORRECTION_PREFIX = "correction:rekku:turn:"

#: The task that pushes the feed to the model's webhook (registered by the worker side, on the io pool).
PUSH_TASK, PUSH_QUEUE = "rekku.feed.push", "io"
#: Key, in the ``info`` of a database connection that added items, that wakes the pusher at its check-in.
_ADDED = "rekku_feed_added"
#: Seconds without wake-ups after one could not be published (the broker is down: beat's tick will do).
_KICK_PAUSE = 5.0
_kick_paused_until = 0.0


class FeedItem(Base):
    __tablename__ = "feed_items"
    __table_args__ = (sa.UniqueConstraint("dedupe_key", name="uq_feed_items_dedupe_key"),
                      sa.Index("ix_feed_items_chat", "interface", "chat_id", "thread_id", "id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(sa.String(32))
    interface: Mapped[str] = mapped_column(sa.String(64), default="")
    chat_id: Mapped[str] = mapped_column(sa.String(191), default="")
    thread_id: Mapped[str] = mapped_column(sa.String(191), default="")
    action_id: Mapped[str | None] = mapped_column(sa.String(36))
    dedupe_key: Mapped[str | None] = mapped_column(sa.String(191))
    data: Mapped[Any] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FeedOrder(Base):
    """One row; every transaction that adds feed items locks it first (see the module's docstring)."""

    __tablename__ = "feed_order"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)


@dataclass(frozen=True)
class NewItem:
    """An item to add: its kind, the chat it is about (empty when none), and what it says."""

    type: str
    data: dict[str, Any]
    interface: str = ""
    chat_id: str = ""
    thread_id: str = ""
    action_id: str | None = None
    dedupe_key: str | None = None

    @classmethod
    def about(cls, type: str, context: dict[str, Any] | None, data: dict[str, Any], **more: Any) -> NewItem:
        """An item about the chat a request context names."""
        ctx = context or {}
        return cls(type, data, interface=str(ctx.get("interface") or ""), chat_id=str(ctx.get("chat_id") or ""),
                   thread_id=str(ctx.get("thread_id") or ""), **more)


def append(connection: sa.Connection, items: list[NewItem]) -> list[int | None]:
    """Add ``items`` in the caller's transaction, in order, under the feed's order lock; returns each
    one's id, or None for an item whose ``dedupe_key`` the feed already holds (nothing is added)."""
    return prepare(connection, items).append()


class Prepared:
    """Items ready to add in a transaction: their rows built, and on MariaDB their INSERT rendered
    (rekku.ordering.Rendered), before the feed's order lock is taken, since every other writer of the
    feed waits while it is held. :meth:`append` takes the lock and adds them as :func:`append` does."""

    def __init__(self, connection: sa.Connection | Any, items: list[NewItem], *, strict: bool = False) -> None:
        for item in items:
            if item.type not in KINDS:
                raise ValueError(f"unknown feed item type {item.type!r}")
        self.connection, self.items, self.strict = connection, items, strict
        now = utcnow()
        self.rows = [{"type": item.type, "interface": item.interface, "chat_id": item.chat_id,
                      "thread_id": item.thread_id, "action_id": item.action_id, "dedupe_key": item.dedupe_key,
                      "data": item.data, "created_at": now} for item in items]
        self.rendered = Rendered.of(_connection_of(connection), FeedItem.__table__, self.rows) if len(items) > 1 \
            else None

    def append(self) -> list[int | None]:
        """Lock the feed's order, add the items whose ``dedupe_key`` it does not hold yet (one statement);
        returns each item's id, None for one not added."""
        if not self.items:
            return []
        connection, table = self.connection, FeedItem.__table__
        hold(connection, FeedOrder)
        keys = [i.dedupe_key for i in self.items if i.dedupe_key and not self.strict]
        present = set(connection.scalars(sa.select(table.c.dedupe_key).where(table.c.dedupe_key.in_(keys)))) \
            if keys else set()
        new: list[int] = []  # positions of the items to add, in order
        for n, item in enumerate(self.items):
            if item.dedupe_key and item.dedupe_key in present:
                continue
            if item.dedupe_key:
                present.add(item.dedupe_key)
            new.append(n)
        if not new:
            return [None] * len(self.items)
        if self.rendered is not None:
            added = self.rendered.insert(_connection_of(connection), new)
        else:
            added = _insert_rows(connection, table, [self.rows[n] for n in new])
        ids: list[int | None] = [None] * len(self.items)
        for n, new_id in zip(new, added, strict=True):
            ids[n] = new_id
        _connection_of(connection).info[_ADDED] = True
        return ids


def prepare(connection: sa.Connection | Any, items: list[NewItem], *, strict: bool = False) -> Prepared:
    """``items`` made ready to add in ``connection``'s transaction (see :class:`Prepared`); nothing is
    locked or written until its ``append()``.

    ``strict``: every item is new, or ``append()`` fails (IntegrityError on the unique dedupe key, the
    caller's transaction to roll back) and adds nothing: no read of the keys under the lock. For a
    caller with a path of its own for items already added (the event reminders' chunk falls back to
    delivering one by one, which skips them)."""
    return Prepared(connection, items, strict=strict)


def _insert_rows(connection: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> list[int]:
    """Insert ``rows`` and return their ids in order: one multi-row INSERT … RETURNING where the database
    returns the ids in parameter order (MariaDB ≥ 10.5, SQLite ≥ 3.35), else one INSERT per row. A burst
    of due reminders adds hundreds of items per transaction while holding the feed's order lock."""
    if not rows:
        return []
    if len(rows) > 1 and connection.dialect.insert_executemany_returning_sort_by_parameter_order:
        return list(connection.scalars(sa.insert(table).returning(table.c.id, sort_by_parameter_order=True),
                                       rows).all())
    return [connection.execute(sa.insert(table).values(**row)).inserted_primary_key[0] for row in rows]


def _connection_of(connection: Any) -> sa.Connection:
    return connection if isinstance(connection, sa.Connection) else connection.connection()  # a Session


def kick(settings: Settings | None = None) -> None:
    """Wake the pusher now (when the feed is pushed at all); never raises, never waits on a broker
    that is down for more than one try every few seconds."""
    global _kick_paused_until
    settings = settings or get_settings()
    if not (settings.model_webhook_url and settings.model_webhook_secret) or time.monotonic() < _kick_paused_until:
        return
    try:
        app.send_task(PUSH_TASK, queue=PUSH_QUEUE, ignore_result=True, retry=False,
                      expires=max(10.0, 2 * settings.model_webhook_poll_seconds))
    except Exception as exc:
        _kick_paused_until = time.monotonic() + _KICK_PAUSE
        log.warning("could not wake the feed pusher (%s); beat wakes it within %g s", type(exc).__name__,
                    settings.model_webhook_poll_seconds)


@sa.event.listens_for(sa.pool.Pool, "checkin")
def _wake_pusher(_dbapi_connection: Any, record: Any) -> None:
    """A connection that added items goes back to its pool: its transaction is over (committed, or
    rolled back: then the pusher finds nothing new), so the pusher can read what it added."""
    if record.info.pop(_ADDED, None):
        kick()


def append_now(items: list[NewItem], engine: sa.Engine | None = None) -> list[int | None]:
    """:func:`append` in a transaction of its own (on ``engine``, default the configured database); then,
    with the model loop on, asks for a turn of each chat an added item is about (rekku.turns: coalesced,
    and nothing at all without REKKU_LLM_URL)."""
    with (engine or get_engine()).begin() as connection:
        ids = append(connection, items)
    announce(items, ids)
    return ids


def announce(items: list[NewItem], ids: list[int | None]) -> None:
    """After the commit of :func:`append`'s ``items`` (``ids``: what it returned): with the model loop
    on, ask for a turn of each chat a newly added item is about (rekku.turns: coalesced; nothing at all
    without REKKU_LLM_URL). :func:`append_now` does it itself; a caller of :func:`append` calls it after
    its own transaction."""
    request_turns_for([(i.interface, i.chat_id, i.thread_id) for i, new in zip(items, ids)
                       if new is not None and i.chat_id and i.type in TURN_KINDS
                       and not (i.dedupe_key or "").startswith(LOOP_CORRECTION_PREFIX)])


def shown(row: Any) -> dict[str, Any]:
    """An item as readers get it (docs/contracts.md)."""
    item: dict[str, Any] = {"id": row.id, "type": row.type,
                            "chat": {"interface": row.interface or None, "chat_id": row.chat_id or None,
                                     "thread_id": row.thread_id or None},
                            "created_at": row.created_at.isoformat(), "data": row.data}
    if row.action_id:
        item["action_id"] = row.action_id
    return item


def read(after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Items with an id greater than ``after``, oldest first."""
    table = FeedItem.__table__
    with get_engine().connect() as connection:
        rows = connection.execute(sa.select(table).where(table.c.id > after).order_by(table.c.id).limit(limit)).all()
    return [shown(r) for r in rows]


def last_id() -> int:
    """The newest item's id (0 when the feed is empty): where a reader that wants only new items starts."""
    with get_engine().connect() as connection:
        return connection.scalar(sa.select(sa.func.max(FeedItem.__table__.c.id))) or 0


def _json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it (a handler may return datetimes or other objects: kept as text)."""
    return json.loads(json.dumps(value, default=str))


def send_output(result: Any, message: str) -> int | None:
    """From inside a handler: give the model this action's result, as an ``output`` item of the feed
    (upstream sent it as a ``system_message`` of type ``output``), never as a message in a human chat.
    Once per action: a query re-run after a redelivery adds nothing. Returns the item's id, None when
    called outside an action or when the feed already holds this action's output."""
    ctx = current_action()
    if ctx is None:
        return None
    context = {"interface": ctx.interface, "chat_id": ctx.chat_id, "thread_id": ctx.thread_id}
    data = {"type": "output", "action": ctx.action_type, "action_id": ctx.action_id, "message": message,
            "result": _json_safe(result)}
    return append_now([NewItem.about(OUTPUT, context, data, action_id=ctx.action_id,
                                     dedupe_key=f"output:{ctx.action_id}")])[0]
