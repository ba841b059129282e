"""Prometheus metrics, served by the ingress at ``GET /metrics`` (bearer token, like every route).

Workers and the reconciler run in other processes (often other machines), so what they measure is
added up in Redis hashes (one pipelined round trip per action) and read when Prometheus scrapes;
the ingress's own counters live in its process. Queue depth is read from Redis at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from rekku.hooks import Hook, Run
from rekku.settings import get_settings

log = logging.getLogger(__name__)

#: Redis hashes the workers add to.
RUNS_KEY, SUM_KEY, BUCKETS_KEY, RECONCILER_KEY = ("rekku:metrics:runs", "rekku:metrics:duration_sum",
                                                  "rekku:metrics:duration_bucket", "rekku:metrics:reconciler")
#: Histogram bucket bounds of action run durations, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

REGISTRY = CollectorRegistry()
ACCEPTED = Counter("rekku_actions_accepted", "Actions accepted by this ingress process", ["type"], registry=REGISTRY)
REJECTED = Counter("rekku_actions_rejected", "Actions rejected by this ingress process", ["type"], registry=REGISTRY)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(get_settings().resolved_broker_url(), socket_timeout=2)
    return _client


def count_submission(accepted: list[dict], rejected: list[dict]) -> None:
    for item in accepted:
        ACCEPTED.labels(item["type"]).inc()
    for item in rejected:
        REJECTED.labels(item.get("type") or "(none)").inc()


def count_reconciled(outcome: dict[str, int]) -> None:
    try:
        pipe = _redis().pipeline()
        for reason, n in outcome.items():
            if n:
                pipe.hincrby(RECONCILER_KEY, reason, n)
        pipe.execute()
    except redis.RedisError:
        log.debug("could not record reconciler metrics", exc_info=True)


class MetricsHook(Hook):
    """Counts outcomes and run durations by action type (in Redis, read by the ingress's /metrics)."""

    def before_run(self, run: Run) -> None:
        run.extras["t0"] = time.perf_counter()

    def _record(self, run: Run, status: str) -> None:
        elapsed = time.perf_counter() - run.extras.get("t0", time.perf_counter())
        kind = run.spec.type
        try:
            pipe = _redis().pipeline(transaction=False)
            pipe.hincrby(RUNS_KEY, f"{kind}|{status}", 1)
            pipe.hincrbyfloat(SUM_KEY, kind, elapsed)
            for bound in BUCKETS:
                if elapsed <= bound:
                    pipe.hincrby(BUCKETS_KEY, f"{kind}|{bound}", 1)
            pipe.hincrby(BUCKETS_KEY, f"{kind}|+Inf", 1)
            pipe.execute()
        except redis.RedisError:
            log.debug("could not record run metrics", exc_info=True)

    def after_success(self, run: Run, result: Any) -> None:
        self._record(run, "succeeded")

    def after_failure(self, run: Run, error: str) -> None:
        self._record(run, "failed")


class _SharedCollector:
    """What workers and the broker know, read at scrape time."""

    def collect(self) -> Iterator[Any]:
        from workers.pools import POOLS

        client = _redis()
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


def render() -> bytes:
    return generate_latest(REGISTRY)
