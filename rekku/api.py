"""The HTTP ingress (docs/contracts.md §2): FastAPI routes over :mod:`rekku.ingest` and the action log.

Every ``/v1`` route needs the bearer token; health checks don't, and Telegram's webhook takes its own
secret instead (rekku/telegram_webhook_api.py). Every bad input gets a 4xx in
the one error shape ``{"detail", "errors"}``; a 500 means a bug.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from rekku.action_log import shared_log
from rekku.action_query import shown
from rekku.auth import require_token
from rekku.cancel import request_stop
from rekku.celery_app import app as celery
from rekku.db import get_engine
from rekku.errors import Conflict, NotFound, RekkuError
from rekku.ingest import capabilities, default_ingress
from rekku.interfaces import get_interfaces
from rekku.kombu_clients import reuse_clients
from rekku.models import CANCELLED, FINAL_STATES, RUNNING
from rekku.parsing import decode_json
from rekku.registry import get_registry
from rekku.schemas import (
    ActionState,
    BatchState,
    CancelResponse,
    CapabilitiesResponse,
    ErrorResponse,
    Health,
    SubmitRequest,
    SubmitResponse,
)
from rekku.settings import Settings, get_settings
from rekku.view_api import Redact

log = logging.getLogger(__name__)

_ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           400: {"model": ErrorResponse}}
#: The ``Idempotency-Key`` header, the same as the body's ``idempotency_key``.
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]
#: The header of a 202 that created (or, for a repeated idempotency key, had created) a batch: where it is.
_LOCATION = {"description": "the batch: `/v1/batches/{batch_id}`", "schema": {"type": "string"}}
#: The ``?wait=`` query parameter (seconds to long-poll).
Wait = Annotated[float, Query(ge=0, le=3600, description="long-poll up to this many seconds")]


class SafeJSONResponse(JSONResponse):
    """JSON as UTF-8, except that text which is not valid UTF-8 (a lone surrogate stored before the
    ingress refused it, or echoed from a refused request) is written as a ``\\ud800`` escape instead
    of failing the whole answer with a 500: no stored value may break a read route."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


T = TypeVar("T")

#: Threads for the blocking part of ``POST /v1/actions`` (the log's commit, the publish); as many as
#: Starlette's own threadpool allows.
SUBMIT_THREADS = 40


def _new_submit_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="rekku-submit")


#: The process's executor for :func:`_in_thread` (its threads start on first use).
_submit_pool = _new_submit_pool()


def _renew_submit_pool() -> None:
    # A forked child: the parent's threads do not come along, and an executor that still counts them
    # as idle never starts one (the child's first submit would wait forever).
    global _submit_pool
    _submit_pool = _new_submit_pool()


os.register_at_fork(after_in_child=_renew_submit_pool)


async def _in_thread(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work`` on a thread of its own, with the request's context variables, off the event loop.

    The route that accepts actions is the ingress's hot path; FastAPI runs a sync route through anyio's
    ``to_thread``, whose limiter, backend lookup and two extra event-loop turns cost about 0.25 ms per
    request here, a sixth of a one-action request (in-process ASGI measure). asyncio's own executor
    hop keeps what matters (the commit never holds the event loop) without them."""
    call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_submit_pool, call)


def _submit_from_client(payload: Any, context: dict, idempotency_key: str | None) -> Any:
    """``POST /v1/actions``' blocking part, all of it on the executor's thread: building the process's
    ingress on the first request (plugin discovery, which imports every plugin) included."""
    return default_ingress().submit_from_client(payload, context=context, idempotency_key=idempotency_key)


def _error(status: int, detail: str, errors: list | None = None, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse({"detail": detail, "errors": errors or []}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies above the limit with 413, with or without Content-Length.

    The body (at most the limit) is read here and replayed to the app, so a chunked upload is
    cut off as soon as it passes the limit instead of being read to the end."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error(413, f"request body larger than {self.limit} bytes (REKKU_MAX_BODY_BYTES)")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _error(400, "invalid Content-Length")(scope, receive, send)
                if declared > self.limit:
                    return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class StrictJSONRequest(Request):
    """Request bodies are decoded like LLM replies: no NaN/Infinity, no duplicate keys, no deep-nesting crash."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = decode_json(body.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise json.JSONDecodeError(f"body is not UTF-8 ({exc.reason})", "", exc.start) from None
            except ValueError as exc:
                if isinstance(exc, json.JSONDecodeError):
                    raise
                raise json.JSONDecodeError(str(exc), "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Any:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    reuse_clients()  # the ingress publishes through kombu: one redis.Redis per pool (rekku/kombu_clients.py)
    app = FastAPI(title="Rekku actions", version="1", description=__doc__, default_response_class=SafeJSONResponse)
    app.state.api_token = settings.ensure_api_token().encode()
    app.router.route_class = StrictJSONRoute
    auth = [Depends(require_token)]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        if any(e["type"] == "json_invalid" for e in errors):
            reasons = [str(e.get("ctx", {}).get("error", "")) for e in exc.errors() if e.get("type") == "json_invalid"]
            return _error(400, "the request body is not valid JSON", [r for r in reasons if r] or errors)
        if any(e["type"] == "string_unicode" for e in errors):
            return _error(422, "the request holds text that is not valid UTF-8 (a lone surrogate such as "
                               "\\ud800); send the characters themselves", errors)
        return _error(422, "the request does not match the expected shape", errors)

    @app.exception_handler(RekkuError)
    async def _rekku_error(_request: Request, exc: RekkuError) -> JSONResponse:
        return _error(exc.http_status, str(exc), getattr(exc, "errors", None))

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the ingress")
        return _error(500, "internal error; see the ingress log")

    @app.post("/v1/actions", status_code=202, response_model=SubmitResponse, dependencies=auth,
              responses={**_ERRORS, 202: {"headers": {"Location": _LOCATION}},
                         422: {"model": SubmitResponse}, 403: {"model": SubmitResponse},
                         409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def submit_actions(body: SubmitRequest, idempotency_header: IdempotencyHeader = None) -> Any:
        """Accept actions (any JSON form) or a raw LLM reply; each valid action becomes one task.

        An idempotency key (``idempotency_key`` or the ``Idempotency-Key`` header) answers a repeated
        request with its first answer; the same key with a different request is a 409."""
        if body.text is not None and body.actions is not None:
            return _error(422, "send either 'actions' or 'text', not both")
        payload: Any = body.text if body.text is not None else body.actions
        if payload is None:
            return _error(422, "send 'actions' (a list of actions) or 'text' (a raw LLM reply)")
        key = body.idempotency_key
        if idempotency_header is not None:
            if key is not None and key != idempotency_header:
                return _error(422, "the Idempotency-Key header and the body's idempotency_key differ; send one")
            key = idempotency_header
        context = body.context.model_dump(exclude_none=True) if body.context else {}
        answer = await _in_thread(_submit_from_client, payload, context=context, idempotency_key=key)
        location = {"Location": f"/v1/batches/{answer.batch_id}"} if answer.status == 202 and answer.batch_id else None
        return SafeJSONResponse(answer.as_dict(), status_code=answer.status, headers=location)

    async def _wait_for(fetch: Any, wait: float) -> Any:
        deadline = time.monotonic() + min(wait, settings.max_wait_seconds)
        delay = 0.05
        while True:
            value = await run_in_threadpool(fetch)
            if value is None:
                return None
            runs = value if isinstance(value, list) else [value]
            if all(r["status"] in FINAL_STATES for r in runs) or time.monotonic() >= deadline:
                return value
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    @app.get("/v1/actions/{action_id}", response_model=ActionState, dependencies=auth, responses=_ERRORS)
    async def get_action(action_id: str, wait: Wait = 0, redact: Redact = False) -> Any:
        """One action's state; ``?wait=`` long-polls until it is finished."""
        run = await _wait_for(lambda: shared_log().get(action_id), wait)
        if run is None:
            raise NotFound(f"no action {action_id}")
        return shown(run, redact)

    @app.get("/v1/batches/{batch_id}", response_model=BatchState, dependencies=auth, responses=_ERRORS)
    async def get_batch(batch_id: str, wait: Wait = 0) -> Any:
        """A batch's actions in submission order; ``?wait=`` long-polls until all are finished."""
        runs = await _wait_for(lambda: shared_log().batch(batch_id), wait)
        if runs is None:
            raise NotFound(f"no batch {batch_id}")
        return {"batch_id": batch_id, "actions": runs, "done": all(r["status"] in FINAL_STATES for r in runs)}

    @app.post("/v1/actions/{action_id}/cancel", response_model=CancelResponse, dependencies=auth,
              responses={**_ERRORS, 409: {"model": ErrorResponse}})
    def cancel_action(action_id: str) -> Any:
        """Cancel a queued action; ask a running one to stop."""
        status, changed = shared_log().request_cancel(action_id)
        if status is None:
            raise NotFound(f"no action {action_id}")
        if status == CANCELLED and changed:
            celery.control.revoke(action_id)
            # a worker may have started it in the last milliseconds, before its claim was written
            request_stop(celery, action_id)
            return {"id": action_id, "status": status, "detail": "cancelled before it ran"}
        if status == RUNNING and changed:
            request_stop(celery, action_id)
            return {"id": action_id, "status": status, "detail": "running; asked to stop"}
        raise Conflict(f"action {action_id} already {status}; nothing to cancel")

    @app.get("/v1/capabilities", response_model=CapabilitiesResponse, dependencies=auth, responses=_ERRORS)
    def get_capabilities() -> Any:
        """Every action this deployment can run, with its schema, instructions and queue."""

        registry = get_registry()
        return {"actions": capabilities(registry), "interfaces": get_interfaces().describe(), "errors": registry.errors,
                "disabled": {t: s.disabled for t, s in sorted(registry.disabled.items())}}

    @app.get("/healthz", response_model=Health)
    def healthz() -> Any:
        """The process is alive (no dependencies checked)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    def readyz() -> Any:
        """Broker and database reachable."""
        checks = readiness()
        ok = all(v == "ok" for v in checks.values())
        return SafeJSONResponse({"status": "ok" if ok else "unavailable", "checks": checks},
                            status_code=200 if ok else 503)

    for router in extra_routers():
        app.include_router(router)
    _document_errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _document_errors(app: FastAPI) -> None:
    """The OpenAPI schema says what the API really answers: our one error shape for 400/422 (FastAPI
    documents its own validation body, which we replace), and either shape for POST /v1/actions' 422."""
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
        malformed = {"description": "Malformed HTTP request (e.g. a URL longer than the server accepts, "
                                    "answered by the HTTP server itself) or a body that is not JSON",
                     "content": {"application/json": {"schema": error_ref},
                                 "text/plain": {"schema": {"type": "string"}}}}
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                responses = operation.get("responses", {})
                responses["400"] = malformed
                if "422" not in responses:
                    continue
                content = responses["422"].setdefault("content", {}).setdefault("application/json", {})
                if path == "/v1/actions" and method == "post":
                    content["schema"] = {"anyOf": [{"$ref": "#/components/schemas/SubmitResponse"}, error_ref]}
                else:
                    content["schema"] = error_ref
                responses["422"]["description"] = "The request does not match what this route takes"
        schema["components"]["schemas"].pop("HTTPValidationError", None)
        schema["components"]["schemas"].pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


#: Modules that contribute routes (each exposes ``router``, an APIRouter using ``require_token``; the one
#: exception is Telegram's webhook, which Telegram calls with a secret of its own instead: SECURITY.md).
ROUTER_MODULES: tuple[str, ...] = ("rekku.outbox_api", "rekku.prompt_api", "rekku.ops_api", "rekku.artifacts_api",
                                   "rekku.conversation_api", "rekku.telegram_webhook_api", "rekku.view_api")


def extra_routers() -> list[Any]:
    return [importlib.import_module(name).router for name in ROUTER_MODULES]


def readiness() -> dict[str, str]:
    """``{"broker": "ok"|error, "database": "ok"|error}``."""

    checks: dict[str, str] = {}
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    try:
        with get_engine().connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    return checks
