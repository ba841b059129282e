"""Reading many actions: the filtered, newest-first list of ``GET /v1/actions`` and the last hour's
figures of ``GET /v1/stats`` (what the web view and ``rekku list`` show).

The list is keyset-paginated on ``(created_at, id)``: a page is "the ``limit`` actions before this
one", read as an index range (migration 0006_action_list_indexes), so page 1,000 costs what page 1
does and an action written while someone pages never shifts, skips or repeats another. Actions of
one request share their ``created_at`` to the microsecond; the id breaks the tie.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from rekku.action_log import run_as_dict
from rekku.errors import ValidationError
from rekku.models import FAILED, ActionRun, UTCDateTime, chat_key, utcnow
from rekku.redact import redact

_runs = ActionRun.__table__
#: Most rows ``GET /v1/stats`` reads for its window; past it the answer covers the newest ones and says so.
STATS_MAX_ROWS = 500_000
#: Decimals of the latencies of ``GET /v1/stats``: microseconds, what the action log keeps.
LATENCY_DIGITS = 6


@dataclass(frozen=True)
class ActionFilter:
    """What ``GET /v1/actions`` and ``rekku list`` narrow by (all optional, all combined with AND).

    ``since`` is inclusive and ``until`` exclusive, both on ``created_at``."""

    status: str | None = None
    type: str | None = None
    chat_id: str | None = None
    batch_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def index(self) -> str | None:
        """The index a page of this filter reads (migration 0006_action_list_indexes); None for a batch's few rows."""
        if self.batch_id:
            return None
        if self.chat_id is not None:
            return "ix_action_runs_chat_created"
        if self.type:
            return "ix_action_runs_type_created"
        if self.status:
            return "ix_action_runs_status_created"
        return "ix_action_runs_created"

    def where(self) -> list[Any]:
        clauses: list[Any] = []
        if self.status:
            clauses.append(_runs.c.status == self.status)
        if self.type:
            clauses.append(_runs.c.type == self.type)
        if self.chat_id is not None:
            # the column holds a prefix (the index); the context holds the chat id itself (the exact test)
            clauses += [_runs.c.chat_id == chat_key(self.chat_id),
                        _runs.c.context["chat_id"].as_string() == self.chat_id]
        if self.batch_id:
            clauses.append(_runs.c.batch_id == self.batch_id)
        if self.since is not None:
            clauses.append(_runs.c.created_at >= self.since)
        if self.until is not None:
            clauses.append(_runs.c.created_at < self.until)
        return clauses


def encode_cursor(created_at: str, action_id: str) -> str:
    """The opaque cursor of the page after the action with these ``created_at`` (ISO) and ``id``."""
    raw = json.dumps([created_at, action_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, id)`` of a cursor made by :func:`encode_cursor`; a ValidationError (422) otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, action_id = json.loads(raw)
        when = datetime.fromisoformat(created_at)
        if when.tzinfo is None or not isinstance(action_id, str):
            raise ValueError("not a cursor")
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("invalid cursor: pass the next_cursor of a previous answer unchanged",
                              [{"loc": ["query", "cursor"], "msg": "not a cursor of this API", "type": "value_error"}]
                              ) from None
    return when, action_id


def shown(run: dict[str, Any], hide_secrets: bool) -> dict[str, Any]:
    """An action as the API shows it; with ``hide_secrets``, every value under a secret-looking key of its
    payload, context and result replaced by ``'***'`` (rekku.redact, as Flower's view of the payload)."""
    if not hide_secrets:
        return run
    return {**run, "payload": redact(run["payload"]), "context": redact(run["context"]),
            "result": redact(run["result"])}


def list_query(where: ActionFilter, limit: int, cursor: str | None = None) -> sa.Select:
    """The SELECT of one page: ``limit`` rows matching ``where`` after ``cursor``, newest first."""
    query = sa.select(_runs).where(*where.where())
    if (index := where.index()) is not None:
        # MariaDB otherwise reads a type's (or status's) whole index entry from its newest row, filtering out
        # every row before the cursor (100 ms at 5,000 rows deep, against 1 ms as a range of the same index)
        for dialect in ("mysql", "mariadb"):
            query = query.with_hint(_runs, f"FORCE INDEX ({index})", dialect_name=dialect)
    if cursor:
        created_at, action_id = decode_cursor(cursor)
        # (created_at, id) < (c, i), written so that its first term is an index range on both backends
        query = query.where(_runs.c.created_at <= created_at,
                            (_runs.c.created_at < created_at) | (_runs.c.id < action_id))
    return query.order_by(_runs.c.created_at.desc(), _runs.c.id.desc()).limit(limit)


def list_actions(engine: Engine, where: ActionFilter, limit: int, cursor: str | None = None,
                 hide_secrets: bool = False) -> dict[str, Any]:
    """``{"actions": [...], "next_cursor": str | None}``: the newest ``limit`` actions matching ``where``,
    after ``cursor``; ``next_cursor`` is None on the last page."""
    query = list_query(where, limit + 1, cursor)
    with engine.connect() as c:
        rows = c.execute(query).all()
    runs = [run_as_dict(r) for r in rows[:limit]]
    after = encode_cursor(rows[limit - 1].created_at.isoformat(), rows[limit - 1].id) if len(rows) > limit else None
    return {"actions": [shown(r, hide_secrets) for r in runs], "next_cursor": after}


def _percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile of sorted values (None for none)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(round(q * len(ordered), 9)) - 1)]  # round: 0.99 * 100 is 99.00000000000001


def _minute_and_latency(dialect: str, start: datetime) -> tuple[Any, Any]:
    """SQL for the minute of the window an action was created in (0 = the first) and its seconds from
    creation to finish (NULL while unfinished): computed by the database, so a window of many actions
    costs no date handling in Python (a third of the time at 100,000 actions)."""
    since = sa.literal(start, UTCDateTime())
    if dialect == "sqlite":
        # SQLite's date functions round to milliseconds (59.9999 s is the next minute): its stored text,
        # "YYYY-MM-DD HH:MM:SS.ffffff", is split into whole seconds and their fraction instead
        def epoch(value: Any) -> Any:
            return sa.cast(sa.func.strftime("%s", sa.func.substr(value, 1, 19)), sa.Integer)

        def fraction(value: Any) -> Any:
            return sa.cast(sa.func.substr(value, 20), sa.Float)

        return ((epoch(_runs.c.created_at) - epoch(since)) // 60,
                epoch(_runs.c.finished_at) - epoch(_runs.c.created_at)
                + (fraction(_runs.c.finished_at) - fraction(_runs.c.created_at)))
    return (sa.func.timestampdiff(sa.text("MINUTE"), since, _runs.c.created_at),
            sa.func.timestampdiff(sa.text("MICROSECOND"), _runs.c.created_at, _runs.c.finished_at) / 1e6)


def minute_stats(engine: Engine, minutes: int, now: datetime | None = None) -> dict[str, Any]:
    """Actions created in each of the last ``minutes`` minutes (oldest first), how many of them have
    finished and failed, and the p50/p99 of ``finished_at - created_at`` of those finished, per minute
    and for the whole window (seconds). Read on the ``(created_at, id)`` index."""
    now = (now or utcnow()).astimezone(timezone.utc)
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    minute, latency = _minute_and_latency(engine.dialect.name, start)
    query = (sa.select(minute, latency, _runs.c.status == FAILED)
             .where(_runs.c.created_at >= start).order_by(_runs.c.created_at.desc()).limit(STATS_MAX_ROWS + 1))
    with engine.connect() as c:
        rows = c.execute(query).all()
    truncated = len(rows) > STATS_MAX_ROWS
    created, failed = [0] * minutes, [0] * minutes
    latencies: list[list[float]] = [[] for _ in range(minutes)]
    for index, seconds, is_failed in rows[:STATS_MAX_ROWS]:
        if index is None or not 0 <= (index := int(index)) < minutes:
            continue
        created[index] += 1
        if seconds is not None:
            latencies[index].append(max(0.0, round(float(seconds), LATENCY_DIGITS)))
            failed[index] += bool(is_failed)
    every: list[float] = []
    per_minute = []
    for i in range(minutes):
        ordered = sorted(latencies[i])
        every += ordered
        per_minute.append({"minute": (start + timedelta(minutes=i)).isoformat(), "created": created[i],
                           "finished": len(ordered), "failed": failed[i],
                           "p50_seconds": _percentile(ordered, 0.5), "p99_seconds": _percentile(ordered, 0.99)})
    every.sort()
    return {"since": start.isoformat(), "until": end.isoformat(), "truncated": truncated, "per_minute": per_minute,
            "latency": {"finished": len(every), "p50_seconds": _percentile(every, 0.5),
                        "p99_seconds": _percentile(every, 0.99)}}
