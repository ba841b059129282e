"""The one place that turns a logged action into a Celery message (used by the ingress and retries)."""

from __future__ import annotations

import logging
from typing import Any

from rekku.action_log import NewRun
from rekku.celery_app import app
from rekku.redact import kwargs_repr

log = logging.getLogger(__name__)

#: How hard to try the broker before giving up on a publish.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}


def enqueue(runs: list[NewRun], batch_id: str, publisher: Any = None) -> list[str]:
    """Publish one ``rekku.action.<type>`` message per run, task id = action id.

    Published by name (``send_task``): the ingress holds no task objects (rekku.celery_app), and the
    message is the one a registered task's ``apply_async`` would send, with the queue given here.

    Returns the ids that could not be published (the broker is unreachable)."""
    failed: list[str] = []
    sender = publisher if publisher is not None else app
    try:
        with sender.producer_or_acquire() as producer:
            for run in runs:
                if failed:
                    failed.append(run.id)
                    continue
                kwargs = {"action_id": run.id, "payload": run.payload, "context": {**run.context, "batch_id": batch_id}}
                try:
                    # kwargsrepr: what task events (Flower) show, with secret-looking fields hidden
                    sender.send_task(f"rekku.action.{run.type}", kwargs=kwargs, kwargsrepr=kwargs_repr(kwargs),
                                  task_id=run.id, queue=run.queue, producer=producer, retry=True,
                                  retry_policy=RETRY_POLICY, ignore_result=True)  # as the task declares
                except Exception:
                    log.exception("could not publish action %s", run.id)
                    failed.append(run.id)
    except Exception:
        log.exception("could not reach the broker")
        return [r.id for r in runs if r.id not in failed] + failed
    return failed
