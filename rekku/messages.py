"""Messages in: what users say to Rekku, from any interface or service (``POST /v1/messages``, the
Telegram receiver).

A message is stored once per (interface, chat, message id) and, in the same transaction, becomes a
``message`` item of the feed, so the model hears it exactly once however often a platform or a client
delivers it. A blocked user's message is dropped here, before any model is paid to read it: the
plugins' ``check_request`` decides, as it does for action requests (trainers are never dropped), and
their ``on_request`` sees the chat's activity (recent_chats). With the model loop on (``REKKU_LLM_URL``),
a stored message then asks for a turn of its chat (rekku.turns, rekku/model_loop.py).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.orm import Mapped, mapped_column

from rekku import feed
from rekku.db import get_engine
from rekku.ingest import Ingress, default_ingress
from rekku.limits import is_valid_text
from rekku.models import Base, BigId, UTCDateTime, utcnow
from rekku.settings import get_settings
from rekku.turns import request_turn

log = logging.getLogger(__name__)


#: Why a message was not stored as new.
BLOCKED, DUPLICATE = "blocked", "duplicate"


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (sa.UniqueConstraint("interface", "chat_id", "message_id", name="uq_messages_platform_id"),
                      sa.Index("ix_messages_chat", "interface", "chat_id", "thread_id", "id"),
                      sa.Index("ix_messages_chat_date", "chat_id", "date"))  # the chat history (0006)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    interface: Mapped[str] = mapped_column(sa.String(64))
    chat_id: Mapped[str] = mapped_column(sa.String(191))
    thread_id: Mapped[str] = mapped_column(sa.String(191), default="")
    #: The platform's id of the message; NULL for a source that has none (then nothing de-duplicates it).
    message_id: Mapped[str | None] = mapped_column(sa.String(191))
    user_id: Mapped[str] = mapped_column(sa.String(191))
    username: Mapped[str | None] = mapped_column(sa.String(255))
    chat_name: Mapped[str | None] = mapped_column(sa.String(255))
    text: Mapped[str] = mapped_column(sa.Text)
    reply_to_message_id: Mapped[str | None] = mapped_column(sa.String(191))
    #: When the user sent it (the platform's time, or when it arrived).
    date: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


_ID = Field(min_length=1, max_length=191)


class IncomingMessage(BaseModel):
    """``POST /v1/messages``'s body. Ids may be numbers (platforms send them so); they are kept as text."""

    model_config = {"extra": "forbid"}

    interface: str = Field(min_length=1, max_length=64)
    chat_id: str = _ID
    thread_id: str | None = Field(None, max_length=191)
    message_id: str | None = Field(None, max_length=191)
    user_id: str = _ID
    username: str | None = Field(None, max_length=255)
    chat_name: str | None = Field(None, max_length=255)
    text: str = Field(min_length=1)
    reply_to_message_id: str | None = Field(None, max_length=191)
    date: datetime | None = None

    @field_validator("chat_id", "thread_id", "message_id", "user_id", "reply_to_message_id", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("interface", "chat_id", "thread_id", "message_id", "user_id", "username", "chat_name", "text",
                     "reply_to_message_id")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_text(value):
            raise ValueError("must be valid UTF-8 text (it holds a lone surrogate)")
        return value

    @field_validator("text")
    @classmethod
    def _not_too_long(cls, value: str) -> str:
        limit = get_settings().max_field_chars
        if len(value) > limit:
            raise ValueError(f"is longer than {limit} characters (REKKU_MAX_FIELD_CHARS)")
        return value

    def context(self) -> dict[str, str]:
        """The request context this message gives the actions its turn produces."""
        return {k: v for k, v in {"interface": self.interface, "chat_id": self.chat_id, "thread_id": self.thread_id,
                                  "user_id": self.user_id, "username": self.username,
                                  "message_id": self.message_id}.items() if v}


def as_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "interface": row.interface, "chat_id": row.chat_id, "thread_id": row.thread_id or None,
            "message_id": row.message_id, "user_id": row.user_id, "username": row.username,
            "chat_name": row.chat_name, "text": row.text, "reply_to_message_id": row.reply_to_message_id,
            "date": row.date.isoformat(), "received_at": row.received_at.isoformat()}


def receive(message: IncomingMessage, ingress: Ingress | None = None) -> dict[str, Any]:
    """Store ``message`` and put it on the feed, once; answers ``{"message": ..., "dropped": ...}``
    (docs/contracts.md): ``dropped`` is None for a new message, ``blocked`` or ``duplicate``."""
    ingress = ingress or default_ingress()
    context = message.context()
    reason = ingress.refusal(context)
    if reason:
        log.info("message from %s in %s:%s dropped: %s", message.user_id, message.interface, message.chat_id, reason)
        return {"message": None, "dropped": BLOCKED}
    table = Message.__table__
    now = utcnow()
    values = message.model_dump(exclude={"date"}) | {"thread_id": message.thread_id or "",
                                                      "date": message.date or now, "received_at": now}
    with get_engine().begin() as connection:
        earlier = _find(connection, message)
        if earlier is not None:
            return {"message": as_dict(earlier), "dropped": DUPLICATE}
        try:
            with connection.begin_nested():
                new_id = connection.execute(sa.insert(table).values(**values)).inserted_primary_key[0]
        except sa.exc.IntegrityError:  # a concurrent delivery of the same message won
            return {"message": as_dict(_find(connection, message)), "dropped": DUPLICATE}
        row = connection.execute(sa.select(table).where(table.c.id == new_id)).one()
        stored = as_dict(row)
        feed.append(connection, [feed.NewItem.about(feed.MESSAGE, context, stored, dedupe_key=f"message:{new_id}")])
    ingress.observe(context)
    request_turn(message.interface, message.chat_id, message.thread_id)  # committed: the model loop's turn, if on
    return {"message": stored, "dropped": None}


def _find(connection: sa.Connection, message: IncomingMessage) -> Any:
    if message.message_id is None:
        return None
    table = Message.__table__
    return connection.execute(sa.select(table).where(table.c.interface == message.interface,
                                                     table.c.chat_id == message.chat_id,
                                                     table.c.message_id == message.message_id)).first()


def find(interface: str | None, chat_id: str | None, message_id: str | None) -> dict[str, Any] | None:
    """A stored message by its platform id (the ``message_id`` of an action's context), or None."""
    if not (interface and chat_id and message_id):
        return None
    table = Message.__table__
    with get_engine().connect() as connection:
        row = connection.execute(sa.select(table).where(table.c.interface == interface, table.c.chat_id == chat_id,
                                                        table.c.message_id == message_id)).first()
    return as_dict(row) if row is not None else None
