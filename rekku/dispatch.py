"""The one place that turns a logged action into a Celery message (used by the ingress and retries)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from rekku import held
from rekku.action_log import NewRun
from rekku.celery_app import app
from rekku.redact import kwargs_repr

log = logging.getLogger(__name__)

#: How hard to try the broker before giving up on a publish.
RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 2}
#: Redis commands one pipeline carries at most (a message and its task-sent event are two): a request
#: holds at most REKKU_MAX_ACTIONS_PER_REQUEST actions, so a large one is sent in a few pipelines.
BATCH_COMMANDS = 1000


def _batch(producer: Any) -> contextlib.AbstractContextManager:
    """kombu's publish batch (5.7+): the messages and their task-sent events go out in one Redis
    pipeline when the producer's context ends, instead of one round trip each. A transport without it
    publishes each message at once, as before."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=BATCH_COMMANDS) if batch is not None else contextlib.nullcontext()


def enqueue(runs: list[NewRun], batch_id: str, publisher: Any = None) -> list[str]:
    """Publish one ``rekku.action.<type>`` message per run, task id = action id, all of them in one
    publish batch (one Redis round trip for a request's actions, the held counts (rekku.held) ahead of
    the messages in it).

    Published by name (``send_task``): the ingress holds no task objects (rekku.celery_app), and the
    message is the one a registered task's ``apply_async`` would send, with the queue given here.

    Returns the ids that could not be published (the broker is unreachable). A batch that fails when
    it is sent counts as unsent as a whole: its actions are marked failed by the caller, and a message
    of it that reached Redis anyway finds its action final and does not run."""
    sender = publisher if publisher is not None else app
    try:
        with sender.producer_or_acquire() as producer:
            try:
                with _batch(producer):
                    _count_up(producer, runs)
                    _publish(sender, producer, runs, batch_id)
            except Exception:
                _count_down(_redis_of(producer), runs)
                raise
    except Exception:
        log.exception("could not publish the %d actions of batch %s: the broker is unreachable", len(runs), batch_id)
        return [r.id for r in runs]
    return []


def _redis_of(producer: Any) -> Any:
    """The Redis client of a producer's channel (None for another transport, or no producer)."""
    return getattr(getattr(producer, "channel", None), "client", None)


def _count_up(producer: Any, runs: list[NewRun]) -> None:
    """Count each message as held (rekku.held) before it exists.

    Inside kombu's publish batch the counts go first into the batch's own pipeline, which Redis runs
    in order, so they are counted before any message of the batch can be taken, and the request pays
    no round trip of its own for them (a tenth of a 5-action request's ingress time in py-spy). Without
    a batch (another kombu, or a transport without one) they take a round trip of their own first."""
    client = _redis_of(producer)
    if client is None:
        return
    session = _batch_session(producer)
    pipe = session.pipeline if session is not None else client.pipeline(transaction=False)
    for run in runs:
        held.count_up(pipe, run.queue, [run.id])
    if session is not None:
        session._buffered += len(runs)  # what the batch flushes: kombu counts the commands it queued
    else:
        pipe.execute()


def _batch_session(producer: Any) -> Any:
    """The Redis pipeline session of the producer's open publish batch (kombu 5.7's
    ``_ProducerBatchState`` and ``PublishBatch``, private: pinned by ``kombu<5.8``), or None."""
    state = getattr(getattr(producer, "_batch_local", None), "current", None)
    get_session = getattr(state, "_get_session", None)
    if get_session is None:
        return None
    session = get_session(producer.channel)
    if session is None or not hasattr(session, "pipeline") or not isinstance(getattr(session, "_buffered", None), int):
        return None
    return session


def _count_down(client: Any, runs: list[NewRun]) -> None:
    """Undo :func:`_count_up` after a failed publish, if the broker still answers."""
    if client is None:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for run in runs:
            held.count_down(pipe, run.queue, run.id)
        pipe.execute()
    except Exception:
        log.warning("could not undo the held counts of %d unpublished actions (the reconciler repairs them)",
                    len(runs))


def _publish(sender: Any, producer: Any, runs: list[NewRun], batch_id: str) -> None:
    with _batch(producer):  # within enqueue's batch, the same one (kombu nests them)
        for run in runs:
            kwargs = {"action_id": run.id, "payload": run.payload, "context": {**run.context, "batch_id": batch_id}}
            # kwargsrepr: what task events (Flower) show, with secret-looking fields hidden
            sender.send_task(f"rekku.action.{run.type}", kwargs=kwargs, kwargsrepr=kwargs_repr(kwargs),
                             task_id=run.id, queue=run.queue, producer=producer, retry=True,
                             retry_policy=RETRY_POLICY, ignore_result=True,  # as the task declares
                             declare=_declare(sender, producer, run.queue))


def _declare(sender: Any, producer: Any, queue: str) -> list | None:
    """``[]`` (declare nothing) when the producer's connection has declared ``queue`` already, else None
    (Celery declares it). This is kombu's own cache test (``maybe_declare``: the entity's hash in the
    connection's ``declared_entities``, emptied when it reconnects), made before kombu would bind a copy
    of the queue to the channel to make it, which was a tenth of a publish."""
    declared = getattr(getattr(producer, "connection", None), "declared_entities", None)
    queues = getattr(getattr(sender, "amqp", None), "queues", None)
    known = queues.get(queue) if declared is not None and queues is not None else None
    return [] if known is not None and hash(known) in declared else None
