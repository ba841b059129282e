"""chat_link: a directory of chats (links and names, so actions may address a chat by name) and
cross-platform links (every message sent to one chat is also delivered to another).

Upstream's actions and ``chat_link`` table are kept (docs/plugins.md §2); ``link_chats`` and
``unlink_chats`` add the cross-platform links, stored in ``chat_link_forwards`` and followed by
every message send (rekku/interfaces/delivery.py) with loop protection: a message reaches each chat
at most once, so A↔B or A→B→C→A never echo. A name matching several chats is an error that asks for
the numeric id. Query results also go back to the asking chat as a ``system_message`` of type output.
The original Rekku's field names ``message_thread_id`` and ``message_thread_name`` are accepted for
``thread_id`` and ``thread_name`` (renamed when the action is validated; both, with different values,
is an error), and ``get_link`` finds a thread by its stored name too.

Who may change what (``authorize_payload``, checked at the ingress and again in the worker): the
request context says who speaks and from which chat; the payload is the model's. A trainer may link,
unlink, store and rename any chat. Anyone else may only touch the chat the request came from:
``link_chats``/``unlink_chats`` are refused when ``from_chat`` or ``to_chat`` is another chat (linking
another chat to mine reads its messages, linking mine to another pushes my traffic into it, and
unlinking removes someone else's forward; since a chat cannot be linked to itself, linking needs a
trainer), and ``store_link``/``update_chat_names`` only for this chat, with names no other chat uses
and that are not chat ids: actions address chats by name, so a name is a route to a chat.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku.plugin import (
    ChatForward,
    ChatLink,
    PluginError,
    TablePlugin,
    chats_named,
    current_action,
    get_interfaces,
    get_settings,
    is_known_chat_id,
    looks_like_id,
    register_plugin,
    resolve_chat,
    resolve_thread,
    send_output,
    session_factory,
    utcnow,
)

ACTIONS = {
    "store_link": ("Remember a chat's (or thread's) link and names", ["chat_id", "link"],
                   ["thread_id", "interface", "chat_name", "thread_name"]),
    "get_link": ("Get the stored link of a chat, by id or name (and of a thread, by id or name)", ["chat_id"],
                 ["thread_id", "thread_name", "interface"]),
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
#: Actions that change where a chat's messages go: only for the requesting chat unless a trainer asks.
LINKING = ("link_chats", "unlink_chats")
#: Actions that change which chat a name (or link) means: the same rule, plus names nobody else uses.
NAMING = ("store_link", "update_chat_names")


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def _row(link: ChatLink) -> dict:
    return {"interface": link.interface or None, "chat_id": link.chat_id, "thread_id": link.thread_id or None,
            "link": link.link, "chat_name": link.chat_name, "thread_name": link.thread_name}


class ChatLinkPlugin(TablePlugin):
    ACTIONS = ACTIONS
    FIELD_TYPES = {"bidirectional": "boolean"}
    #: The original Rekku's names of the thread fields (renamed when an action is validated).
    FIELD_ALIASES = {"message_thread_id": "thread_id", "message_thread_name": "thread_name"}
    INSTRUCTION_NOTE = " Chats may be named by id or by stored name; an ambiguous name needs the numeric id."
    idempotent = True

    def __init__(self) -> None:
        register_plugin("chat_link", self)

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        if "bidirectional" in payload and not isinstance(payload["bidirectional"], bool):
            return [f"Field 'bidirectional' must be true or false for action '{action_type}'"]
        return []

    def authorize_payload(self, action_type: str, payload: dict, context: dict, is_trainer: bool) -> str | None:
        """A non-trainer may only link, unlink, store or name the chat the request came from (see the
        module's docstring): anything else would redirect another chat's messages."""
        if is_trainer or action_type not in LINKING + NAMING:
            return None
        own = _requesting_chat(context)
        if own is None:
            return (f"Action '{action_type}' is restricted to trainers when the request comes from no chat: "
                    "others may only change the chat they write from")
        if action_type in LINKING:
            return _link_refusal(action_type, payload, context, own)
        return _naming_refusal(action_type, payload, context, own)

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
        thread = _s(p.get("thread_id"))
        if p.get("thread_name") not in (None, ""):
            named = resolve_thread(interface, chat_id, str(p["thread_name"]))
            if thread and thread != named:
                raise PluginError(f"Fields 'thread_id' and 'thread_name' name different threads for action "
                                  f"'get_link': thread '{p['thread_name']}' is {named}, not {thread}; give one")
            thread = named
        with session_factory()() as s:
            link = s.scalar(sa.select(ChatLink).where(ChatLink.interface == interface, ChatLink.chat_id == chat_id,
                                                      ChatLink.thread_id == thread))
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
            _check_fetched_name(info.get("chat_name"), interface, _s(p["chat_id"]))
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
    return _end(p, "from", _ctx_interface()), _end(p, "to", _ctx_interface())


def _end(p: dict, side: str, ctx_interface: str | None) -> tuple[str, str]:
    """``(interface, chat_id)`` of one end of a link: ``from`` defaults to the request's interface."""
    wanted = p.get(f"{side}_interface") or (ctx_interface if side == "from" else None)
    interface, chat_id = resolve_chat(p[f"{side}_chat"], wanted, strict=not wanted)
    interface = wanted or interface
    if not interface:
        raise PluginError(f"Give {side}_interface: chat '{p[f'{side}_chat']}' is not stored with its interface")
    return interface, chat_id


# ----------------------------------------------------------------------------- authorization
def _label(chat: tuple[str, str]) -> str:
    return f"{chat[0]}:{chat[1]}" if chat[0] else chat[1]


def _requesting_chat(context: dict) -> tuple[str, str] | None:
    """The chat the request came from, as the context (the token holder) says, or None."""
    chat_id = context.get("chat_id")
    if chat_id in (None, ""):
        return None
    return _s(context.get("interface")), str(chat_id)


def _link_refusal(action_type: str, p: dict, context: dict, own: tuple[str, str]) -> str | None:
    """Both ends must be the requesting chat, resolved as the handler will resolve them."""
    for side in ("from", "to"):
        try:
            end = _end(p, side, context.get("interface"))
        except PluginError as exc:
            return (f"Action '{action_type}' is restricted to trainers unless {side}_chat is this chat "
                    f"({_label(own)}): {exc}")
        if end != own:
            return (f"Action '{action_type}' is restricted to trainers when it links a chat other than this one: "
                    f"{side}_chat is {_label(end)}, but this request came from {_label(own)} (a link redirects "
                    "a chat's messages, so only a trainer may link or unlink other chats)")
    return None


def _naming_refusal(action_type: str, p: dict, context: dict, own: tuple[str, str]) -> str | None:
    """The chat must be the requesting chat, and each new name one no other chat answers to."""
    chat = (_s(p.get("interface") or context.get("interface")), _s(p["chat_id"]))
    if chat != own:
        return (f"Action '{action_type}' is restricted to trainers for a chat other than this one: chat "
                f"{_label(chat)} is not the chat this request came from ({_label(own)})")
    for key in ("chat_name", "thread_name"):
        if p.get(key) not in (None, ""):
            reason = _name_refusal(action_type, key, str(p[key]), own)
            if reason:
                return reason
    return None


def _name_refusal(action_type: str, key: str, name: str, own: tuple[str, str]) -> str | None:
    """Why a non-trainer's chat may not take ``name``: a name is a route (``message_<iface>`` with a
    ``target`` name, ``link_chats``), so taking another chat's name or id would take its messages."""
    if looks_like_id(name.strip()) or (is_known_chat_id(name) and name.strip() != own[1]):
        return (f"Action '{action_type}' is restricted to trainers when '{key}' is a chat id ('{name}'): "
                "give a name that is not a chat's id")
    taken = sorted(chat for chat in chats_named(name) if chat != own)
    if taken:
        return (f"Action '{action_type}' is restricted to trainers when '{key}' is already used by another chat: "
                f"'{name}' names {', '.join(_label(c) for c in taken)}; choose another name")
    return None


def _check_fetched_name(name: Any, interface: str, chat_id: str) -> None:
    """A name read from the platform follows the same rule as a given one (the platform's title is
    whatever the chat's members typed): a non-trainer's chat may not take a name another chat uses."""
    ctx = current_action()
    if not name or ctx is None or get_settings().is_trainer(ctx.interface, ctx.user_id):
        return
    reason = _name_refusal("update_chat_names", "chat_name", str(name), (interface, chat_id))
    if reason:
        raise PluginError(reason)


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
