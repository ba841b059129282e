"""The body of every ``rekku.action.<type>`` task: hooks around one handler call.

Outcomes: the handler's return value is the result; TransientError is retried with backoff until
``max_retries``; any other exception, a time limit or a refused authorization fails the action
(never the worker); a cancel request stops it as ``cancelled``.

The result goes to the action log only (``ActionLogHook``; GET /v1/actions/{id} returns it). What
the task returns is what Celery *shows* — the ``task-succeeded`` event (Flower, ``celery events``),
the worker's "succeeded in …: <return value>" log line — so it is only the outcome (:func:`shown`):
a terminal command's output, a query's rows or anything a handler returns never travels there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import Any

from celery.exceptions import Retry, SoftTimeLimitExceeded
from rekku_workers import event_loop
from rekku_workers.claim import ActionLogHook
from rekku_workers.hooks import (
    AuthorizationHook,
    FailureFeedHook,
    HookChain,
    LoggingHook,
    OrderRule,
    ProgressHook,
    Run,
    SkipRun,
    check_order,
)
from rekku_workers.run_metrics import MetricsHook
from sqlalchemy.exc import DBAPIError

from rekku import context as ctxvars
from rekku import held
from rekku.action_log import shared_log
from rekku.backoff import retry_delay
from rekku.broker import broker_client
from rekku.context import ActionContext
from rekku.errors import TransientError
from rekku.plugin_base import ActionSpec
from rekku.registry import get_registry
from rekku.settings import get_settings

#: The hooks every action run passes through, in this order (rekku_workers.hooks says what a raise does).
HOOKS = HookChain([
    # First. Its before_run reads the action's state and acknowledges (SkipRun) an unknown, finished,
    # cancelled or poisoned delivery before any other hook does work on it or judges it; it makes
    # run.claim and the context's attempt_source. Its outcomes write the action log, before any
    # observer reports the outcome.
    ActionLogHook(),
    # After the action log: a delivery that must not run is skipped, not refused. A refusal
    # (NotAuthorized) fails the action, and the action log's after_failure records that.
    AuthorizationHook(),
    # After the action log: its sink hands progress to run.claim while the claim is unwritten.
    ProgressHook(),
    # Observers, last. After the deciding hooks, so a skipped or refused delivery starts no clock (it
    # counts zero seconds) and its outcome is reported after the action log recorded it.
    FailureFeedHook(),
    MetricsHook(),
    LoggingHook(),
])

#: What the order of HOOKS must keep, checked below when this module is imported: a list that breaks
#: a rule never reaches a worker.
ORDER_RULES = (
    OrderRule(ActionLogHook, AuthorizationHook,
              "an unknown, finished, cancelled or poisoned delivery is acknowledged, not refused"),
    OrderRule(ActionLogHook, ProgressHook, "the progress sink reads run.claim, made by the action log's before_run"),
    OrderRule(ActionLogHook, MetricsHook, "an outcome is counted after the action log recorded it"),
    OrderRule(ActionLogHook, LoggingHook, "an outcome is logged after the action log recorded it"),
    OrderRule(ActionLogHook, FailureFeedHook, "the model hears of a failure the action log recorded"),
    OrderRule(AuthorizationHook, MetricsHook, "a refused delivery starts no clock: it counts zero seconds"),
)
check_order(HOOKS.hooks, ORDER_RULES)

#: Longest wait between retries, in seconds.
MAX_BACKOFF = 300.0


class ActionFailed(Exception):
    """Raised from the task so Celery (and Flower) record the failure; the log already has it."""


def time_limit_of(spec: ActionSpec) -> float:
    return float(spec.time_limit or get_settings().default_time_limit)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _bound(ctx: ActionContext, awaitable: Any) -> Any:
    token = ctxvars.bind(ctx)
    try:
        return await awaitable
    finally:
        ctxvars.unbind(token)


def invoke_handler(spec: ActionSpec, payload: dict, ctx: ActionContext) -> Any:
    """Call the plugin's handler; async handlers run on the process's event loop, with the time limit."""
    plugin = get_registry().plugins[spec.plugin]
    token = ctxvars.bind(ctx)
    try:
        outcome = plugin.handle_custom_action(spec.type, payload)
    finally:
        ctxvars.unbind(token)
    if inspect.isawaitable(outcome):
        outcome = event_loop.run(_bound(ctx, outcome), timeout=time_limit_of(spec), key=ctx.action_id)
    return outcome


def shown(status: str, **detail: Any) -> dict:
    """What the task returns, for Celery to show: the outcome, never the handler's result."""
    return {"status": status, **detail}


def execute(task: Any, spec: ActionSpec, action_id: str, payload: dict, context: dict | None) -> dict:
    """Run one delivery of one action through the hooks; returns its outcome (:func:`shown`), the
    result itself is in the action log."""
    ctx = ActionContext.from_request(action_id, spec.type, context, worker=task.request.hostname,
                                     batch_id=(context or {}).get("batch_id"))
    run = Run(task=task, spec=spec, action_id=action_id, payload=payload, context=ctx)
    token = ctxvars.bind(ctx)  # every log line of this run carries its ids (rekku.logs)
    try:
        return _execute(task, spec, run)
    finally:
        ctxvars.unbind(token)


def _execute(task: Any, spec: ActionSpec, run: Run) -> dict:
    action_id, payload, ctx = run.action_id, run.payload, run.context
    try:
        HOOKS.before_run(run)
    except SkipRun as skip:
        HOOKS.after_skip(run, skip.reason)
        return shown("skipped", reason=skip.reason)
    except Exception as exc:
        HOOKS.after_failure(run, _describe(exc))
        raise ActionFailed(_describe(exc)) from None
    try:
        try:
            result = invoke_handler(spec, payload, ctx)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # The database dropped the handler's connection: nothing was committed on it, try again.
            raise TransientError(f"database connection lost ({type(exc.orig).__name__})") from exc
    except Retry:
        raise
    except TransientError as exc:
        if ctx.attempt <= spec.max_retries:
            countdown = (exc.retry_after if exc.retry_after is not None
                         else retry_delay(ctx.attempt, MAX_BACKOFF, minimum=1.0))
            HOOKS.before_retry(run, _describe(exc), countdown)
            _count_retry_as_held(task, action_id)
            raise task.retry(countdown=countdown, max_retries=None, exc=exc) from None
        error = f"{_describe(exc)} (gave up after {ctx.attempt} attempts)"
    except (SoftTimeLimitExceeded, TimeoutError, asyncio.CancelledError, concurrent.futures.CancelledError) as exc:
        if shared_log().cancel_requested(action_id):
            HOOKS.after_cancel(run)
            return shown("cancelled")
        error = f"time limit of {time_limit_of(spec):g} s exceeded"
        if isinstance(exc, TimeoutError) and "did not finish" not in str(exc):
            error = _describe(exc)
    except Exception as exc:
        error = _describe(exc)
    else:
        HOOKS.after_success(run, result)
        return shown("succeeded")
    HOOKS.after_failure(run, error)
    raise ActionFailed(error)


def _count_retry_as_held(task: Any, action_id: str) -> None:
    """Count the retry's message as held (rekku.held) before Celery publishes it: this delivery's
    acknowledgement, right after, counts the old one down, and the action must stay held meanwhile."""
    queue = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
    if queue:
        held.count_up(broker_client(get_settings()), queue, [action_id])
