"""Operations routes: Prometheus metrics, the dead-letter list and manual retry of a failed action."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from rekku import dispatch
from rekku.action_log import NewRun, shared_log
from rekku.auth import require_token
from rekku.context import normalize_context
from rekku.errors import Conflict, NotFound, ServiceUnavailable
from rekku.metrics import render
from rekku.models import FAILED
from rekku.registry import get_registry
from rekku.schemas import ActionState, ErrorResponse
from rekku.settings import get_settings
from rekku.validation import authorize_again

router = APIRouter(dependencies=[Depends(require_token)], tags=["operations"],
                   responses={401: {"model": ErrorResponse}})


class DeadLetters(BaseModel):
    actions: list[ActionState]


@router.get("/v1/dead-letters", response_model=DeadLetters)
def dead_letters(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                 before: Annotated[str | None, Query(max_length=64, description="an action id, for paging")] = None
                 ) -> Any:
    """Actions that failed for good (retries exhausted or not retryable), newest first."""
    return {"actions": shared_log().failed(limit, before)}


@router.post("/v1/actions/{action_id}/retry", response_model=ActionState,
             responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
def retry_action(action_id: str) -> Any:
    """Run a failed action again (same id, same payload and context).

    The retry is authorized again, as a new request with the action's recorded context would be (a
    trainer demoted since, or a payload a plugin now refuses, gets a 409 and the action stays failed):
    the token holder may ask for a retry, but not for more than that context may run."""

    log = shared_log()
    current = log.get(action_id)
    if current is None:
        raise NotFound(f"no action {action_id}")
    if current["status"] == FAILED:

        denied = authorize_again(current["type"], current.get("payload") or {},
                                 normalize_context(current.get("context")), get_settings(), get_registry())
        if denied:
            raise Conflict(f"action {action_id} cannot be retried: {denied}; it stays failed")
    run = log.reset_for_retry(action_id)
    if run is None:
        raise Conflict(f"action {action_id} is {current['status']}; only failed actions can be retried")
    context = {k: v for k, v in run["context"].items() if k != "batch_id"}
    unsent = dispatch.enqueue([NewRun(run["id"], 0, run["type"], run["queue"], run["payload"], context)],
                              run["batch_id"])
    if unsent:
        log.fail(action_id, "could not enqueue the retry: the broker is unreachable")
        raise ServiceUnavailable("the broker is unreachable; the action stays failed")
    return run


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics() -> Response:
    """Prometheus metrics: actions accepted/rejected by type, queue depth per pool, run outcomes and
    durations by type, reconciler re-enqueues."""
    return Response(render(), media_type=CONTENT_TYPE_LATEST)
