"""Due reminders for the outbox are written a chunk per transaction; chats with links, and any chunk
that meets an earlier delivery, take the one-by-one path. Same results, never a duplicate."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from rekku_plugins.event import engine as ev
from rekku_plugins.event.settings import EventSettings

from rekku import feed
from rekku.db import get_engine
from rekku.interfaces.models import ChatForward, Delivery, OutboxMessage
from tests.support import child_env, wait_until
from tests.test_event_dispatch import add_event, event_db, run_clock  # noqa: F401 - event_db is a fixture


@pytest.mark.usefixtures("event_db")
def test_outbox_chunk_in_one_transaction_matches_the_one_by_one_path(monkeypatch) -> None:
    ids = [add_event({"date": "2026-03-28", "time": "09:00"}, chat=f"c{i % 3}") for i in range(6)]
    due = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
    with get_engine().begin() as conn:
        conn.execute(sa.insert(ChatForward.__table__).values(source_interface="outbox", source_chat_id="c2",
                     target_interface="outbox", target_chat_id="fwd", target_thread_id="", created_at=due))
    seen = run_clock(due, due, timedelta(seconds=1))
    items = [[e, o.isoformat()] for _, e, o in seen]
    calls = []
    orig = ev._deliver_to_outbox
    # a spy, not a stand-in: the real batch runs; the test sees how many occurrences it took
    monkeypatch.setattr(ev, "_deliver_to_outbox", lambda r, f: calls.append(len(r)) or orig(r, f))
    assert ev.deliver_task(items) == {"delivered": 6, "failed": 0}
    assert calls == [4]
    assert ev.deliver_task(items) == {"delivered": 0, "failed": 0}
    with get_engine().connect() as conn:
        msgs = conn.execute(sa.select(OutboxMessage.chat_id, OutboxMessage.text)).all()
        recs = conn.execute(sa.select(Delivery.action_id, Delivery.part_key, Delivery.remote_id)).all()
        rows = conn.execute(sa.select(ev.deliveries.c.event_id, ev.deliveries.c.status, ev.deliveries.c.result)).all()
    assert len(msgs) == 6 + 2  # the reminders, and the forwards of c2's two
    assert len([m for m in msgs if m.chat_id == "fwd"]) == 2
    assert not any("system_message" in m.text for m in msgs)  # the model's part is on the feed, not in a chat
    assert len(recs) == 8
    reminders = feed.read(0, 100)
    assert len(reminders) == 6 and {i["type"] for i in reminders} == {"event_reminder"}
    assert sorted(i["data"]["event_id"] for i in reminders) == sorted(ids)
    results = {r.event_id: (json.loads(r.result) if isinstance(r.result, str) else r.result) for r in rows}
    assert {r.status for r in rows} == {"delivered"}
    fast = results[ids[0]]
    slow = results[ids[2]]
    assert set(fast) == set(slow) == {"reminder", "system_message"}
    assert set(fast["reminder"]) == set(slow["reminder"]) - {"forwarded"} | {"forwarded"}
    assert set(fast["system_message"]) == set(slow["system_message"])
    assert fast["reminder"]["forwarded"] == []


@pytest.mark.usefixtures("event_db")
def test_a_chunk_meeting_an_earlier_delivery_falls_back_without_duplicates() -> None:
    ids = [add_event({"date": "2026-03-28", "time": "09:00"}, chat="c1") for _ in range(3)]
    due = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
    seen = run_clock(due, due, timedelta(seconds=1))
    items = [[e, o.isoformat()] for _, e, o in seen]
    # one part already sent earlier (a redelivered task): the batch must not write it again
    from rekku.interfaces.delivery import deliver
    from rekku.interfaces.links import Chat
    deliver(Chat("outbox", "c1"), ev.message_id(ids[0], due, "reminder"), text=ev.reminder_text("x"))
    assert ev.deliver_task(items) == {"delivered": 3, "failed": 0}
    with get_engine().connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(OutboxMessage.__table__)) == 3
    assert len(feed.read(0, 100)) == 3  # one event_reminder per occurrence, none twice


def _waiting_on_outbox_order() -> set[int]:
    """Connections waiting inside a statement on the outbox order lock (PROCESSLIST is live; InnoDB's
    lock tables in information_schema are a cache refreshed at most every 0.1 s)."""
    with get_engine().connect() as conn:
        return set(conn.scalars(sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = DATABASE() "
                                        "AND COMMAND = 'Query' AND INFO LIKE '%outbox_order%FOR UPDATE%'")))


@pytest.mark.parametrize("event_db", ["mariadb"], indirect=True)
def test_a_chunk_that_kills_its_worker_every_time_ends_failed_not_retried_forever(event_db: str,  # noqa: F811
                                                                                   tmp_path: Path) -> None:
    """A worker SIGKILLed inside the outbox chunk's transaction (held there by a lock on the outbox
    order) has still used an attempt; after MAX_ATTEMPTS such deaths recovery leaves the occurrences
    failed with a reason instead of re-enqueuing them."""
    for _ in range(3):
        add_event({"date": "2026-03-28", "time": "09:00"}, chat="c1")
    due = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
    items = [[e, o.isoformat()] for _, e, o in run_clock(due, due, timedelta(seconds=1))]
    script = ("import json, sys\nfrom rekku_plugins.event.engine import deliver_task\n"
              "deliver_task(json.loads(sys.argv[1]))")
    for attempt in range(1, ev.MAX_ATTEMPTS + 1):
        with get_engine().connect() as holder, holder.begin():
            holder.execute(sa.text("SELECT id FROM outbox_order FOR UPDATE"))
            earlier = _waiting_on_outbox_order()  # a killed worker's connection may linger a moment
            worker = subprocess.Popen([sys.executable, "-c", script, json.dumps(items)],
                                      env=child_env(REKKU_DATABASE_URL=event_db, REKKU_HOME=str(tmp_path / "home")))
            try:
                wait_until(lambda: _waiting_on_outbox_order() - earlier or worker.poll() is not None, timeout=60,
                           what="the delivery to wait inside its outbox transaction")
                assert worker.poll() is None, "the delivery finished instead of waiting on the outbox order"
            finally:
                worker.kill()
                worker.wait()
        with get_engine().connect() as conn:
            rows = conn.execute(sa.select(ev.deliveries.c.status, ev.deliveries.c.attempts)).all()
            assert conn.scalar(sa.select(sa.func.count()).select_from(OutboxMessage.__table__)) == 0
        assert sorted(rows) == [("pending", attempt)] * 3

    assert ev.deliver_task(items) == {"delivered": 0, "failed": 0}  # attempts exhausted: nothing sent
    requeued: list = []
    later = datetime.now(timezone.utc) + timedelta(seconds=EventSettings.get().redeliver_seconds + 1)
    assert ev.recover_lost(now=later, enqueue=requeued.extend) == 0
    assert requeued == []
    with get_engine().connect() as conn:
        rows = conn.execute(sa.select(ev.deliveries.c.status, ev.deliveries.c.error)).all()
    assert {row.status for row in rows} == {"failed"}
    assert all("interrupted 6 times" in row.error for row in rows)
