"""Events end to end on MariaDB with real processes: two beats and two io workers deliver every
occurrence exactly once, a worker killed mid-delivery does not duplicate it, failures stay visible."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import datetime, timezone

import sqlalchemy as sa

from rekku.db import make_engine
from tests.support import Stack, stop_process, twice, wait_until


def _chat() -> str:
    return f"ev-{uuid.uuid4().hex[:8]}"


def outbox(stack: Stack, chat: str) -> list[str]:
    return [m["text"] for m in stack.get("/v1/outbox", params={"chat_id": chat, "limit": 500}).json()["messages"]]


def delivery_rows(stack: Stack, event_ids: list[int]) -> list[dict]:
    engine = make_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT event_id, status, attempts, error, result FROM event_deliveries "
                                        "WHERE event_id IN :ids").bindparams(sa.bindparam("ids", expanding=True)),
                                {"ids": event_ids}).mappings().all()
    finally:
        engine.dispose()
    return [{**r, "result": json.loads(r["result"]) if isinstance(r["result"], str) else r["result"]} for r in rows]


#: Beat's event tick (it claims due occurrences and enqueues their deliveries, and enqueues lost ones
#: again) and the delivery task.
TICK, DELIVER = "rekku.periodic.event.tick", "rekku.event.deliver"


def in_flight(stack: Stack, event_ids: list[int], ignore: frozenset[str] = frozenset()) -> list[dict]:
    """Event ticks, and deliveries of these events, waiting in a queue or held by a worker (but the
    unacked messages tagged in ``ignore``: a killed worker's, which wait for the visibility timeout)."""
    wanted = {int(i) for i in event_ids}
    return [m for m in stack.broker_messages() if m["tag"] not in ignore and (
        m["task"] == TICK or (m["task"] == DELIVER
                              and any(int(item[0]) in wanted for item in (m["kwargs"] or {}).get("items", []))))]


def settle(stack: Stack, event_ids: list[int], ignore: frozenset[str] = frozenset()) -> None:
    """Positive evidence that nothing more can arrive for these events, whose deliveries are all final
    now: once their recovery lease has run out (a tick after that would enqueue any of them again if
    recovery took final ones), no tick and none of their deliveries in flight; then two more ticks run
    from start to end (enqueued after that, they saw the occurrences as they are now, and enqueued
    whatever they would); then nothing in flight again."""
    lease_over = time.monotonic() + float(stack.extra_env["REKKU_EVENT_REDELIVER_SECONDS"])
    idle = twice(lambda: not in_flight(stack, event_ids, ignore))
    wait_until(lambda: time.monotonic() > lease_over and idle(), timeout=60,
               what="the recovery lease over, and no tick and none of these deliveries in flight")
    ticks = stack.tasks_succeeded(TICK)
    wait_until(lambda: stack.tasks_succeeded(TICK) >= ticks + 2, timeout=30, what="two more ticks")
    wait_until(idle, timeout=60, what="no tick and none of these deliveries in flight, after two more ticks")


def create(stack: Stack, payload: dict, context: dict) -> dict:
    run = stack.run("event", payload, context)
    assert run["status"] == "succeeded", run
    return run["result"]


def test_past_and_malformed_times_are_refused_at_the_ingress(event_stack: Stack) -> None:
    answer = event_stack.submit([{"type": "event", "payload": {"description": "x", "date": "2020-01-01"}},
                                 {"type": "event", "payload": {"description": "x", "in": "soon"}},
                                 {"type": "event", "payload": {"description": "x", "date": "2099-01-01",
                                                               "repeat": "always"}}], {"chat_id": "c"})
    errors = [r["errors"][0] for r in answer["rejected"]]
    assert "would happen in the past" in errors[0] and "give a future time" in errors[0]
    assert "cannot read the duration 'soon'" in errors[1]
    assert "repeat 'always' is not supported" in errors[2]


def test_two_beats_and_two_workers_deliver_every_occurrence_exactly_once(event_stack: Stack, fakes: dict) -> None:
    chat = _chat()
    ctx = {"interface": "outbox", "chat_id": chat}
    created = [create(event_stack, {"description": f"tea {i}", "in": "in 3 seconds"}, ctx) for i in range(12)]
    created.append(create(event_stack, {"description": "with actions", "in": "in 3 seconds", "timezone": "Asia/Tokyo",
                                        "actions": [{"type": "message_outbox", "payload": {"text": "scheduled hi"}}]},
                          ctx))
    assert created[0]["next_run_local"].endswith("+01:00") or created[0]["next_run_local"].endswith("+02:00")
    expected = sorted([f"⏰ Reminder: tea {i}" for i in range(12)] + ["⏰ Reminder: with actions", "scheduled hi"])
    wait_until(lambda: len([t for t in outbox(event_stack, chat) if not t.startswith("{")]) >= 14, timeout=30,
               what="13 reminders and the scheduled action in the outbox")
    ids = [e["id"] for e in created]
    wait_until(lambda: {r["status"] for r in delivery_rows(event_stack, ids)} == {"delivered"}, timeout=30,
               what="every occurrence delivered")
    settle(event_stack, ids)  # whatever either beat or worker would still send has been sent
    assert sorted(t for t in outbox(event_stack, chat) if not t.startswith("{")) == expected
    # claimed up to four ticks ahead, published with the due time as ETA: never delivered before it
    due = {f"⏰ Reminder: {e['description']}": datetime.fromisoformat(e["next_run"]) for e in created}
    for message in event_stack.get("/v1/outbox", params={"chat_id": chat, "limit": 500}).json()["messages"]:
        if message["text"] in due:
            assert datetime.fromisoformat(message["created_at"]).replace(tzinfo=timezone.utc) >= due[message["text"]]
    rows = delivery_rows(event_stack, ids)
    assert sorted(r["event_id"] for r in rows) == sorted(ids)
    assert {r["status"] for r in rows} == {"delivered"} and {r["attempts"] for r in rows} == {1}
    # the system messages are the model's (the feed); no human chat, the webhook's included, gets one
    sent = [json.loads(r.raw)["text"] for r in fakes["webhook"].requests if json.loads(r.raw)["chat_id"] == chat]
    assert not any("system_message" in t for t in sent + outbox(event_stack, chat)), sent
    systems = [i["data"] for i in event_stack.feed(type="event_reminder", chat_id=chat)]
    assert sorted(s["event_id"] for s in systems) == sorted(ids) and {s["type"] for s in systems} == {"event_reminder"}
    tokyo = next(s for s in systems if s["description"] == "with actions")
    assert tokyo["scheduled"].endswith("+09:00") and tokyo["target"] == {"interface": "outbox", "chat_id": chat,
                                                                         "thread_id": None}
    listed = event_stack.run("list_events", {"include_finished": True}, ctx)["result"]["events"]
    assert sorted(e["id"] for e in listed) == sorted(ids) and {e["status"] for e in listed} == {"done"}


def test_recurring_event_every_minute_is_cancelled(event_stack: Stack) -> None:
    chat = _chat()
    ctx = {"interface": "outbox", "chat_id": chat}
    event = create(event_stack, {"description": "stretch", "in": "2 seconds", "repeat": "every 1 minute"}, ctx)
    assert event["repeat"] == "every" and event["every"] == 60 and len(event["upcoming_local"]) == 3
    wait_until(lambda: "⏰ Reminder: stretch" in outbox(event_stack, chat), timeout=20, what="the first occurrence")
    listed = event_stack.run("list_events", {}, ctx)["result"]["events"]
    assert [e["id"] for e in listed] == [event["id"]] and listed[0]["next_run"] > event["next_run"]
    cancelled = event_stack.run("cancel_event", {"id": event["id"]}, ctx)
    assert cancelled["result"] == {"id": event["id"], "cancelled": True, "status": "cancelled"}
    assert event_stack.run("list_events", {}, ctx)["result"]["events"] == []
    missing = event_stack.run("cancel_event", {"id": 987654321}, ctx)
    assert missing["status"] == "failed" and "No event with id 987654321" in missing["error"]


def test_a_worker_killed_during_delivery_still_delivers_once(event_stack: Stack, tg) -> None:
    chat = str(-200_000_000 - uuid.uuid4().int % 1_000_000)
    tg.hold("⏰ Reminder: held")
    event = create(event_stack, {"description": "held call", "in": "2 seconds",
                                 "target": {"interface": "telegram_bot", "chat_id": chat}}, {"chat_id": "x"})
    assert tg.held.wait(30), "the reminder never reached the fake Telegram"
    for proc in [p for p in event_stack.processes if getattr(p, "node", "").startswith("io@") and p.poll() is None]:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker holding the send dies, and its twin with it
        stop_process(proc)
    # what the dead workers held stays unacknowledged until the visibility timeout (an hour)
    dead = frozenset(m["tag"] for m in event_stack.broker_messages() if m["tag"] is not None)
    tg.release.set()
    event_stack.start_worker("io", concurrency=4, node=f"events-io-{uuid.uuid4().hex[:4]}")
    row = wait_until(lambda: (r := delivery_rows(event_stack, [event["id"]])) and r[0]["status"] == "delivered"
                     and r[0], timeout=30, what="the lost delivery to be enqueued again and finished")
    assert len(tg.sends(chat)) == 1
    # at least the killed attempt and the one that finished; both beats recover the lost delivery, so a
    # third attempt may count itself before the row is marked (it finds the part 'sending' and sends nothing)
    assert row["attempts"] >= 2 and row["result"]["reminder"]["uncertain"] == [0]
    settle(event_stack, [event["id"]], ignore=dead)  # a second redelivery (both beats recover) has run too
    assert len(tg.sends(chat)) == 1
    event_stack.start_worker("io", concurrency=4, node=f"events-io-{uuid.uuid4().hex[:4]}")


def test_a_failed_delivery_is_retried_with_backoff_and_never_marked_delivered_before(event_stack: Stack, tg) -> None:
    chat = str(-300_000_000 - uuid.uuid4().int % 1_000_000)
    tg.rate_limit(1)
    event = create(event_stack, {"description": "retry me", "in": "2 seconds",
                                 "target": {"interface": "telegram_bot", "chat_id": chat}}, {"chat_id": "x"})
    failed = wait_until(lambda: (r := delivery_rows(event_stack, [event["id"]])) and r[0]["status"] != "pending"
                        and r[0], timeout=20, what="the first attempt")
    assert failed["status"] == "failed" and "rate limited" in failed["error"], failed
    done = wait_until(lambda: (r := delivery_rows(event_stack, [event["id"]])) and r[0]["status"] == "delivered"
                      and r[0], timeout=20, what="the retry")
    assert done["attempts"] == 2 and [r.response["ok"] for r in tg.sends(chat)] == [False, True]
    tg.rate_limit(1000)  # Telegram keeps refusing: each attempt fails, is retried later, and stays failed
    bad = create(event_stack, {"description": "refused", "in": "2 seconds",
                               "target": {"interface": "telegram_bot", "chat_id": chat}}, {"chat_id": "x"})
    sent = lambda: [r for r in tg.sends(chat) if r.data.get("text") == "⏰ Reminder: refused"]  # noqa: E731
    try:
        sends = wait_until(lambda: len(s := sent()) >= 3 and s, timeout=30, what="three refused attempts")
    finally:
        tg.rate_limited = 0
    row = delivery_rows(event_stack, [bad["id"]])[0]
    assert row["status"] == "failed" and "rate limited" in row["error"] and row["result"] is None
    # jittered backoff (rekku.backoff): at least 1 s, at most 2 s then 4 s
    assert sends[1].at - sends[0].at >= 0.9 and sends[2].at - sends[1].at >= 0.9
