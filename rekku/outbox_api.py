"""``GET /v1/outbox``: messages delivered through the ``outbox`` interface, oldest first (docs/contracts.md §2).

Poll with ``after`` = the last message id seen; an empty list means nothing new.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from rekku.auth import require_token
from rekku.db import session_factory
from rekku.interfaces.models import OutboxMessage
from rekku.schemas import ErrorResponse

#: Most messages one call returns.
MAX_LIMIT = 1000
#: Largest message id (BIGINT): a larger ``after`` is a 422, not a database overflow.
MAX_ID = 2**63 - 1


class OutboxItem(BaseModel):
    id: int
    chat_id: str
    thread_id: str | None
    text: str | None
    audio_url: str | None
    created_at: str
    action_id: str | None


class OutboxPage(BaseModel):
    messages: list[OutboxItem]


router = APIRouter(dependencies=[Depends(require_token)])


@router.get("/v1/outbox", response_model=OutboxPage, responses={401: {"model": ErrorResponse}})
def get_outbox(chat_id: Annotated[str | None, Query(max_length=191)] = None,
               thread_id: Annotated[str | None, Query(max_length=191)] = None,
               after: Annotated[int, Query(ge=0, le=MAX_ID, description="only messages with a larger id")] = 0,
               limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100) -> Any:
    """Messages sent to the outbox, oldest first; filter by chat (and thread), page with ``after``."""
    query = sa.select(OutboxMessage).where(OutboxMessage.id > after)
    if chat_id is not None:
        query = query.where(OutboxMessage.chat_id == chat_id)
    if thread_id is not None:
        query = query.where(OutboxMessage.thread_id == thread_id)
    with session_factory()() as s:
        rows = s.scalars(query.order_by(OutboxMessage.id).limit(limit)).all()
    return {"messages": [{"id": m.id, "chat_id": m.chat_id, "thread_id": m.thread_id or None, "text": m.text,
                          "audio_url": m.audio_url, "created_at": m.created_at.isoformat(),
                          "action_id": m.action_id} for m in rows]}
