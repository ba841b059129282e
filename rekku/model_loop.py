"""The optional model loop: with ``REKKU_LLM_URL`` set, Rekku asks the model itself, against any
OpenAI-compatible chat-completions endpoint (``POST {REKKU_LLM_URL}/chat/completions``; OpenAI,
llama.cpp, vLLM, Ollama), and runs its reply through the ingress. Without it nothing here is imported
or published: a service reads the feed (``GET /v1/feed``) and answers through ``POST /v1/actions``.

A **turn** is the Celery task ``rekku.model.turn`` (kwargs ``interface``, ``chat_id``, ``thread_id``) on
the io pool (registered by rekku_workers.model_turn only when the loop is on). rekku.turns publishes it,
by name, after a message was stored (rekku.messages.receive) and after the feed got an item the model
must see for a chat (rekku.feed.append_now: outputs, event reminders, failures, corrections).

**One turn per chat at a time; a burst becomes one turn.** Three Redis keys per chat (rekku.turns.keys),
next to the broker's data, and two Lua scripts, so each step is atomic:

- *trigger* (rekku.turns.request_turn): set ``dirty``; then if no turn holds ``lock``, set ``queued``
  with NX and publish a turn only if that set it. So triggers while a turn waits in the queue coalesce
  into it (``queued`` is already set), and triggers while a turn runs only leave ``dirty``.
- *start* (:func:`run`): take ``lock`` (SET NX with a lease longer than any turn), then clear
  ``queued``. A turn that finds the lock taken (a redelivery, a retry) marks ``queued`` again and
  retries in a moment, so what it stood for is not dropped.
- *read*: clear ``dirty``, THEN read what is new for the chat on the feed: anything committed after the
  read sets ``dirty`` again (its trigger runs after its commit).
- *end* (rekku.turns.finish): if ``dirty`` is set, clear it and keep the lock: the same task runs the
  turn once more; else release the lock. Atomic with *trigger*: a trigger either saw the lock (and its
  ``dirty`` is seen here) or saw it free (and published a new turn).

So a burst of messages while a turn runs becomes at most one more turn, and two turns of a chat never
run at once.

**What a turn does.** It reads the chat's feed items after its durable cursor (table ``model_turns``:
``read_upto``, and ``pending_upto``, the span a started turn reads, kept so a retried or redelivered
turn reads the same span and uses the same idempotency keys). It builds the prompt with the same code
as ``GET /v1/prompt`` (rekku.prompt.build_prompt, with the chat and the last message's user and text as
input) and sends the new items as the original Rekku did: the user messages as the input, outputs,
event reminders and failures as ``{"system_message": {"type": "output" | "event_reminder" | "error", ...}}``.
The reply is submitted through the ingress with the message's context and the key
``rekku:turn:<chat>:<span end>:<n>``: a redelivered turn does not act twice. A rejected reply's correction
goes back to the model (another completions call, with the reply and the correction appended) up to
``CORRECTOR_RETRIES`` times; the ingress marks those corrections (their feed dedupe key), so they start
no turn of their own and are not sent again.

**Chains.** A turn that only the chat's own outputs and failures started (no message, no reminder) is
one link of a chain; past ``REKKU_LLM_MAX_CHAINED_TURNS`` links the model is not asked (a model that
answers each output with another query would never stop, and each call costs), and those items wait,
unread, for the turn the chat's next message starts.

**Errors.** The endpoint failing (connection, timeout, 5xx, 429) or the broker being unreachable: the
turn is retried with backoff (``REKKU_LLM_RETRIES``). A malformed completion, or an endpoint's other
refusal (4xx): logged, the turn ends. The cursor moves only after the reply was submitted, so a message
is never lost: the next turn of the chat sends it again.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from rekku import feed
from rekku.db import get_engine
from rekku.errors import RekkuError, ServiceUnavailable
from rekku.ingest import Answer, default_ingress
from rekku.messages import Message
from rekku.models import Base, BigId, UTCDateTime, utcnow
from rekku.prompt import build_prompt
from rekku.settings import Settings, get_settings
from rekku.turns import DIRTY_TTL, QUEUED_TTL, chat_hash, chat_of, finish, give_up_lock, keys, redis_client, release

log = logging.getLogger(__name__)


#: Seconds a turn that found its chat's lock taken waits before it tries again.
LOCK_WAIT = 2.0
#: Most feed items one turn sends (the newest; older ones are counted in a note).
MAX_ITEMS = 20
#: Longest JSON of one system message sent to the model, in characters.
MAX_ITEM_CHARS = 4000
#: Longest backoff between retries of a failing endpoint, in seconds.
MAX_BACKOFF = 60.0


class ModelTurn(Base):
    """Per chat: the feed read so far (``read_upto``) and the span a started turn reads (``pending_upto``)."""

    __tablename__ = "model_turns"
    __table_args__ = (sa.UniqueConstraint("interface", "chat_id", "thread_id", name="uq_model_turns_chat"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    interface: Mapped[str] = mapped_column(sa.String(64))
    chat_id: Mapped[str] = mapped_column(sa.String(191))
    thread_id: Mapped[str] = mapped_column(sa.String(191), default="")
    read_upto: Mapped[int] = mapped_column(BigId, default=0)
    pending_upto: Mapped[int | None] = mapped_column(BigId)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class EndpointFailed(Exception):
    """The endpoint did not answer (connection, timeout, 5xx, 429): worth a retry."""


class BadCompletion(Exception):
    """The endpoint answered, but not with a completion to use (malformed, or a 4xx refusal)."""


@dataclass
class Outcome:
    """What the task does next: nothing (``retry_in`` None) or retry after ``retry_in`` seconds."""

    retry_in: float | None = None
    failures: int = 0


Chat = tuple[str, str, str]


# ----------------------------------------------------------------------------- the endpoint
def complete(messages: list[dict[str, str]], settings: Settings) -> str:
    """One chat-completions call; the reply's text."""
    url = (settings.llm_url or "").rstrip("/") + "/chat/completions"
    body: dict[str, Any] = {"messages": messages}
    if settings.llm_model:
        body["model"] = settings.llm_model
    headers = {"Authorization": f"Bearer {settings.llm_api_key}"} if settings.llm_api_key else {}
    where = urlsplit(url).netloc
    try:
        resp = requests.post(url, json=body, headers=headers, timeout=settings.llm_timeout)
    except requests.RequestException as exc:
        raise EndpointFailed(f"{where}: {type(exc).__name__}") from None
    if resp.status_code == 429 or resp.status_code >= 500:
        raise EndpointFailed(f"{where} answered {resp.status_code}")
    if resp.status_code >= 400:
        raise BadCompletion(f"{where} answered {resp.status_code}: {resp.text[:300]}")
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadCompletion(f"{where} answered no choices[0].message.content: {resp.text[:300]}") from None
    if not isinstance(content, str) or not content.strip():
        raise BadCompletion(f"{where} answered an empty or non-text completion: {resp.text[:300]}")
    return content


# ----------------------------------------------------------------------------- the cursor
def _row(connection: sa.Connection, chat: Chat) -> Any:
    table = ModelTurn.__table__
    where = (table.c.interface == chat[0], table.c.chat_id == chat[1], table.c.thread_id == chat[2])
    row = connection.execute(sa.select(table).where(*where)).first()
    if row is None:
        try:
            with connection.begin_nested():
                connection.execute(sa.insert(table).values(interface=chat[0], chat_id=chat[1], thread_id=chat[2],
                                                           read_upto=0, updated_at=utcnow()))
        except sa.exc.IntegrityError:
            pass
        row = connection.execute(sa.select(table).where(*where)).one()
    return row


def _set(chat: Chat, **values: Any) -> None:
    table = ModelTurn.__table__
    with get_engine().begin() as connection:
        connection.execute(sa.update(table).where(table.c.interface == chat[0], table.c.chat_id == chat[1],
                                                  table.c.thread_id == chat[2]).values(**values, updated_at=utcnow()))


def _span(chat: Chat, clear_dirty: Any) -> tuple[int, int]:
    """``(read_upto, upto)``: the span of the feed this turn reads. A span a started turn left
    (``pending_upto``) is read again as it was; else ``dirty`` is cleared and the span ends at the
    chat's newest item, recorded as pending before the model is asked."""
    items = feed.FeedItem.__table__
    with get_engine().begin() as connection:
        row = _row(connection, chat)
        if row.pending_upto is not None and row.pending_upto > row.read_upto:
            return row.read_upto, row.pending_upto
        clear_dirty()
        upto = connection.scalar(sa.select(sa.func.max(items.c.id)).where(
            items.c.interface == chat[0], items.c.chat_id == chat[1], items.c.thread_id == chat[2])) or 0
        if upto > row.read_upto:
            connection.execute(sa.update(ModelTurn.__table__).where(ModelTurn.__table__.c.id == row.id)
                               .values(pending_upto=upto, updated_at=utcnow()))
        return row.read_upto, upto


def _items(chat: Chat, after: int, upto: int) -> list[Any]:
    """The chat's feed items in the span, oldest first, without the corrections of the loop's own
    replies (each turn sends those back itself)."""
    table = feed.FeedItem.__table__
    with get_engine().connect() as connection:
        rows = connection.execute(sa.select(table).where(
            table.c.interface == chat[0], table.c.chat_id == chat[1], table.c.thread_id == chat[2],
            table.c.id > after, table.c.id <= upto).order_by(table.c.id)).all()
    return [r for r in rows if not (r.dedupe_key or "").startswith(feed.LOOP_CORRECTION_PREFIX)]


def _last_message(chat: Chat) -> dict[str, Any] | None:
    """The chat's newest stored message (for a turn that only an output or a reminder started)."""
    table = Message.__table__
    with get_engine().connect() as connection:
        row = connection.execute(sa.select(table).where(
            table.c.interface == chat[0], table.c.chat_id == chat[1], table.c.thread_id == chat[2])
            .order_by(table.c.id.desc()).limit(1)).first()
    return {"user_id": row.user_id, "username": row.username, "message_id": row.message_id,
            "text": row.text} if row is not None else None


# ----------------------------------------------------------------------------- what the model is sent
def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _clipped(value: dict[str, Any]) -> str:
    text = _dumps(value)
    if len(text) <= MAX_ITEM_CHARS:
        return text
    inner = value.get("system_message", {})
    short = {"system_message": {"type": inner.get("type"), "message": inner.get("message"),
                                "truncated": f"{len(text)} characters; the rest left out: " + text[:MAX_ITEM_CHARS]}}
    return _dumps(short)


def system_message(row: Any) -> dict[str, Any] | None:
    """A feed item other than a message as the original Rekku told its model: a ``system_message``."""
    data = row.data if isinstance(row.data, dict) else {"value": row.data}
    if row.type == feed.OUTPUT:
        return {"system_message": {**data, "type": "output"}}
    if row.type == feed.EVENT_REMINDER:
        return {"system_message": {**data, "type": "event_reminder"}}
    if row.type == feed.FAILURE:
        return {"system_message": {"type": "error", "action": data.get("action_type"), "action_id": row.action_id,
                                   "message": f"Your action {data.get('action_type')} failed: {data.get('error')}",
                                   "error": data.get("error")}}
    if row.type == feed.CORRECTION:
        return data if "system_message" in data else {"system_message": {"type": "error", **data}}
    return None


def _message_input(message: dict[str, Any]) -> dict[str, Any]:
    """An earlier message of the same turn, in the shape of the prompt's ``input``."""
    source = {"chat_id": message.get("chat_id"), "message_id": message.get("message_id"),
              "username": message.get("username"), "thread_id": message.get("thread_id"),
              "interface": message.get("interface"), "user_id": message.get("user_id")}
    return {"input": {"type": "message", "interface": message.get("interface"),
                      "payload": {"text": message.get("text"), "source": source, "timestamp": message.get("date")}}}


def conversation(chat: Chat, rows: list[Any], settings: Settings) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The completions ``messages`` of a turn and the request context its reply runs with."""
    dropped = max(0, len(rows) - MAX_ITEMS)
    rows = rows[-MAX_ITEMS:]
    messages_in = [r for r in rows if r.type == feed.MESSAGE and isinstance(r.data, dict)]
    last = messages_in[-1].data if messages_in else _last_message(chat)
    who = last or {}
    prompt = build_prompt(interface=chat[0] or None, chat_id=chat[1], thread_id=chat[2] or None,
                          user_id=who.get("user_id"), username=who.get("username"),
                          message_id=who.get("message_id"), text=who.get("text") or "", settings=settings)
    prompt.pop("meta", None)
    instructions = prompt.pop("instructions")
    out: list[dict[str, str]] = [{"role": "system", "content": instructions}]
    if dropped:
        out.append({"role": "user", "content": _dumps({"system_message": {
            "type": "note", "message": f"{dropped} older items of this chat were left out of this turn"}})})
    if not messages_in:
        out.append({"role": "user", "content": _dumps(prompt)})
    for row in rows:
        if row.type == feed.MESSAGE:
            if messages_in and row is messages_in[-1]:
                out.append({"role": "user", "content": _dumps(prompt)})
            elif isinstance(row.data, dict):
                out.append({"role": "user", "content": _dumps(_message_input(row.data))})
            continue
        said = system_message(row)
        if said is not None:
            out.append({"role": "user", "content": _clipped(said)})
    context = {"interface": chat[0], "chat_id": chat[1], "thread_id": chat[2],
               "user_id": who.get("user_id"), "username": who.get("username"), "message_id": who.get("message_id")}
    return out, {k: str(v) for k, v in context.items() if v}


# ----------------------------------------------------------------------------- one turn
def _submit(reply: str, context: dict[str, Any], key: str) -> Answer | None:
    """The reply through the ingress (None: refused as a whole, e.g. too large: logged)."""
    try:
        return default_ingress().submit(reply, context=context, idempotency_key=key)
    except ServiceUnavailable:
        raise
    except RekkuError as exc:
        log.warning("the model's reply for chat %s:%s was refused: %s", context.get("interface"),
                    context.get("chat_id"), exc)
        return None


def _chained_too_long(chat: Chat, rows: list[Any], client: Any, settings: Settings) -> bool:
    """Whether this turn would be one too many in a chain of turns that only the chat's own outputs
    started. Someone speaking (a message) or a reminder firing ends a chain; outputs and failures extend
    it. Kept in Redis beside the turn lock: losing it only restarts the count."""
    key = keys(chat)["chain"]
    if any(r.type in (feed.MESSAGE, feed.EVENT_REMINDER) for r in rows):
        client.delete(key)
        return False
    chained = client.incr(key)
    client.expire(key, DIRTY_TTL)
    return chained > settings.llm_max_chained_turns


def one_turn(chat: Chat, clear_dirty: Any, settings: Settings, client: Any) -> int:
    """Read what is new for the chat, ask the model, run its reply (and its corrections); returns how
    many completions calls were made. Raises EndpointFailed / ServiceUnavailable for a retry."""
    after, upto = _span(chat, clear_dirty)
    if upto <= after:
        return 0
    rows = _items(chat, after, upto)
    if not rows:
        _set(chat, read_upto=upto, pending_upto=None)
        return 0
    if _chained_too_long(chat, rows, client, settings):
        log.warning("model turn of chat %s:%s not started: %d turns in a row came from its own outputs alone "
                    "(REKKU_LLM_MAX_CHAINED_TURNS); its %d new items go to the model with the chat's next message",
                    chat[0], chat[1], settings.llm_max_chained_turns, len(rows))
        _set(chat, pending_upto=None)  # unread: the next turn a message starts sends them too
        return 0
    messages, context = conversation(chat, rows, settings)
    key = f"rekku:turn:{chat_hash(chat)}:{upto}"
    calls = 0
    try:
        reply = complete(messages, settings)
    except BadCompletion as exc:
        log.error("model turn of chat %s:%s ended: %s (its %d items are sent again next turn)",
                  chat[0], chat[1], exc, len(rows))
        _set(chat, pending_upto=None)
        return 1
    calls += 1
    answer = _submit(reply, context, f"{key}:0")
    attempt = 0
    while (answer is not None and answer.correction and attempt < settings.corrector_retries
           and not answer.correction.get("system_message", {}).get("blocked")):
        attempt += 1
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": _dumps(answer.correction)}]
        try:
            reply = complete(messages, settings)
        except BadCompletion as exc:
            log.error("model turn of chat %s:%s: the answer to correction %d was unusable: %s", chat[0], chat[1],
                      attempt, exc)
            break
        calls += 1
        answer = _submit(reply, context, f"{key}:{attempt}")
    if answer is not None:
        log.info("model turn of chat %s:%s: %d items, %d calls, %d actions accepted, %d rejected", chat[0], chat[1],
                 len(rows), calls, len(answer.accepted), len(answer.rejected))
    _set(chat, read_upto=upto, pending_upto=None)
    return calls


def lease_ms(settings: Settings) -> int:
    """How long a turn holds its chat's lock: longer than the longest turn (every completions call of a
    full correction round at its timeout, plus the prompt)."""
    return int((settings.llm_timeout * (settings.corrector_retries + 2) + 120) * 1000)


def run(interface: str, chat_id: str, thread_id: str = "", failures: int = 0,
        settings: Settings | None = None) -> Outcome:
    """The task's body: turns of one chat, under its lock, until nothing new came meanwhile (see the
    module's docstring)."""
    settings = settings or get_settings()
    chat = chat_of(interface, chat_id, thread_id)
    client = redis_client(settings)
    k = keys(chat)
    token = uuid.uuid4().hex
    lease = lease_ms(settings)
    if not client.set(k["lock"], token, nx=True, px=lease):
        client.set(k["queued"], "1", ex=QUEUED_TTL)  # a turn runs: this one waits and looks again
        return Outcome(retry_in=LOCK_WAIT, failures=failures)
    client.delete(k["queued"])
    released = False
    try:
        while True:
            try:
                one_turn(chat, lambda: client.delete(k["dirty"]), settings, client)
            except (EndpointFailed, ServiceUnavailable) as exc:
                if failures >= settings.llm_retries:
                    log.error("model turn of chat %s:%s given up after %d retries: %s (its items are sent again "
                              "next turn)", chat[0], chat[1], failures, exc)
                    _set(chat, pending_upto=None)
                else:
                    delay = min(MAX_BACKOFF, 2.0 ** failures)
                    log.warning("model turn of chat %s:%s: %s; retried in %g s", chat[0], chat[1], exc, delay)
                    give_up_lock(chat, token, client)
                    released = True
                    return Outcome(retry_in=delay, failures=failures + 1)
            failures = 0
            if finish(chat, token, lease, client) != 1:
                released = True
                return Outcome()
    finally:
        if not released:  # an unexpected error: free the chat (its items stay unread for the next turn)
            try:
                release(chat, token, client)
            except Exception:
                log.exception("could not release the model-turn lock of chat %s:%s", chat[0], chat[1])
