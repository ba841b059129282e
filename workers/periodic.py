"""Periodic work offered by plugins, run by celery beat (weather refresh, due events, reconciler).

A plugin offers ``periodic_tasks() -> {name: {"every": seconds, "run": callable, "pool": queue}}``;
each entry becomes the Celery task ``rekku.periodic.<plugin>.<name>`` on that queue and a beat
schedule entry. ``run`` takes no arguments and may be async (it then runs on the process loop).
A beat tick that is still waiting when the next one is due expires instead of piling up.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from celery import Celery
from rekku_workers import event_loop

from rekku.registry import Registry

log = logging.getLogger(__name__)


def _make_task(app: Celery, task_name: str, run: Any, every: float, queue: str) -> None:
    def periodic() -> Any:
        outcome = run()
        if inspect.isawaitable(outcome):
            outcome = event_loop.run(outcome, timeout=max(every * 2, 30))
        return outcome

    periodic.__name__ = task_name.rsplit(".", 1)[-1]
    app.task(periodic, name=task_name, queue=queue, acks_late=True, ignore_result=True,
             soft_time_limit=max(every * 2, 30) + 5, time_limit=max(every * 2, 30) + 15)


def register_periodic_tasks(app: Celery, registry: Registry) -> None:
    schedule = dict(app.conf.beat_schedule or {})
    for plugin_name, plugin in registry.plugins.items():
        offer = getattr(plugin, "periodic_tasks", None)
        if offer is None:
            continue
        try:
            entries = offer() or {}
        except Exception as exc:
            registry.errors.append(f"plugin {plugin_name}: periodic_tasks failed: {exc}")
            continue
        for name, entry in entries.items():
            task_name = f"rekku.periodic.{plugin_name}.{name}"
            every, queue = float(entry["every"]), entry.get("pool", "default")
            if task_name not in app.tasks:
                _make_task(app, task_name, entry["run"], every, queue)
            schedule[task_name] = {"task": task_name, "schedule": every, "options": {"queue": queue, "expires": every}}
    app.conf.beat_schedule = schedule
