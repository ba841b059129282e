"""Tables of the interfaces (delivery records, the outbox) and of the chat directory chat_link keeps.

Their migrations: ``interfaces_0001`` (interface_deliveries, outbox_messages), ``interfaces_0002``
(outbox_order), ``interfaces_0003_history`` (what a delivered part said) and the chat_link
plugin's branch ``chat_link_0001`` (chat_link, chat_link_forwards). Thread ids are stored as ''
when absent, so the unique keys hold on SQLite and MariaDB alike (NULLs never collide there).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from rekku.models import Base, BigId, UTCDateTime, utcnow

#: Text of up to 16 MB on MariaDB (TEXT stops at 65 535 bytes; an outbox part may be 100 000 characters).
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")

#: Delivery states: the platform call is under way (or its outcome is unknown), or it is done.
SENDING, SENT = "sending", "sent"


class Delivery(Base):
    """One part of one message to one chat, recorded before and after it is sent (never twice).

    A part recorded ``sent`` with its ``text`` (or ``audio``) is what Rekku said in that chat: the
    prompt's chat history reads them (rekku.prompt.chat_history)."""

    __tablename__ = "interface_deliveries"
    __table_args__ = (sa.UniqueConstraint("action_id", "part_key", name="uq_interface_deliveries_part"),
                      sa.Index("ix_interface_deliveries_chat_created", "chat_id", "created_at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    action_id: Mapped[str] = mapped_column(sa.String(36))
    #: ``<interface>|<chat>|<thread>|<part index>`` (hashed when long).
    part_key: Mapped[str] = mapped_column(sa.String(191))
    interface: Mapped[str] = mapped_column(sa.String(64))
    chat_id: Mapped[str] = mapped_column(sa.String(191))
    #: '' when the message went to no thread.
    thread_id: Mapped[str] = mapped_column(sa.String(191), default="", server_default="")
    status: Mapped[str] = mapped_column(sa.String(16))
    remote_id: Mapped[str | None] = mapped_column(sa.String(191))
    #: The part's text and audio as sent (None for a record that says nothing a chat shows: a Reddit post's).
    text: Mapped[str | None] = mapped_column(LongText)
    audio: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxMessage(Base):
    """A message delivered through the ``outbox`` interface (read with GET /v1/outbox)."""

    __tablename__ = "outbox_messages"
    __table_args__ = (sa.Index("ix_outbox_messages_chat", "chat_id", "thread_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    chat_id: Mapped[str] = mapped_column(sa.String(191))
    thread_id: Mapped[str] = mapped_column(sa.String(191), default="")
    text: Mapped[str | None] = mapped_column(LongText)
    audio_url: Mapped[str | None] = mapped_column(sa.Text)
    reply_to: Mapped[str | None] = mapped_column(sa.String(191))
    action_id: Mapped[str | None] = mapped_column(sa.String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OutboxOrder(Base):
    """One row; every transaction that adds outbox messages locks it first (MariaDB), so ids are
    taken and committed in the same order and a poller following ``after`` misses nothing."""

    __tablename__ = "outbox_order"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)


class ChatLink(Base):
    """Upstream's chat_link: a chat's (and thread's) link and names, so actions may address it by name."""

    __tablename__ = "chat_link"
    __table_args__ = (sa.UniqueConstraint("interface", "chat_id", "thread_id", name="uq_chat_link_chat"),
                      sa.Index("ix_chat_link_chat_name", "chat_name"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    interface: Mapped[str] = mapped_column(sa.String(64), default="")
    chat_id: Mapped[str] = mapped_column(sa.String(191))
    thread_id: Mapped[str] = mapped_column(sa.String(191), default="")
    link: Mapped[str | None] = mapped_column(sa.Text)
    chat_name: Mapped[str | None] = mapped_column(sa.String(255))
    thread_name: Mapped[str | None] = mapped_column(sa.String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ChatForward(Base):
    """A cross-platform link: every message sent to the source chat is also delivered to the target chat."""

    __tablename__ = "chat_link_forwards"
    __table_args__ = (sa.UniqueConstraint("source_interface", "source_chat_id", "target_interface",
                                          "target_chat_id", "target_thread_id", name="uq_chat_link_forward"),
                      sa.Index("ix_chat_link_forwards_source", "source_interface", "source_chat_id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source_interface: Mapped[str] = mapped_column(sa.String(64))
    source_chat_id: Mapped[str] = mapped_column(sa.String(191))
    target_interface: Mapped[str] = mapped_column(sa.String(64))
    target_chat_id: Mapped[str] = mapped_column(sa.String(191))
    target_thread_id: Mapped[str] = mapped_column(sa.String(191), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
