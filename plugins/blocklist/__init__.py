"""blocklist: users whose requests the ingress refuses (403), unless they are trainers.

Upstream dropped blocked users' messages; here the ingress's ``check_request`` refuses every
request whose context user is blocked (trainers are exempt: the ingress never asks for them), and
the worker's handler does nothing more. Query results also go back to the asking chat as a
``system_message`` of type output.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku.plugin import TablePlugin, UTCDateTime, register_plugin, send_output, session_factory, utcnow

metadata = sa.MetaData()
blocklist = sa.Table(
    "blocklist", metadata,
    sa.Column("user_id", sa.String(191), primary_key=True),
    sa.Column("reason", sa.Text),
    sa.Column("blocked_at", UTCDateTime, nullable=False),
)

ACTIONS = {
    "block_user": ("Block a user: their requests are refused (trainers never are)", ["user_id"], ["reason"]),
    "unblock_user": ("Unblock a user", ["user_id"], []),
    "is_user_blocked": ("Whether a user is blocked", ["user_id"], []),
    "get_blocked_users": ("List blocked users", [], []),
}
QUERIES = ("is_user_blocked", "get_blocked_users")


def blocked(user_id: str) -> dict | None:
    with session_factory()() as s:
        row = s.execute(sa.select(blocklist).where(blocklist.c.user_id == user_id)).mappings().first()
    return dict(row) if row is not None else None


class BlocklistPlugin(TablePlugin):
    ACTIONS = ACTIONS
    idempotent = True

    def __init__(self) -> None:
        register_plugin("blocklist", self)

    def check_request(self, context: dict) -> str | None:
        """Refuse the request of a blocked user (the ingress skips this for trainers)."""
        user = context.get("user_id")
        if user and blocked(str(user)) is not None:
            return f"User {user} is blocked"
        return None

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        user = str(payload.get("user_id", ""))
        if action_type == "block_user":
            values = {"reason": payload.get("reason"), "blocked_at": utcnow()}
            try:
                with session_factory().begin() as s:
                    s.execute(sa.insert(blocklist).values(user_id=user, **values))
            except IntegrityError:
                with session_factory().begin() as s:
                    s.execute(sa.update(blocklist).where(blocklist.c.user_id == user).values(reason=values["reason"]))
            return {"blocked": True, "user_id": user}
        if action_type == "unblock_user":
            with session_factory().begin() as s:
                removed = s.execute(sa.delete(blocklist).where(blocklist.c.user_id == user)).rowcount
            return {"unblocked": bool(removed), "user_id": user}
        if action_type == "is_user_blocked":
            row = blocked(user)
            result = {"user_id": user, "blocked": row is not None,
                      "reason": row["reason"] if row else None,
                      "blocked_at": row["blocked_at"].isoformat() if row else None}
        else:
            with session_factory()() as s:
                rows = s.execute(sa.select(blocklist).order_by(blocklist.c.blocked_at)).mappings().all()
            result = {"users": [{"user_id": r["user_id"], "reason": r["reason"],
                                 "blocked_at": r["blocked_at"].isoformat()} for r in rows]}
        send_output(result, f"{action_type} done")
        return result


PLUGIN_CLASS = BlocklistPlugin
