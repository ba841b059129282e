"""What a worker (and beat) process registers on Rekku's Celery app: imported by Celery there alone.

* one task per action type, ``rekku.action.<type>``, routed to its pool's queue, which runs the
  handler through the runner and its hooks (rekku_workers.runner);
* ``rekku.ingest`` (actions from a service that speaks Celery) and ``rekku.reconcile`` (beat);
* ``rekku.retention.prune`` (beat, every REKKU_PRUNE_SECONDS): rows and artifacts past their retention;
* ``rekku.feed.push`` (io pool): the feed POSTed to the model's webhook (rekku.feed_push), woken by
  beat and by rekku.feed when items are added;
* plugins' periodic tasks and the beat schedule (rekku_workers.periodic);
* with REKKU_LLM_URL, the model loop's ``rekku.model.turn`` (rekku_workers.model_turn);
* the worker's bootsteps (rekku_workers.node, rekku_workers.timer_sweep), its cancel command and its signal
  handlers (log format, metrics flush).

Importing this module discovers the plugins; the ingress never imports it (rekku.celery_app).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_shutdown, worker_shutdown
from rekku_workers import cancel  # noqa: F401 - registers the worker's cancel command
from rekku_workers.malformed import GuardTaskHandler, set_aside_malformed
from rekku_workers.node import NodeIdentity
from rekku_workers.owned_qos import DeferredAcks
from rekku_workers.periodic import register_periodic_tasks
from rekku_workers.reconnect import GiveBackOnReconnect
from rekku_workers.run_metrics import RUN_METRICS
from rekku_workers.runner import execute, time_limit_of
from rekku_workers.task_events import BatchedTaskEvents
from rekku_workers.timer_sweep import TimerSweep

from rekku import feed_push, retention
from rekku.celery_app import app
from rekku.envelope import message_key
from rekku.ingest import default_ingress
from rekku.kombu_clients import reuse_clients
from rekku.logs import install as install_log_format
from rekku.metrics import count_reconciled
from rekku.plugin_base import ActionSpec
from rekku.reconciler import reconcile as reconcile_pass
from rekku.registry import Registry, get_registry
from rekku.settings import get_settings

#: Extra seconds Celery waits past an action's own limit before interrupting (soft) and killing (hard).
SOFT_GRACE, HARD_GRACE = 5.0, 15.0


def _make_action_task(app: Celery, spec: ActionSpec) -> Task:
    limit = time_limit_of(spec)

    def run_action(self: Task, action_id: str, payload: dict, context: dict | None = None) -> dict:
        # the action log keeps the result; Celery gets only the outcome ({"status": "succeeded"}), as
        # whatever it gets back it shows (worker log, task events, Flower): see rekku_workers.runner
        return execute(self, spec, action_id, payload, context)

    run_action.__name__ = f"action_{spec.type}"
    run_action.__doc__ = spec.description or f"Run the '{spec.type}' action of plugin '{spec.plugin}'."
    return app.task(
        run_action, bind=True, name=spec.task_name, queue=spec.pool,
        acks_late=True, reject_on_worker_lost=True, ignore_result=True,
        soft_time_limit=limit + SOFT_GRACE, time_limit=limit + HARD_GRACE,
        rate_limit=spec.rate_limit, max_retries=None,
        # the worker's main process counts a run lost with its pool process (poison messages)
        Request="rekku_workers.claim:ActionRequest",
    )


def register_action_tasks(app: Celery, registry: Registry) -> None:
    """Register a task for every enabled action type, routed to its pool's queue."""
    routes = {}
    for spec in registry.actions.values():
        if spec.task_name not in app.tasks:
            _make_action_task(app, spec)
        routes[spec.task_name] = {"queue": spec.pool}
    app.conf.task_routes = {**(app.conf.task_routes or {}), **routes}


@app.task(name="rekku.ingest", bind=True, queue="default", acks_late=True)
def ingest(self: Task, body: Any, context: dict | None = None, idempotency_key: str | None = None) -> dict:
    """Accept actions from a service that speaks Celery; answers like POST /v1/actions.

    Without a key of its own, the message's identity is the idempotency key, so a redelivered
    ingest (its worker died after accepting) answers the same and enqueues nothing twice: the
    task id, or with signing on the signed envelope's id (a replay may carry any task id)."""
    ingress = default_ingress()
    if idempotency_key:
        return ingress.submit_from_client(body, context=context, idempotency_key=idempotency_key).as_dict()
    return ingress.submit(body, context=context, idempotency_key=message_key(self.request)).as_dict()


@app.task(name="rekku.reconcile", queue="default", acks_late=True, ignore_result=True, expires=60)
def reconcile() -> dict:
    """Re-enqueue actions the broker lost or a dead worker held (see rekku.reconciler)."""
    outcome = reconcile_pass()
    count_reconciled(outcome)
    return outcome


@app.task(name=feed_push.TASK_NAME, queue="io", ignore_result=True)
def push_feed() -> dict:
    """One pass of the model webhook's pusher (see rekku.feed_push): what the cursor has not reached
    yet, POSTed in id order; one pass at a time across every node."""
    return feed_push.push_pass()


@app.task(name=retention.TASK_NAME, queue=retention.TASK_QUEUE, acks_late=True, ignore_result=True,
          soft_time_limit=retention.PASS_SECONDS + 60, time_limit=retention.PASS_SECONDS + 90)
def prune() -> dict:
    """One pruning pass (see rekku.retention): rows and artifacts past their retention, in small
    transactions; one pass at a time across every node."""
    return retention.prune_pass()


def _register(app: Celery) -> None:
    settings = get_settings()
    reuse_clients()  # one redis.Redis per kombu pool, not one per publish, ack and event flush
    set_aside_malformed()  # an item on a queue that is not a message no longer ends the worker
    app.steps["worker"].add(NodeIdentity)  # incarnation, heartbeat, predecessor recovery: workers/node.py
    app.steps["worker"].add(TimerSweep)  # finished tasks' time-limit timers, see workers/timer_sweep.py
    app.steps["consumer"].add(GiveBackOnReconnect)  # what a lost connection stranded: workers/reconnect.py
    app.steps["consumer"].add(GuardTaskHandler)  # a malformed task message is refused, not fatal: workers/malformed.py
    app.steps["consumer"].add(DeferredAcks)  # acknowledgements ride with the next delivery: workers/owned_qos.py
    app.steps["consumer"].add(BatchedTaskEvents)  # task events published every 20 ms: workers/task_events.py
    register_action_tasks(app, get_registry())
    register_periodic_tasks(app, get_registry())
    if settings.model_loop:  # the optional model loop: nothing of it is imported without REKKU_LLM_URL
        from rekku_workers.model_turn import register_model_turn

        register_model_turn(app)
    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), "rekku.reconcile": {
        "task": "rekku.reconcile", "schedule": settings.reconcile_seconds,
        "options": {"queue": "default", "expires": settings.reconcile_seconds}}}
    if settings.prune_seconds:  # retention: a pass is at most this long, so passes never pile up
        app.conf.beat_schedule[retention.TASK_NAME] = {
            "task": retention.TASK_NAME, "schedule": settings.prune_seconds,
            "options": {"queue": retention.TASK_QUEUE, "expires": settings.prune_seconds}}
    if settings.model_webhook_url:  # without the secret too: the pass then says, once, why nothing is pushed
        every = settings.model_webhook_poll_seconds
        app.conf.beat_schedule[feed_push.TASK_NAME] = {
            "task": feed_push.TASK_NAME, "schedule": every,
            "options": {"queue": "io", "expires": max(every, 1.0)}}


@after_setup_logger.connect(weak=False)
@after_setup_task_logger.connect(weak=False)
def _log_format(logger: logging.Logger, **_kwargs: Any) -> None:
    """Celery's worker and task loggers get our format (REKKU_LOG_FORMAT) and the action ids."""
    install_log_format(logger.handlers)


@worker_process_shutdown.connect(weak=False)
@worker_shutdown.connect(weak=False)
def _flush_metrics(**_kwargs: Any) -> None:
    """A pool process (or a threads/solo worker) sends its last second of run metrics before it exits."""
    RUN_METRICS.flush()


_register(app)
