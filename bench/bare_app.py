"""The two baselines: Celery apps with two trivial tasks each, and nothing of Rekku in their tasks.

- ``bare`` (this module's ``app``) loads the very ``rekku.celeryconfig`` module ``rekku.celery_app``
  uses (JSON only, acks_late, reject-on-worker-lost, task events, the same broker and result backend),
  and its worker is started with Rekku's own worker arguments: the ratio against it is what Rekku's
  code adds on top of Rekku's Celery configuration.
- ``plain`` (``plain_app``) is what a user would write instead of Rekku: a fresh ``Celery(broker=...)``
  with only ``task_acks_late``, ``task_reject_on_worker_lost``, JSON and task events set, every other
  setting Celery's default, and a plain ``celery worker -E`` (prefork). The issue's goals are judged
  against this one.

Both read the broker from ``REKKU_BROKER_URL``, which the bench sets before importing this module.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import redis
from celery import Celery


@dataclass(frozen=True)
class Baseline:
    """One baseline app: its queue, its Redis keys and its two tasks."""

    name: str
    app: Celery
    queue: str

    @property
    def count_key(self) -> str:
        return f"bench:{self.name}:count"

    @property
    def done_key(self) -> str:
        return f"bench:{self.name}:done_at"

    @property
    def stamp_key(self) -> str:
        return f"bench:stamps:{self.name}"

    @property
    def noop(self):  # noqa: ANN201 - a Celery task
        return self.app.tasks[f"bench.{self.name}.noop"]

    @property
    def stamp(self):  # noqa: ANN201 - a Celery task
        return self.app.tasks[f"bench.{self.name}.stamp"]


_clients: dict[tuple[int, str], redis.Redis] = {}


def _redis(url: str) -> redis.Redis:
    """One connection per process and URL, made again after a fork."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url)
    return _clients[key]


def _with_tasks(name: str, app: Celery, queue: str) -> Baseline:
    base = Baseline(name, app, queue)
    app.conf.task_default_queue = queue
    app.conf.task_routes = {f"bench.{name}.*": {"queue": queue}}

    @app.task(name=f"bench.{name}.noop", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
    def noop(target: int) -> None:
        """Count completions; the one that reaches ``target`` records the time (the drain's end)."""
        client = _redis(app.conf.broker_url)
        if client.incr(base.count_key) == target:
            client.set(base.done_key, repr(time.time()))

    @app.task(name=f"bench.{name}.stamp", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
    def stamp() -> None:
        """Record the task's start time, like the ``bench_stamp`` plugin's handler."""
        started = time.time()
        _redis(app.conf.broker_url).rpush(base.stamp_key, repr(started))

    return base


def _bare_app() -> Celery:
    app = Celery("bare")
    app.config_from_object("rekku.celeryconfig")
    return app


def _plain_app() -> Celery:
    app = Celery("plain", broker=os.environ.get("REKKU_BROKER_URL", "redis://127.0.0.1:6379/14"))
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, task_serializer="json",
                    result_serializer="json", accept_content=["json"], worker_send_task_events=True,
                    task_send_sent_event=True)
    return app


BARE = _with_tasks("bare", _bare_app(), "bare")
PLAIN = _with_tasks("plain", _plain_app(), "plain")
#: ``celery -A bench.bare_app`` finds ``app``: the bare baseline; ``-A bench.bare_app:plain_app`` the plain one.
app, plain_app = BARE.app, PLAIN.app
BASELINES = {"bare": BARE, "plain": PLAIN}
