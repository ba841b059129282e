"""An item on a queue that is not a message is set aside; it no longer ends the worker.

kombu's Redis transport pops an item with BRPOP and decodes it (a JSON envelope: body, headers,
properties) on the worker's event loop. An item that is not one (not UTF-8, not JSON, JSON of another
shape, a body its encoding does not decode) raised out of that loop ("Unrecoverable error:
JSONDecodeError") and ended the worker node, and ``rekku up`` stops everything when a child ends: a
stray LPUSH onto a queue, another program's list of the same name, or a producer with another
serializer stopped a pool. kombu's own fan-out path already logs and skips such an item; its BRPOP
path did not.

Here the item, already popped, is logged and pushed (with its queue, what was wrong, and when) onto
the list :data:`MALFORMED_KEY` on the broker, capped at :data:`KEEP` items, so nothing vanishes
unseen; the worker goes on with the next item.

An envelope that decodes as JSON is not enough: kombu's QoS needs a string delivery tag and a
``delivery_info`` naming an exchange and a routing key, Celery's consumer a body and, for a task
message (a ``task`` header), a task name and id that are strings, and its request a body of the
protocol's shape. Each of those missing ended the worker too, and as it died kombu put the item back
on its queue, so it ended every worker of the pool in turn. The message class checks the envelope's
part (:func:`_envelope_problem`); :class:`GuardTaskHandler` catches what Celery's handler of task
messages raises for the rest (a body of another shape, a protocol-1 body naming an unknown task
without an id), sets the message aside and rejects it. What Celery handles itself (an unknown task
with an id, a content type it does not accept, a body it cannot deserialize) it handles as before.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from queue import Empty
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state
from kombu.exceptions import KombuError
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual.base import Message
from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

#: The broker list where set-aside items are kept, newest first.
MALFORMED_KEY = "rekku:malformed"
#: How many set-aside items the list keeps (older ones are dropped): a flood of garbage stays bounded.
KEEP = 1000
#: Characters of a set-aside item shown in the log line (the list keeps it whole).
SHOWN = 200

_PATCHED = "_rekku_sets_aside_malformed"


class MalformedMessage(ValueError):
    """Raised only by :class:`_CheckedMessage`: the envelope decoded as JSON, but is no message."""


class _CheckedMessage(Message):
    """kombu's message, whose construction failing on a bad envelope raises :class:`MalformedMessage`
    (told apart from anything Celery's callback raises later)."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedMessage(f"not a message envelope: {type(exc).__name__}: {exc}") from exc
        if (problem := _envelope_problem(self)) is not None:
            raise MalformedMessage(f"not a message envelope: {problem}")


def _envelope_problem(message: Message) -> str | None:
    """What kombu's QoS or Celery's consumer would fail on in this message, before either sees it."""
    info = message.delivery_info
    if not isinstance(message.delivery_tag, str) or not message.delivery_tag:
        return "its delivery_tag is not a string"
    if not isinstance(info, dict) or not all(k in info and isinstance(info[k], (str, type(None)))
                                             for k in ("exchange", "routing_key")):
        return "its delivery_info does not name an exchange and a routing key"
    if not isinstance(message.headers, dict):
        return "its headers are not an object"
    if message.body is None:
        return "it has no body"
    headers = message.headers
    if "task" in headers:
        if not (isinstance(headers["task"], str) and isinstance(headers.get("id"), str)):
            return "a task message whose task name or id is not a string"
        limits = headers.get("timelimit")
        if limits is not None and not (isinstance(limits, list) and len(limits) == 2 and all(
                limit is None or (isinstance(limit, (int, float)) and not isinstance(limit, bool))
                for limit in limits)):
            return "a task message whose timelimit is not [hard, soft]"  # used only as the pool takes it
    return None


class GuardTaskHandler(bootsteps.StartStopStep):
    """A consumer bootstep: what Celery's handler of task messages raises for a message it cannot take
    (a body or header of another shape, a protocol-1 body naming no task it knows, without an id) is
    caught around the handler: the message is set aside and rejected, and the worker goes on. Celery's
    handler deals with what it expects itself (an unknown task with an id, a content type it does not
    accept, a body it cannot deserialize: InvalidTaskError, ContentDisallowed, DecodeError); everything
    else raised out of it, into kombu's delivery and out of the event loop. Only before the message's
    request is reserved: after that (its pool slot taken) the error is Celery's, as before."""

    label = "rekku malformed task messages"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        make = parent.create_task_handler  # the event loop asks the consumer for its handler as it starts
        if getattr(make, _PATCHED, False):
            return

        def create_task_handler(*args: Any, **kwargs: Any) -> Any:
            return _guarded(make(*args, **kwargs))

        setattr(create_task_handler, _PATCHED, True)
        parent.create_task_handler = create_task_handler


def _guarded(handler: Any) -> Any:
    def on_task_received(message: Any) -> Any:
        try:
            return handler(message)
        except KombuError:  # Celery's own (ContentDisallowed, DecodeError) or the connection's: as before
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            if any(request.message is message for request in worker_state.reserved_requests):
                raise  # the request was made and reserved: Celery's own failure, handled as before
            queue = str((message.delivery_info or {}).get("routing_key") or "?")
            _set_aside(message.channel, queue, json.dumps(message._raw),
                       f"a task message Celery cannot take: {type(exc).__name__}: {exc}")
            if not message.acknowledged:
                message.reject(requeue=False)
            return None

    return on_task_received


def set_aside_malformed() -> None:
    """Make this process's kombu Redis channels (the Sentinel channel inherits it) set malformed items
    aside instead of raising out of the event loop. Applied by the worker (rekku_workers.tasks)."""
    channel = kombu_redis.Channel
    if getattr(channel, _PATCHED, False):
        return
    channel.Message = _CheckedMessage
    channel._brpop_read = _brpop_read
    setattr(channel, _PATCHED, True)


def _brpop_read(self: Any, **options: Any) -> bool:
    """kombu 5.7's ``Channel._brpop_read`` (kombu is pinned below 5.8), with the item's decoding and
    the building of its message guarded: a malformed item is set aside (:func:`_set_aside`)."""
    try:
        try:
            dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
        except self.connection_errors:
            # if there's a ConnectionError, disconnect so the next iteration will reconnect automatically
            self.client.connection.disconnect()
            raise
        if not dest__item:
            raise Empty()
        dest, item = dest__item
        dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(dest)
        try:
            envelope = kombu_redis.loads(bytes_to_str(item))
        except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
            _set_aside(self, dest, item, f"not a JSON message: {type(exc).__name__}: {exc}")
            return True
        try:
            self.connection._deliver(envelope, dest)
        except MalformedMessage as exc:
            _set_aside(self, dest, item, str(exc))
        return True
    finally:
        self._in_poll = None
        # The BRPOP connection is idle now (its reply consumed, no new BRPOP issued yet): the safe
        # moment for a pending streaming re-auth token, as kombu does.
        self._flush_brpop_reauth()


def _set_aside(channel: Any, queue: str, item: bytes | str, error: str) -> None:
    text = item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item
    log.error("set aside an item of queue %r that is not a message (%s): %d characters, kept on the "
              "broker's %r list; it starts %r", queue, error, len(text), MALFORMED_KEY, text[:SHOWN])
    entry = json.dumps({"queue": queue, "error": error, "at": datetime.now(timezone.utc).isoformat(),
                        "item": text})
    try:
        channel.client.pipeline().lpush(MALFORMED_KEY, entry).ltrim(MALFORMED_KEY, 0, KEEP - 1).execute()
    except Exception:  # the log line above is the record then; the worker goes on either way
        log.warning("could not keep the set-aside item on %r", MALFORMED_KEY, exc_info=True)
