"""Prometheus metrics, served by the ingress at ``GET /metrics`` (bearer token, like every route).

Workers and the reconciler run in other processes (often other machines), so what they measure is
added up in Redis hashes and read when Prometheus scrapes; the ingress's own counters live in its
process. Queue depth is read from Redis at scrape time.

A worker process adds its runs up in memory and sends them every ``REKKU_METRICS_FLUSH_SECONDS``
(:class:`RunMetrics`):
a pipeline of up to 17 Redis commands per action used to be about half of a no-op action's time in
the worker, on the same Redis as the broker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
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


#: The ``type`` label of rejected actions whose type no plugin declares: the model can invent any
#: number of types, and each label value is kept by the process for good.
UNKNOWN_TYPE = "(unknown)"


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
        pipe = _redis().pipeline()
        for reason, n in outcome.items():
            if n:
                pipe.hincrby(RECONCILER_KEY, reason, n)
        pipe.execute()
    except redis.RedisError:
        log.debug("could not record reconciler metrics", exc_info=True)


class RunMetrics:
    """This process's action runs since its last flush, by type: counted in memory on the action's path
    and added to the Redis hashes in one MULTI/EXEC every ``REKKU_METRICS_FLUSH_SECONDS`` by a daemon
    thread, and on worker shutdown. What a flush could not send stays for the next one; a SIGKILLed
    process loses at most its last interval of metrics, never an action."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a pool child starts empty, with its own thread

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._counts: Tally[tuple[str, str]] = Tally()
        self._sums: Tally[str] = Tally()
        self._flusher: threading.Thread | None = None

    def add(self, kind: str, status: str, elapsed: float) -> None:
        with self._lock:
            self._counts[(RUNS_KEY, f"{kind}|{status}")] += 1
            self._sums[kind] += elapsed
            for bound in BUCKETS:
                if elapsed <= bound:
                    self._counts[(BUCKETS_KEY, f"{kind}|{bound}")] += 1
            self._counts[(BUCKETS_KEY, f"{kind}|+Inf")] += 1
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_forever, name="rekku-metrics", daemon=True)
                self._flusher.start()

    def _flush_forever(self) -> None:
        interval = get_settings().metrics_flush_seconds
        while True:
            time.sleep(interval)
            self.flush()

    def flush(self) -> None:
        """Send what was counted since the last flush (all of it or, if Redis is away, none of it)."""
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = Tally(), Tally()
        if not counts and not sums:
            return
        try:
            pipe = _redis().pipeline(transaction=True)
            for (key, field), n in counts.items():
                pipe.hincrby(key, field, n)
            for kind, total in sums.items():
                pipe.hincrbyfloat(SUM_KEY, kind, total)
            pipe.execute()
        except redis.RedisError:
            log.debug("could not send run metrics; keeping them for the next flush", exc_info=True)
            with self._lock:
                self._counts.update(counts)
                self._sums.update(sums)


RUN_METRICS = RunMetrics()


class MetricsHook(Hook):
    """Counts outcomes and run durations by action type (sent to Redis by :data:`RUN_METRICS`, read by
    the ingress's /metrics)."""

    def before_run(self, run: Run) -> None:
        run.started_monotonic = time.perf_counter()

    def _record(self, run: Run, status: str) -> None:
        started = run.started_monotonic  # None: a hook before this one skipped or refused the run
        RUN_METRICS.add(run.spec.type, status, 0.0 if started is None else time.perf_counter() - started)

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
