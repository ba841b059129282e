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

* **Acknowledgements ride along.** kombu removes an acknowledged delivery's unacknowledged entry in a
  round trip of its own, on the event loop, between a pool process's result and the next job written to
  it: the worker's main process spent about 40 % of its wall time waiting on such synchronous replies
  (py-spy, bench (b)). Here an acknowledgement frees its prefetch slot at once (kombu's in-memory part)
  and its Redis part (the removal and the held count-down) waits, in this process, for the next
  delivery's own pipeline, which carries it: one round trip instead of two. When no delivery comes
  within :data:`ACK_FLUSH_SECONDS`, the event loop sends what waits on its own; and before the channel
  restores or closes anything, too. Only on the event loop's thread (prefork, whose main process
  acknowledges there); elsewhere (a threads pool acknowledging from its threads) as before, at once.
  What this changes is only how soon Redis hears: an action is recorded in the log before its
  delivery is acknowledged at all, so if the process dies with removals waiting, the entries are
  restored after the visibility timeout (or by recovery at the node's next start) and the redelivery
  finds the action final and only acknowledges it, as after a death just before an acknowledgement.

The class replaces ``kombu.transport.redis.Channel.QoS``; kombu's Sentinel channel, a subclass of that
channel, uses it too.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from celery import bootsteps
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from rekku import held
from rekku.broker import broker_client
from rekku.reconciler import ACTION_TASK_PREFIX, OWNER_PROPERTY

log = logging.getLogger(__name__)

#: Longest wait, in seconds, of an acknowledgement's Redis part for a delivery to carry it.
ACK_FLUSH_SECONDS = 0.02

#: The worker's event loop (set by :class:`DeferredAcks` when the consumer starts); None: no deferral.
_hub: Any = None
#: QoS objects with removals waiting, for the loop's flush.
_waiting: weakref.WeakSet = weakref.WeakSet()
_flush_scheduled = False


def tag_deliveries(owner: str) -> None:
    """Make this process's Redis consumers write ``owner`` into each unacknowledged entry they add,
    and survive their connection breaking (see the module docstring)."""
    base = getattr(kombu_redis.Channel.QoS, "rekku_base", kombu_redis.Channel.QoS)

    class OwnedQoS(base):  # type: ignore[misc, valid-type]
        rekku_base = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            #: (delivery tag, message) of acknowledgements whose Redis part waits for a pipeline to ride in
            self._removals: list[tuple[Any, Any]] = []

        def append(self, message: Any, delivery_tag: Any) -> None:
            raw = message._raw
            try:
                message._raw = {**raw, "properties": {**raw["properties"], OWNER_PROPERTY: owner}}
            except (TypeError, KeyError):
                return self._append(message, delivery_tag)
            try:
                self._append(message, delivery_tag)
            finally:
                message._raw = raw

        def _append(self, message: Any, delivery_tag: Any) -> None:
            """kombu's append, with the acknowledgements waiting (see the module docstring) in its pipeline."""
            removals = self._take_removals()
            if not removals:
                return super().append(message, delivery_tag)
            delivery = message.delivery_info
            try:
                with self.pipe_or_acquire() as pipe:
                    self._queue_removals(pipe, removals)
                    pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                        self.unacked_key, delivery_tag,
                        dumps([message._raw, delivery["exchange"], delivery["routing_key"]])).execute()
            except BaseException:
                self._removals[:0] = removals  # not sent: they wait for the next chance
                _waiting.add(self)
                raise
            virtual.QoS.append(self, message, delivery_tag)

        def _take_removals(self) -> list:
            removals, self._removals = self._removals, []
            return removals

        def _queue_removals(self, pipe: Any, removals: list) -> None:
            for tag, message in removals:
                self._remove_from_indices(tag, pipe)
                _count_down_delivery(pipe, message)

        def flush_removals(self) -> None:
            """Send the acknowledgements waiting, on their own (no delivery came to carry them)."""
            removals = self._take_removals()
            if removals:
                self._send_removals(removals)

        def _send_removals(self, removals: list) -> None:
            """Remove the unacknowledged entries and count the messages down, in one pipeline: the
            channel's, or a client of our own when the channel is detached."""
            pipe = (broker_client() if self._detached() else self.channel._create_client()).pipeline()
            self._queue_removals(pipe, removals)
            pipe.execute()

        def _detached(self) -> bool:
            transport = getattr(self.channel, "connection", None)
            return transport is None or getattr(transport, "client", None) is None

        def restore_unacked(self, client: Any = None) -> Any:
            self._flush_quietly()
            if client is None and self._detached():
                log.warning("the broker connection is gone: %d deliveries are given back once it is "
                            "connected again", len(self._delivered))
                self._delivered.clear()
                return None
            return super().restore_unacked(client)

        # kombu's own two lines, with the action's held count (rekku.held) going down in the same
        # pipeline as the unacknowledged entry: an acknowledged message is held no more.
        def ack(self, delivery_tag: Any) -> None:
            if _hub is not None and threading.current_thread() is threading.main_thread():
                self._removals.append((delivery_tag, self._delivered.get(delivery_tag)))
                virtual.QoS.ack(self, delivery_tag)  # the prefetch slot is free at once
                _waiting.add(self)
                _schedule_flush()
                return
            self._send_removals([(delivery_tag, self._delivered.get(delivery_tag))])
            virtual.QoS.ack(self, delivery_tag)

        def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
            if requeue:  # back in its queue: still held
                return super().reject(delivery_tag, requeue=True)
            self._send_removals([(delivery_tag, self._delivered.get(delivery_tag))])
            virtual.QoS.ack(self, delivery_tag)
            return None

        def _flush_quietly(self) -> None:
            try:
                self.flush_removals()
            except Exception as exc:  # restored after the visibility timeout; the redelivery is skipped
                log.warning("could not send %s acknowledgements to the broker: %s", "waiting", exc)

        def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
            if client is None and self._detached():
                client = broker_client()
            super().restore_by_tag(tag, client=client, leftmost=leftmost)

    kombu_redis.Channel.QoS = OwnedQoS


def _schedule_flush() -> None:
    """Have the event loop send, within ACK_FLUSH_SECONDS, the acknowledgements no delivery carried."""
    global _flush_scheduled
    if not _flush_scheduled and _hub is not None:
        _flush_scheduled = True
        _hub.call_later(ACK_FLUSH_SECONDS, flush_waiting)


def flush_waiting() -> None:
    """Send every QoS's waiting acknowledgements (on the event loop; a failure leaves them to the
    visibility timeout: their redelivery finds the action final)."""
    global _flush_scheduled
    _flush_scheduled = False
    for qos in list(_waiting):
        _waiting.discard(qos)
        qos._flush_quietly()


class DeferredAcks(bootsteps.StartStopStep):
    """A consumer bootstep that lets acknowledgements wait for the next delivery's pipeline (module
    docstring) while the consumer runs on an event loop, and sends what waits when it stops."""

    label = "rekku deferred acknowledgements"
    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, parent: Any) -> None:
        global _hub
        _hub = getattr(parent, "hub", None)

    def stop(self, parent: Any) -> None:
        global _hub
        _hub = None
        flush_waiting()

    shutdown = stop


def _count_down_delivery(pipe: Any, message: Any) -> None:
    """Count an action's message down (rekku.held), if the delivery is one of an action task."""
    try:
        headers, info = message.headers, message.delivery_info
        task, action_id, queue = headers.get("task"), headers.get("id"), info.get("routing_key")
    except AttributeError:
        return
    if isinstance(task, str) and task.startswith(ACTION_TASK_PREFIX) and action_id and queue:
        held.count_down(pipe, queue, action_id)
