"""Adversarial follow-ups to three changes: items on a queue that are not messages
(workers/malformed.py), another chat's events (plugins/event), the SQLite checkpointer (rekku/db.py).
Black-box: real Redis, real workers, real HTTP."""

from __future__ import annotations

import base64
import json
import uuid

import redis

from tests.support import REDIS_HOST, REDIS_PORT, wait_until

_ROUTE = {"exchange": "", "routing_key": "default"}
_JSON = {"content-type": "application/json", "content-encoding": "utf-8"}


def _envelope(properties: dict | None = None, **top: object) -> bytes:
    """A kombu envelope as a stray producer might write it: JSON, with a delivery tag, and whatever else."""
    props = {"delivery_tag": str(uuid.uuid4()), "delivery_info": _ROUTE, "body_encoding": "base64",
             **(properties or {})}
    return json.dumps({"properties": props, **top}).encode()


def _body(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _task(**headers: object) -> dict:
    return {"task": "rekku.action.echo", "id": str(uuid.uuid4()), **headers}


#: Envelopes that decode (JSON objects with properties and a delivery tag) but that kombu's QoS or
#: Celery's consumer cannot take: each ended the worker ("Unrecoverable error"), and most were put back
#: on the queue as the worker died, so they ended every worker of the pool in turn.
POISON = {
    "no delivery_info": json.dumps({"properties": {"delivery_tag": "t-1"}}).encode(),
    "delivery_info not an object": _envelope({"delivery_info": "x"}),
    "delivery tag a list": _envelope({"delivery_tag": ["x"]}),
    "delivery tag a number": _envelope({"delivery_tag": 5}),
    "no body, no headers": _envelope(),
    "unknown task, no id": _envelope(headers={"task": "nope"}, body=_body([[], {}, {}]), **_JSON),
    "known task, no body": _envelope(headers=_task()),
    "task name a list": _envelope(headers={"task": ["x"], "id": "x"}, body=_body([[], {}, {}]), **_JSON),
    "task id a list": _envelope(headers=_task(id=["x"]), body=_body([[], {}, {}]), **_JSON),
    "body an object": _envelope(headers=_task(), body=_body({}), **_JSON),
    "body too short": _envelope(headers=_task(), body=_body([1]), **_JSON),
    "body without a content type": _envelope(headers=_task(), body=_body([[], {}, {}])),
    "time limit a string": _envelope(headers=_task(timelimit="x"), body=_body([[], {}, {}]), **_JSON),
}


def test_envelopes_that_decode_but_are_no_task_are_set_aside_too(make_stack) -> None:
    stack = make_stack()
    worker = stack.start_worker("default", concurrency=1, node="poisoned")
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    for item in POISON.values():
        client.lpush("default", item)
    assert stack.run("echo", {"text": "after the poison"})["status"] == "succeeded"
    kept = wait_until(lambda: len(client.lrange("rekku:malformed", 0, -1)) >= len(POISON)
                      and client.lrange("rekku:malformed", 0, -1), timeout=30, what="every envelope set aside")
    assert worker.poll() is None, stack.worker_logs()[-3000:]
    logs = stack.worker_logs()
    assert "Unrecoverable error" not in logs and "Connection to broker lost" not in logs, logs[-3000:]
    entries = [json.loads(entry) for entry in kept]
    assert all(e["queue"] == "default" and e["error"] for e in entries), entries
    assert len(entries) == len(POISON), entries
    # nothing of them left behind: not in the queue, not unacknowledged (a restart would not find them).
    # Waited for: the echo's own entry goes a moment after its run is logged (its acknowledgement rides
    # with the next delivery or a flush within 20 ms); a set-aside item's would stay for an hour.
    assert client.llen("default") == 0
    wait_until(lambda: client.hlen("unacked") == 0, timeout=10, interval=0.1,
               what="no unacknowledged entry left")


# ----------------------------------------------------------------------------- another chat's events
TRAINER = {"interface": "telegram_bot", "chat_id": "-100", "user_id": "42", "username": "boss"}


def test_naming_ones_own_chat_id_does_not_list_the_same_id_on_another_interface(make_stack) -> None:
    """Chat ids are per interface (Discord's 123 is not Telegram's): a user of the outbox chat "555"
    who names their own chat in list_events must not see the events of Telegram's chat "555". Leaving
    the chat out listed only the outbox's; naming it (the check lets one's own chat through) dropped
    the interface and listed every interface's chat "555", scheduled actions included."""
    stack = make_stack(TELEGRAM_BOT_TOKEN="123:fake", TELEGRAM_API_URL="http://127.0.0.1:9")
    stack.start_worker("default", concurrency=1, node="events")
    secret = stack.run("event", {"description": "payroll run", "in": "in 1 hour",
                                 "target": {"interface": "telegram_bot", "chat_id": "555"},
                                 "actions": [{"type": "echo", "payload": {"text": "pay"}}]}, TRAINER)
    assert secret["status"] == "succeeded", secret
    outsider = {"interface": "outbox", "chat_id": "555", "user_id": "666", "username": "mallory"}
    for payload in ({}, {"chat_id": "555"}, {"chat_id": 555}, {"chat_id": "555", "interface": "outbox"}):
        listed = stack.run("list_events", payload, outsider)
        assert listed["status"] == "succeeded", (payload, listed)
        assert listed["result"]["events"] == [], (payload, listed["result"])
    # the trainer, naming the chat from elsewhere, still reaches it
    found = stack.run("list_events", {"chat_id": "555", "interface": "telegram_bot"}, TRAINER)["result"]["events"]
    assert [e["id"] for e in found] == [secret["result"]["id"]]


def test_a_protocol_1_body_of_another_shape_does_not_end_the_worker(make_stack) -> None:
    """A protocol-1 task message (no 'task' header; the task named in its JSON body) is decoded by
    Celery's handler itself, before any strategy: a body whose 'task' is a list (unhashable in the
    strategies' lookup) or an unknown task without an 'id' (Celery's on_unknown_task reads it) raised
    out of the event loop, and the item went back on its queue for the next worker. The guard around
    the handler sets it aside and rejects it; no body is decoded outside Celery's own accept check."""
    stack = make_stack()
    worker = stack.start_worker("default", concurrency=1, node="proto1")
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    for body in ({"task": ["x"]}, {"task": "nope"}):
        client.lpush("default", _envelope(body=_body(body), **_JSON))
    assert stack.run("echo", {"text": "after"}, timeout=10)["status"] == "succeeded"
    assert worker.poll() is None
    assert client.llen("rekku:malformed") == 2
