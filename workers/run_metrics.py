"""A worker's side of the metrics: its action runs, counted in memory and added to the Redis hashes the
ingress reads at scrape time (rekku.metrics).

A pipeline of up to 17 Redis commands per action used to be about half of a no-op action's time in
the worker, on the same Redis as the broker; so a process adds its runs up and sends them every
``REKKU_METRICS_FLUSH_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from typing import Any

import redis
from rekku_workers.hooks import Hook, Run

from rekku.broker import broker_client
from rekku.metrics import BUCKETS, BUCKETS_KEY, RUNS_KEY, SUM_KEY
from rekku.settings import get_settings

log = logging.getLogger(__name__)


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
            pipe = broker_client(timeout=2).pipeline(transaction=True)
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
