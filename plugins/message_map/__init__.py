"""message_map: a message forwarded to the trainer, mapped back to its original chat and message.

Upstream's actions and ``message_map`` table (docs/plugins.md §2), with portable SQL (upstream's was
SQLite-only). Query results also go back to the asking chat as a ``system_message`` of type output.

``get_original_message`` also takes the id of a stored message (POST /v1/messages) of the asking chat
that replies to a forwarded one: when no mapping has that id, the message it replies to is looked up.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku.plugin import (
    TablePlugin,
    UTCDateTime,
    current_action,
    find_message,
    register_plugin,
    send_output,
    session_factory,
    utcnow,
)

metadata = sa.MetaData()
message_map = sa.Table(
    "message_map", metadata,
    sa.Column("trainer_message_id", sa.String(191), primary_key=True),
    sa.Column("chat_id", sa.String(191), nullable=False),
    sa.Column("message_id", sa.String(191), nullable=False),
    sa.Column("interface", sa.String(64)),
    sa.Column("timestamp", UTCDateTime, nullable=False),
)

ACTIONS = {
    "store_message_mapping": ("Remember which chat and message a message forwarded to the trainer came from",
                              ["trainer_message_id", "chat_id", "message_id"], []),
    "get_original_message": ("Find the chat and message a trainer's message was forwarded from",
                             ["trainer_message_id"], []),
    "cleanup_old_mappings": ("Forget mappings older than some hours (default 24)", [], ["older_than_hours"]),
    "get_mapping_stats": ("Count stored mappings", [], []),
}
QUERIES = ("get_original_message", "get_mapping_stats")


class MessageMapPlugin(TablePlugin):
    ACTIONS = ACTIONS
    FIELD_TYPES = {"older_than_hours": "number"}
    idempotent = True

    def __init__(self) -> None:
        register_plugin("message_map", self)

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        hours = payload.get("older_than_hours")
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float)) or hours < 0):
            return [f"Field 'older_than_hours' must be a non-negative number for action '{action_type}'"]
        return []

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        result = getattr(self, action_type)(payload)
        if action_type in QUERIES:
            send_output(result, f"{action_type} done")
        return result

    def store_message_mapping(self, p: dict) -> dict:
        ctx = current_action()
        row = {"chat_id": str(p["chat_id"]), "message_id": str(p["message_id"]),
               "interface": ctx.interface if ctx else None, "timestamp": utcnow()}
        key = str(p["trainer_message_id"])
        try:
            with session_factory().begin() as s:
                s.execute(sa.insert(message_map).values(trainer_message_id=key, **row))
        except IntegrityError:
            with session_factory().begin() as s:
                s.execute(sa.update(message_map).where(message_map.c.trainer_message_id == key).values(**row))
        return {"stored": True, "trainer_message_id": key, "chat_id": row["chat_id"], "message_id": row["message_id"]}

    def get_original_message(self, p: dict) -> dict:
        key = str(p["trainer_message_id"])
        row, via = _mapping(key), None
        ctx = current_action()
        if row is None and ctx is not None:  # a stored reply, in the asking chat, to a forwarded message?
            reply = find_message(ctx.interface, ctx.chat_id, key)
            if reply is not None and reply["reply_to_message_id"]:
                via = reply["reply_to_message_id"]
                row = _mapping(via)
        if row is None:
            return {"found": False, "trainer_message_id": key}
        return {"found": True, "trainer_message_id": key, "chat_id": row["chat_id"], "message_id": row["message_id"],
                "interface": row["interface"], "timestamp": row["timestamp"].isoformat(),
                **({"reply_to": via} if via else {})}

    def cleanup_old_mappings(self, p: dict) -> dict:
        cutoff = utcnow() - timedelta(hours=float(p.get("older_than_hours", 24)))
        with session_factory().begin() as s:
            removed = s.execute(sa.delete(message_map).where(message_map.c.timestamp < cutoff)).rowcount
        return {"removed": removed}

    def get_mapping_stats(self, p: dict) -> dict:
        with session_factory()() as s:
            total, oldest, newest = s.execute(sa.select(sa.func.count(), sa.func.min(message_map.c.timestamp),
                                                        sa.func.max(message_map.c.timestamp))).one()
        return {"total": total, "oldest": oldest.isoformat() if oldest else None,
                "newest": newest.isoformat() if newest else None}


def _mapping(trainer_message_id: str) -> Any:
    with session_factory()() as s:
        return s.execute(sa.select(message_map).where(message_map.c.trainer_message_id == trainer_message_id)
                         ).mappings().first()


PLUGIN_CLASS = MessageMapPlugin
