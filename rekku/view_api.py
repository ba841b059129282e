"""Seeing what happened: ``GET /v1/actions`` (the filtered list), ``GET /v1/stats`` (the last hour, the
queues and the workers) and the read-only web view at ``/ui`` that shows them (docs/contracts.md §2).

The page is static files (rekku/web/) holding no data: they need no token, and everything they show
comes from the bearer-token JSON routes here, called by the page's script with the token the user
typed (kept in the tab's sessionStorage). No cookie is involved, so there is nothing to forge across
sites. The page's Content-Security-Policy allows scripts from the ingress only (no inline script), and
the script inserts every text with ``textContent``: a payload is written by a model and shown as text.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel

from rekku.action_log import shared_log
from rekku.action_query import ActionFilter, list_actions, minute_stats
from rekku.auth import require_token
from rekku.errors import NotFound
from rekku.fleet import queue_depths, workers_up
from rekku.schemas import ActionState, ErrorResponse, Status

router = APIRouter(tags=["view"])
_auth = [Depends(require_token)]
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}

#: The web view's files (package data), by the name the page asks for, with their media types.
WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "app.css": "text/css; charset=utf-8"}
#: Headers of every file of the web view: its own scripts and styles only, data from this origin only,
#: no framing, no referrer (the page's address holds no secret, but it is nobody's business).
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


#: The ``?redact=`` query parameter of the action routes (the web view asks for it): every value under a
#: secret-looking key of the payload, context and result shown as ``'***'`` (rekku.redact).
Redact = Annotated[bool, Query(description="show '***' for values under secret-looking keys (password, "
                                           "api_key, *_token, ...) of the payload, context and result")]


class ActionPage(BaseModel):
    actions: list[ActionState]
    #: Pass as ``cursor`` for the next (older) page; None on the last page.
    next_cursor: str | None


def _aware(value: datetime | None) -> datetime | None:
    """A time without a zone is taken as UTC (what the API shows)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


@router.get("/v1/actions", response_model=ActionPage, dependencies=_auth, responses=_ERRORS)
def list_action_runs(
        status: Annotated[Status | None, Query(description="only actions in this state")] = None,
        type: Annotated[str | None, Query(min_length=1, max_length=128, description="only this action type")] = None,
        chat_id: Annotated[str | None, Query(min_length=1, max_length=255,
                                             description="only actions asked from this chat")] = None,
        batch_id: Annotated[str | None, Query(min_length=1, max_length=36, description="only this request's")] = None,
        since: Annotated[datetime | None, Query(description="created at or after (ISO 8601; UTC without a zone)")
                         ] = None,
        until: Annotated[datetime | None, Query(description="created before (ISO 8601; UTC without a zone)")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")] = None,
        redact: Redact = False,
) -> Any:
    """Actions, newest first (by creation, then id), ``limit`` a page; follow ``next_cursor`` for older ones.

    Each action is shown as ``GET /v1/actions/{id}`` shows it."""
    where = ActionFilter(status=status, type=type, chat_id=chat_id, batch_id=batch_id,
                         since=_aware(since), until=_aware(until))
    return list_actions(shared_log().engine, where, limit, cursor, hide_secrets=redact)


class MinuteStats(BaseModel):
    #: The minute's start (UTC).
    minute: str
    #: Actions created in that minute, and of those, how many have finished (any final state) and failed.
    created: int
    finished: int
    failed: int
    #: Median and 99th percentile of finished_at - created_at of those finished, in seconds.
    p50_seconds: float | None
    p99_seconds: float | None


class Latency(BaseModel):
    finished: int
    p50_seconds: float | None
    p99_seconds: float | None


class Stats(BaseModel):
    since: str
    until: str
    #: More actions than rekku.action_query.STATS_MAX_ROWS in the window: only the newest were read.
    truncated: bool
    per_minute: list[MinuteStats]
    latency: Latency
    #: Messages waiting per pool, and the worker nodes up per pool (None when the broker cannot be read).
    queues: dict[str, int] | None
    workers: dict[str, list[str]] | None
    broker_error: str | None


@router.get("/v1/stats", response_model=Stats, dependencies=_auth, responses=_ERRORS)
def stats(minutes: Annotated[int, Query(ge=1, le=1440)] = 60) -> Any:
    """The last ``minutes`` minutes from the action log (per minute: created, finished, failed, p50/p99 of
    the time from creation to finish), and from the broker the queue depth and the workers up per pool."""
    answer = minute_stats(shared_log().engine, minutes)
    try:
        answer |= {"queues": queue_depths(), "workers": workers_up(), "broker_error": None}
    except redis.RedisError as exc:
        answer |= {"queues": None, "workers": None, "broker_error": f"the broker cannot be read: {type(exc).__name__}"}
    return answer


def _page_file(name: str) -> FileResponse:
    if name not in WEB_FILES:
        raise NotFound(f"no file {name} in the web view")
    return FileResponse(WEB_DIR / name, media_type=WEB_FILES[name], headers=PAGE_HEADERS)


@router.get("/ui", include_in_schema=False)
def web_view() -> FileResponse:
    """The read-only web view (public static page; its data needs the token)."""
    return _page_file("index.html")


@router.get("/ui/{name}", include_in_schema=False)
def web_view_file(name: str) -> FileResponse:
    return _page_file(name)
