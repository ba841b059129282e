"""The conversation's routes: ``POST /v1/messages`` (a user's message in) and the model's feed,
``GET /v1/feed`` (long poll) and ``GET /v1/feed/stream`` (server-sent events). docs/contracts.md,
"The conversation", is the contract.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from rekku import feed
from rekku.api import SafeJSONResponse, StrictJSONRoute
from rekku.auth import require_token
from rekku.errors import ValidationError
from rekku.messages import IncomingMessage, receive
from rekku.schemas import ErrorResponse, FeedPage
from rekku.settings import get_settings

#: Most items one call returns.
MAX_LIMIT = 1000
#: Largest item id (BIGINT): a larger ``after`` is a 422, not a database overflow.
MAX_ID = 2**63 - 1
#: How often a waiting reader looks for new items, and how often the stream sends a keep-alive comment.
POLL_SECONDS, KEEPALIVE_SECONDS = 0.2, 15.0

router = APIRouter(dependencies=[Depends(require_token)], route_class=StrictJSONRoute)
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


StreamStart = Annotated[int | None, Query(ge=0, le=MAX_ID, description="start after this id (default: only new items)")]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)]


class MessageAnswer(BaseModel):
    message: dict[str, Any] | None
    dropped: str | None


@router.post("/v1/messages", status_code=202, response_model=MessageAnswer, responses=_ERRORS)
async def post_message(message: IncomingMessage) -> Any:
    """An incoming user message: stored once per (interface, chat_id, message_id) and put on the feed;
    a blocked user's message is dropped (``dropped: "blocked"``), a repeated one answers the stored
    message (``dropped: "duplicate"``)."""
    return SafeJSONResponse(await run_in_threadpool(receive, message), status_code=202)


@router.get("/v1/feed", response_model=FeedPage, responses=_ERRORS)
async def get_feed(after: Annotated[int, Query(ge=0, le=MAX_ID, description="only items with a larger id")] = 0,
                   limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                   wait: Annotated[float, Query(ge=0, le=3600, description="long-poll up to this many seconds "
                                                                           "for a first item")] = 0) -> Any:
    """Items for the model, oldest first, with an id greater than ``after``; ids increase in commit
    order, so following ``next`` never skips one."""
    deadline = time.monotonic() + min(wait, get_settings().max_wait_seconds)
    while True:
        items = await run_in_threadpool(feed.read, after, limit)
        if items or time.monotonic() >= deadline:
            return {"items": items, "next": items[-1]["id"] if items else after}
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


@router.get("/v1/feed/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS})
async def stream_feed(request: Request, after: StreamStart = None, last_event_id: LastEventId = None) -> Any:
    """The feed as server-sent events (``id:`` = the item's id, ``event:`` = its type, ``data:`` = the
    item as JSON). A reconnecting client sends ``Last-Event-ID`` and misses nothing; a new one starts
    at ``after``, or with only items added from now on."""
    start = _resume_point(last_event_id) if last_event_id is not None else after
    if start is None:
        start = await run_in_threadpool(feed.last_id)
    return StreamingResponse(_events(request, start), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _resume_point(header: str) -> int:
    try:
        value = int(header)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_ID:
        raise ValidationError("Last-Event-ID must be a feed item id (a non-negative integer)")
    return value


async def _events(request: Request, after: int) -> AsyncIterator[bytes]:
    yield b": rekku feed\n\n"  # the headers and a first byte now, so a client knows it is connected
    quiet_since = time.monotonic()
    while not await request.is_disconnected():
        items = await run_in_threadpool(feed.read, after, MAX_LIMIT)
        for item in items:
            yield f"id: {item['id']}\nevent: {item['type']}\ndata: {json.dumps(item, ensure_ascii=False)}\n\n".encode()
            after = item["id"]
        if items:
            quiet_since = time.monotonic()
            continue
        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)
