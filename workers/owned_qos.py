"""The worker's kombu Redis QoS: it names its holder in each delivery, and outlives a broken connection.

* **Owner.** Each unacknowledged entry a worker adds carries the incarnation holding it (a property of
  the stored message, written by kombu's own HSET: no extra round trip), so the deliveries a dead
  worker held are told from a live one's at once rather than after the visibility timeout
  (rekku.reconciler, rekku_workers.recovery, rekku_workers.reconnect).
* **Held counts.** An acknowledgement counts the action's message down (rekku.held) in the same
  pipeline as kombu's removal of the unacknowledged entry: an acknowledged message is held no more.
* **A broken connection.** When the broker connection breaks (a Sentinel failover, Redis restarted, a
  network cut), Celery collects the connection, which detaches its transport, then closes it, and
  keeps going with the requests that were running. Through a detached channel kombu fails with an
  AttributeError ('NoneType' object has no attribute 'hostname' / 'client'), which is not a
  connection error, so it escaped Celery's handlers and the worker died ("Unrecoverable error"):
  once when the channel's close restored what it held, once when a task that had been running
  finished and was acknowledged. Here a detached channel restores nothing (the consumer gives those
  deliveries back once connected again: rekku_workers.reconnect), and acknowledges or requeues
  through the process's own client of the broker (rekku.broker, which follows a Sentinel master).

The class replaces ``kombu.transport.redis.Channel.QoS``; kombu's Sentinel channel, a subclass of that
channel, uses it too.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from rekku import held
from rekku.broker import broker_client
from rekku.reconciler import ACTION_TASK_PREFIX, OWNER_PROPERTY

log = logging.getLogger(__name__)


def tag_deliveries(owner: str) -> None:
    """Make this process's Redis consumers write ``owner`` into each unacknowledged entry they add,
    and survive their connection breaking (see the module docstring)."""
    base = getattr(kombu_redis.Channel.QoS, "rekku_base", kombu_redis.Channel.QoS)

    class OwnedQoS(base):  # type: ignore[misc, valid-type]
        rekku_base = base

        def append(self, message: Any, delivery_tag: Any) -> None:
            raw = message._raw
            try:
                message._raw = {**raw, "properties": {**raw["properties"], OWNER_PROPERTY: owner}}
            except (TypeError, KeyError):
                return super().append(message, delivery_tag)
            try:
                super().append(message, delivery_tag)
            finally:
                message._raw = raw

        def _detached(self) -> bool:
            transport = getattr(self.channel, "connection", None)
            return transport is None or getattr(transport, "client", None) is None

        def restore_unacked(self, client: Any = None) -> Any:
            if client is None and self._detached():
                log.warning("the broker connection is gone: %d deliveries are given back once it is "
                            "connected again", len(self._delivered))
                self._delivered.clear()
                return None
            return super().restore_unacked(client)

        def _unacked_removal(self, delivery_tag: Any) -> Any:
            """kombu's removal of the unacknowledged entry, as a pipeline not yet executed; on a client of
            our own when the channel is detached."""
            if not self._detached():
                return self._remove_from_indices(delivery_tag)
            pipe = broker_client().pipeline()  # kombu's _remove_from_indices takes an empty one for none
            return pipe.zrem(self.unacked_index_key, delivery_tag).hdel(self.unacked_key, delivery_tag)

        # kombu's own two lines, with the action's held count (rekku.held) going down in the same
        # pipeline as the unacknowledged entry: an acknowledged message is held no more.
        def ack(self, delivery_tag: Any) -> None:
            pipe = self._unacked_removal(delivery_tag)
            _count_down_delivery(pipe, self._delivered.get(delivery_tag))
            pipe.execute()
            virtual.QoS.ack(self, delivery_tag)

        def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
            if requeue:  # back in its queue: still held
                return super().reject(delivery_tag, requeue=True)
            pipe = self._unacked_removal(delivery_tag)
            _count_down_delivery(pipe, self._delivered.get(delivery_tag))
            pipe.execute()
            virtual.QoS.ack(self, delivery_tag)
            return None

        def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
            if client is None and self._detached():
                client = broker_client()
            super().restore_by_tag(tag, client=client, leftmost=leftmost)

    kombu_redis.Channel.QoS = OwnedQoS


def _count_down_delivery(pipe: Any, message: Any) -> None:
    """Count an action's message down (rekku.held), if the delivery is one of an action task."""
    try:
        headers, info = message.headers, message.delivery_info
        task, action_id, queue = headers.get("task"), headers.get("id"), info.get("routing_key")
    except AttributeError:
        return
    if isinstance(task, str) and task.startswith(ACTION_TASK_PREFIX) and action_id and queue:
        held.count_down(pipe, queue, action_id)
