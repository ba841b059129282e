"""Task events (Flower's feed) are published at most every :data:`FLUSH_SECONDS`, not once per turn of
the event loop.

Celery buffers a worker's task events (received, started, succeeded, ...) and publishes the buffer on
the next turn of its event loop: one synchronous Redis ``PUBLISH`` per turn, and at a few hundred quick
tasks a second most turns carry one or two events (1.6-1.8 ``PUBLISH`` per task, measured with ``INFO
commandstats`` in bench (b)). Each is a round trip the loop waits on, and the turn that receives a
task publishes its "received" event before it writes the job to a pool process. Here the first event
buffered schedules a flush FLUSH_SECONDS later on the same loop, and every event buffered meanwhile
goes with it. Events carry the time they were made (Flower shows that), so they are only seen up to
FLUSH_SECONDS later; Celery's own limit still flushes a full buffer at once, and what waits is
published before the consumer stops (Celery's own close does not flush).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

#: Longest wait, in seconds, of a buffered task event.
FLUSH_SECONDS = 0.02


class BatchedTaskEvents(bootsteps.StartStopStep):
    """A consumer bootstep: the event dispatcher's "an event was buffered" callback schedules one
    flush per FLUSH_SECONDS instead of one per loop turn (see the module docstring)."""

    label = "rekku batched task events"
    requires = ("celery.worker.consumer.events:Events",)

    def start(self, parent: Any) -> None:
        dispatcher, hub = getattr(parent, "event_dispatcher", None), getattr(parent, "hub", None)
        if dispatcher is None or hub is None or dispatcher.on_send_buffered is None:
            return  # no event loop (Celery publishes each event at once) or events are off
        scheduled = False

        def flush() -> None:
            nonlocal scheduled
            scheduled = False
            parent._flush_events()

        def on_buffered() -> None:
            nonlocal scheduled
            if not scheduled:
                scheduled = True
                hub.call_later(FLUSH_SECONDS, flush)

        dispatcher.on_send_buffered = on_buffered

    def stop(self, parent: Any) -> None:
        try:
            parent._flush_events()
        except Exception as exc:  # the broker is gone: Celery would have lost them too
            log.warning("could not publish the last task events: %s", exc)

    shutdown = stop
