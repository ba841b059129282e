"""Task events (what Flower shows) from a real worker: every task's received, started and succeeded
events reach a listener, and they are published several to a PUBLISH (rekku_workers.task_events), not
one or two per turn of the worker's event loop."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from celery import Celery

from tests.support import REDIS_HOST, REDIS_PORT

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

TASKS = 60


def test_every_task_event_arrives_in_fewer_publishes(stack) -> None:  # noqa: ANN001 - the stack fixture
    seen: dict[str, set[str]] = {}
    app = Celery(broker=stack.broker_url)
    connection = app.connection()

    def record(event: dict) -> None:
        if event.get("uuid"):
            seen.setdefault(event["uuid"], set()).add(event["type"])

    receiver = app.events.Receiver(connection, handlers={"*": record})
    listening = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False},
                                 daemon=True)
    listening.start()
    time.sleep(1)  # subscribed before anything is sent (pub/sub keeps nothing for late listeners)

    monitor_client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    publishes = 0
    ids: list[str] = []
    with monitor_client.monitor() as monitor:
        ids = [a["id"] for a in stack.submit([{"type": "echo", "payload": {"n": i}} for i in range(TASKS)])["accepted"]]
        deadline = time.monotonic() + 120
        for command in monitor.listen():
            assert time.monotonic() < deadline, f"only {sum(1 for i in ids if _all_seen(seen, i))} tasks' events came"
            text = command["command"]
            if command.get("db") == stack.redis_db and text.startswith("PUBLISH ") and "task.multi" in text:
                publishes += 1
            if all(_all_seen(seen, i) for i in ids):
                break
    receiver.should_stop = True
    connection.release()
    for action_id in ids:
        assert stack.wait_action(action_id)["status"] == "succeeded"
    # 3 events per task: Celery's per-turn flush needed 1.6-1.8 PUBLISH per task; batched, several
    # tasks' events share one (a quick echo runs in a few ms, the batch waits up to 20 ms)
    assert publishes <= TASKS, f"{publishes} PUBLISH for {3 * TASKS} task events"


def _all_seen(seen: dict[str, set[str]], task_id: str) -> bool:
    return {"task-received", "task-started", "task-succeeded"} <= seen.get(task_id, set())
