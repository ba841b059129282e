"""Who an action runs as, through real processes: the request context (the token holder's word) decides,
never a payload the model wrote.

Events (``event_stack``: MariaDB, two beats ticking every second, Telegram fake, trainer telegram_bot:42,
plus a terminal worker here): an event's ``created_by`` is a label; its scheduled actions are authorized
when it is created, for the requester, and run when due with the requester's stored context.
Chats (``chat_stack``): only a trainer may link, unlink, store or name a chat other than the one the
request came from, and a name can never take another chat's messages.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

from rekku.action_log import ActionLog, NewRun
from rekku.db import make_engine
from tests.conftest import TRAINER
from tests.support import Stack, stop_process, wait_until

#: Where the terminal commands of these tests leave their marks (the terminal worker runs on this machine).
MARKS = Path("/tmp") / f"rekku-trust-{uuid.uuid4().hex[:8]}"
#: The trainer's wording the ingress uses for a trainer-only action.
TRAINERS_ONLY = "Action 'terminal' is restricted to trainers"


def _tg_chat() -> str:
    """A fresh Telegram-like chat id (negative number), so tests never see each other's messages."""
    return str(-700_000_000 - uuid.uuid4().int % 100_000_000)


def _mark(name: str) -> Path:
    MARKS.mkdir(exist_ok=True)
    return MARKS / f"{name}-{uuid.uuid4().hex[:6]}"


def _mallory(chat: str) -> dict:
    """A chat user who is not a trainer, speaking from ``chat`` (their own Telegram group)."""
    return {"interface": "telegram_bot", "chat_id": chat, "user_id": "666", "username": "mallory"}


def _trainer(chat: str) -> dict:
    return {**TRAINER, "chat_id": chat}


def _terminal(mark: Path) -> dict:
    return {"type": "terminal", "payload": {"command": f"echo pwned > {mark}"}}


def _rejected_errors(resp) -> list[str]:
    return [e for r in resp.json()["rejected"] for e in r["errors"]]


@pytest.fixture(scope="module")
def terminal_node(event_stack: Stack) -> Iterator[object]:
    """A terminal worker in the event stack, so an event's terminal action would really run."""
    proc = event_stack.start_worker("terminal", concurrency=2, node=f"trust-term-{uuid.uuid4().hex[:4]}")
    yield proc
    stop_process(proc)
    shutil.rmtree(MARKS, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers on the database
def _engine(stack: Stack) -> sa.Engine:
    return make_engine(stack.database_url)


def delivery_of(stack: Stack, event_id: int) -> dict | None:
    engine = _engine(stack)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT status, result, error FROM event_deliveries WHERE event_id = :id"),
                               {"id": event_id}).mappings().first()
    finally:
        engine.dispose()
    if row is None:
        return None
    result = json.loads(row["result"]) if isinstance(row["result"], str) else row["result"]
    return {"status": row["status"], "result": result, "error": row["error"]}


def delivered(stack: Stack, event_id: int, timeout: float = 30) -> dict:
    return wait_until(lambda: (d := delivery_of(stack, event_id)) and d["status"] == "delivered" and d,
                      timeout=timeout, what=f"event {event_id} delivered")


def insert_event(stack: Stack, chat: str, actions: list, created_by: str, requester: dict | None = None) -> int:
    """A ``scheduled_events`` row due in 2 s, written as an older release wrote it: with ``requester``
    None the column is not named at all (a row from before it existed)."""
    from rekku_plugins.event.engine import events, new_event

    from rekku.models import utcnow
    from rekku.schedule import build_rule

    rule, first = build_rule({"in": "in 2 seconds"}, utcnow(), "Europe/Rome")
    row = new_event(rule, first, "old reminder", "telegram_bot", chat, created_by=created_by, actions=actions)
    row.pop("requester", None)
    if requester is not None:
        row["requester"] = requester
    engine = _engine(stack)
    try:
        with engine.begin() as conn:
            return conn.execute(sa.insert(events).values(**row)).inserted_primary_key[0]
    finally:
        engine.dispose()


def send_past_the_ingress(stack: Stack, action_type: str, payload: dict, context: dict, queue: str) -> dict:
    """Log and enqueue an action the way the ingress would, skipping its checks: the worker must refuse."""
    action_id, batch_id = str(uuid.uuid4()), str(uuid.uuid4())
    engine = sa.create_engine(stack.database_url)
    try:
        ActionLog(engine).record_batch(batch_id, None, [NewRun(action_id, 0, action_type, queue, payload, context)], {})
    finally:
        engine.dispose()
    app = Celery(broker=stack.broker_url)
    try:
        app.send_task(f"rekku.action.{action_type}", kwargs={"action_id": action_id, "payload": payload,
                                                             "context": {**context, "batch_id": batch_id}},
                      task_id=action_id, queue=queue)
    finally:
        app.close()
    return stack.wait_action(action_id)


def scheduled_run(stack: Stack, delivery: dict) -> dict:
    """The action log's record of the (single) scheduled action an occurrence submitted."""
    accepted = delivery["result"]["actions"]["accepted"]
    assert len(accepted) == 1, delivery
    return stack.wait_action(accepted[0]["id"])


def runs_naming(stack: Stack, mark: Path) -> list[dict]:
    """Every action in the action log (any state) whose payload names ``mark``. The ingress writes an
    action there before it enqueues it, so an empty list means no command writing ``mark`` was ever
    accepted, by any path through the ingress."""
    engine = _engine(stack)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, type, status, payload FROM action_runs")).mappings().all()
    finally:
        engine.dispose()
    return [dict(row) for row in rows if mark.name in str(row["payload"])]


def events_naming(stack: Stack, mark: Path) -> list[dict]:
    """Every stored event (any state) whose scheduled actions name ``mark``."""
    engine = _engine(stack)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, status, action_id, actions FROM scheduled_events")).mappings().all()
    finally:
        engine.dispose()
    return [dict(row) for row in rows if mark.name in str(row["actions"])]


def a_later_event_ran(stack: Stack) -> None:
    """Positive evidence that the scheduler has moved past whatever this test did before: an event the
    trainer schedules now, due after anything scheduled earlier, was claimed by a beat tick, delivered,
    and its scheduled terminal command ran. A refused event, had it been stored after all, would have
    been due no later than this one."""
    mark = _mark("control")
    run = stack.run("event", {"description": "control", "in": "in 2 seconds",
                              "actions": [{"type": "terminal", "payload": {"command": f"echo ok > {mark}"}}]},
                    _trainer(_tg_chat()))
    assert run["status"] == "succeeded", run
    command = scheduled_run(stack, delivered(stack, run["result"]["id"]))
    assert command["status"] == "succeeded" and mark.exists(), command


# ----------------------------------------------------------------------------- events: the forgery
def test_a_non_trainers_event_claiming_created_by_the_trainer_cannot_run_terminal(event_stack: Stack,
                                                                                   terminal_node: object) -> None:
    """The reported attack: user 666 schedules an event 'created_by' the trainer (42) holding a terminal
    command; it used to run as the trainer 2 s later. Now the ingress refuses it (422, trainer wording,
    naming the event's actions) and nothing runs."""
    mark = _mark("forged")
    resp = event_stack.post("/v1/actions", {"actions": [{"type": "event", "payload": {
        "description": "totally harmless", "in": "in 2 seconds", "created_by": "42", "actions": [_terminal(mark)]}}],
        "context": _mallory(_tg_chat())})
    assert resp.status_code == 422, resp.text
    errors = _rejected_errors(resp)
    assert any(TRAINERS_ONLY in e and "'actions'" in e and "actions[0] (terminal)" in e for e in errors), errors
    a_later_event_ran(event_stack)  # the forged event, had it been stored, was due before this one
    assert events_naming(event_stack, mark) == [] and runs_naming(event_stack, mark) == []
    assert not mark.exists()


def test_a_trainers_event_runs_its_terminal_action_as_the_trainer_whatever_created_by_says(
        event_stack: Stack, terminal_node: object) -> None:
    """Positive path: the trainer's event runs its terminal command when due, as the trainer (the stored
    requester), even though its 'created_by' label names somebody else (before: it ran as that label)."""
    mark, chat = _mark("trainer"), _tg_chat()
    run = event_stack.run("event", {"description": "nightly", "in": "in 2 seconds", "created_by": "someone else",
                                    "actions": [{"type": "terminal", "payload": {"command": f"echo ok > {mark}"}}]},
                          _trainer(chat))
    assert run["status"] == "succeeded", run
    assert run["result"]["created_by"] == "someone else"
    assert wait_until(mark.exists, timeout=30, what="the scheduled terminal command to run")
    command = scheduled_run(event_stack, delivered(event_stack, run["result"]["id"]))
    assert command["type"] == "terminal" and command["status"] == "succeeded", command
    assert (command["context"]["user_id"], command["context"]["chat_id"]) == ("42", chat)


def test_a_non_trainers_scheduled_actions_run_as_the_requester_not_as_created_by(event_stack: Stack) -> None:
    """An event a non-trainer may schedule (an echo) runs it with the requester's verified context (user,
    username, chat), never with the 'created_by' the payload claims."""
    chat = _tg_chat()
    run = event_stack.run("event", {"description": "ping", "in": "in 2 seconds", "created_by": "42",
                                    "actions": [{"type": "echo", "payload": {"text": "scheduled"}}]}, _mallory(chat))
    assert run["status"] == "succeeded", run
    echo = scheduled_run(event_stack, delivered(event_stack, run["result"]["id"]))
    context = echo["context"]
    assert (context["user_id"], context.get("username"), context["chat_id"]) == ("666", "mallory", chat), context
    assert echo["status"] == "succeeded" and echo["result"] == {"text": "scheduled"}
    assert run["result"]["created_by"] == "42"  # kept as the label it is
    assert run["result"]["requested_by"] == {"interface": "telegram_bot", "user_id": "666", "username": "mallory"}


def test_an_event_cannot_schedule_another_event(event_stack: Stack) -> None:
    """No event inside an event's actions (the nested one would launder its own actions one level deeper)."""
    inner = {"type": "event", "payload": {"description": "inner", "in": "in 1 hour"}}
    resp = event_stack.post("/v1/actions", {"actions": [{"type": "event", "payload": {
        "description": "outer", "in": "in 1 hour", "actions": [inner]}}], "context": _trainer(_tg_chat())})
    assert resp.status_code == 422, resp.text
    assert any("cannot hold ['event']" in e for e in _rejected_errors(resp))


def test_a_non_trainer_sees_and_cancels_only_their_own_chats_events(event_stack: Stack) -> None:
    """The trainer's reminder in their chat, with its scheduled action: another user can neither list it
    (naming the chat, or asking from no chat) nor cancel it by id (before: both worked, and the listing
    showed the trainer's scheduled actions). In their own chat they list and cancel their own events;
    the trainer still reaches any chat's."""
    boss, mine = _tg_chat(), _tg_chat()
    secret = event_stack.run("event", {"description": "payroll run", "in": "in 1 hour",
                                       "actions": [{"type": "echo", "payload": {"text": "pay"}}]}, _trainer(boss))
    assert secret["status"] == "succeeded", secret
    secret_id = secret["result"]["id"]

    # listing another chat's events: refused at the ingress, naming the rule
    for payload, context in (({"chat_id": boss}, _mallory(mine)),
                             ({"chat_id": boss, "interface": "telegram_bot"}, _mallory(mine)),
                             ({"interface": "outbox"}, _mallory(mine)),
                             ({}, {"interface": "telegram_bot", "user_id": "666"})):  # from no chat: every chat's
        resp = event_stack.post("/v1/actions", {"actions": [{"type": "list_events", "payload": payload}],
                                                "context": context})
        assert resp.status_code == 422, (payload, context, resp.text)
        assert any("trainer" in e for e in _rejected_errors(resp)), resp.text
    # cancelling it by id from their own chat: the worker finds it is another chat's, and it stays
    attempt = event_stack.run("cancel_event", {"id": secret_id}, _mallory(mine))
    assert attempt["status"] == "failed" and f"Event {secret_id} is another chat's" in attempt["error"], attempt
    boss_view = event_stack.run("list_events", {}, _trainer(boss))["result"]["events"]
    assert [(e["id"], e["status"]) for e in boss_view] == [(secret_id, "active")]

    # their own chat: listed and cancelled as before; the boss's event is not among theirs
    own = event_stack.run("event", {"description": "water the plants", "in": "in 1 hour"}, _mallory(mine))
    listed = event_stack.run("list_events", {"chat_id": mine}, _mallory(mine))["result"]["events"]
    assert [e["id"] for e in listed] == [own["result"]["id"]]
    done = event_stack.run("cancel_event", {"id": own["result"]["id"]}, _mallory(mine))
    assert done["result"] == {"id": own["result"]["id"], "cancelled": True, "status": "cancelled"}, done

    # the trainer lists the user's chat from theirs, and cancels the payroll run
    theirs = event_stack.run("list_events", {"chat_id": mine, "include_finished": True}, _trainer(boss))
    assert [e["id"] for e in theirs["result"]["events"]] == [own["result"]["id"]]
    assert event_stack.run("cancel_event", {"id": secret_id}, _trainer(boss))["result"]["cancelled"] is True


def test_an_event_the_user_asked_for_in_another_chat_is_theirs_to_cancel(event_stack: Stack) -> None:
    """An event aimed at another chat (as a message may be) stays cancellable by the user who asked for
    it, from wherever they write, and by anyone writing from the chat it is aimed at; not by a third
    user of a third chat."""
    origin, target = _tg_chat(), _tg_chat()
    payload = {"description": "to the group", "in": "in 1 hour", "target": {"interface": "telegram_bot",
                                                                            "chat_id": target}}
    first, second = (event_stack.run("event", payload, _mallory(origin))["result"]["id"] for _ in range(2))
    stranger = {"interface": "telegram_bot", "chat_id": _tg_chat(), "user_id": "777", "username": "eve"}
    refused = event_stack.run("cancel_event", {"id": first}, stranger)
    assert refused["status"] == "failed" and "another chat's" in refused["error"], refused
    assert event_stack.run("cancel_event", {"id": first}, _mallory(_tg_chat()))["result"]["cancelled"] is True
    in_target = {**stranger, "chat_id": target}
    assert event_stack.run("cancel_event", {"id": second}, in_target)["result"]["cancelled"] is True


def test_the_worker_refuses_a_forged_event_that_skipped_the_ingress_and_its_retry_is_refused_too(
        event_stack: Stack, terminal_node: object) -> None:
    """The worker checks again (AuthorizationHook → the event plugin's authorize_payload): an event with
    a terminal action logged and enqueued past the ingress for user 666 fails and creates nothing; and
    POST /v1/actions/{id}/retry does not re-run it for that context (409, the reason, still failed)."""
    mark = _mark("past-ingress")
    payload = {"description": "sneaky", "in": "in 2 seconds", "created_by": "42", "actions": [_terminal(mark)]}
    run = send_past_the_ingress(event_stack, "event", payload, _mallory(_tg_chat()), "default")
    assert run["status"] == "failed" and TRAINERS_ONLY in (run["error"] or ""), run
    retry = event_stack.post(f"/v1/actions/{run['id']}/retry")
    assert retry.status_code == 409, retry.text
    assert TRAINERS_ONLY in retry.json()["detail"] and "stays failed" in retry.json()["detail"]
    assert event_stack.wait_action(run["id"], timeout=1)["status"] == "failed"
    a_later_event_ran(event_stack)  # an event the refused one had created would have been due before this one
    assert events_naming(event_stack, mark) == []
    assert [r["id"] for r in runs_naming(event_stack, mark)] == [run["id"]]  # only the refused event action
    assert not mark.exists()


def test_an_event_row_from_before_the_requester_was_recorded_delivers_its_reminder_but_runs_nothing(
        event_stack: Stack, terminal_node: object, tg) -> None:
    """Old rows have only the label 'created_by' (here the trainer's id): the reminder still goes out,
    the scheduled actions are not run as anyone, and the delivery says why."""
    mark, chat = _mark("old-row"), _tg_chat()
    event_id = insert_event(event_stack, chat, [_terminal(mark)], created_by="42")
    done = delivered(event_stack, event_id)
    assert "created before its requester was recorded" in done["result"]["actions"]["not_run"], done
    assert [r.data["text"] for r in tg.sends(chat)] == ["⏰ Reminder: old reminder"]
    # the delivery is marked delivered only after its scheduled actions were submitted (and so logged)
    assert runs_naming(event_stack, mark) == []
    assert not mark.exists()


def test_scheduled_actions_are_authorized_again_when_due_for_the_stored_requester(
        event_stack: Stack, terminal_node: object) -> None:
    """A stored requester who may no longer run the action (a trainer demoted since: user 999 is not in
    TRAINER_IDS) is refused by the ingress at delivery, whatever 'created_by' says."""
    mark, chat = _mark("demoted"), _tg_chat()
    event_id = insert_event(event_stack, chat, [_terminal(mark)], created_by="42",
                            requester={"interface": "telegram_bot", "chat_id": chat, "user_id": "999"})
    done = delivered(event_stack, event_id)
    actions = done["result"]["actions"]
    assert actions["accepted"] == [] and TRAINERS_ONLY in actions["rejected"][0]["errors"][0], done
    # the delivery is marked delivered only after its scheduled actions were submitted (and so logged)
    assert runs_naming(event_stack, mark) == []
    assert not mark.exists()


# ----------------------------------------------------------------------------- chats: links
def test_a_non_trainer_cannot_link_the_trainers_chat_to_theirs(chat_stack: Stack, tg) -> None:
    """The reported hijack: user 666 in their chat links the trainer's chat to it; every message to the
    trainer was then copied to them. Refused at the ingress, and messages stay where they were sent.
    The other direction (pushing their chat's traffic into the trainer's) is refused too; a trainer
    may link any two chats."""
    trainer_chat, evil = _tg_chat(), _tg_chat()
    for payload in ({"from_chat": trainer_chat, "to_chat": evil, "to_interface": "telegram_bot"},
                    {"from_chat": evil, "to_chat": trainer_chat, "to_interface": "telegram_bot"},
                    {"from_chat": trainer_chat, "from_interface": "telegram_bot", "to_chat": evil,
                     "to_interface": "telegram_bot", "bidirectional": True}):
        resp = chat_stack.post("/v1/actions", {"actions": [{"type": "link_chats", "payload": payload}],
                                               "context": _mallory(evil)})
        assert resp.status_code == 422, resp.text
        assert any("Action 'link_chats' is restricted to trainers" in e for e in _rejected_errors(resp))
    sent = chat_stack.run("message_telegram_bot", {"text": "for the trainer only"}, _trainer(trainer_chat))
    assert sent["status"] == "succeeded" and sent["result"]["forwarded"] == [], sent
    assert [r.data["text"] for r in tg.sends(trainer_chat)] == ["for the trainer only"]
    assert tg.sends(evil) == []
    # a trainer links any two chats (neither of them their own)
    a, b = _tg_chat(), _tg_chat()
    linked = chat_stack.run("link_chats", {"from_chat": a, "to_chat": b, "to_interface": "telegram_bot"},
                            _trainer(_tg_chat()))
    assert linked["status"] == "succeeded", linked
    chat_stack.run("message_telegram_bot", {"text": "to a"}, _trainer(a))
    assert [r.data["text"] for r in tg.sends(b)] == ["to a"]


def test_a_non_trainer_cannot_remove_a_link_between_other_chats_or_from_their_own(chat_stack: Stack, tg) -> None:
    """A trainer's forward A→B (say, to watch chat A from B) cannot be removed by a non-trainer, neither
    from B nor from A: unlinking changes where another chat's messages go."""
    a, b = _tg_chat(), _tg_chat()
    assert chat_stack.run("link_chats", {"from_chat": a, "to_chat": b, "to_interface": "telegram_bot"},
                          _trainer(a))["status"] == "succeeded"
    for chat in (a, b):
        resp = chat_stack.post("/v1/actions", {"actions": [{"type": "unlink_chats", "payload": {
            "from_chat": a, "from_interface": "telegram_bot", "to_chat": b, "to_interface": "telegram_bot"}}],
            "context": _mallory(chat)})
        assert resp.status_code == 422, resp.text
        assert any("Action 'unlink_chats' is restricted to trainers" in e for e in _rejected_errors(resp))
    chat_stack.run("message_telegram_bot", {"text": "still watched"}, _mallory(a))
    assert [r.data["text"] for r in tg.sends(b)] == ["still watched"]


def test_the_worker_refuses_a_link_that_skipped_the_ingress(chat_stack: Stack, tg) -> None:
    """The chat_link check runs in the worker too: a hijacking link_chats logged and enqueued past the
    ingress fails there, and no forward is created."""
    trainer_chat, evil = _tg_chat(), _tg_chat()
    run = send_past_the_ingress(chat_stack, "link_chats", {"from_chat": trainer_chat, "to_chat": evil,
                                                           "to_interface": "telegram_bot"}, _mallory(evil), "default")
    assert run["status"] == "failed" and "restricted to trainers" in (run["error"] or ""), run
    chat_stack.run("message_telegram_bot", {"text": "private"}, _trainer(trainer_chat))
    assert tg.sends(evil) == []


# ----------------------------------------------------------------------------- chats: names
def test_a_non_trainer_cannot_re_point_the_trainers_chat_name_to_their_chat(chat_stack: Stack, tg) -> None:
    """Actions address chats by name; a non-trainer may not rename or store another chat, may not take
    a name another chat uses (given, or read from the platform), and may still name their own chat."""
    trainer_chat, evil = _tg_chat(), _tg_chat()
    name = f"Trainer room {uuid.uuid4().hex[:6]}"
    stored = chat_stack.run("store_link", {"chat_id": trainer_chat, "interface": "telegram_bot", "link": "t",
                                           "chat_name": name}, _trainer(trainer_chat))
    assert stored["status"] == "succeeded", stored
    attempts = [("update_chat_names", {"chat_id": trainer_chat, "chat_name": f"old {name}"}, "other than this one"),
                ("store_link", {"chat_id": trainer_chat, "link": "https://evil.example"}, "other than this one"),
                ("update_chat_names", {"chat_id": evil, "chat_name": name.lower()}, "already used by another chat"),
                ("store_link", {"chat_id": evil, "link": "l", "chat_name": name}, "already used by another chat"),
                ("store_link", {"chat_id": evil, "link": "l", "thread_id": "5", "thread_name": name},
                 "already used by another chat"),
                # the original's field names are the same fields: the same rule reads them
                ("store_link", {"chat_id": evil, "link": "l", "message_thread_id": 5, "message_thread_name": name},
                 "already used by another chat"),
                ("update_chat_names", {"chat_id": evil, "message_thread_id": 5, "message_thread_name": name},
                 "already used by another chat")]
    for action_type, payload, why in attempts:
        resp = chat_stack.post("/v1/actions", {"actions": [{"type": action_type, "payload": payload}],
                                               "context": _mallory(evil)})
        assert resp.status_code == 422, (action_type, payload, resp.text)
        errors = _rejected_errors(resp)
        assert any(f"Action '{action_type}' is restricted to trainers" in e and why in e for e in errors), errors
    # the platform's title is the members' choice: the same rule applies to a name read from it
    tg.chats[evil] = {"id": int(evil), "type": "supergroup", "title": name.upper()}
    fetched = chat_stack.run("update_chat_names", {"chat_id": evil}, _mallory(evil))
    assert fetched["status"] == "failed" and "already used by another chat" in fetched["error"], fetched
    # their own chat, with a name of its own: allowed
    own = chat_stack.run("store_link", {"chat_id": evil, "link": "l", "chat_name": f"Mallory {uuid.uuid4().hex[:6]}"},
                         _mallory(evil))
    assert own["status"] == "succeeded", own
    by_name = chat_stack.run("message_telegram_bot", {"text": "by name", "target": name}, _trainer(trainer_chat))
    assert by_name["status"] == "succeeded", by_name
    assert [r.data["text"] for r in tg.sends(trainer_chat)] == ["by name"] and tg.sends(evil) == []


def test_a_name_can_never_take_a_chat_ids_messages(chat_stack: Stack, tg) -> None:
    """A chat id always wins over a name: a non-trainer may not name their chat after another chat's id
    (a number, or an outbox chat id some request came from), and even a name stored that way (here by
    a trainer, e.g. an old row) does not re-route the id, nor the query output sent back to that chat."""
    evil, victim = _tg_chat(), _tg_chat()
    asking = f"web-{uuid.uuid4().hex[:8]}"
    heard = chat_stack.run("echo", {}, {"interface": "outbox", "chat_id": asking})  # the outbox chat exists
    assert heard["status"] == "succeeded"
    for name in (victim, asking):
        resp = chat_stack.post("/v1/actions", {"actions": [{"type": "store_link", "payload": {
            "chat_id": evil, "link": "l", "chat_name": name}}], "context": _mallory(evil)})
        assert resp.status_code == 422, resp.text
        assert any("restricted to trainers when 'chat_name' is a chat id" in e for e in _rejected_errors(resp))
    other = f"web-{uuid.uuid4().hex[:8]}"
    for chat, name in ((evil, victim), (other, asking)):
        iface = "telegram_bot" if chat == evil else "outbox"
        assert chat_stack.run("store_link", {"chat_id": chat, "interface": iface, "link": "l", "chat_name": name},
                              _trainer(_tg_chat()))["status"] == "succeeded"
    resolved = chat_stack.run("resolve_chat", {"identifier": victim, "interface": "telegram_bot"}, TRAINER)
    assert resolved["status"] == "succeeded" and resolved["result"]["chat_id"] == victim, resolved
    query = chat_stack.run("resolve_chat", {"identifier": asking}, {"interface": "outbox", "chat_id": asking})
    assert query["status"] == "succeeded" and query["result"]["chat_id"] == asking, query

    def outputs(chat: str) -> list[dict]:
        return [i["data"] for i in chat_stack.feed(type="output", chat_id=chat)]

    wait_until(lambda: any(o.get("action_id") == query["id"] for o in outputs(asking)), timeout=20,
               what="the query's output on the asking chat's feed")
    assert outputs(other) == []
