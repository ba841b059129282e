"""``POST /v1/telegram/webhook``: Telegram's updates in webhook mode (the alternative to `rekku receive`).

The one route besides the health checks that takes no bearer token: Telegram cannot send one. It
takes the secret Telegram sends instead, ``X-Telegram-Bot-Api-Secret-Token`` (setWebhook's
``secret_token``), which must equal ``TELEGRAM_WEBHOOK_SECRET`` (compared in constant time); without
that setting the route does not exist (404), so a deployment that polls (or has no bot) has no
unauthenticated route. Each update goes through :func:`rekku.telegram_updates.receive_update`, the
poller's path: its message is stored once, however often Telegram retries the call.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from rekku.api import SafeJSONResponse, StrictJSONRoute
from rekku.schemas import ErrorResponse
from rekku.settings import get_settings
from rekku.telegram_updates import receive_update

log = logging.getLogger(__name__)

#: The header Telegram sends the webhook's secret in.
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


_SECRET = Header(alias=SECRET_HEADER, description="setWebhook's secret_token: TELEGRAM_WEBHOOK_SECRET")


def require_webhook_secret(secret: Annotated[str | None, _SECRET] = None) -> None:
    """404 without TELEGRAM_WEBHOOK_SECRET; 401 without the header, 403 with another value."""
    expected = get_settings().telegram_webhook_secret
    if not expected:
        raise HTTPException(404, "Not Found")
    if secret is None:
        raise HTTPException(401, f"missing {SECRET_HEADER}")
    if not hmac.compare_digest(secret.encode(), expected.encode()):
        raise HTTPException(403, f"wrong {SECRET_HEADER}")


router = APIRouter(dependencies=[Depends(require_webhook_secret)], route_class=StrictJSONRoute)


class WebhookAnswer(BaseModel):
    update_id: int | None
    #: The stored message (a duplicate's first copy), or None.
    message: dict[str, Any] | None
    #: ``duplicate`` or ``blocked`` (as POST /v1/messages), or None.
    dropped: str | None
    #: Why the update holds nothing to store (a sticker, an edit ...), or None.
    skipped: str | None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 503)}
_UPDATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "A Telegram Bot API Update", "required": ["update_id"],
    "properties": {"update_id": {"type": "integer"}, "message": {"type": "object"}}}}}}}


@router.post("/v1/telegram/webhook", response_model=WebhookAnswer, responses=_ERRORS, openapi_extra=_UPDATE_BODY)
async def telegram_webhook(request: Request) -> Any:
    """A Telegram update (webhook mode): its message stored once, as `rekku receive` stores it. Needs
    ``X-Telegram-Bot-Api-Secret-Token`` equal to ``TELEGRAM_WEBHOOK_SECRET`` instead of the bearer
    token; without that setting, 404. An update with nothing to store is answered 200 with ``skipped``
    (Telegram would resend anything else)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return _error(415, "the body must be JSON (Content-Type: application/json)")
    try:
        update = await request.json()
    except json.JSONDecodeError as exc:
        return _error(400, "the request body is not valid JSON", [str(exc)])
    update_id = update.get("update_id") if isinstance(update, dict) else None
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        return _error(422, "the body is not a Telegram update (an object with an integer update_id)")
    try:
        answer = await run_in_threadpool(receive_update, update)
    except SQLAlchemyError as exc:
        log.error("telegram update %s not stored (%s); Telegram will send it again", update_id, type(exc).__name__)
        return _error(503, "the database is unreachable; send the update again")
    return SafeJSONResponse(answer)


def _error(status: int, detail: str, errors: list | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"detail": detail, "errors": errors or []}, status_code=status)
