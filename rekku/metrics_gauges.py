"""The gauges operators alert on, computed when Prometheus scrapes (nothing to keep in step between
ingress processes): how old the oldest queued action of each pool is, how many actions are stuck, how
many failed for good (dead letters), and how many workers are up for each pool and each node's own queue.

Each scrape costs three indexed queries and two Redis round trips, whatever the size of the action log:

* ``rekku_oldest_queued_action_seconds{pool}``: seconds since the oldest ``queued`` action of each
  queue (a pool, or a node's own ``terminal.<node>``) was queued (accepted, retried or re-enqueued:
  ``updated_at``); read through the (status, updated_at) index, so it reads the queued rows only.
* ``rekku_stuck_actions{status}``: unfinished actions untouched for longer than REKKU_RECONCILE_GRACE,
  the reconciler's notion of stuck (``rekku status --stuck`` lists them); a range of that index.
* ``rekku_dead_letters``: failed actions (``GET /v1/dead-letters``); a count over that index.
* ``rekku_workers_up{pool}``: live workers of each pool (their heartbeat key exists), and 1 for each
  live node's own queue (``terminal.<node>``). Workers are found in the sorted set their heartbeats
  add to (rekku.worker_identity.WORKERS_KEY), never by scanning the broker's keys (results live there too).

Every pool of rekku.pools always has a sample (0 when nothing is there), so an alert on a pool with no
worker does not depend on a sample that went missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily

from rekku.action_log import stuck_condition
from rekku.db import get_engine
from rekku.models import FAILED, QUEUED, RUNNING, ActionRun, utcnow
from rekku.pools import POOLS
from rekku.settings import get_settings
from rekku.worker_identity import HEARTBEAT_PREFIX, WORKERS_KEPT_SECONDS, WORKERS_KEY

log = logging.getLogger(__name__)


def live_workers(client: redis.Redis) -> list[str]:
    """The workers (``pool@node``) whose heartbeat key exists now."""
    names = sorted(n.decode() for n in client.zrangebyscore(WORKERS_KEY, time.time() - WORKERS_KEPT_SECONDS, "+inf"))
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(HEARTBEAT_PREFIX + name)
    return [name for name, up in zip(names, pipe.execute(), strict=True) if up]


def workers_up(workers: list[str]) -> dict[str, int]:
    """Live workers per queue: each pool's (0 when none) and each live node's own queue."""
    up = dict.fromkeys(POOLS, 0)
    for worker in workers:
        pool, _, node = worker.partition("@")
        spec = POOLS.get(pool)
        if spec is None or not node:
            continue
        up[pool] += 1
        if spec.node_queue:
            up[f"{pool}.{node}"] = up.get(f"{pool}.{node}", 0) + 1
    return up


class OperatorGauges:
    """A Prometheus collector of the gauges above; ``broker`` gives the broker's Redis client."""

    def __init__(self, broker: Callable[[], redis.Redis]) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        yield from self._from_action_log()
        try:
            up = workers_up(live_workers(self.broker()))
        except redis.RedisError as exc:
            log.warning("workers up unavailable: %s", exc)
            return
        family = GaugeMetricFamily("rekku_workers_up", "Live workers of each pool, and of each node's own queue",
                                   labels=["pool"])
        for pool, n in sorted(up.items()):
            family.add_metric([pool], n)
        yield family

    @staticmethod
    def _from_action_log() -> Iterator[Any]:
        runs = ActionRun.__table__
        try:
            with get_engine().connect() as conn:
                oldest = conn.execute(sa.select(runs.c.queue, sa.func.min(runs.c.updated_at))
                                      .where(runs.c.status == QUEUED).group_by(runs.c.queue)).all()
                stuck = dict(conn.execute(sa.select(runs.c.status, sa.func.count())
                                          .where(stuck_condition(get_settings().reconcile_grace)).group_by(runs.c.status)).all())
                dead = conn.execute(sa.select(sa.func.count()).select_from(runs).where(runs.c.status == FAILED)
                                    ).scalar_one()
        except sa.exc.SQLAlchemyError as exc:
            log.warning("gauges from the action log unavailable: %s", exc)
            return
        now = utcnow()
        ages = dict.fromkeys(POOLS, 0.0)
        for queue, since in oldest:
            ages[queue] = max(0.0, (now - since).total_seconds()) if since is not None else 0.0
        family = GaugeMetricFamily("rekku_oldest_queued_action_seconds",
                                   "Seconds the oldest queued action of each queue has waited (0: none waits)",
                                   labels=["pool"])
        for queue, age in sorted(ages.items()):
            family.add_metric([queue], age)
        yield family
        family = GaugeMetricFamily("rekku_stuck_actions", "Unfinished actions untouched for longer than "
                                   "REKKU_RECONCILE_GRACE (rekku status --stuck)", labels=["status"])
        for status in (QUEUED, RUNNING):
            family.add_metric([status], int(stuck.get(status, 0)))
        yield family
        yield GaugeMetricFamily("rekku_dead_letters", "Actions that failed for good (GET /v1/dead-letters)",
                                value=int(dead))
