"""The prompt context an LLM service sends to its model (``GET /v1/prompt``, ``rekku prompt``).

docs/contracts.md §1's shape: ``{"context": {time, date, location, weather, participants,
latest_diary_entries, chat_history, ...}, "input": {...}, "instructions": ..., "actions": ...}``.

- **Static injections** come from every plugin offering ``get_static_injection``; they run at once,
  each in a thread, sharing one deadline (``REKKU_INJECTION_TIMEOUT``). A plugin that is late,
  raises or returns something other than an object is left out, logged, and named in
  ``meta.skipped_injections``; the prompt never waits longer than the deadline.
- **Chat history** is :func:`chat_history` (the action log); it is the one place other sources
  (the outbox, incoming messages) are to be merged.
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
from rekku.models import ActionRun, chat_key, utcnow
from rekku.registry import Registry, get_registry
from rekku.schemas import Capability
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Longest text kept of one chat-history payload, result or error, in characters.
MAX_ITEM_CHARS = 600
#: Context keys the budget never drops (small and always useful).
KEEP_KEYS = ("time", "date", "location")

INSTRUCTIONS = (
    "You are Rekku. 'input' is the message you are answering, from the chat in 'input.payload.source'; "
    "'context' is what you know right now: the time, place and weather, the people in the chat "
    "('participants'), your own recent diary ('latest_diary_entries') and what you recently did in "
    "this chat ('chat_history', oldest first). " + JSON_INSTRUCTIONS + " To reply in the chat, use the "
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


def _history_entry(run: Any) -> dict[str, Any]:
    context = run.context or {}
    entry: dict[str, Any] = {"time": run.created_at.isoformat(timespec="seconds"), "type": run.type,
                             "status": run.status}
    for key in ("user_id", "username", "thread_id"):
        if context.get(key):
            entry[key] = context[key]
    payload = run.payload or {}
    if run.type.startswith("message_") and isinstance(payload.get("text"), str):
        entry["text"] = _clip(payload["text"])
        if payload.get("target") not in (None, context.get("chat_id")):
            entry["target"] = payload["target"]
    else:
        entry["payload"] = _clip(payload)
        if run.result is not None:
            entry["result"] = _clip(run.result)
    if run.error:
        entry["error"] = _clip(run.error, 200)
    return entry


def chat_history(interface: str | None, chat_id: str | None, thread_id: str | None = None, *,
                 limit: int = 30, days: float = 7.0, settings: Settings | None = None) -> list[dict[str, Any]]:
    """What happened in one chat, oldest first: the actions answered to it (from the action log).

    THE chat-history builder: merge other sources (outbox messages, incoming messages) here, as
    more entries with a ``time``, sorted together before the ``limit`` newest are kept.

    An action counts for the chat when its request context names the chat (and the thread, when
    one is given) and either no interface or this interface. Query outputs sent back to the chat
    (context ``reply_to_action``) are left out: the query's own entry carries its result.
    """
    if not chat_id or limit <= 0:
        return []
    runs = ActionRun.__table__
    since = utcnow() - timedelta(days=days)
    # the indexed column narrows to the chat; the context's own value is the exact test
    query = (sa.select(runs).where(runs.c.chat_id == chat_key(chat_id),
                                   runs.c.context["chat_id"].as_string() == str(chat_id),
                                   runs.c.created_at >= since)
             .order_by(runs.c.created_at.desc(), runs.c.position.desc()).limit(limit * 3))
    if thread_id:
        query = query.where(runs.c.context["thread_id"].as_string() == str(thread_id))
    url = (settings or get_settings()).resolved_database_url()
    with get_engine(url).connect() as c:
        rows = c.execute(query).all()
    entries = []
    for run in rows:
        context = run.context or {}
        if context.get("reply_to_action"):
            continue
        if interface and context.get("interface") not in (None, interface):
            continue
        entries.append(_history_entry(run))
        if len(entries) >= limit:
            break
    entries.reverse()
    return entries


def participants_of(history: list[dict[str, Any]], user_id: str | None, username: str | None) -> list[dict]:
    """Who is in the chat: the asking user first, then the users of the history, newest first."""
    people: list[dict] = []
    seen: set[str] = set()
    for uid, name in [(user_id, username)] + [(e.get("user_id"), e.get("username")) for e in reversed(history)]:
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
                           days=settings.prompt_history_days, settings=settings)
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
