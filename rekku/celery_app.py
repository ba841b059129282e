"""The Celery application: one task per action type (``rekku.action.<type>``) plus ``rekku.ingest``.

Importing this module discovers the plugins, so ``celery -A rekku.celery_app worker`` and
``rekku worker`` register exactly the tasks the ingress enqueues.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    worker_process_shutdown,
    worker_shutdown,
)

from rekku import cancel  # noqa: F401 - registers the worker's cancel command
from rekku.periodic import register_periodic_tasks
from rekku.plugin_base import ActionSpec
from rekku.registry import Registry, get_registry
from rekku.runner import execute, time_limit_of
from rekku.settings import get_settings
from workers.timer_sweep import TimerSweep

#: Extra seconds Celery waits past an action's own limit before interrupting (soft) and killing (hard).
SOFT_GRACE, HARD_GRACE = 5.0, 15.0


def _make_action_task(app: Celery, spec: ActionSpec) -> Task:
    limit = time_limit_of(spec)

    def run_action(self: Task, action_id: str, payload: dict, context: dict | None = None) -> dict:
        # the action log keeps the result; Celery gets only the outcome ({"status": "succeeded"}), as
        # whatever it gets back it shows (worker log, task events, Flower): see rekku.runner
        return execute(self, spec, action_id, payload, context)

    run_action.__name__ = f"action_{spec.type}"
    run_action.__doc__ = spec.description or f"Run the '{spec.type}' action of plugin '{spec.plugin}'."
    return app.task(
        run_action, bind=True, name=spec.task_name, queue=spec.pool,
        acks_late=True, reject_on_worker_lost=True, ignore_result=True,
        soft_time_limit=limit + SOFT_GRACE, time_limit=limit + HARD_GRACE,
        rate_limit=spec.rate_limit, max_retries=None,
    )


def register_action_tasks(app: Celery, registry: Registry) -> None:
    """Register a task for every enabled action type, routed to its pool's queue."""
    routes = {}
    for spec in registry.actions.values():
        if spec.task_name not in app.tasks:
            _make_action_task(app, spec)
        routes[spec.task_name] = {"queue": spec.pool}
    app.conf.task_routes = {**(app.conf.task_routes or {}), **routes}


def make_app() -> Celery:
    app = Celery("rekku")
    app.config_from_object("celeryconfig")
    settings = get_settings()
    if settings.signing_enabled:
        from rekku.signing import register as register_signing

        app.setup_security(allowed_serializers=["json"], serializer="json")
        register_signing(settings.signing_key.read_text(), settings.signing_cert.read_text(),  # type: ignore[union-attr]
                         str(settings.signing_cert_store), ttl=settings.signed_message_ttl)
    app.steps["worker"].add(TimerSweep)  # finished tasks' time-limit timers, see workers/timer_sweep.py
    register_action_tasks(app, get_registry())
    register_periodic_tasks(app, get_registry())

    @app.task(name="rekku.ingest", bind=True, queue="default", acks_late=True)
    def ingest(self: Task, body: Any, context: dict | None = None, idempotency_key: str | None = None) -> dict:
        """Accept actions from a service that speaks Celery; answers like POST /v1/actions.

        Without a key of its own, the message's identity is the idempotency key, so a redelivered
        ingest (its worker died after accepting) answers the same and enqueues nothing twice: the
        task id, or with signing on the signed envelope's id (a replay may carry any task id)."""
        from rekku.ingest import default_ingress
        from rekku.signing import ENVELOPE_ATTR

        ingress = default_ingress()
        if idempotency_key:
            return ingress.submit_from_client(body, context=context, idempotency_key=idempotency_key).as_dict()
        envelope = getattr(self.request, ENVELOPE_ATTR, None)
        key = f"signed:{envelope}" if envelope else f"celery-task:{self.request.id}"
        return ingress.submit(body, context=context, idempotency_key=key).as_dict()

    @app.task(name="rekku.reconcile", queue="default", acks_late=True, ignore_result=True, expires=60)
    def reconcile() -> dict:
        """Re-enqueue actions the broker lost or a dead worker held (see rekku.reconciler)."""
        from rekku.metrics import count_reconciled
        from rekku.reconciler import reconcile as run_pass

        outcome = run_pass()
        count_reconciled(outcome)
        return outcome

    app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), "rekku.reconcile": {
        "task": "rekku.reconcile", "schedule": settings.reconcile_seconds,
        "options": {"queue": "default", "expires": settings.reconcile_seconds}}}
    return app


_heartbeat_stop = threading.Event()


@celeryd_after_setup.connect(weak=False)
def _start_heartbeat(sender: str, instance: Any, **_kwargs: Any) -> None:
    """Each worker says it is alive, so the reconciler can tell orphaned 'running' actions.

    Each start of a worker is an incarnation of its node (rekku.reconciler): its claims, heartbeat and
    unacknowledged deliveries carry ``<node>#<incarnation>``, its first heartbeat is written before it
    consumes anything, and it recovers at once what an earlier start of the same node name left
    running or unacknowledged (a SIGKILLed node restarted by systemd, compose or Kubernetes). Its pool
    processes, forked after this, inherit the incarnation; the main process counts a pool process lost
    mid-action (rekku.claim.ActionRequest), which bounds poison messages (REKKU_MAX_ATTEMPTS)."""
    import redis

    from rekku.reconciler import (
        ACTION_TASK_PREFIX,
        _redis,
        beat,
        heartbeat_forever,
        recover_predecessors,
        start_incarnation,
        tag_deliveries,
    )

    settings = get_settings()
    incarnation = start_incarnation()
    tag_deliveries(f"{sender}#{incarnation}")
    for name, task in instance.app.tasks.items():  # before the consumer builds its strategies
        if name.startswith(ACTION_TASK_PREFIX):
            task.Request = "rekku.claim:ActionRequest"
    try:
        beat(_redis(settings), sender, incarnation, max(3, int(settings.worker_heartbeat_ttl)))
    except redis.RedisError:
        logging.getLogger(__name__).warning("could not write the first worker heartbeat", exc_info=True)
    threading.Thread(target=heartbeat_forever, args=(sender, _heartbeat_stop, settings, incarnation),
                     name="rekku-heartbeat", daemon=True).start()

    # In this thread, before the pool forks: a thread doing database or import work while a pool process
    # is forked can leave that child a lock held forever (the C client's, an import's), and the child
    # then hangs on its first task. Without a predecessor this costs one query; with one, a few seconds.
    try:
        recover_predecessors(sender, incarnation, settings)
    except Exception:  # the reconciler recovers them once their heartbeat expires
        logging.getLogger(__name__).warning("could not recover %s's earlier runs", sender, exc_info=True)


@after_setup_logger.connect(weak=False)
@after_setup_task_logger.connect(weak=False)
def _log_format(logger: logging.Logger, **_kwargs: Any) -> None:
    """Celery's worker and task loggers get our format (REKKU_LOG_FORMAT) and the action ids."""
    from rekku.logs import install

    install(logger.handlers)


@worker_shutdown.connect(weak=False)
def _stop_heartbeat(**_kwargs: Any) -> None:
    _heartbeat_stop.set()


@worker_process_shutdown.connect(weak=False)
@worker_shutdown.connect(weak=False)
def _flush_metrics(**_kwargs: Any) -> None:
    """A pool process (or a threads/solo worker) sends its last second of run metrics before it exits."""
    from rekku.metrics import RUN_METRICS

    RUN_METRICS.flush()


app = make_app()
