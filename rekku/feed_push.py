"""The model webhook: every feed item POSTed to ``REKKU_MODEL_WEBHOOK_URL``, in id order, at least once.

docs/contracts.md §8 is the contract. In short:

* **Body**: the item exactly as ``GET /v1/feed`` shows it (:func:`rekku.feed.shown`), as JSON.
  **Headers**: those of the webhook interface, so one verifier serves both: ``X-Rekku-Timestamp``
  (Unix seconds), ``X-Rekku-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with
  REKKU_MODEL_WEBHOOK_SECRET>`` and ``X-Rekku-Delivery: feed:<id>``; and ``X-Rekku-Feed-Id: <id>``.
  Pushes are always signed: with a URL and no secret nothing is pushed, ``rekku doctor`` fails and the
  pusher logs why.
* **The cursor** is the one row of ``feed_push``: ``last_id``, the last item acknowledged with a 2xx
  (or given up on, with an ERROR logged), and the item being retried with its attempts and the time of
  its next try. It is in the database, so a restart (of a worker, of everything) resumes there; an
  item whose 2xx was lost with its worker is sent again (the receiver de-duplicates on the id).
* **Strictly in order**: item N+1 is sent only once N is acknowledged or given up on. One pusher at a
  time across every node (a Redis lock), and the cursor moves by compare-and-set, never backwards.
* **Failures**: a connection error, a timeout, 408, 429 and 5xx are retried until they succeed, with
  jittered exponential backoff up to ``REKKU_MODEL_WEBHOOK_MAX_BACKOFF`` (a ``Retry-After`` is honoured
  up to that too). A redirect, 401, 403, 404, 405, 407, 410 and 421 say the receiver refuses Rekku,
  not this item (a wrong URL or secret): skipping would drop every item, so they are retried the same
  way, with a warning naming the settings to check. Any other 4xx (400, 409, 413, 422 ...) refuses
  this item: after ``REKKU_MODEL_WEBHOOK_REFUSED_ATTEMPTS`` tries it is skipped with an ERROR line (its
  id, the status and the start of the answer), so one item a receiver cannot take never blocks the
  stream.

It runs as the Celery task ``rekku.feed.push`` on the io pool (registered by the worker side), woken
by beat every ``REKKU_MODEL_WEBHOOK_POLL_SECONDS`` and right after items are added (rekku.feed). A
pass never sleeps: an item waiting for its next try ends the pass, and a later wake-up tries it when
its time has come. A pass also ends after :data:`RUN_SECONDS`, so a worker's warm shutdown never
waits long for it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
import requests
import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from rekku import feed
from rekku.backoff import retry_delay
from rekku.broker import broker_client
from rekku.db import get_engine
from rekku.interfaces.webhook import signature
from rekku.models import Base, BigId, UTCDateTime, utcnow
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: The Celery task (rekku_workers.tasks registers it; rekku.feed publishes it by name).
TASK_NAME = feed.PUSH_TASK
#: Held by the one pusher running; a wake-up that finds it taken leaves :data:`AGAIN_KEY` for the holder.
LOCK_KEY = "rekku:feed:push:lock"
#: "Items were added while you were pushing": the holder reads once more before it lets go.
AGAIN_KEY = "rekku:feed:push:again"
#: Seconds one pass pushes before it returns (the next wake-up goes on from the cursor).
RUN_SECONDS = 10.0
#: Items read from the feed at a time.
BATCH = 100
#: Answers that refuse Rekku rather than the item (wrong URL, wrong secret): never a reason to skip.
REFUSES_SENDER = frozenset({401, 403, 404, 405, 407, 410, 421})
#: Longest part of an answer kept in the log and the cursor's last_error.
EXCERPT = 200



class FeedPush(Base):
    """One row (id 1): the push's cursor, and the item being retried (migration 0006_feed_push)."""

    __tablename__ = "feed_push"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(BigId, default=0)
    failing_id: Mapped[int | None] = mapped_column(BigId)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(sa.String(500))
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


def unavailable_reason(settings: Settings) -> str | None:
    """Why the feed is not pushed (None: it is)."""
    if not settings.model_webhook_url:
        return "REKKU_MODEL_WEBHOOK_URL is not set"
    if not settings.model_webhook_secret:
        return ("REKKU_MODEL_WEBHOOK_URL is set but REKKU_MODEL_WEBHOOK_SECRET is not: the feed is not pushed "
                "(pushes are always signed)")
    return None


def enabled(settings: Settings) -> bool:
    return unavailable_reason(settings) is None


def cursor() -> dict[str, Any]:
    """The cursor row as a dict (for doctor and tests)."""
    table = FeedPush.__table__
    with get_engine().connect() as connection:
        row = connection.execute(sa.select(table).where(table.c.id == 1)).first()
    return dict(row._mapping) if row is not None else {}


def body_of(item: dict[str, Any]) -> bytes:
    """``item`` as JSON, written as the ingress writes it (rekku.api.SafeJSONResponse)."""
    try:
        return json.dumps(item, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate stored before the ingress refused them
        return json.dumps(item, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- one try of one item
#: What a try came to: the item is done with (``delivered``: a 2xx), or it is to be tried again.
DELIVERED, RETRY, REFUSED = "delivered", "retry", "refused"


@dataclass(frozen=True)
class Outcome:
    kind: str  # DELIVERED | RETRY (transient, or the receiver refuses Rekku) | REFUSED (this item)
    detail: str = ""
    retry_after: float | None = None


def _retry_after(resp: requests.Response) -> float | None:
    value = (resp.headers.get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def send(session: requests.Session, settings: Settings, item: dict[str, Any]) -> Outcome:
    """POST ``item`` once, signed; what came of it."""
    body = body_of(item)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Rekku-Timestamp": timestamp,
               "X-Rekku-Signature": signature(settings.model_webhook_secret or "", timestamp, body),
               "X-Rekku-Delivery": f"feed:{item['id']}", "X-Rekku-Feed-Id": str(item["id"])}
    timeout = settings.model_webhook_timeout
    try:
        resp = session.post(settings.model_webhook_url or "", data=body, headers=headers,
                            timeout=(min(timeout, 5.0), timeout), allow_redirects=False)
    except requests.Timeout:
        return Outcome(RETRY, f"no answer within {timeout:g} s")
    except requests.RequestException as exc:
        return Outcome(RETRY, f"cannot reach it ({type(exc).__name__})")
    status, excerpt = resp.status_code, resp.text[:EXCERPT]
    if 200 <= status < 300:
        return Outcome(DELIVERED)
    if status in (408, 429) or status >= 500:
        return Outcome(RETRY, f"answered {status}", _retry_after(resp))
    if status < 400 or status in REFUSES_SENDER:
        return Outcome(RETRY, f"answered {status} {excerpt!r}: it refuses Rekku, not this item; check "
                              "REKKU_MODEL_WEBHOOK_URL and REKKU_MODEL_WEBHOOK_SECRET", _retry_after(resp))
    return Outcome(REFUSED, f"refused it: {status} {excerpt!r}")


# ----------------------------------------------------------------------------- the cursor
def _advance(connection: sa.Connection, from_id: int, to_id: int, error: str | None = None) -> bool:
    """Move the cursor from ``from_id`` to ``to_id`` (compare-and-set); False when another pusher moved it."""
    table = FeedPush.__table__
    done = connection.execute(sa.update(table).where(table.c.id == 1, table.c.last_id == from_id).values(
        last_id=to_id, failing_id=None, attempts=0, next_attempt_at=None, last_error=error, updated_at=utcnow()))
    return done.rowcount == 1


def _failed(connection: sa.Connection, last_id: int, item_id: int, attempts: int, delay: float,
            error: str) -> None:
    table = FeedPush.__table__
    now = utcnow()
    connection.execute(sa.update(table).where(table.c.id == 1, table.c.last_id == last_id).values(
        failing_id=item_id, attempts=attempts, next_attempt_at=now + timedelta(seconds=delay),
        last_error=error[:500], updated_at=now))


def backoff(settings: Settings, attempts: int, retry_after: float | None = None) -> float:
    """Seconds until the next try of an item that failed ``attempts`` times: exponential from 1 s,
    fully jittered, at most REKKU_MODEL_WEBHOOK_MAX_BACKOFF; a Retry-After (up to that maximum) wins
    when longer."""
    delay = retry_delay(attempts - 1, settings.model_webhook_max_backoff, minimum=0.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.model_webhook_max_backoff))
    return delay


# ----------------------------------------------------------------------------- a pass
_sessions = threading.local()
#: Reasons already logged by this process (the no-secret warning, once).
_warned: set[str] = set()


def _session() -> requests.Session:
    if getattr(_sessions, "session", None) is None:
        _sessions.session = requests.Session()
    return _sessions.session


def push_pass(settings: Settings | None = None) -> dict[str, Any]:
    """One pass of the pusher (the task ``rekku.feed.push``): push what the cursor has not reached,
    in order, until the feed is drained, an item must wait for its next try, or :data:`RUN_SECONDS`
    are up. Does nothing while another pass holds the lock (it is told to read again)."""
    settings = settings or get_settings()
    reason = unavailable_reason(settings)
    if reason is not None:
        if settings.model_webhook_url and reason not in _warned:
            _warned.add(reason)
            log.error("%s", reason)
        return {"pushed": 0, "state": "off", "reason": reason}
    client = broker_client(settings)
    lock_seconds = RUN_SECONDS + 3 * settings.model_webhook_timeout + 30
    while True:
        # "read again" before trying the lock: a holder that lets go after this still sees it (below)
        client.set(AGAIN_KEY, "1", ex=int(lock_seconds))
        lock = client.lock(LOCK_KEY, timeout=lock_seconds, blocking=False)
        if not lock.acquire():
            return {"pushed": 0, "state": "busy"}
        try:
            outcome = _drain(settings, client, lock)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning("the feed pusher's lock expired before its pass ended")
        # a wake-up that found the lock taken after the feed was read empty: read once more
        if outcome["state"] != "idle" or not client.get(AGAIN_KEY):
            return outcome


def _drain(settings: Settings, client: redis.Redis, lock: Any) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_SECONDS
    pushed = 0
    table = FeedPush.__table__
    while time.monotonic() < deadline:
        client.delete(AGAIN_KEY)
        with get_engine().connect() as connection:
            state = connection.execute(sa.select(table).where(table.c.id == 1)).one()
        if state.failing_id is not None and state.next_attempt_at and state.next_attempt_at > utcnow():
            return {"pushed": pushed, "state": "waiting", "item": state.failing_id}
        items = feed.read(state.last_id, BATCH)
        if not items:
            if client.get(AGAIN_KEY):
                continue
            return {"pushed": pushed, "state": "idle", "last_id": state.last_id}
        last_id, attempts = state.last_id, state.attempts if state.failing_id == items[0]["id"] else 0
        for item in items:
            if time.monotonic() >= deadline:
                break
            try:
                lock.reacquire()  # a full TTL for this send
            except redis.exceptions.LockError:
                return {"pushed": pushed, "state": "lock lost"}
            outcome = send(_session(), settings, item)
            attempts += 1
            with get_engine().begin() as connection:
                if outcome.kind == DELIVERED or (outcome.kind == REFUSED
                                                 and attempts >= settings.model_webhook_refused_attempts):
                    error = None
                    if outcome.kind == REFUSED:
                        error = f"item {item['id']} skipped: the model webhook {outcome.detail}"[:500]
                        log.error("feed item %s not pushed: the model webhook %s (%d tries); skipped, the stream "
                                  "goes on", item["id"], outcome.detail, attempts)
                    if not _advance(connection, last_id, item["id"], error):
                        return {"pushed": pushed, "state": "moved by another pusher"}
                    last_id, attempts = item["id"], 0
                    pushed += outcome.kind == DELIVERED
                    continue
                delay = backoff(settings, attempts, outcome.retry_after)
                _failed(connection, last_id, item["id"], attempts, delay, outcome.detail)
            log.warning("feed item %s: the model webhook %s (try %d); next try in %.1f s",
                        item["id"], outcome.detail, attempts, delay)
            return {"pushed": pushed, "state": "waiting", "item": item["id"]}
    feed.kick(settings)  # more to push: the next pass starts now, not at beat's next tick
    return {"pushed": pushed, "state": "more"}
