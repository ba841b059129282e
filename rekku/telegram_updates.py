"""Telegram updates in: the one place that turns a Bot API ``Update`` into an incoming message.

Both ways Telegram delivers updates end here: the getUpdates poller (`rekku receive`,
rekku/receiver.py) and the webhook (``POST /v1/telegram/webhook``, rekku/telegram_webhook_api.py).
An update's ``message`` with text (or a media caption, taken as its text) becomes an
:class:`~rekku.messages.IncomingMessage` of the interface ``telegram_bot`` and is stored through
:func:`rekku.messages.receive`, the one path of every message in, which stores it once per (interface,
chat, message id): an update delivered twice (the poller restarted before it saved its offset,
Telegram retrying a webhook call) is stored once. Anything else (stickers, service messages, edits,
other update kinds) is skipped with a debug line.

The poller's position (the next ``offset`` to ask for) is kept in ``receiver_offsets``, one row per
source, written after the update's message is stored.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Mapped, mapped_column

from rekku.db import get_engine
from rekku.ingest import Ingress
from rekku.messages import IncomingMessage, receive
from rekku.models import Base, BigId, UTCDateTime, utcnow

log = logging.getLogger(__name__)

#: The interface (and the receiver source) Telegram's messages come in as.
INTERFACE = "telegram_bot"
#: How a skipped update that held a message Rekku could not store (too long, malformed) is described.
CANNOT_TAKE = "a message Rekku cannot take"


class ReceiverOffset(Base):
    """Where a receiver goes on: for Telegram, the ``offset`` of its next getUpdates (last update_id + 1)."""

    __tablename__ = "receiver_offsets"

    source: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigId)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def _text_id(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else str(value)


def _full_name(who: dict[str, Any]) -> str | None:
    name = " ".join(part for part in (who.get("first_name"), who.get("last_name")) if isinstance(part, str) and part)
    return name or who.get("username") or None


def incoming_message(update: dict[str, Any]) -> tuple[IncomingMessage | None, str | None]:
    """The update's message as an :class:`IncomingMessage`, or ``(None, why it is skipped)``."""
    message = update.get("message")
    if not isinstance(message, dict):
        kinds = ", ".join(sorted(k for k in update if k != "update_id")) or "nothing"
        return None, f"not a message ({kinds})"
    text = message.get("text")
    if not isinstance(text, str) or not text:
        text = message.get("caption")
    if not isinstance(text, str) or not text.strip():
        kinds = ", ".join(sorted(k for k in message if k not in _MESSAGE_FRAME)) or "nothing"
        return None, f"a message without text ({kinds})"
    chat = message.get("chat") if isinstance(message.get("chat"), dict) else {}
    sender = message.get("from") if isinstance(message.get("from"), dict) else {}
    if not sender and isinstance(message.get("sender_chat"), dict):
        sender = message["sender_chat"]  # a post in the name of a chat (an anonymous admin, a channel)
    thread = message.get("message_thread_id")
    reply = message.get("reply_to_message") if isinstance(message.get("reply_to_message"), dict) else {}
    reply_to = reply.get("message_id")
    if reply_to is not None and thread is not None and reply_to == thread and not message.get("quote"):
        reply_to = None  # in a forum topic every message "replies" to the topic's first message: not a reply
    date = message.get("date")
    try:
        incoming = IncomingMessage(
            interface=INTERFACE, chat_id=_text_id(chat.get("id")), thread_id=_text_id(thread),
            message_id=_text_id(message.get("message_id")), user_id=_text_id(sender.get("id")),
            username=sender.get("username"), chat_name=chat.get("title") or _full_name(chat) or _full_name(sender),
            text=text, reply_to_message_id=_text_id(reply_to),
            date=datetime.fromtimestamp(date, timezone.utc) if isinstance(date, int) and date > 0 else None)
    except (ValidationError, TypeError, ValueError, OverflowError) as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()) \
            if isinstance(exc, ValidationError) else str(exc)
        return None, f"{CANNOT_TAKE} ({problems})"
    return incoming, None


#: Keys every message has, whatever it holds: not named when a message without text is skipped.
_MESSAGE_FRAME = frozenset({"message_id", "from", "sender_chat", "chat", "date", "message_thread_id",
                            "is_topic_message", "reply_to_message", "entities", "caption_entities"})


def receive_update(update: dict[str, Any], ingress: Ingress | None = None) -> dict[str, Any]:
    """Store the update's message (through :func:`rekku.messages.receive`), once; answers
    ``{"update_id", "message", "dropped", "skipped"}``: ``skipped`` says why an update holds nothing
    to store, ``dropped`` is receive's (``duplicate``, ``blocked`` or None)."""
    update_id = update.get("update_id")
    incoming, skipped = incoming_message(update)
    if incoming is None:
        # a message of a kind Rekku does not take is routine; one it cannot take is worth a look
        level = logging.WARNING if skipped and skipped.startswith(CANNOT_TAKE) else logging.DEBUG
        log.log(level, "telegram update %s skipped: %s", update_id, skipped)
        return {"update_id": update_id, "message": None, "dropped": None, "skipped": skipped}
    answer = receive(incoming, ingress)
    if answer["dropped"] is None:
        log.info("telegram update %s: message %s from %s in chat %s stored", update_id, incoming.message_id,
                 incoming.user_id, incoming.chat_id)
    else:
        log.info("telegram update %s: message %s in chat %s %s", update_id, incoming.message_id, incoming.chat_id,
                 "already stored" if answer["dropped"] == "duplicate" else f"dropped ({answer['dropped']})")
    return {"update_id": update_id, **answer, "skipped": None}


def load_offset(source: str = INTERFACE) -> int | None:
    """The offset the receiver asks for next, or None when it never confirmed an update."""
    table = ReceiverOffset.__table__
    with get_engine().connect() as connection:
        return connection.scalar(sa.select(table.c.next_offset).where(table.c.source == source))


def save_offset(offset: int, source: str = INTERFACE) -> None:
    """Record that every update before ``offset`` is stored (never moves backwards)."""
    table = ReceiverOffset.__table__
    with get_engine().begin() as connection:
        changed = connection.execute(sa.update(table).where(table.c.source == source, table.c.next_offset < offset)
                                     .values(next_offset=offset, updated_at=utcnow())).rowcount
        if changed:
            return
        if connection.scalar(sa.select(table.c.next_offset).where(table.c.source == source)) is None:
            connection.execute(sa.insert(table).values(source=source, next_offset=offset, updated_at=utcnow()))
