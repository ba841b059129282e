"""The prompt context an LLM service sends to its model (``GET /v1/prompt``, ``rekku prompt``).

docs/contracts.md §1's shape: ``{"context": {time, date, location, weather, participants,
latest_diary_entries, chat_history, ...}, "input": {...}, "instructions": ..., "actions": ...}``.

- **Static injections** come from every plugin offering ``get_static_injection``; they run at once,
  each in a thread, sharing one deadline (``REKKU_INJECTION_TIMEOUT``). A plugin that is late,
  raises or returns something other than an object is left out, logged, and named in
  ``meta.skipped_injections``; the prompt never waits longer than the deadline.
- **Chat history** is :func:`chat_history`: the chat's user messages, what Rekku sent there (on
  any interface, the outbox included) and its other actions there, in time order; the one place a
  new source of the conversation is merged.
- **Budget**: the whole answer, as JSON, stays within ``REKKU_PROMPT_MAX_CHARS`` (or ``max_chars``):
  first the diary goes (oldest entries first), then older chat history, then participants, then
  the other plugins' context. ``meta`` says what was dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import threading
import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from rekku.corrections import JSON_INSTRUCTIONS
from rekku.db import get_engine
from rekku.ingest import capabilities
from rekku.interfaces.models import SENT, Delivery
from rekku.messages import Message
from rekku.models import ActionRun, chat_key, utcnow
from rekku.registry import Registry, get_registry
from rekku.schemas import Capability
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The interface whose messages a service relays to the chat their id names, whatever its platform.
OUTBOX = "outbox"

#: Longest text kept of one chat-history payload, result or error, in characters.
MAX_ITEM_CHARS = 600
#: Context keys the budget never drops (small and always useful).
KEEP_KEYS = ("time", "date", "location")

INSTRUCTIONS = (
    "You are Rekku. 'input' is the message you are answering, from the chat in 'input.payload.source'; "
    "'context' is what you know right now: the time, place and weather, the people in the chat "
    "('participants'), your own recent diary ('latest_diary_entries') and the recent conversation in "
    "this chat ('chat_history', oldest first: what people said, from 'user', and what you said and did, "
    "from 'rekku'). " + JSON_INSTRUCTIONS + " To reply in the chat, use the "
    "message action of its interface (e.g. message_telegram_bot with the chat as target). "
    "You may answer with several actions, or with {\"actions\": []} to stay silent."
)


# ----------------------------------------------------------------------------- response model
class PromptContext(BaseModel):
    """What the model knows now; plugins may add keys of their own."""

    model_config = ConfigDict(extra="allow")
    time: str | None = None
    date: str | None = None
    location: str | None = None
    weather: str | None = None
    participants: list[Any] = []
    latest_diary_entries: list[Any] = []
    chat_history: list[dict[str, Any]] = []


class MessageSource(BaseModel):
    chat_id: str | None = None
    message_id: str | None = None
    username: str | None = None
    usertag: str | None = None
    thread_id: str | None = None
    interface: str | None = None
    user_id: str | None = None


class InputPayload(BaseModel):
    text: str
    source: MessageSource
    timestamp: str


class PromptInput(BaseModel):
    type: str = "message"
    interface: str | None = None
    payload: InputPayload


class PromptMeta(BaseModel):
    """How the answer was built: its size, what the budget dropped, which injections were left out."""

    max_chars: int
    chars: int
    fits: bool
    dropped: list[str] = []
    skipped_injections: dict[str, str] = {}
    elapsed_ms: int = 0


class PromptResponse(BaseModel):
    context: PromptContext
    input: PromptInput
    instructions: str
    actions: dict[str, Capability]
    meta: PromptMeta = Field(description="Not for the model: how this answer was built")


# ----------------------------------------------------------------------------- chat history
def _clip(value: Any, limit: int = MAX_ITEM_CHARS) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) <= limit:
        return value
    return text[:limit] + f"… [{len(text) - limit} more characters]"


#: Action types whose effect is a chat message: what they said is in the delivery records instead.
MESSAGE_ACTION_PREFIXES = ("message_", "audio_")


def _time(value: Any) -> str:
    return value.isoformat(timespec="seconds")


def _user_entry(row: Any, interface: str | None, thread_id: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"time": _time(row.date), "from": "user", "user_id": row.user_id}
    if row.username:
        entry["username"] = row.username
    entry["text"] = _clip(row.text)
    if row.message_id:
        entry["message_id"] = row.message_id
    if row.reply_to_message_id:
        entry["reply_to_message_id"] = row.reply_to_message_id
    if row.thread_id and not thread_id:
        entry["thread_id"] = row.thread_id
    if row.interface != interface:
        entry["interface"] = row.interface
    return entry


def _rekku_entry(parts: list[Any], interface: str | None, thread_id: str | None) -> dict[str, Any]:
    first = parts[0]
    entry: dict[str, Any] = {"time": _time(first.created_at), "from": "rekku"}
    texts = [p.text for p in parts if p.text]
    if texts:
        entry["text"] = _clip("\n".join(texts))
    audio = [p.audio for p in parts if p.audio]
    if audio:
        entry["audio"] = audio[0]
    remote = next((p.remote_id for p in parts if p.remote_id not in (None, "", "None")), None)
    if remote:
        entry["message_id"] = remote
    if first.thread_id and not thread_id:
        entry["thread_id"] = first.thread_id
    if first.interface != interface:
        entry["interface"] = first.interface
    return entry


def _action_entry(run: Any, interface: str | None, thread_id: str | None) -> dict[str, Any]:
    context = run.context or {}
    entry: dict[str, Any] = {"time": _time(run.created_at), "from": "rekku", "action": run.type,
                             "status": run.status, "payload": _clip(run.payload or {})}
    if run.result is not None:
        entry["result"] = _clip(run.result)
    if run.error:
        entry["error"] = _clip(run.error, 200)
    for key in ("user_id", "username"):  # who asked for it
        if context.get(key):
            entry[key] = context[key]
    if context.get("thread_id") and not thread_id:
        entry["thread_id"] = context["thread_id"]
    if interface and context.get("interface") not in (None, interface):
        entry["interface"] = context["interface"]
    return entry


def _user_messages(c: sa.Connection, interface: str | None, chat_id: str, thread_id: str | None, since: Any,
                   limit: int, answering: str | None) -> list[tuple[tuple, dict[str, Any]]]:
    """The chat's newest user messages (index ix_messages_chat_date), but the one being answered."""
    table = Message.__table__
    query = (sa.select(table).where(table.c.chat_id == chat_id, table.c.date >= since)
             .order_by(table.c.date.desc(), table.c.id.desc()).limit(limit + 1))
    if interface:
        query = query.where(table.c.interface == interface)
    if thread_id:
        query = query.where(table.c.thread_id == thread_id)
    return [((row.date, 0, row.id), _user_entry(row, interface, thread_id)) for row in c.execute(query)
            if row.chat_id == chat_id  # exact, whatever the collation
            and not (answering and row.message_id == answering and interface in (None, row.interface))][:limit]


def _rekku_messages(c: sa.Connection, interface: str | None, chat_id: str, thread_id: str | None, since: Any,
                    limit: int) -> list[tuple[tuple, dict[str, Any]]]:
    """What Rekku said in the chat: its delivery records ``sent`` with a text or audio, one entry per
    message however many parts it took (index ix_interface_deliveries_chat_created, then the parts by
    action id)."""
    table = Delivery.__table__
    where = [table.c.chat_id == chat_id, table.c.status == SENT]
    if interface and interface != OUTBOX:
        where.append(table.c.interface.in_([interface, OUTBOX]))
    elif interface:
        where.append(table.c.interface == interface)
    if thread_id:
        where.append(table.c.thread_id == thread_id)
    at = sa.func.min(table.c.created_at).label("at")
    groups = c.execute(sa.select(table.c.action_id, at)
                       .where(*where, table.c.created_at >= since,
                              sa.or_(table.c.text.is_not(None), table.c.audio.is_not(None)))
                       .group_by(table.c.action_id).order_by(at.desc()).limit(limit)).all()
    if not groups:
        return []
    messages: dict[tuple, list[Any]] = {}
    for row in c.execute(sa.select(table).where(*where, table.c.action_id.in_([g.action_id for g in groups]))
                         .order_by(table.c.id)):
        if row.chat_id == chat_id and (row.text or row.audio):
            messages.setdefault((row.action_id, row.interface, row.thread_id), []).append(row)
    return [((parts[0].created_at, 1, parts[0].id), _rekku_entry(parts, interface, thread_id))
            for parts in messages.values() if parts[0].created_at >= since]


def _actions(c: sa.Connection, interface: str | None, chat_id: str, thread_id: str | None, since: Any,
             limit: int) -> list[tuple[tuple, dict[str, Any]]]:
    """The chat's other actions (index ix_action_runs_chat_created; the context's chat is the exact test)."""
    runs = ActionRun.__table__
    query = (sa.select(runs).where(runs.c.chat_id == chat_key(chat_id),
                                   runs.c.context["chat_id"].as_string() == str(chat_id),
                                   runs.c.created_at >= since,
                                   *(~runs.c.type.startswith(prefix, autoescape=True)
                                     for prefix in MESSAGE_ACTION_PREFIXES))
             .order_by(runs.c.created_at.desc(), runs.c.position.desc()).limit(limit * 3))
    if thread_id:
        query = query.where(runs.c.context["thread_id"].as_string() == str(thread_id))
    entries = []
    for run in c.execute(query):
        context = run.context or {}
        if context.get("reply_to_action"):
            continue
        if interface and context.get("interface") not in (None, interface):
            continue
        entries.append(((run.created_at, 2, run.position), _action_entry(run, interface, thread_id)))
        if len(entries) >= limit:
            break
    return entries


def chat_history(interface: str | None, chat_id: str | None, thread_id: str | None = None, *,
                 limit: int = 30, days: float = 7.0, settings: Settings | None = None,
                 answering: str | None = None) -> list[dict[str, Any]]:
    """The conversation in one chat, oldest first: the ``limit`` newest of its entries of the last
    ``days`` days. THE chat-history builder: a new source of the conversation is merged here.

    Three sources, each read newest first by an index, then merged by time:

    - **user messages** (table ``messages``, ``POST /v1/messages``): ``{"time", "from": "user",
      "user_id", "username"?, "text", "message_id"?, "reply_to_message_id"?}``. The message being
      answered (``answering``, the prompt's ``message_id``) is left out: it is the prompt's ``input``.
    - **Rekku's messages**: what was delivered to the chat (``interface_deliveries`` recorded
      ``sent``, on the chat's interface or the outbox, whatever sent it: a reply, a reminder, a copy
      forwarded from a linked chat), one entry per message however many parts it took:
      ``{"time", "from": "rekku", "text"?, "audio"?, "message_id"?}``. What a message action meant to
      send but did not is not there (its failure is on the feed).
    - **Rekku's other actions** in the chat (the action log, not ``message_*`` / ``audio_*``, whose
      text is the entry above): ``{"time", "from": "rekku", "action", "status", "payload",
      "result"?, "error"?, "user_id"?, "username"?}`` (the user: who asked for it). Kept because
      nothing else in the prompt says what Rekku *did* here: the reminder it set, the bio it
      updated, a query and its result; without them the model repeats itself. Query outputs sent
      back to the chat (context ``reply_to_action``) are left out: the query's own entry carries
      its result.

    Any entry may also say ``thread_id`` (when no thread was asked for) and ``interface`` (when it is
    not the one asked for: the outbox, or any when none was). A chat is its interface and id; with no
    interface, the id on every interface. With ``thread_id`` only that thread. Texts, payloads and
    results are clipped to :data:`MAX_ITEM_CHARS`; :func:`fit_budget` drops the oldest entries when
    the prompt is too long.
    """
    if not chat_id or limit <= 0:
        return []
    chat_id = str(chat_id)
    thread_id = str(thread_id) if thread_id else None
    since = utcnow() - timedelta(days=days)
    url = (settings or get_settings()).resolved_database_url()
    with get_engine(url).connect() as c:
        entries = (_user_messages(c, interface, chat_id, thread_id, since, limit, answering)
                   + _rekku_messages(c, interface, chat_id, thread_id, since, limit)
                   + _actions(c, interface, chat_id, thread_id, since, limit))
    entries.sort(key=lambda item: item[0])
    return [entry for _, entry in entries[-limit:]]


def participants_of(history: list[dict[str, Any]], user_id: str | None, username: str | None) -> list[dict]:
    """Who is in the chat: the asking user first, then the users of the history (the authors of its
    messages, and who asked for its actions, for a service that sends actions only), newest first."""
    people: list[dict] = []
    seen: set[str] = set()
    authors = [(e.get("user_id"), e.get("username")) for e in reversed(history)]
    for uid, name in [(user_id, username)] + authors:
        if uid and str(uid) not in seen:
            seen.add(str(uid))
            people.append({"user_id": str(uid), **({"username": name} if name else {})})
    return people


# ----------------------------------------------------------------------------- injections
_executor = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rekku-inject")
#: Each plugin's injection still running from an earlier prompt (a hung plugin holds one thread, not one per prompt).
_in_flight: dict[str, concurrent.futures.Future] = {}
_in_flight_lock = threading.Lock()


def _accepted_kwargs(fn: Any, offered: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return offered
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return offered
    return {k: v for k, v in offered.items() if k in params}


def _inject(plugin: Any, message: dict, memory: dict) -> Any:
    fn = plugin.get_static_injection
    outcome = fn(**_accepted_kwargs(fn, {"message": message, "context_memory": memory}))
    if inspect.isawaitable(outcome):
        async def wait() -> Any:
            return await outcome
        outcome = asyncio.run(wait())
    return outcome


def run_injections(registry: Registry, message: dict, memory: dict,
                   timeout: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Every plugin's static injection, concurrently, within ``timeout`` seconds in all.

    Returns ``(context keys, {plugin: why it was left out})``."""
    futures: dict[str, concurrent.futures.Future] = {}
    skipped: dict[str, str] = {}
    with _in_flight_lock:
        for name, plugin in registry.injectors():
            earlier = _in_flight.get(name)
            if earlier is not None and not earlier.done():
                skipped[name] = "still busy with an earlier prompt"
                log.warning("prompt injection of plugin %s is still running from an earlier prompt; left out", name)
                continue
            futures[name] = _in_flight[name] = _executor.submit(_inject, plugin, message, memory)
    concurrent.futures.wait(futures.values(), timeout=timeout)
    context: dict[str, Any] = {}
    for name, future in futures.items():
        if not future.done():
            future.cancel()
            skipped[name] = f"timed out after {timeout:g} s"
            log.warning("prompt injection of plugin %s took longer than %g s; left out", name, timeout)
            continue
        exc = future.exception()
        if exc is not None:
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            log.warning("prompt injection of plugin %s failed; left out", name, exc_info=exc)
            continue
        value = future.result()
        if value is None:
            continue
        if not isinstance(value, dict):
            skipped[name] = f"returned {type(value).__name__}, not an object"
            log.warning("prompt injection of plugin %s returned %s; left out", name, type(value).__name__)
            continue
        for key, item in value.items():
            if key in context:
                log.warning("prompt context key %r of plugin %s replaces another plugin's", key, name)
            context[key] = item
    return context, skipped


# ----------------------------------------------------------------------------- budget
def _size(body: dict) -> int:
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str))


def _shrink_list(body: dict, key: str, oldest_first: bool, label: str) -> bool:
    """Drop the oldest items of context[key] until the body fits or the list is empty."""
    items = body["context"].get(key)
    if not isinstance(items, list) or not items:
        return False
    total, meta = len(items), body["meta"]
    note = f"{label}: dropped all {total}"
    meta["dropped"].append(note)
    while items:
        overflow = _size(body) - meta["max_chars"]
        if overflow <= 0:
            break
        freed = 0
        while items and freed < overflow:  # drop about enough in one go, then measure again
            freed += len(json.dumps(items.pop(0 if oldest_first else -1), ensure_ascii=False, default=str)) + 1
        meta["dropped"][-1] = f"{label}: dropped {total - len(items)} of {total}" if items else note
    return True


def fit_budget(body: dict) -> dict:
    """Drop context, least important first, until the JSON of ``body`` is within ``meta.max_chars``."""
    meta = body["meta"]
    meta["chars"] = meta["max_chars"]  # as many digits as the final size, while measuring
    steps = [("latest_diary_entries", False, "latest_diary_entries (oldest first)"),
             ("chat_history", True, "chat_history (oldest first)"),
             ("participants", False, "participants")]
    for key, oldest_first, label in steps:
        if _size(body) <= meta["max_chars"]:
            break
        _shrink_list(body, key, oldest_first, label)
    optional = [k for k in body["context"] if k not in KEEP_KEYS and k != "weather"
                and k not in ("latest_diary_entries", "chat_history", "participants")] + ["weather"]
    for key in optional:
        if _size(body) <= meta["max_chars"]:
            break
        if body["context"].get(key) is not None:
            body["context"].pop(key)
            meta["dropped"].append(f"{key}: dropped")
    for _ in range(3):  # writing the size into meta may change the size by a digit
        meta["chars"] = _size(body)
        meta["fits"] = meta["chars"] <= meta["max_chars"]
    return body


# ----------------------------------------------------------------------------- the builder
def build_prompt(*, interface: str | None = None, chat_id: str | None = None, thread_id: str | None = None,
                 user_id: str | None = None, username: str | None = None, message_id: str | None = None,
                 text: str = "", max_chars: int | None = None, settings: Settings | None = None,
                 registry: Registry | None = None) -> dict[str, Any]:
    """The prompt for one incoming message, as a JSON-ready dict (see :class:`PromptResponse`)."""
    started = time.monotonic()
    settings = settings or get_settings()
    registry = registry or get_registry()
    history = chat_history(interface, chat_id, thread_id, limit=settings.prompt_history_limit,
                           days=settings.prompt_history_days, settings=settings, answering=message_id)
    source = {"chat_id": chat_id, "message_id": message_id, "username": username,
              "usertag": f"@{username}" if username else None, "thread_id": thread_id,
              "interface": interface, "user_id": user_id}
    message = {"type": "message", "interface": interface,
               "payload": {"text": text, "source": source, "timestamp": utcnow().isoformat(timespec="seconds")}}
    memory = {"interface": interface, "chat_id": chat_id, "thread_id": thread_id, "user_id": user_id,
              "chat_history": history, "participants": participants_of(history, user_id, username)}
    injected, skipped = run_injections(registry, message, memory, settings.injection_timeout)
    context = {"time": None, "date": None, "location": None, "weather": None, "participants": [],
               "latest_diary_entries": [], **injected, "chat_history": history}
    for key in ("time", "date", "location", "weather"):  # typed as text in the response model
        if context[key] is not None and not isinstance(context[key], str):
            context[key] = json.dumps(context[key], ensure_ascii=False, default=str)
    for key in ("participants", "latest_diary_entries"):
        if not isinstance(context[key], list):
            context[key] = [] if context[key] is None else [context[key]]
    body = {"context": context, "input": message, "instructions": INSTRUCTIONS,
            "actions": capabilities(registry),
            "meta": {"max_chars": max_chars or settings.prompt_max_chars, "chars": 0, "fits": True, "dropped": [],
                     "skipped_injections": skipped, "elapsed_ms": 0}}
    body["meta"]["elapsed_ms"] = int((time.monotonic() - started) * 1000)
    return fit_budget(body)
