"""The broker's held counts (rekku.held): each action message counted up before it is published and
down when a worker acknowledges it, so the reconciler can judge a long queue without reading it.

Real Redis and real workers; the reconciler's judgement (rekku.reconciler.held_of) is called in-process
against real Redis with messages pushed the way kombu pushes them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis

from rekku import held
from rekku.reconciler import UNACKED_KEY, held_of
from tests.support import REDIS_HOST, REDIS_PORT, Stack, claim_redis_db, release_redis_db, wait_until


def _counts(stack: Stack, queue: str = "default") -> dict[str, int]:
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    return {k.decode(): int(v) for k, v in client.hgetall(held.key(queue)).items()}


# ----------------------------------------------------------------------------- counts follow messages
def test_a_message_is_counted_while_it_waits_and_not_once_acknowledged(make_stack) -> None:
    stack = make_stack()
    first = stack.submit([{"type": "echo", "payload": {"text": "waiting"}}])["accepted"][0]["id"]
    assert _counts(stack) == {first: 1}  # counted before it was published, no worker yet
    stack.start_worker("default", concurrency=1)
    assert stack.wait_action(first)["status"] == "succeeded"
    wait_until(lambda: first not in _counts(stack), what="the count to go with the acknowledgement")
    # a retried action stays counted while its retry waits, and goes once it finally succeeds
    run = stack.run("tk_flaky", {"succeed_on": 3}, timeout=60)
    assert run["status"] == "succeeded" and run["attempts"] == 3
    wait_until(lambda: _counts(stack) == {}, what="no count left behind")


def test_counts_ride_ahead_of_their_messages_in_the_publish_round_trip(make_stack) -> None:
    """The ingress sends a request's held counts in the same pipeline as its messages, ahead of them
    (Redis runs a pipeline in order, so no worker can take a message before its count): seen with
    MONITOR, from the server's side. A count sent on its own round trip, or after its message, fails it."""
    stack = make_stack()
    monitor_client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    seen: list[dict] = []
    with monitor_client.monitor() as monitor:
        ids = [a["id"] for a in stack.submit([{"type": "echo", "payload": {"n": i}} for i in range(3)])["accepted"]]
        for command in monitor.listen():
            if command.get("db") == stack.redis_db:
                seen.append(command)
            if sum(1 for c in seen if c["command"].startswith("LPUSH default ")) == len(ids):
                break
    counts = [c for c in seen if c["command"].startswith(f"HINCRBY {held.key('default')} ")]
    pushes = [c for c in seen if c["command"].startswith("LPUSH default ")]
    assert {c["command"].split()[2] for c in counts} == set(ids)
    connection = {(c["client_address"], c["client_port"]) for c in counts + pushes}
    assert len(connection) == 1, "the counts and the messages go through one connection, one pipeline"
    order = [c["command"].split()[0] for c in seen if (c["client_address"], c["client_port"]) in connection]
    first_push = order.index("LPUSH")
    # every count right ahead of the first message, nothing between: one pipeline
    assert order[first_push - len(ids):first_push] == ["HINCRBY"] * len(ids)
    assert order.count("HINCRBY") == len(ids)


def test_acknowledgements_ride_with_the_next_delivery_and_reach_redis_when_the_queue_is_empty(make_stack) -> None:
    """A worker's acknowledgement frees its prefetch slot at once and its Redis part (the unacknowledged
    entry's removal, the held count-down) goes in the next delivery's pipeline (rekku_workers.owned_qos):
    seen with MONITOR, a MULTI block of the worker's that both removes an acknowledged entry (ZREM) and
    adds a new one (ZADD). Once the queue is empty, what waits reaches Redis on its own: no entry and no
    count is left behind."""
    stack = make_stack()
    ids = [a["id"] for a in stack.submit([{"type": "echo", "payload": {"n": i}} for i in range(40)])["accepted"]]
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    blocks: list[set[str]] = []
    open_blocks: dict[tuple[str, int], set[str]] = {}
    removed = 0
    deadline = time.monotonic() + 120
    with client.monitor() as monitor:
        stack.start_worker("default", concurrency=1)
        for command in monitor.listen():
            assert time.monotonic() < deadline, f"only {removed} of {len(ids)} entries removed"
            if command.get("db") != stack.redis_db:
                continue
            who, name = (command["client_address"], command["client_port"]), command["command"].split()[0].upper()
            if name == "MULTI":
                open_blocks[who] = set()
            elif name == "EXEC" and who in open_blocks:
                blocks.append(open_blocks.pop(who))
            elif who in open_blocks:
                open_blocks[who].add(name)
            removed += name == "ZREM"
            if removed >= len(ids):
                break
    assert any({"ZREM", "ZADD"} <= block for block in blocks), "no acknowledgement rode with a delivery"
    for action_id in ids:
        assert stack.wait_action(action_id)["status"] == "succeeded"
    wait_until(lambda: client.hlen(UNACKED_KEY) == 0 and not _counts(stack),
               what="every acknowledged entry removed and every count gone, with nothing more to carry them")


# ----------------------------------------------------------------------------- the reconciler's judgement
@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    number = claim_redis_db()
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=number)
    try:
        yield client
    finally:
        client.flushdb()
        release_redis_db(number)


def _message(action_id: str, queue: str = "default") -> bytes:
    """A message as kombu's Redis transport stores it (only what the reconciler reads is real)."""
    return json.dumps({"body": "", "headers": {"id": action_id, "task": "rekku.action.echo"},
                       "properties": {"delivery_info": {"routing_key": queue}}}).encode()


def _publish(client: redis.Redis, action_id: str, queue: str = "default") -> None:
    held.count_up(client, queue, [action_id])
    client.lpush(queue, _message(action_id, queue))


def _rows(*ids: str, queue: str = "default") -> list[SimpleNamespace]:
    return [SimpleNamespace(id=i, queue=queue) for i in ids]


def _fill(client: redis.Redis, n: int, queue: str = "default") -> None:
    """``n`` messages of other actions ahead in the queue, counted as dispatch counts them."""
    pipe = client.pipeline(transaction=False)
    for _ in range(n):
        other = uuid.uuid4().hex
        held.count_up(pipe, queue, [other])
        pipe.lpush(queue, _message(other, queue))
    pipe.execute()


def test_a_short_queue_is_read_whole(broker: redis.Redis) -> None:
    _publish(broker, "waiting")
    held.count_up(broker, "default", ["purged"])  # counted, but its message was removed behind Rekku's back
    broker.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(_message("taken")), "", "default"]))
    assert held_of(broker, _rows("waiting", "purged", "taken", "lost")) == {"waiting", "taken"}


def test_a_long_queue_is_judged_by_the_counts_without_reading_it(broker: redis.Redis) -> None:
    _fill(broker, held.SCAN_LIMIT + 1)
    _publish(broker, "waiting")
    broker.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(_message("taken")), "", "default"]))
    held.count_up(broker, "default", ["in-transit"])  # counted by the ingress, its LPUSH not yet done
    before = broker.llen("default")
    # the counts answer (reading the queue would call the one in transit lost and publish it again)
    assert held_of(broker, _rows("waiting", "taken", "in-transit", "lost")) == {"waiting", "taken", "in-transit"}
    assert broker.llen("default") == before  # nothing moved out of Redis
    # a flush loses counts and messages together: nothing is counted as held any more
    broker.flushdb()
    assert held_of(broker, _rows("waiting", "taken", "lost")) == set()


def test_counts_for_more_due_actions_than_the_queue_holds_are_not_trusted(broker: redis.Redis) -> None:
    """A purge left counts behind: when the queue holds fewer messages than the due actions its counts
    vouch for, it is read whole after all, and only what is really there is held."""
    _fill(broker, held.SCAN_LIMIT + 1)
    real = [uuid.uuid4().hex for _ in range(3)]
    for action_id in real:
        _publish(broker, action_id)
    stale = [uuid.uuid4().hex for _ in range(held.SCAN_LIMIT + 10)]
    pipe = broker.pipeline(transaction=False)
    held.count_up(pipe, "default", stale)
    pipe.execute()
    assert held_of(broker, _rows(*real, *stale)) == set(real)
