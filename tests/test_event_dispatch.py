"""The event dispatcher in-process with a controllable clock, on a real MariaDB and SQLite: each
occurrence is claimed once (even by dispatchers racing), recorded before it is enqueued, and
recurring events advance in local wall-clock time across DST."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from rekku_plugins.event import engine as ev

from rekku.db import get_engine
from rekku.migrate import upgrade
from rekku.schedule import build_rule
from rekku.settings import get_settings
from tests.support import scratch_database

T0 = datetime(2026, 3, 27, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["mariadb", "sqlite"])
def event_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with scratch_database(request.param, tmp_path, monkeypatch) as url:
        upgrade(url)
        yield url


def add_event(payload: dict, now: datetime = T0, tz: str = "UTC", chat: str = "c1") -> int:
    rule, first = build_rule({"description": "x", **payload}, now, tz)
    row = ev.new_event(rule, first, "x", "outbox", chat, now=now)
    with get_engine().begin() as conn:
        return conn.execute(sa.insert(ev.events).values(**row)).inserted_primary_key[0]


def deliveries() -> list[tuple[int, datetime, str]]:
    with get_engine().connect() as conn:
        rows = conn.execute(sa.select(ev.deliveries.c.event_id, ev.deliveries.c.occurrence, ev.deliveries.c.status)
                            .order_by(ev.deliveries.c.occurrence)).all()
    return [tuple(r) for r in rows]


def run_clock(start: datetime, end: datetime, step: timedelta) -> list[tuple[datetime, int, datetime]]:
    """Tick the dispatcher from ``start`` to ``end``; returns (tick time, event id, occurrence) enqueued."""
    seen: list[tuple[datetime, int, datetime]] = []
    now = start
    while now <= end:
        ev.dispatch_due(now=now, enqueue=lambda keys, at=now: seen.extend((at, e, o) for e, o in keys))
        now += step
    return seen


@pytest.mark.parametrize("tz, day", [("Europe/Rome", "2026-03-27"), ("America/New_York", "2026-03-06"),
                                     ("Europe/Rome", "2026-10-23"), ("America/New_York", "2026-10-30")])
def test_daily_reminder_fires_at_local_nine_once_a_day_across_dst(event_db: str, tz: str, day: str) -> None:
    start = datetime.fromisoformat(day).replace(tzinfo=timezone.utc) - timedelta(days=1)
    event_id = add_event({"date": day, "time": "09:00", "repeat": "daily", "count": 4}, now=start, tz=tz)
    seen = run_clock(start, start + timedelta(days=6), timedelta(minutes=20))
    from zoneinfo import ZoneInfo

    assert [o.astimezone(ZoneInfo(tz)).strftime("%H:%M") for _, _, o in seen] == ["09:00"] * 4
    assert len({o.date() for _, _, o in seen}) == 4 and {e for _, e, _ in seen} == {event_id}
    assert all(timedelta(0) <= at - o < timedelta(minutes=20) for at, _, o in seen)
    assert [(e, o) for e, o, _ in deliveries()] == [(e, o) for _, e, o in seen]
    with get_engine().connect() as conn:
        assert conn.execute(sa.select(ev.events.c.status)).scalar() == ev.DONE


def test_monthly_from_the_31st_through_a_leap_february(event_db: str) -> None:
    start = datetime(2028, 1, 1, tzinfo=timezone.utc)
    add_event({"date": "2028-01-31", "time": "10:00", "repeat": "monthly", "until": "2028-04-30"}, now=start)
    seen = run_clock(start, datetime(2028, 6, 1, tzinfo=timezone.utc), timedelta(hours=6))
    assert [o.date().isoformat() for _, _, o in seen] == ["2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30"]


def test_a_missed_series_is_delivered_once_and_skips_ahead(event_db: str) -> None:
    event_id = add_event({"date": "2026-03-28", "time": "09:00", "repeat": "daily"})
    late = datetime(2026, 4, 10, 12, 0, tzinfo=timezone.utc)  # the scheduler was down for two weeks
    seen = run_clock(late, late + timedelta(minutes=5), timedelta(minutes=1))
    assert [(e, o) for _, e, o in seen] == [(event_id, datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc))]
    with get_engine().connect() as conn:
        assert conn.execute(sa.select(ev.events.c.next_run)).scalar() == datetime(2026, 4, 11, 9, 0,
                                                                                  tzinfo=timezone.utc)


def test_cancelled_events_are_not_claimed(event_db: str) -> None:
    event_id = add_event({"date": "2026-03-28", "time": "09:00"})
    with get_engine().begin() as conn:
        conn.execute(sa.update(ev.events).where(ev.events.c.id == event_id).values(status=ev.CANCELLED))
    assert run_clock(datetime(2026, 3, 28, 9, tzinfo=timezone.utc), datetime(2026, 3, 29, tzinfo=timezone.utc),
                     timedelta(hours=1)) == []


def test_racing_dispatchers_claim_each_occurrence_once(event_db: str) -> None:
    due = T0 + timedelta(hours=1)
    rule, _ = build_rule({"date": "2026-03-27", "time": "01:00", "repeat": "every 1 hour", "count": 3}, T0, "UTC")
    rows = [ev.new_event(rule, due, f"e{i}", "outbox", "c", now=T0) for i in range(1200)]
    with get_engine().begin() as conn:
        conn.execute(sa.insert(ev.events), rows)
    seen: list[tuple[int, datetime]] = []
    lock, barrier = threading.Lock(), threading.Barrier(4)
    errors: list[Exception] = []

    def tick(now: datetime) -> None:
        barrier.wait()

        def collect(keys: list) -> None:
            with lock:
                seen.extend(keys)
        try:
            ev.dispatch_due(now=now, enqueue=collect)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    for hour in (1, 2, 3, 4):
        threads = [threading.Thread(target=tick, args=(T0 + timedelta(hours=hour, seconds=1),)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(seen) == len(set(seen)) == 3600
    assert len(deliveries()) == 3600


def test_a_delivery_left_pending_is_enqueued_again_after_the_lease(event_db: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REKKU_EVENT_REDELIVER_SECONDS", "30")
    get_settings.cache_clear()
    event_id = add_event({"date": "2026-03-28", "time": "09:00"})
    due = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
    assert run_clock(due, due, timedelta(seconds=1)) == [(due, event_id, due)]
    again: list = []
    assert ev.recover_lost(now=due + timedelta(seconds=29), enqueue=again.extend) == 0
    assert ev.recover_lost(now=due + timedelta(seconds=31), enqueue=again.extend) == 1
    assert ev.recover_lost(now=due + timedelta(seconds=40), enqueue=again.extend) == 0  # touched: a new lease
    with get_engine().begin() as conn:
        conn.execute(sa.update(ev.deliveries).values(status=ev.DELIVERED))
    assert ev.recover_lost(now=due + timedelta(hours=1), enqueue=again.extend) == 0
    assert again == [(event_id, due)]


def test_occurrences_due_within_the_lookahead_are_claimed_ahead_and_no_earlier(event_db: str) -> None:
    event_id = add_event({"date": "2026-03-28", "time": "09:00"})
    due = datetime(2026, 3, 28, 9, 0, tzinfo=timezone.utc)
    seen: list = []
    assert ev.dispatch_due(now=due - timedelta(seconds=11), enqueue=seen.extend, lookahead=10) == 0
    assert ev.dispatch_due(now=due - timedelta(seconds=9), enqueue=seen.extend, lookahead=10) == 1
    assert seen == [(event_id, due)]  # published now, with the due time as its ETA (enqueue_deliveries)
    assert ev.dispatch_due(now=due, enqueue=seen.extend, lookahead=10) == 0
    assert deliveries() == [(event_id, due, ev.PENDING)]


def test_cancel_after_an_early_claim_cancels_the_pending_occurrence(event_db: str) -> None:
    from rekku.registry import get_registry

    now = datetime.now(timezone.utc).replace(microsecond=0)
    due = now + timedelta(hours=1)
    once = add_event({"date": due.date().isoformat(), "time": due.strftime("%H:%M:%S")}, now=now)
    daily = add_event({"date": due.date().isoformat(), "time": due.strftime("%H:%M:%S"), "repeat": "daily"}, now=now)
    claimed: list = []
    assert ev.dispatch_due(now=due - timedelta(seconds=5), enqueue=claimed.extend, lookahead=10) == 2
    plugin = get_registry().plugins["event"]
    listed = {e["id"]: e for e in plugin._list({"chat_id": "c1"})["events"]}
    assert listed[once]["status"] == listed[daily]["status"] == ev.ACTIVE  # claimed, not due yet: still waiting
    assert listed[once]["next_run"] == due.isoformat()
    assert plugin._cancel(once) == {"id": once, "cancelled": True, "status": ev.CANCELLED}
    assert plugin._cancel(daily) == {"id": daily, "cancelled": True, "status": ev.CANCELLED}
    assert {s for _, _, s in deliveries()} == {ev.CANCELLED_DELIVERY}
    # the messages already published find nothing to deliver, and recovery never brings them back
    assert ev._open_deliveries([[e, o.isoformat()] for e, o in claimed]) == ([], {})
    assert ev.recover_lost(now=due + timedelta(hours=2), enqueue=claimed.extend) == 0
