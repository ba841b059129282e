"""The outbox: messages kept in our own database and read with GET /v1/outbox — no account needed.

It is the default interface (``REKKU_DEFAULT_INTERFACE``), so `rekku up` shows what Rekku says
before any platform is configured. Delivery writes a message and its delivery record in one
transaction, so a redelivered send never stores a message twice.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from rekku.interfaces.base import Interface, Outgoing
from rekku.interfaces.models import OutboxMessage
from rekku.interfaces.registry import register_interface
from rekku.models import utcnow


@register_interface
class Outbox(Interface):
    name = "outbox"
    max_text = 100_000
    audio = True
    stored = True

    def store(self, session: Any, message: Outgoing) -> dict[str, Any]:
        result = session.execute(sa.insert(OutboxMessage).values(
            chat_id=message.chat_id, thread_id=message.thread_id or "", text=message.text,
            audio_url=message.audio, reply_to=message.reply_to, action_id=message.action_id, created_at=utcnow()))
        return {"message_id": result.inserted_primary_key[0]}
