"""Prometheus metrics, served by the ingress at ``GET /metrics`` (bearer token, like every route).

Workers and the reconciler run in other processes (often other machines), so what they measure is
added up in Redis hashes and read when Prometheus scrapes. The ingress's own counters live in its
process; ``rekku ingress --workers N`` runs N processes, so it puts them in prometheus-client's
multiprocess mode (:func:`use_multiprocess_dir`): each process writes its counters to files in a
private directory and every scrape, whichever process answers it, adds them all up. Queue depth and
the gauges operators alert on (rekku/metrics_gauges.py) are read from Redis and the action log at
scrape time, so they need no sharing.

A worker process adds its runs up in memory and sends them to the hashes named here every
``REKKU_METRICS_FLUSH_SECONDS`` (workers/run_metrics.py).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from rekku.broker import broker_client
from rekku.metrics_gauges import OperatorGauges
from rekku.pools import POOLS
from rekku.settings import Settings

log = logging.getLogger(__name__)

#: Redis hashes the workers add to.
RUNS_KEY, SUM_KEY, BUCKETS_KEY, RECONCILER_KEY = ("rekku:metrics:runs", "rekku:metrics:duration_sum",
                                                  "rekku:metrics:duration_bucket", "rekku:metrics:reconciler")
#: Histogram bucket bounds of action run durations, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

REGISTRY = CollectorRegistry()
ACCEPTED = Counter("rekku_actions_accepted", "Actions accepted by this ingress process", ["type"], registry=REGISTRY)
REJECTED = Counter("rekku_actions_rejected", "Actions rejected by this ingress process", ["type"], registry=REGISTRY)

#: The ``type`` label of rejected actions whose type no plugin declares: the model can invent any
#: number of types, and each label value is kept by the process for good.
UNKNOWN_TYPE = "(unknown)"


def _broker() -> redis.Redis:
    """The broker's Redis for a scrape (a short timeout: a scrape must not hang)."""
    return broker_client(timeout=2)


def count_submission(accepted: list[dict], rejected: list[dict], registry: Any) -> None:
    for item in accepted:
        ACCEPTED.labels(item["type"]).inc()
    for item in rejected:
        kind = item.get("type")
        if not kind:
            kind = "(none)"
        elif kind not in registry.actions and kind not in registry.disabled:
            kind = UNKNOWN_TYPE
        REJECTED.labels(kind).inc()


def count_reconciled(outcome: dict[str, int]) -> None:
    try:
        pipe = broker_client(timeout=2).pipeline()
        for reason, n in outcome.items():
            if n:
                pipe.hincrby(RECONCILER_KEY, reason, n)
        pipe.execute()
    except redis.RedisError:
        log.debug("could not record reconciler metrics", exc_info=True)


class _SharedCollector:
    """What workers and the broker know, read at scrape time."""

    def collect(self) -> Iterator[Any]:
        client = broker_client(timeout=2)
        try:
            depth = GaugeMetricFamily("rekku_queue_depth", "Messages waiting in each pool's queue", labels=["pool"])
            pipe = client.pipeline(transaction=False)
            for pool in POOLS:
                pipe.llen(pool)
            for pool, n in zip(POOLS, pipe.execute(), strict=True):
                depth.add_metric([pool], n)
            yield depth
            runs = CounterMetricFamily("rekku_action_runs", "Finished action runs", labels=["type", "status"])
            for key, n in client.hgetall(RUNS_KEY).items():
                kind, _, status = key.decode().rpartition("|")
                runs.add_metric([kind, status], int(n))
            yield runs
            yield self._durations(client)
            requeued = CounterMetricFamily("rekku_reconciler_requeued", "Actions re-enqueued by the reconciler",
                                           labels=["reason"])
            for reason, n in client.hgetall(RECONCILER_KEY).items():
                requeued.add_metric([reason.decode()], int(n))
            yield requeued
        except redis.RedisError as exc:
            log.warning("metrics from Redis unavailable: %s", exc)

    @staticmethod
    def _durations(client: redis.Redis) -> HistogramMetricFamily:
        family = HistogramMetricFamily("rekku_action_run_seconds", "Action run durations", labels=["type"])
        buckets: dict[str, dict[str, int]] = {}
        for key, n in client.hgetall(BUCKETS_KEY).items():
            kind, _, bound = key.decode().rpartition("|")
            buckets.setdefault(kind, {})[bound] = int(n)
        sums = {k.decode(): float(v) for k, v in client.hgetall(SUM_KEY).items()}
        for kind, counts in sorted(buckets.items()):
            ordered = [(str(b), counts.get(str(b), 0)) for b in BUCKETS] + [("+Inf", counts.get("+Inf", 0))]
            family.add_metric([kind], ordered, sums.get(kind, 0.0))
        return family


REGISTRY.register(_SharedCollector())
REGISTRY.register(OperatorGauges(_broker))

#: prometheus-client's own variable (not Rekku's: Rekku sets it, see :func:`use_multiprocess_dir`). It is
#: read when prometheus_client is imported, so it must be in the environment before the process starts.
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_multiprocess_registry: CollectorRegistry | None = None


def use_multiprocess_dir(settings: Settings, port: int) -> Path:
    """Called by ``rekku ingress --workers N`` before it starts its processes: a fresh private directory
    (``REKKU_HOME/metrics/ingress-<port>``, 0700, emptied: counts of an earlier run would otherwise be
    added to this one's) named in the environment the processes inherit."""
    parent = settings.home_dir / "metrics"
    parent.mkdir(mode=0o700, exist_ok=True)
    parent.chmod(0o700)
    path = parent / f"ingress-{port}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    os.environ[MULTIPROC_VARIABLE] = str(path)
    return path


def _registry() -> CollectorRegistry:
    """This process's counters alone, or (multiprocess mode) every process's, added up from their files."""
    global _multiprocess_registry
    if not os.environ.get(MULTIPROC_VARIABLE):
        return REGISTRY
    if _multiprocess_registry is None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(_SharedCollector())
        registry.register(OperatorGauges(_broker))
        _multiprocess_registry = registry
    return _multiprocess_registry


def render() -> bytes:
    return generate_latest(_registry())
