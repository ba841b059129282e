"""recent_chats: when each chat was last active. The ingress records activity for every request
that has a chat (``on_request``); the LLM may record more (``update_chat_activity``) and ask for the
most recent chats (the answer also goes back to the asking chat as a ``system_message`` of type output).

Upstream keyed the table by chat id alone; chats on different platforms may share an id, so the
key here is (interface, chat_id), '' when a request names no interface.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku.plugin import (
    JSONType,
    TablePlugin,
    UTCDateTime,
    current_action,
    register_plugin,
    send_output,
    session_factory,
    utcnow,
)

log = logging.getLogger(__name__)

metadata = sa.MetaData()
recent_chats = sa.Table(
    "recent_chats", metadata,
    sa.Column("interface", sa.String(64), primary_key=True),
    sa.Column("chat_id", sa.String(191), primary_key=True),
    sa.Column("last_active", UTCDateTime, nullable=False),
    sa.Column("metadata", JSONType),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

ACTIONS = {
    "update_chat_activity": ("Record that a chat is active now", ["chat_id"], ["metadata", "interface"]),
    "get_recent_chats": ("List the most recently active chats (default 10)", [], ["limit"]),
    "cleanup_old_chats": ("Forget chats inactive for some days (default 30)", [], ["older_than_days"]),
}


#: Seconds within which repeated requests from one chat are recorded once.
ACTIVITY_RESOLUTION = 5.0


def touch(interface: str | None, chat_id: str, metadata_: dict | None = None) -> None:
    """Mark a chat active now (insert or update; safe under concurrent requests)."""
    key = (recent_chats.c.interface == (interface or ""), recent_chats.c.chat_id == chat_id)
    now = utcnow()
    values: dict[str, Any] = {"last_active": now, **({"metadata": metadata_} if metadata_ is not None else {})}
    sessions = session_factory()
    for _ in range(2):
        with sessions.begin() as s:
            if s.execute(sa.update(recent_chats).where(*key).values(**values)).rowcount:
                return
        try:
            with sessions.begin() as s:
                s.execute(sa.insert(recent_chats).values(interface=interface or "", chat_id=chat_id,
                                                         created_at=now, **{"metadata": None, **values}))
            return
        except IntegrityError:
            continue


class RecentChatsPlugin(TablePlugin):
    ACTIONS = ACTIONS
    FIELD_TYPES = {"metadata": "object", "limit": "integer", "older_than_days": "number"}
    idempotent = True

    def __init__(self) -> None:
        self._last_touch: dict[tuple[str | None, str], float] = {}
        register_plugin("recent_chats", self)

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        errors = []
        if "metadata" in payload and not isinstance(payload["metadata"], dict):
            errors.append(f"Field 'metadata' must be an object for action '{action_type}'")
        limit = payload.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000):
            errors.append(f"Field 'limit' must be an integer from 1 to 1000 for action '{action_type}'")
        days = payload.get("older_than_days")
        if days is not None and (isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0):
            errors.append(f"Field 'older_than_days' must be a non-negative number for action '{action_type}'")
        return errors

    def on_request(self, context: dict) -> None:
        """The ingress saw a request from this chat (written at most every ACTIVITY_RESOLUTION seconds
        per chat and ingress process: a busy chat must not cost a database write on every request)."""
        if not context.get("chat_id"):
            return
        key = (context.get("interface"), str(context["chat_id"]))
        now = time.monotonic()
        if now - self._last_touch.get(key, float("-inf")) < ACTIVITY_RESOLUTION:
            return
        touch(*key)
        self._last_touch[key] = now
        if len(self._last_touch) > 10_000:
            self._last_touch.clear()

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        if action_type == "update_chat_activity":
            ctx = current_action()
            interface = payload.get("interface") or (ctx.interface if ctx else None)
            touch(interface, str(payload["chat_id"]), payload.get("metadata"))
            return {"updated": True, "interface": interface, "chat_id": str(payload["chat_id"])}
        if action_type == "cleanup_old_chats":
            cutoff = utcnow() - timedelta(days=float(payload.get("older_than_days", 30)))
            with session_factory().begin() as s:
                removed = s.execute(sa.delete(recent_chats).where(recent_chats.c.last_active < cutoff)).rowcount
            return {"removed": removed}
        with session_factory()() as s:
            rows = s.execute(sa.select(recent_chats).order_by(recent_chats.c.last_active.desc())
                             .limit(int(payload.get("limit", 10)))).mappings().all()
        result = {"chats": [{"interface": r["interface"] or None, "chat_id": r["chat_id"],
                             "last_active": r["last_active"].isoformat(), "metadata": r["metadata"]} for r in rows]}
        send_output(result, f"{len(rows)} recent chats")
        return result


PLUGIN_CLASS = RecentChatsPlugin
