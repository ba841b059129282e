"""The chat directory chat_link keeps: chats addressed by name, and cross-platform forwards.

Used by the chat_link plugin (its actions), by message sends (a ``target`` may be a chat's name) and
by delivery (a message sent to a chat is also delivered to the chats it is linked to).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import sqlalchemy as sa

from rekku.db import session_factory
from rekku.errors import PluginError
from rekku.interfaces.models import ChatForward, ChatLink

#: Chat ids as platforms write them: numbers (Telegram's may be negative) and @channel names.
_ID = re.compile(r"^-?\d+$")
#: Most chats one message may fan out to through forwards (the source included).
MAX_FAN_OUT = 16


@dataclass(frozen=True)
class Chat:
    interface: str
    chat_id: str
    thread_id: str | None = None

    def label(self) -> str:
        return f"{self.interface}:{self.chat_id}" + (f"/{self.thread_id}" if self.thread_id else "")


def looks_like_id(value: str) -> bool:
    return bool(_ID.match(value)) or value.startswith("@")


def resolve_chat(identifier: str | int, interface: str | None = None, *, strict: bool = True) -> tuple[str, str]:
    """``(interface, chat_id)`` of a chat given by id or by name.

    A known id wins; otherwise names (chat or thread) are matched case-insensitively. Several
    chats with that name is an error that asks for the numeric id; no chat with that name is an
    error when ``strict``, else the identifier is taken as a platform's own chat id."""
    ident = str(identifier).strip()
    with session_factory()() as s:
        query = sa.select(ChatLink.interface, ChatLink.chat_id)
        if interface:
            query = query.where(ChatLink.interface == interface)
        by_id = s.execute(query.where(ChatLink.chat_id == ident)).first()
        if by_id is not None:
            return by_id[0], by_id[1]
        lowered = ident.lower()
        rows = s.execute(query.where(sa.or_(sa.func.lower(ChatLink.chat_name) == lowered,
                                            sa.func.lower(ChatLink.thread_name) == lowered))).all()
    chats = sorted({(r[0], r[1]) for r in rows})
    if not chats:
        if looks_like_id(ident) or not strict:
            return interface or "", ident
        where = f" on {interface}" if interface else ""
        raise PluginError(f"Unknown chat '{ident}'{where}: no stored chat has that id or name "
                          "(store it with store_link, or use the numeric chat_id)")
    if len(chats) > 1:
        listed = ", ".join(f"{i}:{c}" for i, c in chats)
        raise PluginError(f"Ambiguous name '{ident}': it matches {len(chats)} chats ({listed}); "
                          "use the numeric chat_id instead")
    return chats[0]


def forwards_from(source: Chat) -> list[Chat]:
    """Every chat a message sent to ``source`` reaches through forwards, transitively, each once.

    Loop protection: a chat already reached (the source included) is never reached again, so
    A→B→A and longer cycles end, and the fan-out is capped at :data:`MAX_FAN_OUT` chats."""
    seen = {(source.interface, source.chat_id)}
    out: list[Chat] = []
    queue = deque([source])
    with session_factory()() as s:
        while queue and len(seen) < MAX_FAN_OUT:
            chat = queue.popleft()
            rows = s.execute(sa.select(ChatForward.target_interface, ChatForward.target_chat_id,
                                       ChatForward.target_thread_id)
                             .where(ChatForward.source_interface == chat.interface,
                                    ChatForward.source_chat_id == chat.chat_id)
                             .order_by(ChatForward.id)).all()
            for iface, chat_id, thread in rows:
                if (iface, chat_id) in seen or len(seen) >= MAX_FAN_OUT:
                    continue
                seen.add((iface, chat_id))
                target = Chat(iface, chat_id, thread or None)
                out.append(target)
                queue.append(target)
    return out
