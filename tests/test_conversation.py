"""The conversation: messages in (POST /v1/messages) and the model's feed (GET /v1/feed, the SSE
stream), end to end through a real ingress and workers on SQLite and MariaDB, and the feed's order
under concurrent writers."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import TRAINER
from tests.support import Stack, race_with_poller
from tests.test_event_dispatch import event_db  # noqa: F401 - a MariaDB and a SQLite database, migrated


def _message(chat: str | None = None, **fields: Any) -> dict:
    return {"interface": "telegram_bot", "chat_id": chat or f"-100{uuid.uuid4().int % 10**9}",
            "message_id": uuid.uuid4().int % 10**9, "user_id": f"u{uuid.uuid4().hex[:6]}", "username": "ann",
            "text": "hi Rekku", **fields}


def _post(stack: Stack, message: dict) -> requests.Response:
    return stack.post("/v1/messages", message)


# ----------------------------------------------------------------------------- messages in
def test_a_message_is_stored_once_and_reaches_the_feed_once(stack: Stack) -> None:
    message = _message(thread_id=7, chat_name="Book club", reply_to_message_id=3, date="2026-11-30T10:00:00+01:00")
    first = _post(stack, message)
    assert first.status_code == 202, first.text
    stored = first.json()["message"]
    assert first.json()["dropped"] is None
    assert stored["chat_id"] == message["chat_id"] and stored["message_id"] == str(message["message_id"])
    assert stored["thread_id"] == "7" and stored["date"].startswith("2026-11-30T09:00:00")  # kept in UTC
    again = _post(stack, message)
    assert again.status_code == 202 and again.json() == {"message": stored, "dropped": "duplicate"}
    item = stack.feed_item(type="message", chat_id=message["chat_id"])
    assert item["data"] == stored
    assert item["chat"] == {"interface": "telegram_bot", "chat_id": message["chat_id"], "thread_id": "7"}


def test_a_message_without_a_platform_id_is_stored_each_time(stack: Stack) -> None:
    message = _message(message_id=None)
    ids = {_post(stack, message).json()["message"]["id"] for _ in range(2)}
    assert len(ids) == 2 and len(stack.feed(type="message", chat_id=message["chat_id"])) == 2


@pytest.mark.parametrize("change", [{"text": ""}, {"text": None}, {"user_id": None}, {"chat_id": ""},
                                    {"interface": ""}, {"surprise": 1}, {"date": "yesterday"},
                                    {"text": "x" * 100_001}])
def test_a_malformed_message_is_a_422_and_nothing_is_stored(stack: Stack, change: dict) -> None:
    message = {k: v for k, v in {**_message(), **change}.items() if v is not None}
    resp = _post(stack, message)
    assert resp.status_code == 422, resp.text
    assert stack.feed(type="message", chat_id=message.get("chat_id") or "-") == []


def test_messages_need_the_token(stack: Stack) -> None:
    resp = requests.post(stack.base_url + "/v1/messages", json=_message(), timeout=10)
    assert resp.status_code == 401
    assert requests.get(stack.base_url + "/v1/feed", timeout=10).status_code == 401


def test_a_blocked_users_message_is_dropped_before_the_model_sees_it(stack: Stack) -> None:
    message = _message()
    blocked = stack.run("block_user", {"user_id": message["user_id"], "reason": "spam"}, TRAINER)
    assert blocked["status"] == "succeeded", blocked
    resp = _post(stack, message)
    assert resp.status_code == 202 and resp.json() == {"message": None, "dropped": "blocked"}
    # positive evidence first: a message of another user in the same chat does reach the feed
    assert _post(stack, _message(message["chat_id"]))
    stack.feed_item(type="message", chat_id=message["chat_id"])
    # a trainer is never dropped, even when listed
    trainer = _message(message["chat_id"], user_id=TRAINER["user_id"])
    stack.run("block_user", {"user_id": TRAINER["user_id"]}, TRAINER)
    try:
        assert _post(stack, trainer).json()["dropped"] is None
    finally:
        stack.run("unblock_user", {"user_id": TRAINER["user_id"]}, TRAINER)
    texts = [i["data"]["user_id"] for i in stack.feed(type="message", chat_id=message["chat_id"])]
    assert message["user_id"] not in texts and TRAINER["user_id"] in texts


def test_a_message_makes_its_chat_recent(stack: Stack) -> None:
    message = _message()
    assert _post(stack, message).json()["dropped"] is None
    chats = stack.run("get_recent_chats", {"limit": 1000}, TRAINER)["result"]["chats"]
    assert message["chat_id"] in [c["chat_id"] for c in chats]


# ----------------------------------------------------------------------------- the feed
def test_a_correction_reaches_the_feed_of_the_chat_it_is_for(stack: Stack) -> None:
    chat = f"web-{uuid.uuid4().hex[:8]}"
    answer = stack.submit([{"type": "no_such_action", "payload": {}}], {"interface": "outbox", "chat_id": chat})
    item = stack.feed_item(type="correction", chat_id=chat)
    assert item["data"] == answer["correction"] and item["data"]["system_message"]["type"] == "error"


def test_an_action_that_fails_for_good_tells_the_chats_model(stack: Stack) -> None:
    chat = f"web-{uuid.uuid4().hex[:8]}"
    run = stack.run("tk_fail", {"message": "boom"}, {"interface": "outbox", "chat_id": chat})
    assert run["status"] == "failed"
    item = stack.feed_item(type="failure", chat_id=chat)
    assert item["action_id"] == run["id"] and item["data"]["action_type"] == "tk_fail"
    assert "boom" in item["data"]["error"]


def test_a_long_poll_returns_the_first_new_item(stack: Stack) -> None:
    last = max([i["id"] for i in stack.feed()] or [0])
    got: dict = {}
    poller = threading.Thread(target=lambda: got.update(stack.get(
        "/v1/feed", params={"after": last, "wait": 30}, timeout=60).json()))
    poller.start()
    message = _message()
    _post(stack, message)
    poller.join(60)
    assert got["items"] and got["items"][0]["data"]["chat_id"] == message["chat_id"]
    assert got["next"] == got["items"][-1]["id"] > last
    empty = stack.get("/v1/feed", params={"after": got["next"] + 10**9}).json()
    assert empty == {"items": [], "next": got["next"] + 10**9}


def _events(lines: Iterator[str], count: int) -> list[dict]:
    """The next ``count`` server-sent events of a stream's lines (comments skipped)."""
    events: list[dict] = []
    current: dict = {}
    for line in lines:
        if line == "":
            if current:
                events.append(current)
                current = {}
                if len(events) == count:
                    return events
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(": ")
        current[name] = value
    raise AssertionError(f"the stream ended after {len(events)} events")


def test_the_stream_sends_new_items_in_order_and_resumes_from_last_event_id(stack: Stack) -> None:
    chat = f"-100{uuid.uuid4().int % 10**9}"
    with requests.get(stack.base_url + "/v1/feed/stream", headers=stack.headers, stream=True, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.iter_lines(chunk_size=1, decode_unicode=True)  # one iterator: each line is read once
        assert next(lines).startswith(":")  # the connection is open: the first comment came
        sent = [_post(stack, _message(chat, text=f"m{n}")).json()["message"] for n in range(3)]
        first = _events(lines, 3)
    assert [json.loads(e["data"])["data"]["text"] for e in first] == ["m0", "m1", "m2"]
    assert all(e["event"] == "message" for e in first)
    assert [int(e["id"]) for e in first] == sorted(int(e["id"]) for e in first)
    resume = first[0]["id"]
    headers = {**stack.headers, "Last-Event-ID": resume}
    with requests.get(stack.base_url + "/v1/feed/stream", headers=headers, stream=True, timeout=30) as resp:
        again = _events(resp.iter_lines(chunk_size=1, decode_unicode=True), 2)
    assert [json.loads(e["data"])["data"]["id"] for e in again] == [m["id"] for m in sent[1:]]
    bad = stack.get("/v1/feed/stream", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422


# ----------------------------------------------------------------------------- order under concurrency
WRITERS, ITEMS = 6, 40


@pytest.mark.usefixtures("event_db")
def test_a_feed_poller_following_after_sees_every_item_once_while_writers_race() -> None:
    """Writers add feed items at once (messages in, and bare items); a poller following ``next`` sees
    every one exactly once: ids become visible in commit order (rekku.ordering)."""
    from rekku import feed
    from rekku.messages import IncomingMessage, receive

    def writer(n: int) -> Any:
        def write() -> None:
            for i in range(ITEMS):
                if n % 2:
                    receive(IncomingMessage(**_message(f"c{n}", message_id=i)))
                else:
                    feed.append_now([feed.NewItem("output", {"n": n, "i": i}, dedupe_key=f"w{n}:{i}")])
        return write

    seen, errors = race_with_poller([writer(n) for n in range(WRITERS)],
                                    lambda after: [i["id"] for i in feed.read(after, 1000)])
    assert not errors
    everything = [i["id"] for i in feed.read(0, 10_000)]
    assert len(everything) == WRITERS * ITEMS
    assert len(seen) == len(set(seen))
    assert sorted(seen) == everything, f"the poller missed {len(set(everything) - set(seen))} items"


def test_an_item_with_a_dedupe_key_is_added_once(event_db: str) -> None:  # noqa: F811
    from rekku import feed

    item = feed.NewItem("output", {"x": 1}, dedupe_key="output:same")
    assert feed.append_now([item])[0] is not None
    assert feed.append_now([item, feed.NewItem("output", {"x": 2})])[0] is None
    assert [i["data"] for i in feed.read(0, 10)] == [{"x": 1}, {"x": 2}]
    with pytest.raises(ValueError):
        feed.append_now([feed.NewItem("gossip", {})])
