"""The worker's timer drops finished tasks' time-limit entries (workers/timer_sweep.py)."""

from __future__ import annotations

from time import monotonic

import pytest
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st
from kombu.asynchronous.timer import Timer
from rekku_workers.timer_sweep import sweep

from tests.support import Stack, wait_until

#: (seconds from now, cancelled?) per entry; equal delays are likely, to exercise ties.
ENTRIES = st.lists(st.tuples(st.integers(-50, 50), st.booleans()), max_size=200)


def _timer_with(entries: list[tuple[int, bool]]) -> tuple[Timer, list, list]:
    timer = Timer()
    now = monotonic()
    live, cancelled = [], []
    for delay, is_cancelled in entries:
        entry = timer.call_at(now + delay, lambda: None)
        if is_cancelled:
            entry.cancel()
        (cancelled if is_cancelled else live).append(entry)
    return timer, live, cancelled


@given(ENTRIES)
def test_sweep_keeps_exactly_the_live_entries_in_their_order(entries: list[tuple[int, bool]]) -> None:
    timer, live, cancelled = _timer_with(entries)
    firing_order = [item.entry for item in timer.queue if not item.entry.canceled]
    heap = timer._queue

    assert sweep(timer) == len(cancelled)

    assert timer._queue is heap  # the hub's loop and the timer's iterator hold this very list
    assert all(heap[(child - 1) // 2] <= heap[child] for child in range(1, len(heap)))  # still a heap
    assert sorted(map(id, (item.entry for item in heap))) == sorted(map(id, live))
    assert [item.entry for item in timer.queue] == firing_order


@given(ENTRIES.filter(lambda entries: any(not cancelled for _, cancelled in entries)))
def test_sweep_between_firings_changes_nothing_the_loop_fires(entries: list[tuple[int, bool]]) -> None:
    """The sweep runs as a timer entry, i.e. while the loop's iterator over the heap is suspended."""
    entries = [(-abs(delay) - 1, cancelled) for delay, cancelled in entries]  # all due: the loop fires each
    timer, live, _ = _timer_with(entries)
    expected = [item.entry for item in timer.queue if not item.entry.canceled]
    schedule = iter(timer)

    fired = [next(schedule)[1]]
    sweep(timer)
    while (entry := next(schedule)[1]) is not None:
        fired.append(entry)

    assert fired == expected
    assert len(timer) == 0


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_worker_timer_holds_no_finished_tasks(stack: Stack) -> None:
    """Each prefork task arms a time-limit entry (300 s + grace by default); once the tasks finish,
    the worker's timer is back to its own few periodic entries instead of one per task."""
    hostname = "default@sqlite-main"
    app = Celery(broker=stack.broker_url)
    try:
        def timer_stats() -> dict:
            replies = app.control.inspect([hostname], timeout=2).stats() or {}
            return replies[hostname]["timer"]

        before = timer_stats()
        ids = [a["id"] for _ in range(3) for a in stack.submit([{"type": "tk_sync", "payload": {}}] * 100)["accepted"]]
        assert len(ids) == 300
        for action_id in ids:
            assert stack.wait_action(action_id, timeout=60)["status"] == "succeeded"

        after = wait_until(lambda: (s := timer_stats())["swept"] >= before["swept"] + 300 and s,
                           timeout=30, what="the finished tasks' timer entries to be swept")
        assert after["entries"] < 100, after
    finally:
        app.close()

