"""Chunks of due outbox reminders written by many writers at once: each reminder, delivery record and
feed item exactly once, ids visible in commit order to pollers of the outbox and of the feed.

The chunk's transaction builds its statements before it takes the outbox's and the feed's order locks
(rekku.ordering.Rendered on MariaDB) and checks the feed's dedupe keys before the lock, so these also
pin what that must keep: the rendered rows are stored exactly as SQLAlchemy stores them, a feed item
added by many in one statement gets the id of its own row, and two deliveries of the same chunk racing
(a redelivered message) still write it once.
"""

from __future__ import annotations

import functools
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from rekku_plugins.event import engine as ev

from rekku import feed
from rekku.db import get_engine
from rekku.interfaces.models import Delivery, OutboxMessage
from rekku.ordering import Rendered
from tests.support import race_with_poller, wait_until
from tests.test_event_dispatch import add_event, event_db, run_clock  # noqa: F401 - event_db is a fixture

DUE = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
#: Chunk writers racing, chunks each, occurrences per chunk.
WRITERS, CHUNKS, PER_CHUNK = 4, 3, 30


def _due_items(count: int, chats: int = 3) -> list[list]:
    for i in range(count):
        add_event({"date": "2026-03-28", "time": "09:00"}, chat=f"c{i % chats}")
    return [[e, o.isoformat()] for _, e, o in run_clock(DUE, DUE, timedelta(seconds=1))]


def _counts() -> dict[str, int]:
    with get_engine().connect() as conn:
        def count(table: sa.Table) -> int:
            return conn.scalar(sa.select(sa.func.count()).select_from(table))
        reminders = conn.scalars(sa.select(OutboxMessage.action_id)).all()
        return {"outbox": len(reminders), "distinct reminders": len(set(reminders)),
                "records": count(Delivery.__table__), "feed": count(feed.FeedItem.__table__),
                "delivered": conn.scalar(sa.select(sa.func.count()).select_from(ev.deliveries)
                                         .where(ev.deliveries.c.status == ev.DELIVERED))}


@pytest.mark.usefixtures("event_db")
def test_chunk_writers_racing_deliver_each_reminder_once_and_pollers_miss_nothing() -> None:
    """Writers deliver chunks at once, each chunk twice (by two writers, as a redelivered message
    would), while one poller follows the outbox and another the feed with ``after=``."""
    items = _due_items(WRITERS * CHUNKS * PER_CHUNK)
    chunks = [items[n * PER_CHUNK:(n + 1) * PER_CHUNK] for n in range(WRITERS * CHUNKS)]

    def write(n: int) -> None:  # writer n delivers its own chunks and then its neighbour's again
        for chunk in chunks[n * CHUNKS:(n + 1) * CHUNKS] + chunks[((n + 1) % WRITERS) * CHUNKS:][:CHUNKS]:
            ev.deliver_task(chunk)

    outbox_seen: list[int] = []

    def read_outbox(after: int) -> list[int]:
        with get_engine().connect() as conn:
            ids = list(conn.scalars(sa.select(OutboxMessage.id).where(OutboxMessage.id > after)
                                    .order_by(OutboxMessage.id).limit(1000)))
        return ids

    def outbox_poller() -> None:
        seen, errors = race_with_poller([functools.partial(write, n) for n in range(WRITERS)], read_outbox)
        outbox_seen.extend(seen)
        assert not errors, errors

    # the feed's poller runs beside the outbox's, over the same writers' run
    feed_seen: list[int] = []
    stop = threading.Event()

    def feed_poller() -> None:
        after = 0
        while True:
            finished = stop.is_set()
            page = [i["id"] for i in feed.read(after, 1000)]
            feed_seen.extend(page)
            after = page[-1] if page else after
            if finished and not page:
                return

    follower = threading.Thread(target=feed_poller)
    follower.start()
    try:
        outbox_poller()
    finally:
        stop.set()
        follower.join(60)

    total = WRITERS * CHUNKS * PER_CHUNK
    assert _counts() == {"outbox": total, "distinct reminders": total, "records": total, "feed": total,
                         "delivered": total}
    with get_engine().connect() as conn:
        everything = list(conn.scalars(sa.select(OutboxMessage.id).order_by(OutboxMessage.id)))
    assert len(outbox_seen) == len(set(outbox_seen))
    assert sorted(outbox_seen) == everything, f"the outbox poller missed {len(set(everything) - set(outbox_seen))}"
    every_item = [i["id"] for i in feed.read(0, 10_000)]
    assert len(feed_seen) == len(set(feed_seen))
    assert sorted(feed_seen) == every_item, f"the feed poller missed {len(set(every_item) - set(feed_seen))}"


def _waiting_on(table: str) -> int:
    with get_engine().connect() as conn:
        return conn.scalar(sa.text("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() "
                                   "AND COMMAND = 'Query' AND ID <> CONNECTION_ID() AND INFO LIKE :like"),
                           {"like": f"%{table}%FOR UPDATE%"})


@pytest.mark.parametrize("event_db", ["mariadb"], indirect=True)
def test_two_deliveries_of_one_chunk_both_past_their_checks_write_it_once(event_db: str) -> None:  # noqa: F811
    """Both deliveries check before the order lock that nothing is recorded yet, then wait on the lock
    (held here); released, one writes the chunk and the other fails on the unique keys, rolls back and
    finds every part sent on the one-by-one path."""
    items = _due_items(20)
    results: list[dict] = []
    with get_engine().connect() as holder, holder.begin():
        holder.execute(sa.text("SELECT id FROM outbox_order FOR UPDATE"))
        workers = [threading.Thread(target=lambda: results.append(ev.deliver_task(items))) for _ in range(2)]
        for worker in workers:
            worker.start()
        wait_until(lambda: _waiting_on("outbox_order") == 2, timeout=60,
                   what="both deliveries to wait on the outbox order, their checks done")
    for worker in workers:
        worker.join(60)
    assert [r["failed"] for r in results] == [0, 0]
    assert _counts() == {"outbox": 20, "distinct reminders": 20, "records": 20, "feed": 20, "delivered": 20}


@pytest.mark.usefixtures("event_db")
def test_feed_items_added_in_one_statement_get_their_own_ids() -> None:
    """Many items in one append: each id is its own row's (dedupe key and data agree), in order; items
    already on the feed, or twice in the call, are added once."""
    feed.append_now([feed.NewItem("output", {"n": 3}, dedupe_key="k3")])
    items = [feed.NewItem("output", {"n": n, "text": f"it's {n}% \\ ⏰"}, dedupe_key=f"k{n % 7}") for n in range(12)]
    ids = feed.append_now(items)
    assert [i is None for i in ids] == [n >= 7 or n == 3 for n in range(12)]
    added = [i for i in ids if i is not None]
    assert added == sorted(added)  # ascending in item order
    stored = {i["id"]: i for i in feed.read(0, 100)}
    for item, new_id in zip(items, ids, strict=True):
        if new_id is not None:
            assert stored[new_id]["data"] == item.data


@pytest.mark.usefixtures("event_db")
def test_a_strict_append_of_an_item_the_feed_holds_fails_and_adds_nothing() -> None:
    feed.append_now([feed.NewItem("output", {}, dedupe_key="held")])
    with pytest.raises(sa.exc.IntegrityError), get_engine().begin() as conn:
        feed.prepare(conn, [feed.NewItem("output", {}, dedupe_key="new"),
                            feed.NewItem("output", {}, dedupe_key="held")], strict=True).append()
    assert [i["dedupe_key"] if "dedupe_key" in i else i["data"] for i in feed.read(0, 10)] == [{}]


@pytest.mark.parametrize("event_db", ["mariadb"], indirect=True)
def test_rendered_rows_are_stored_as_sqlalchemy_stores_them(event_db: str) -> None:  # noqa: F811
    """Quotes, backslashes, percent signs, non-BMP text, NULLs, JSON and aware datetimes: a row inserted
    from its rendered text reads back equal to the same row inserted through SQLAlchemy, and the ids come
    back in row order."""
    at = datetime(2026, 3, 28, 9, 0, 1, 123456, tzinfo=timezone.utc)
    texts = ["plain", "it's \"quoted\"", "back\\slash\\", "100% %s %(x)s", "emoji 🦊 ⏰ ünï", "", "\n\t\x00end"]
    rows = [{"chat_id": f"c{n}", "thread_id": "", "text": text, "audio_url": None if n % 2 else "https://x/a.mp3",
             "reply_to": None, "action_id": f"a{n}", "created_at": at} for n, text in enumerate(texts)]
    table = OutboxMessage.__table__
    with get_engine().begin() as conn:
        rendered = Rendered.of(conn, table, rows)
        assert rendered is not None
        ids = rendered.insert(conn)
        plain = list(conn.scalars(sa.insert(table).returning(table.c.id, sort_by_parameter_order=True), rows))
    assert ids == sorted(ids) and len(ids) == len(rows)
    columns = [table.c[name] for name in rows[0]]
    with get_engine().connect() as conn:
        by_id = {r.id: tuple(r)[1:] for r in conn.execute(sa.select(table.c.id, *columns))}
    assert [by_id[i] for i in ids] == [by_id[i] for i in plain]
    assert [by_id[i][2] for i in ids] == texts

    data = {"text": "it's 100% \\ 🦊", "n": [1, None, True], "at": at.isoformat()}
    item_rows = [{"type": "output", "interface": "", "chat_id": "", "thread_id": "", "action_id": None,
                  "dedupe_key": f"d{n}", "data": data, "created_at": at} for n in range(2)]
    items = feed.FeedItem.__table__
    with get_engine().begin() as conn:
        first, _ = Rendered.of(conn, items, item_rows).insert(conn)
    with get_engine().connect() as conn:
        stored = conn.execute(sa.select(items.c.data, items.c.created_at).where(items.c.id == first)).one()
    assert (json.loads(stored.data) if isinstance(stored.data, str) else stored.data) == data
    assert stored.created_at == at
