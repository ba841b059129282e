"""The baseline: a bare Celery app with Rekku's own Celery settings and two trivial tasks.

It loads the same ``rekku.celeryconfig`` module as ``rekku.celery_app`` (JSON only, acks_late,
reject-on-worker-lost, task events, the same broker and result backend), so the ratios the bench
prints measure what Rekku adds on top of Celery, not a difference in Celery configuration.
Its worker is started with the same pool, concurrency and prefetch as the Rekku worker
(see ``bench.stack.bare_worker_argv``). It imports nothing of Rekku but its settings.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

#: The queue the bare worker consumes (Rekku's worker consumes ``default``).
QUEUE = "bare"
#: Redis keys the bare tasks write; the bench resets them before each measurement.
COUNT_KEY, DONE_KEY, STAMP_KEY = "bench:bare:count", "bench:bare:done_at", "bench:stamps:bare"

app = Celery("bare")
app.config_from_object("rekku.celeryconfig")
app.conf.task_default_queue = QUEUE
app.conf.task_routes = {"bench.*": {"queue": QUEUE}}

_client: redis.Redis | None = None
_client_pid: int | None = None


def _redis() -> redis.Redis:
    """One connection per process, made again after a fork."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client, _client_pid = redis.Redis.from_url(app.conf.broker_url), os.getpid()
    return _client


@app.task(name="bench.noop", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def noop(target: int) -> None:
    """Count completions; the one that reaches ``target`` records the time (the drain's end)."""
    if _redis().incr(COUNT_KEY) == target:
        _redis().set(DONE_KEY, repr(time.time()))


@app.task(name="bench.stamp", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def stamp() -> None:
    """Record the task's start time, like the ``bench_stamp`` plugin's handler."""
    started = time.time()
    _redis().rpush(STAMP_KEY, repr(started))
