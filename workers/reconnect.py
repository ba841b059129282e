"""After the broker connection was lost, give back what this worker had taken but no longer holds.

When its connection to Redis breaks (a Sentinel failover, a network cut, Redis restarted with its data),
Celery's consumer drops the messages it had prefetched but not started (``Consumer.on_close``: "the
broker may redeliver these tasks to another worker on reconnect"). Redis does not: their entries stay in
kombu's unacknowledged set, named as this live incarnation's (rekku_workers.owned_qos), so neither the
reconciler (the holder is alive) nor another worker takes them before the visibility timeout, an hour
by default. :class:`GiveBackOnReconnect`, a consumer bootstep, restores them to their queues as soon as
the connection is back, as kombu itself does when a channel closes cleanly.

Only deliveries made before the connection was lost are given back (kombu's unacknowledged index
holds each delivery's time, written by this process's clock), and none whose task still runs in the
pool: what the new connection delivers is this worker's, and a running action is not run twice. One
that was also left in its queue (the new primary never saw it taken) is delivered twice at worst, and
its second delivery finds the action final and skips it (rekku_workers.claim).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import bootsteps
from celery.worker import state

from rekku.broker import broker_client
from rekku.reconciler import UNACKED_INDEX_KEY, unacked
from rekku.worker_identity import worker_id

log = logging.getLogger(__name__)


class GiveBackOnReconnect(bootsteps.StartStopStep):
    """Remembers when the consumer lost its connection (the blueprint stops its steps to restart them)
    and, once it is connected again, restores the deliveries described in the module docstring."""

    label = "rekku give back on reconnect"
    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.lost_at: float | None = None

    def stop(self, parent: Any) -> None:
        self.lost_at = time.time()

    def shutdown(self, parent: Any) -> None:
        self.lost_at = None

    def start(self, parent: Any) -> None:
        lost_at, self.lost_at = self.lost_at, None
        if lost_at is None:  # the first connection
            return
        try:
            given = give_back(parent, worker_id(parent.hostname), lost_at)
        except (redis.RedisError, OSError) as exc:  # the visibility timeout still restores them
            log.warning("could not give back the deliveries held before the connection was lost: %s", exc)
            return
        if given:
            log.warning("the broker connection was lost: gave %d deliveries this worker had taken but not "
                        "started back to their queues", given)


def give_back(consumer: Any, owner: str, before: float) -> int:
    """Restore ``owner``'s unacknowledged deliveries made before ``before`` (epoch seconds) whose task
    is not running here; returns how many."""
    client = broker_client()
    running = {request.id for request in state.active_requests}
    mine = [d for d in unacked(client) if d.owner == owner and d.task_id not in running]
    if not mine:
        return 0
    pipe = client.pipeline(transaction=False)
    for delivery in mine:
        pipe.zscore(UNACKED_INDEX_KEY, delivery.tag)
    stale = [d.tag for d, at in zip(mine, pipe.execute(), strict=True) if at is not None and at < before]
    if not stale:
        return 0
    qos = consumer.connection.default_channel.qos
    for tag in stale:
        qos.restore_by_tag(tag, leftmost=True)  # in a WATCH transaction: restored once, whoever else tries
    return len(stale)
