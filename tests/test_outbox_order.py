"""GET /v1/outbox polling with ``after`` misses nothing while many writers store messages at once.

Ids come from the database when a row is inserted, not when it commits: without care, a writer
that took id 10 and commits after the writer of id 11 leaves a poller that already read 11 (and
polls ``after=11``) never seeing 10. The outbox orders its writers so that ids become visible in
order (rekku/interfaces/outbox.py); this drives real concurrent writers — the one-by-one delivery
path and the event chunk path — against a poller on MariaDB and SQLite.
"""

from __future__ import annotations

import functools
import uuid

import pytest

from tests.support import race_with_poller
from tests.test_event_dispatch import event_db  # noqa: F401 - a MariaDB and a SQLite database, migrated

WRITERS, MESSAGES = 4, 40
#: Threads delivering due events a chunk per transaction, chunks each, occurrences per chunk.
EVENT_WRITERS, CHUNKS, PER_CHUNK = 2, 2, 20


@pytest.mark.usefixtures("event_db")
def test_a_poller_following_after_sees_every_message_once_while_writers_race() -> None:
    from datetime import datetime, timedelta, timezone

    from rekku_plugins.event import engine as ev

    from rekku.interfaces.delivery import deliver
    from rekku.interfaces.links import Chat
    from rekku.outbox_api import get_outbox
    from tests.test_event_dispatch import add_event, run_clock

    chat = f"order-{uuid.uuid4().hex[:6]}"
    for _ in range(EVENT_WRITERS * CHUNKS * PER_CHUNK):  # due in the past: deliverable at once
        add_event({"date": "2026-03-28", "time": "09:00"}, chat=chat)
    due = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
    items = [[e, o.isoformat()] for _, e, o in run_clock(due, due, timedelta(seconds=1))]

    def write(n: int) -> None:
        for i in range(MESSAGES):
            deliver(Chat("outbox", chat), str(uuid.uuid4()), text=f"w{n} m{i}")

    def write_events(n: int) -> None:  # the chunk path: a chunk's reminders in one transaction each
        mine = items[n * CHUNKS * PER_CHUNK:(n + 1) * CHUNKS * PER_CHUNK]
        for c in range(CHUNKS):
            assert ev.deliver_task(mine[c * PER_CHUNK:(c + 1) * PER_CHUNK])["delivered"] == PER_CHUNK

    writers = [functools.partial(write, n) for n in range(WRITERS)]
    writers += [functools.partial(write_events, n) for n in range(EVENT_WRITERS)]
    seen, errors = race_with_poller(writers, lambda after: [
        m["id"] for m in get_outbox(chat_id=chat, thread_id=None, after=after, limit=1000)["messages"]])
    assert not errors
    everything = [m["id"] for m in get_outbox(chat_id=chat, thread_id=None, after=0, limit=1000)["messages"]]
    assert len(everything) == WRITERS * MESSAGES + EVENT_WRITERS * CHUNKS * PER_CHUNK  # the reminders (system
    # messages go to the feed: tests/test_conversation.py)
    assert len(seen) == len(set(seen))
    assert sorted(seen) == everything, f"the poller missed {len(set(everything) - set(seen))} messages"
