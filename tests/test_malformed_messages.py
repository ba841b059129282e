"""Anything on a queue that is not a message of kombu's Redis transport (not JSON, not UTF-8, JSON
of another shape, a body that does not decode) is set aside by the worker that pops it, logged and
kept on the ``rekku:malformed`` list, instead of ending the worker: kombu raised it out of its event
loop ("Unrecoverable error: JSONDecodeError"), which stopped the node, and ``rekku up`` with it."""

from __future__ import annotations

import json

import redis

from tests.support import REDIS_HOST, REDIS_PORT, wait_until

GARBAGE = [
    b"not json",                      # kombu's json.loads fails
    b"\xff\xfe\x00garbage",           # not UTF-8: fails before the JSON
    b"[1, 2, 3]",                     # JSON, not an object
    b"{}",                            # an object without 'properties'
    b'{"properties": {}}',            # no delivery tag
    b'{"properties": "x", "body": "e30="}',
    b'{"properties": {"delivery_tag": "t1", "body_encoding": "base64"}, "body": "!!!not base64"}',
]


def test_items_that_are_not_messages_are_set_aside_and_the_worker_goes_on(make_stack) -> None:
    stack = make_stack()
    worker = stack.start_worker("default", concurrency=1, node="sturdy")
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    for item in GARBAGE:
        client.lpush("default", item)
    # an action after the garbage, on the same queue: it runs, on the same worker
    assert stack.run("echo", {"text": "still here"})["status"] == "succeeded"
    kept = wait_until(lambda: len(client.lrange("rekku:malformed", 0, -1)) == len(GARBAGE)
                      and client.lrange("rekku:malformed", 0, -1), timeout=30, what="every item set aside")
    assert worker.poll() is None, stack.worker_logs()[-3000:]
    entries = [json.loads(entry) for entry in kept]
    assert sorted(e["queue"] for e in entries) == ["default"] * len(GARBAGE)
    # each item kept whole (bytes that are not UTF-8 as their escapes), with what was wrong with it
    assert {e["item"] for e in entries} == {item.decode("utf-8", "backslashreplace") for item in GARBAGE}
    assert all(e["error"] and e["at"] for e in entries), entries
    logs = stack.worker_logs()
    assert logs.count("set aside an item of queue 'default' that is not a message") == len(GARBAGE), logs[-3000:]
    assert "Unrecoverable error" not in logs
    assert client.llen("default") == 0
