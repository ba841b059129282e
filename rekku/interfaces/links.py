"""The chat directory chat_link keeps: chats addressed by name, and cross-platform forwards.

Used by the chat_link plugin (its actions), by message sends (a ``target`` may be a chat's name, a
``thread_name`` a thread's) and by delivery (a message sent to a chat is also delivered to the chats it
is linked to).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from rekku.db import session_factory
from rekku.errors import PluginError
from rekku.interfaces.models import ChatForward, ChatLink
from rekku.models import ActionRun, chat_key

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

    An id always wins over a name, so that nobody can re-point a chat by giving another chat its id
    as a name: a stored chat id, an identifier that looks like an id (numbers, @channel; never
    matched against names) and a chat id some request came from (the action log's indexed
    ``chat_id``, e.g. an outbox chat "web-1") are taken as that chat. Otherwise names (chat or
    thread) are matched case-insensitively. Several chats with that name is an error that asks for
    the numeric id; no chat with that name is an error when ``strict``, else the identifier is taken
    as a platform's own chat id."""
    ident = str(identifier).strip()
    with session_factory()() as s:
        query = sa.select(ChatLink.interface, ChatLink.chat_id)
        if interface:
            query = query.where(ChatLink.interface == interface)
        by_id = s.execute(query.where(ChatLink.chat_id == ident)).first()
        if by_id is not None:
            return by_id[0], by_id[1]
        if looks_like_id(ident):
            return interface or "", ident
        heard = _heard_from(s, ident)
        if heard is not None:
            return interface or heard, ident
        lowered = ident.lower()
        rows = s.execute(query.where(sa.or_(sa.func.lower(ChatLink.chat_name) == lowered,
                                            sa.func.lower(ChatLink.thread_name) == lowered))).all()
    chats = sorted({(r[0], r[1]) for r in rows})
    if not chats:
        if not strict:
            return interface or "", ident
        where = f" on {interface}" if interface else ""
        raise PluginError(f"Unknown chat '{ident}'{where}: no stored chat has that id or name "
                          "(store it with store_link, or use the numeric chat_id)")
    if len(chats) > 1:
        listed = ", ".join(f"{i}:{c}" for i, c in chats)
        raise PluginError(f"Ambiguous name '{ident}': it matches {len(chats)} chats ({listed}); "
                          "use the numeric chat_id instead")
    return chats[0]


def resolve_thread(interface: str, chat_id: str, name: str) -> str:
    """The id of the thread (topic) of chat ``(interface, chat_id)`` stored with the name ``name``
    (``store_link`` with ``thread_id`` and ``thread_name``), matched case-insensitively. No such thread,
    or several threads of that chat with that name, is an error that asks for the thread id."""
    wanted = str(name).strip()
    where = f"{interface}:{chat_id}" if interface else str(chat_id)
    with session_factory()() as s:
        rows = s.scalars(sa.select(ChatLink.thread_id).where(
            ChatLink.interface == (interface or ""), ChatLink.chat_id == str(chat_id), ChatLink.thread_id != "",
            sa.func.lower(ChatLink.thread_name) == wanted.lower())).all()
    threads = sorted(set(rows))
    if not threads:
        raise PluginError(f"Unknown thread '{wanted}' in chat {where}: no stored thread of that chat has that "
                          "name (store it with store_link, giving thread_id and thread_name, or use the thread_id)")
    if len(threads) > 1:
        raise PluginError(f"Ambiguous thread name '{wanted}' in chat {where}: it matches threads "
                          f"{', '.join(threads)}; use the numeric thread_id instead")
    return threads[0]


def _heard_from(session: Any, chat_id: str) -> str | None:
    """The interface ("" if none was given) of a request that came from chat ``chat_id``, or None if
    none did. Chat ids in the action log come from request contexts (the token holder's word), so a
    chat id found there is a real chat, and a name equal to it must not take its messages."""

    context = session.scalar(sa.select(ActionRun.context).where(ActionRun.chat_id == chat_key(chat_id)).limit(1))
    if not isinstance(context, dict) or str(context.get("chat_id")) != chat_id:  # MariaDB compares without case
        return None
    return str(context.get("interface") or "")


def is_known_chat_id(chat_id: str) -> bool:
    """Whether ``chat_id`` is a chat some request came from or a stored chat's id (see :func:`resolve_chat`)."""
    ident = str(chat_id).strip()
    with session_factory()() as s:
        if s.scalar(sa.select(ChatLink.id).where(ChatLink.chat_id == ident).limit(1)) is not None:
            return True
        return _heard_from(s, ident) is not None


def chats_named(name: str) -> set[tuple[str, str]]:
    """Every stored chat ``(interface, chat_id)`` whose chat or thread name is ``name`` (case-insensitive),
    as :func:`resolve_chat` would match it."""
    lowered = str(name).strip().lower()
    with session_factory()() as s:
        rows = s.execute(sa.select(ChatLink.interface, ChatLink.chat_id)
                         .where(sa.or_(sa.func.lower(ChatLink.chat_name) == lowered,
                                       sa.func.lower(ChatLink.thread_name) == lowered))).all()
    return {(r[0], r[1]) for r in rows}


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
