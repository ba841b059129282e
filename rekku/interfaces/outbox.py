"""The outbox: messages kept in our own database and read with GET /v1/outbox — no account needed.

It is the default interface (``REKKU_DEFAULT_INTERFACE``), so `rekku up` shows what Rekku says
before any platform is configured. Delivery writes a message and its delivery record in one
transaction, so a redelivered send never stores a message twice.

Pollers read with ``after`` = the last id they saw, so ids must become visible in order: every
transaction that adds outbox messages locks the one ``outbox_order`` row just before inserting
(:func:`hold_order`, rekku.ordering says why).

``audio_url`` is a link a client can fetch: an http(s) URL as given, or an artifact's
``/v1/artifacts/{name}`` path (``Interface.audio_link``); never a path on the server.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from rekku.interfaces.base import Interface, Outgoing
from rekku.interfaces.models import OutboxMessage, OutboxOrder
from rekku.interfaces.registry import register_interface
from rekku.models import utcnow
from rekku.ordering import Rendered, hold


@register_interface
class Outbox(Interface):
    name = "outbox"
    max_text = 100_000
    audio = True
    stored = True

    def store(self, session: Any, message: Outgoing) -> dict[str, Any]:
        audio_url = self.audio_link(message.audio)  # refused before anything is written
        hold_order(session)
        result = session.execute(sa.insert(OutboxMessage).values(
            chat_id=message.chat_id, thread_id=message.thread_id or "", text=message.text,
            audio_url=audio_url, reply_to=message.reply_to, action_id=message.action_id, created_at=utcnow()))
        return {"message_id": result.inserted_primary_key[0]}


def store_many(connection: sa.Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert outbox messages (``outbox_messages`` rows) in the caller's transaction, under the order
    lock, in one statement where the database can return the ids in order; returns their ids in order."""
    return prepare_many(connection, rows).store()


class PreparedMessages:
    """Outbox messages ready to store: on MariaDB their INSERT is rendered when this is made
    (rekku.ordering.Rendered), before the order lock that every other writer of the outbox waits on."""

    def __init__(self, connection: sa.Connection, rows: list[dict[str, Any]]) -> None:
        self.connection, self.rows = connection, rows
        self.rendered = Rendered.of(connection, OutboxMessage.__table__, rows) if len(rows) > 1 else None

    def store(self) -> list[int]:
        """Lock the outbox order and insert the messages (one statement where possible); their ids in order."""
        connection, table = self.connection, OutboxMessage.__table__
        hold_order(connection)
        if not self.rows:
            return []
        if self.rendered is not None:
            return self.rendered.insert(connection)
        if connection.dialect.insert_executemany_returning_sort_by_parameter_order:
            return list(connection.scalars(sa.insert(table).returning(table.c.id, sort_by_parameter_order=True),
                                           self.rows).all())
        return [connection.execute(sa.insert(table).values(**row)).inserted_primary_key[0] for row in self.rows]


def prepare_many(connection: sa.Connection, rows: list[dict[str, Any]]) -> PreparedMessages:
    """``rows`` made ready to store in ``connection``'s transaction; nothing is locked or written until
    its ``store()``."""
    return PreparedMessages(connection, rows)


def hold_order(connection: sa.Connection | Any) -> None:
    """Lock the outbox order until this transaction ends; call it right before inserting outbox
    messages (a Connection or a Session)."""
    hold(connection, OutboxOrder)
