"""A client for services that call Rekku over HTTP: :class:`Client` (blocking) and :class:`AsyncClient`
(asyncio), both on httpx, speaking the API of docs/contracts.md §2 and answering its typed bodies
(rekku/schemas.py).

Retrying is what makes a caller's life simple and what could run work twice, so it is bounded and
made safe here: a connection error, a timeout, or a 502/503/504 is tried again with jittered
exponential backoff (Celery's own helper, :class:`Retry`), and a submit sends the same idempotency key
on every attempt (the caller's, or one made once per call). The ingress answers a key it has seen with
its first answer and does no new work, so an attempt whose answer was lost (the ingress restarted, a
proxy dropped the connection) is answered by the retry with the batch the lost attempt created. A 503
means nothing was queued and the key was released (docs/contracts.md §2). Reads change nothing; a
cancel repeated after its answer was lost finds nothing left to cancel (409). Other 4xx (401, 403,
404, 409, 413, 422) are the caller's to fix: raised at once as :class:`APIError` subclasses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from celery.utils.time import get_exponential_backoff_interval
from pydantic import BaseModel

from rekku.models import FINAL_STATES
from rekku.schemas import ActionState, BatchState, CancelResponse, FeedPage, RequestContext, SubmitResponse

#: Answers worth another attempt: the ingress could not take the request now (503: the broker is
#: unreachable, nothing was queued and the key was released) or a proxy in front of it could not reach it.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Transport failures worth another attempt: the request may not have arrived, or its answer was lost.
RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
#: What a submit takes: actions (a list, or any JSON form of them) or a raw LLM reply (a ``str``).
Actions = list[Any] | dict[str, Any] | str
#: Where the actions come from: the chat and user they answer (``RequestContext``'s fields).
Context = RequestContext | Mapping[str, Any]
#: Seconds added to a long poll's own wait for the HTTP timeout of that request.
_POLL_SLACK = 30.0


# ----------------------------------------------------------------------------- errors
class ClientError(Exception):
    """Base of what the client raises. ``idempotency_key`` is the key a failed submit sent: submitting
    the same request again with it later still runs the work at most once."""

    idempotency_key: str | None = None


class APIError(ClientError):
    """The ingress answered an error: ``status``, and ``detail`` and ``errors`` from its one error shape
    ``{"detail", "errors"}``. A refused submit (403, or a 422 with nothing accepted) answers a batch
    instead: it is ``answer`` (its ``rejected`` are ``errors``, its ``correction`` tells the model why)."""

    def __init__(self, status: int, detail: str, errors: list[Any] | None = None,
                 answer: SubmitResponse | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.errors, self.answer = status, detail, errors or [], answer


class Unauthorized(APIError):
    """401: no token, or not this ingress's (REKKU_API_TOKEN)."""


class Forbidden(APIError):
    """403: a plugin refused the whole request (a blocked user)."""


class NotFound(APIError):
    """404: no such action or batch."""


class Conflict(APIError):
    """409: the idempotency key was used for another request, or the action is already finished."""


class TooLarge(APIError):
    """413: above REKKU_MAX_BODY_BYTES or REKKU_MAX_ACTIONS_PER_REQUEST."""


class Rejected(APIError):
    """422: the request, or every action in it, is invalid."""


class Unavailable(APIError):
    """502/503/504 on every attempt: the ingress (or its broker) stayed unreachable."""


class TransportError(ClientError):
    """Every attempt failed to connect, timed out, or lost its answer; the cause is the last failure."""


class WaitTimeout(ClientError):
    """``wait`` ran out of time; ``actions`` are the states last seen."""

    def __init__(self, message: str, actions: list[ActionState]) -> None:
        super().__init__(message)
        self.actions = actions


_BY_STATUS: dict[int, type[APIError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
                                         413: TooLarge, 422: Rejected, 502: Unavailable, 503: Unavailable,
                                         504: Unavailable}


def api_error(response: httpx.Response) -> APIError:
    """The typed error of an error answer."""
    try:
        body = response.json()
    except ValueError:
        body = None
    kind = _BY_STATUS.get(response.status_code, APIError)
    if isinstance(body, dict) and "accepted" in body and "rejected" in body:
        answer = SubmitResponse.model_validate(body)
        reasons = [reason for rejection in answer.rejected for reason in rejection.errors]
        return kind(response.status_code, "; ".join(reasons) or "nothing was accepted",
                    [r.model_dump() for r in answer.rejected], answer)
    if isinstance(body, dict) and "detail" in body:
        errors = body.get("errors")
        return kind(response.status_code, str(body["detail"]), errors if isinstance(errors, list) else [])
    text = response.text.strip()[:300]
    return kind(response.status_code, f"{response.reason_phrase}: {text}" if text else response.reason_phrase)


# ----------------------------------------------------------------------------- settings and policy
def default_base_url() -> str:
    """The ingress of this machine's settings (REKKU_HOST, REKKU_PORT), as the CLI reaches it."""
    from rekku.settings import get_settings

    settings = get_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def default_token() -> str:
    """REKKU_API_TOKEN, else the token `rekku up` keeps in REKKU_HOME (the CLI's)."""
    from rekku.settings import get_settings

    return get_settings().ensure_api_token()


def new_idempotency_key() -> str:
    """A key for a submit whose caller gave none: random, and outside Rekku's reserved prefixes."""
    return f"client-{uuid.uuid4()}"


@dataclass(frozen=True)
class Retry:
    """How many attempts a request gets, and the backoff between them: full jitter (a random wait up to
    ``backoff * 2**n`` seconds, at most ``max_backoff``), so that clients cut off together by a restart
    do not come back together."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("a Retry needs at least one attempt and backoffs of zero seconds or more")

    def delay(self, retry: int) -> float:
        """Seconds before retry ``retry`` (0 for the first). Celery's helper counts whole units: milliseconds."""
        return get_exponential_backoff_interval(round(self.backoff * 1000), retry, round(self.max_backoff * 1000),
                                                full_jitter=True) / 1000


@dataclass(frozen=True)
class _Call:
    """One request, as every attempt sends it."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("Idempotency-Key")


def _id(value: str) -> str:
    return quote(str(value), safe="")


def _wait_target(target: str | SubmitResponse | Sequence[str]) -> tuple[str | None, list[str]]:
    """``(batch id, [])`` or ``(None, action ids)``."""
    if isinstance(target, SubmitResponse):
        if target.batch_id is None:
            raise ValueError("this answer has no batch (nothing was accepted): nothing to wait for")
        return target.batch_id, []
    if isinstance(target, str):
        return target, []
    return None, [str(i) for i in target]


def _final(runs: list[ActionState]) -> bool:
    return all(r.status in FINAL_STATES for r in runs)


class _Base:
    """What both clients share: where they send, how each call is built and each answer read."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retry: Retry | None = None) -> None:
        self.base_url = (base_url or default_base_url()).rstrip("/")
        self.timeout = timeout
        self.retry = retry or Retry()
        self._auth = {"Authorization": f"Bearer {token or default_token()}"}

    @staticmethod
    def _submit_call(actions: Actions, context: Context | None, idempotency_key: str | None) -> _Call:
        body: dict[str, Any] = {"text": actions} if isinstance(actions, str) else {"actions": actions}
        if context is not None:
            body["context"] = (context.model_dump(exclude_none=True) if isinstance(context, BaseModel)
                               else dict(context))
        return _Call("POST", "/v1/actions", json=body,
                     headers={"Idempotency-Key": idempotency_key or new_idempotency_key()})

    def _poll_call(self, path: str, wait: float, **params: Any) -> _Call:
        return _Call("GET", path, params={**params, "wait": wait}, timeout=wait + max(self.timeout, _POLL_SLACK))

    @staticmethod
    def _read(response: httpx.Response, model: type[BaseModel], ok: int = 200) -> Any:
        if response.status_code != ok:
            raise api_error(response)
        return model.model_validate(response.json())

    def _gave_up(self, call: _Call, failure: httpx.Response | Exception) -> ClientError:
        if isinstance(failure, httpx.Response):
            error: ClientError = api_error(failure)
        else:
            error = TransportError(f"{call.method} {self.base_url}{call.path}: {type(failure).__name__}: "
                                   f"{failure or 'no answer'} ({self.retry.attempts} attempts)")
            error.__cause__ = failure
        error.idempotency_key = call.idempotency_key
        return error

    def _request_args(self, call: _Call) -> dict[str, Any]:
        return {"params": call.params, "json": call.json, "headers": {**self._auth, **call.headers},
                "timeout": call.timeout or self.timeout}


# ----------------------------------------------------------------------------- the blocking client
class Client(_Base):
    """Rekku's HTTP API, blocking. ``base_url`` and ``token`` default to this machine's settings, as
    the `rekku` CLI uses them. Use it as a context manager, or call :meth:`close`."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retry: Retry | None = None) -> None:
        super().__init__(base_url, token, timeout=timeout, retry=retry)
        self._http = httpx.Client(base_url=self.base_url)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        failure: httpx.Response | Exception | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.delay(attempt - 1))
            try:
                response = self._http.request(call.method, call.path, **self._request_args(call))
            except RETRY_EXCEPTIONS as exc:
                failure = exc
                continue
            if response.status_code not in RETRY_STATUSES:
                return response
            failure = response
        raise self._gave_up(call, failure)

    def submit(self, actions: Actions, context: Context | None = None,
               idempotency_key: str | None = None) -> SubmitResponse:
        """Submit actions (a list, or any JSON form of them) or a raw LLM reply (a ``str``). Returns the
        batch; raises :class:`Rejected` (422) or :class:`Forbidden` (403) when nothing was accepted, with
        the answer and its correction in ``.answer``."""
        call = self._submit_call(actions, context, idempotency_key)
        response = self._send(call)
        try:
            return self._read(response, SubmitResponse, ok=202)
        except ClientError as exc:
            exc.idempotency_key = call.idempotency_key
            raise

    def status(self, action_id: str, wait: float = 0) -> ActionState:
        """One action's state; ``wait`` long-polls up to that many seconds until it is finished."""
        return self._read(self._send(self._poll_call(f"/v1/actions/{_id(action_id)}", wait)), ActionState)

    def batch(self, batch_id: str, wait: float = 0) -> BatchState:
        """A batch's actions in submission order; ``wait`` long-polls until all are finished."""
        return self._read(self._send(self._poll_call(f"/v1/batches/{_id(batch_id)}", wait)), BatchState)

    def wait(self, target: str | SubmitResponse | Sequence[str], timeout: float = 600.0,
             poll: float = 30.0) -> list[ActionState]:
        """Until every action is finished: ``target`` is a submit's answer, a batch id, or a list of
        action ids. Long-polls the ingress (``?wait=``, ``poll`` seconds a request) and returns the
        actions in order; :class:`WaitTimeout` after ``timeout`` seconds."""
        batch_id, ids = _wait_target(target)
        deadline = time.monotonic() + timeout
        states: dict[str, ActionState] = {}
        while True:
            hold = min(poll, max(0.0, deadline - time.monotonic()))
            if batch_id is not None:
                runs = self.batch(batch_id, wait=hold).actions
            else:
                for action_id in ids:
                    if action_id not in states or states[action_id].status not in FINAL_STATES:
                        states[action_id] = self.status(action_id, wait=hold)
                runs = [states[i] for i in ids]
            if _final(runs):
                return runs
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"not finished after {timeout:g} s", runs)

    def cancel(self, action_id: str) -> CancelResponse:
        """Cancel a queued action, or ask a running one to stop; :class:`Conflict` when already finished."""
        return self._read(self._send(_Call("POST", f"/v1/actions/{_id(action_id)}/cancel")), CancelResponse)

    def feed(self, after: int | None = None, *, wait: float = 30.0, limit: int = 100,
             follow: bool = True) -> Iterator[dict[str, Any]]:
        """The model's feed, item by item, from after ``after`` (from the start when None). With
        ``follow`` it long-polls for new items forever; without, it stops when none are left. Resume
        later with ``after=`` the last item's ``id``."""
        cursor = after or 0
        while True:
            call = self._poll_call("/v1/feed", wait if follow else 0, after=cursor, limit=limit)
            page: FeedPage = self._read(self._send(call), FeedPage)
            yield from page.items
            cursor = page.next
            if not page.items and not follow:
                return


# ----------------------------------------------------------------------------- the asyncio client
class AsyncClient(_Base):
    """:class:`Client`'s methods as coroutines (and :meth:`feed` an async iterator), on httpx's
    AsyncClient. Use it as an async context manager, or await :meth:`aclose`."""

    def __init__(self, base_url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retry: Retry | None = None) -> None:
        super().__init__(base_url, token, timeout=timeout, retry=retry)
        self._http = httpx.AsyncClient(base_url=self.base_url)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        failure: httpx.Response | Exception | None = None
        for attempt in range(self.retry.attempts):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt - 1))
            try:
                response = await self._http.request(call.method, call.path, **self._request_args(call))
            except RETRY_EXCEPTIONS as exc:
                failure = exc
                continue
            if response.status_code not in RETRY_STATUSES:
                return response
            failure = response
        raise self._gave_up(call, failure)

    async def submit(self, actions: Actions, context: Context | None = None,
                     idempotency_key: str | None = None) -> SubmitResponse:
        """As :meth:`Client.submit`."""
        call = self._submit_call(actions, context, idempotency_key)
        response = await self._send(call)
        try:
            return self._read(response, SubmitResponse, ok=202)
        except ClientError as exc:
            exc.idempotency_key = call.idempotency_key
            raise

    async def status(self, action_id: str, wait: float = 0) -> ActionState:
        """As :meth:`Client.status`."""
        return self._read(await self._send(self._poll_call(f"/v1/actions/{_id(action_id)}", wait)), ActionState)

    async def batch(self, batch_id: str, wait: float = 0) -> BatchState:
        """As :meth:`Client.batch`."""
        return self._read(await self._send(self._poll_call(f"/v1/batches/{_id(batch_id)}", wait)), BatchState)

    async def wait(self, target: str | SubmitResponse | Sequence[str], timeout: float = 600.0,
                   poll: float = 30.0) -> list[ActionState]:
        """As :meth:`Client.wait`; a list of action ids is long-polled concurrently."""
        batch_id, ids = _wait_target(target)
        deadline = time.monotonic() + timeout
        states: dict[str, ActionState] = {}
        while True:
            hold = min(poll, max(0.0, deadline - time.monotonic()))
            if batch_id is not None:
                runs = (await self.batch(batch_id, wait=hold)).actions
            else:
                pending = [i for i in ids if i not in states or states[i].status not in FINAL_STATES]
                for state in await asyncio.gather(*(self.status(i, wait=hold) for i in pending)):
                    states[state.id] = state
                runs = [states[i] for i in ids]
            if _final(runs):
                return runs
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"not finished after {timeout:g} s", runs)

    async def cancel(self, action_id: str) -> CancelResponse:
        """As :meth:`Client.cancel`."""
        return self._read(await self._send(_Call("POST", f"/v1/actions/{_id(action_id)}/cancel")), CancelResponse)

    async def feed(self, after: int | None = None, *, wait: float = 30.0, limit: int = 100,
                   follow: bool = True) -> AsyncIterator[dict[str, Any]]:
        """As :meth:`Client.feed`."""
        cursor = after or 0
        while True:
            call = self._poll_call("/v1/feed", wait if follow else 0, after=cursor, limit=limit)
            page: FeedPage = self._read(await self._send(call), FeedPage)
            for item in page.items:
                yield item
            cursor = page.next
            if not page.items and not follow:
                return
