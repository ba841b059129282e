"""Which actions the broker holds, without reading its queues: a count per action of its messages
published and not yet acknowledged, kept in Redis next to the messages.

The reconciler must tell an action whose message was lost (a Redis restart, a flush) from one whose
message simply waits in a long queue. Reading the queue answers exactly but costs the whole backlog
(a million messages is a million JSON parses per pass); these counts answer for the actions it asks
about, in one round trip, whatever the backlog.

- ``rekku:held:<queue>`` is a hash: action id → messages of it in ``<queue>`` published and not yet
  acknowledged. rekku.dispatch counts each message up **before** publishing it (so a worker's
  acknowledgement can never come first), a retry's new message is counted up by the worker before it
  is published, and a worker's acknowledgement (or a reject without requeue) counts it down in
  kombu's own pipeline (rekku_workers.owned_qos): no extra round trip. A message going back to its
  queue (requeue, visibility timeout, warm shutdown) keeps its count.
- The counts live and die with the messages: a Redis restart without persistence or a FLUSHDB loses
  both, so a lost message is never counted as held.
- What can leave a count too high: messages removed behind Rekku's back (``celery purge``, a key
  deleted, eviction), a publish that failed after its count. The reconciler therefore reads the queue
  itself when it is short (:data:`SCAN_LIMIT`), and trusts the counts of a longer queue only while the
  queue holds at least as many messages as the due actions the counts say it holds; an action it
  re-enqueues has its count reset first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Prefix of the per-queue hashes.
PREFIX = "rekku:held:"
#: Queues up to this many messages are read whole by the reconciler (exact, and cheap at this size);
#: longer ones are judged by the counts.
SCAN_LIMIT = 10_000

#: Count one message of an action down; the field goes when it reaches zero.
_DOWN = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""


def key(queue: str) -> str:
    return PREFIX + queue


def count_up(pipe: Any, queue: str, ids: Iterable[str]) -> None:
    """Queue ``HINCRBY +1`` for each id's next message in ``queue`` on a Redis pipeline (or client)."""
    for action_id in ids:
        pipe.hincrby(key(queue), action_id, 1)


def count_down(pipe: Any, queue: str, action_id: str) -> None:
    """Queue the count-down of one acknowledged message on a Redis pipeline (or client)."""
    pipe.eval(_DOWN, 1, key(queue), action_id)


def forget(client: Any, queue: str, ids: Iterable[str]) -> None:
    """Drop the counts of ``ids`` in ``queue``: their messages there are known to be gone."""
    ids = list(ids)
    if ids:
        client.hdel(key(queue), *ids)


def held(client: Any, queue: str, ids: list[str]) -> set[str]:
    """The ``ids`` with at least one message counted in ``queue``."""
    if not ids:
        return set()
    counts = client.hmget(key(queue), ids)
    return {i for i, n in zip(ids, counts) if n is not None and int(n) > 0}
