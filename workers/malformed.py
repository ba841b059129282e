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
unseen; the worker goes on with the next item. An envelope that decodes is untouched: what Celery
finds wrong in it (an unknown task, a body it cannot deserialize) Celery handles as before.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from queue import Empty
from typing import Any

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
