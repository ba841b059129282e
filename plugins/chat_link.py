"""chat_link: a directory of chats (links and names, so actions may address a chat by name) and
cross-platform links (every message sent to one chat is also delivered to another).

Upstream's actions and ``chat_link`` table are kept (UPSTREAM.md §2); ``link_chats`` and
``unlink_chats`` add the cross-platform links, stored in ``chat_link_forwards`` and followed by
every message send (rekku/interfaces/delivery.py) with loop protection: a message reaches each chat
at most once, so A↔B or A→B→C→A never echo. A name matching several chats is an error that asks for
the numeric id. Query results also go back to the asking chat as a ``system_message`` of type output.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku import PluginError, current_action, register_plugin
from rekku.db import session_factory
from rekku.interfaces import get_interfaces
from rekku.interfaces.links import resolve_chat
from rekku.interfaces.models import ChatForward, ChatLink
from rekku.interfaces.replies import send_output
from rekku.models import utcnow
from rekku.plugin_base import TablePlugin

ACTIONS = {
    "store_link": ("Remember a chat's (or thread's) link and names", ["chat_id", "link"],
                   ["thread_id", "interface", "chat_name", "thread_name"]),
    "get_link": ("Get the stored link of a chat, by id or name", ["chat_id"], ["thread_id", "interface"]),
    "resolve_chat": ("Find a chat's interface and numeric id from its name (or id)", ["identifier"], ["interface"]),
    "update_chat_names": ("Update a chat's stored names (fetched from the platform when none are given)",
                          ["chat_id"], ["thread_id", "interface", "chat_name", "thread_name"]),
    "list_links": ("List stored chats and cross-platform links", [], ["interface"]),
    "link_chats": ("Link two chats, possibly on different platforms: every message sent to from_chat is "
                   "also delivered to to_chat", ["from_chat", "to_chat"],
                   ["from_interface", "to_interface", "to_thread_id", "bidirectional"]),
    "unlink_chats": ("Remove a link made with link_chats", ["from_chat", "to_chat"],
                     ["from_interface", "to_interface", "bidirectional"]),
}
#: Actions whose result also goes back to the asking chat.
QUERIES = ("get_link", "resolve_chat", "list_links")


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _row(link: ChatLink) -> dict:
    return {"interface": link.interface or None, "chat_id": link.chat_id, "thread_id": link.thread_id or None,
            "link": link.link, "chat_name": link.chat_name, "thread_name": link.thread_name}


class ChatLinkPlugin(TablePlugin):
    ACTIONS = ACTIONS
    FIELD_TYPES = {"bidirectional": "boolean"}
    INSTRUCTION_NOTE = " Chats may be named by id or by stored name; an ambiguous name needs the numeric id."
    idempotent = True

    def __init__(self) -> None:
        register_plugin("chat_link", self)

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        if "bidirectional" in payload and not isinstance(payload["bidirectional"], bool):
            return [f"Field 'bidirectional' must be true or false for action '{action_type}'"]
        return []

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        result = getattr(self, action_type)(payload)
        if action_type in QUERIES:
            send_output(result, f"{action_type} done")
        return result

    # ------------------------------------------------------------------ upstream actions
    def store_link(self, p: dict) -> dict:
        interface = _s(p.get("interface") or _ctx_interface())
        values = {"link": p["link"], **{k: p[k] for k in ("chat_name", "thread_name") if p.get(k) is not None}}
        _upsert(interface, _s(p["chat_id"]), _s(p.get("thread_id")), values)
        return {"stored": True, "interface": interface or None, "chat_id": _s(p["chat_id"]),
                "thread_id": p.get("thread_id"), **values}

    def get_link(self, p: dict) -> dict:
        interface, chat_id = resolve_chat(p["chat_id"], p.get("interface"))
        with session_factory()() as s:
            link = s.scalar(sa.select(ChatLink).where(ChatLink.interface == interface, ChatLink.chat_id == chat_id,
                                                      ChatLink.thread_id == _s(p.get("thread_id"))))
        if link is None:
            return {"found": False, "interface": interface or None, "chat_id": chat_id}
        return {"found": True, **_row(link)}

    def resolve_chat(self, p: dict) -> dict:
        interface, chat_id = resolve_chat(p["identifier"], p.get("interface"))
        with session_factory()() as s:
            link = s.scalar(sa.select(ChatLink).where(ChatLink.interface == interface, ChatLink.chat_id == chat_id)
                            .order_by(ChatLink.thread_id))
        return _row(link) if link is not None else {"interface": interface or None, "chat_id": chat_id}

    def update_chat_names(self, p: dict) -> dict:
        interface = _s(p.get("interface") or _ctx_interface())
        names = {k: p[k] for k in ("chat_name", "thread_name") if p.get(k)}
        if not names:
            iface = get_interfaces().get(interface)
            lookup = getattr(iface, "chat_info", None)
            if lookup is None:
                raise PluginError(f"Give chat_name or thread_name: interface '{interface}' cannot look names up")
            info = lookup(_s(p["chat_id"]))
            names = {"chat_name": info.get("chat_name")}
            if info.get("link"):
                names["link"] = info["link"]
        _upsert(interface, _s(p["chat_id"]), _s(p.get("thread_id")), names)
        return {"updated": True, "interface": interface or None, "chat_id": _s(p["chat_id"]), **names}

    def list_links(self, p: dict) -> dict:
        with session_factory()() as s:
            links = sa.select(ChatLink).order_by(ChatLink.id)
            forwards = sa.select(ChatForward).order_by(ChatForward.id)
            if p.get("interface"):
                links = links.where(ChatLink.interface == p["interface"])
                forwards = forwards.where(sa.or_(ChatForward.source_interface == p["interface"],
                                                 ChatForward.target_interface == p["interface"]))
            return {"links": [_row(r) for r in s.scalars(links)],
                    "forwards": [{"from_interface": f.source_interface, "from_chat": f.source_chat_id,
                                  "to_interface": f.target_interface, "to_chat": f.target_chat_id,
                                  "to_thread_id": f.target_thread_id or None} for f in s.scalars(forwards)]}

    # ------------------------------------------------------------------ cross-platform links
    def link_chats(self, p: dict) -> dict:
        source, target = _pair(p)
        if source == target:
            raise PluginError("A chat cannot be linked to itself")
        pairs = [(source, target, _s(p.get("to_thread_id")))]
        if p.get("bidirectional"):
            pairs.append((target, source, ""))
        linked = []
        for (si, sc), (ti, tc), thread in pairs:
            try:
                with session_factory().begin() as s:
                    s.execute(sa.insert(ChatForward).values(source_interface=si, source_chat_id=sc,
                                                            target_interface=ti, target_chat_id=tc,
                                                            target_thread_id=thread, created_at=utcnow()))
            except IntegrityError:
                pass  # already linked
            linked.append({"from": f"{si}:{sc}", "to": f"{ti}:{tc}" + (f"/{thread}" if thread else "")})
        return {"linked": linked}

    def unlink_chats(self, p: dict) -> dict:
        source, target = _pair(p)
        pairs = [(source, target)] + ([(target, source)] if p.get("bidirectional") else [])
        removed = 0
        with session_factory().begin() as s:
            for (si, sc), (ti, tc) in pairs:
                removed += s.execute(sa.delete(ChatForward).where(
                    ChatForward.source_interface == si, ChatForward.source_chat_id == sc,
                    ChatForward.target_interface == ti, ChatForward.target_chat_id == tc)).rowcount
        return {"removed": removed}


def _ctx_interface() -> str | None:
    ctx = current_action()
    return ctx.interface if ctx is not None else None


def _pair(p: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    ends = []
    for side in ("from", "to"):
        wanted = p.get(f"{side}_interface") or (_ctx_interface() if side == "from" else None)
        interface, chat_id = resolve_chat(p[f"{side}_chat"], wanted, strict=not wanted)
        interface = wanted or interface
        if not interface:
            raise PluginError(f"Give {side}_interface: chat '{p[f'{side}_chat']}' is not stored with its interface")
        ends.append((interface, chat_id))
    return ends[0], ends[1]


def _upsert(interface: str, chat_id: str, thread_id: str, values: dict) -> None:
    key = (ChatLink.interface == interface, ChatLink.chat_id == chat_id, ChatLink.thread_id == thread_id)
    for _ in range(2):
        with session_factory().begin() as s:
            if s.execute(sa.update(ChatLink).where(*key).values(**values, updated_at=utcnow())).rowcount:
                return
        try:
            with session_factory().begin() as s:
                s.execute(sa.insert(ChatLink).values(interface=interface, chat_id=chat_id, thread_id=thread_id,
                                                     updated_at=utcnow(), **values))
            return
        except IntegrityError:
            continue  # inserted meanwhile by someone else: update it


PLUGIN_CLASS = ChatLinkPlugin
