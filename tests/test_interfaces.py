"""Interfaces end to end: HTTP → ingress → io worker → the platform's fake (or the outbox), on MariaDB."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import uuid

import pytest

from tests.conftest import TELEGRAM_TOKEN, TRAINER, WEBHOOK_SECRET
from tests.support import Stack, stop_process, twice, wait_until

TG = {"interface": "telegram_bot"}


def _chat() -> str:
    return str(-100_000_000 - uuid.uuid4().int % 1_000_000)


def words(n: int) -> str:
    return " ".join(f"word{i:05d}" for i in range(n))


def test_capabilities_list_available_interfaces(chat_stack: Stack) -> None:
    caps = chat_stack.get("/v1/capabilities").json()
    names = {i["name"]: i for i in caps["interfaces"]}
    assert {"telegram_bot", "discord_bot", "webhook", "outbox"} <= set(names)
    assert all(names[n]["available"] for n in ("telegram_bot", "discord_bot", "webhook", "outbox"))
    assert names["telegram_bot"]["actions"] == ["message_telegram_bot", "audio_telegram_bot"]
    assert caps["actions"]["message_telegram_bot"]["queue"] == "io"


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_interfaces_without_credentials_are_off_with_the_reason(stack: Stack) -> None:
    caps = stack.get("/v1/capabilities").json()
    off = {i["name"]: i.get("reason") for i in caps["interfaces"] if not i["available"]}
    assert off["telegram_bot"] == "TELEGRAM_BOT_TOKEN is not set"
    assert off["discord_bot"] == "none of DISCORD_BOT_TOKEN, DISCORD_WEBHOOK_URLS, DISCORD_WEBHOOK_URL is set"
    assert off["webhook"] == "REKKU_WEBHOOK_URL is not set"
    assert caps["disabled"]["message_telegram_bot"] == "TELEGRAM_BOT_TOKEN is not set"
    assert "message_outbox" in caps["actions"]
    answer = stack.submit([{"type": "message_telegram_bot", "payload": {"text": "hi", "target": "1"}}])
    assert answer["rejected"][0]["errors"] == [
        "Action 'message_telegram_bot' is unavailable: TELEGRAM_BOT_TOKEN is not set"]


# ----------------------------------------------------------------------------- outbox
def test_outbox_keeps_messages_for_the_requests_chat_oldest_first(chat_stack: Stack) -> None:
    chat = f"web-{uuid.uuid4().hex[:8]}"
    ctx = {"interface": "outbox", "chat_id": chat, "thread_id": "t1"}
    first = chat_stack.run("message_outbox", {"text": "first"}, ctx)
    second = chat_stack.run("message_outbox", {"text": "second"}, ctx)
    other = chat_stack.run("message_outbox", {"text": "elsewhere", "target": chat, "thread_id": "t2"}, ctx)
    assert first["status"] == second["status"] == other["status"] == "succeeded", (first, second, other)
    assert first["queue"] == "io" and first["worker"].startswith("io@")
    messages = chat_stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]
    assert [m["text"] for m in messages] == ["first", "second", "elsewhere"]
    assert messages[0]["thread_id"] == "t1" and messages[2]["thread_id"] == "t2"
    assert messages[0]["action_id"] == first["id"] and messages[0]["audio_url"] is None
    assert messages[0]["created_at"] and messages[0]["id"] < messages[1]["id"]
    after = chat_stack.get("/v1/outbox", params={"chat_id": chat, "after": messages[0]["id"]}).json()["messages"]
    assert [m["text"] for m in after] == ["second", "elsewhere"]
    threaded = chat_stack.get("/v1/outbox", params={"chat_id": chat, "thread_id": "t2"}).json()["messages"]
    assert [m["text"] for m in threaded] == ["elsewhere"]
    limited = chat_stack.get("/v1/outbox", params={"chat_id": chat, "limit": 1}).json()["messages"]
    assert [m["text"] for m in limited] == ["first"]


def test_outbox_needs_the_token(chat_stack: Stack) -> None:
    import requests

    assert requests.get(chat_stack.base_url + "/v1/outbox", timeout=10).status_code == 401


def test_audio_to_the_outbox_keeps_its_url(chat_stack: Stack) -> None:
    chat = f"web-{uuid.uuid4().hex[:8]}"
    run = chat_stack.run("audio_outbox", {"audio": "https://files.example/a.mp3"}, {"chat_id": chat})
    assert run["status"] == "succeeded", run
    messages = chat_stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]
    assert [(m["text"], m["audio_url"]) for m in messages] == [(None, "https://files.example/a.mp3")]


def test_a_message_without_target_from_another_platform_fails_clearly(chat_stack: Stack) -> None:
    run = chat_stack.run("message_outbox", {"text": "hi"}, {"interface": "discord_bot", "chat_id": "9"})
    assert run["status"] == "failed" and "has no 'target'" in run["error"]


# ----------------------------------------------------------------------------- telegram
def test_telegram_message_reaches_the_bot_api_with_token_chat_thread_and_reply(chat_stack: Stack, tg) -> None:
    chat = _chat()
    run = chat_stack.run("message_telegram_bot", {"text": "hello", "reply_to_message_id": 77},
                         {**TG, "chat_id": chat, "thread_id": "5"})
    assert run["status"] == "succeeded", run
    [request] = tg.sends(chat)
    assert request.path == f"/bot{TELEGRAM_TOKEN}/sendMessage"
    assert request.data["chat_id"] == chat and request.data["text"] == "hello"
    assert str(request.data["message_thread_id"]) == "5"
    assert request.data["reply_parameters"]["message_id"] == 77
    assert run["result"]["sent"] == [request.response["result"]["message_id"]]


def test_telegram_splits_long_text_at_4000_characters(chat_stack: Stack, tg) -> None:
    chat, text = _chat(), words(900)  # 8,999 characters
    run = chat_stack.run("message_telegram_bot", {"text": text, "target": chat})
    assert run["status"] == "succeeded", run
    parts = [r.data["text"] for r in tg.sends(chat)]
    assert len(parts) == 3 and all(len(p) <= 4000 for p in parts)
    assert " ".join(parts) == text
    assert run["result"]["parts"] == 3 and len(run["result"]["sent"]) == 3


def test_telegram_429_retry_after_is_honoured(chat_stack: Stack, tg) -> None:
    chat = _chat()
    tg.rate_limit(1, retry_after=2)
    run = chat_stack.run("message_telegram_bot", {"text": "patience", "target": chat}, timeout=40)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == 2
    first, second = tg.sends(chat)
    assert second.at - first.at >= 1.9
    assert [r.data["text"] for r in tg.sends(chat)] == ["patience", "patience"]  # the first got a 429


def test_telegram_thread_not_found_falls_back_to_the_chat(chat_stack: Stack, tg) -> None:
    chat = _chat()
    tg.missing_threads.add("404")
    run = chat_stack.run("message_telegram_bot", {"text": "to a gone topic", "target": chat, "thread_id": "404"})
    assert run["status"] == "succeeded", run
    assert run["result"]["thread_fallback"] is True
    tried, sent = tg.sends(chat)
    assert str(tried.data["message_thread_id"]) == "404" and "message_thread_id" not in sent.data


def test_telegram_voice_file_is_uploaded_with_send_voice(chat_stack: Stack, tg) -> None:
    chat = _chat()
    path = chat_stack.home / "artifacts" / f"voice-{uuid.uuid4().hex[:6]}.ogg"  # an artifact, given by name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"OggS fake opus")
    run = chat_stack.run("audio_telegram_bot", {"audio": path.name, "target": chat})
    assert run["status"] == "succeeded", run
    [request] = tg.sends(chat)
    assert request.path.endswith("/sendVoice") and request.files["voice"] == (path.name, b"OggS fake opus")
    mp3 = chat_stack.run("audio_telegram_bot", {"audio": "https://files.example/song.mp3", "target": chat})
    assert mp3["status"] == "succeeded"
    assert tg.sends(chat)[-1].path.endswith("/sendAudio")
    assert tg.sends(chat)[-1].data["audio"] == "https://files.example/song.mp3"


def test_telegram_refusal_fails_the_action_without_retrying(chat_stack: Stack, tg) -> None:
    run = chat_stack.run("message_telegram_bot", {"text": "x" * 10, "target": " "})
    assert run["status"] == "failed" and "chat_id is empty" in run["error"] and run["attempts"] == 1


# ----------------------------------------------------------------------------- the original Rekku's payloads
def _thread_of(request: object) -> str | None:
    thread = request.data.get("message_thread_id")
    return None if thread is None else str(thread)


def _named_chat_with_a_topic(stack: Stack) -> tuple[str, str]:
    """A Telegram chat stored with a name, and its topic 12 stored as "Announcements" (by a trainer)."""
    chat, name = _chat(), f"Club {uuid.uuid4().hex[:6]}"
    for payload in ({"chat_id": chat, "link": "l", "chat_name": name},
                    {"chat_id": chat, "link": "l", "thread_id": "12", "thread_name": "Announcements"}):
        stored = stack.run("store_link", {**payload, "interface": "telegram_bot"}, TRAINER)
        assert stored["status"] == "succeeded", stored
    return chat, name


def test_telegram_takes_every_way_the_original_named_a_destination(chat_stack: Stack, tg) -> None:
    chat, name = _named_chat_with_a_topic(chat_stack)
    sends = [
        ("by chat_name", {"chat_name": name.lower()}, None),
        ("int target, message_thread_id", {"target": int(chat), "message_thread_id": 12}, "12"),
        ("object target, message_thread_name", {"target": {"chat_id": chat, "message_thread_name": "announcements"}},
         "12"),
        ("chat_name, message_thread_name", {"chat_name": name, "message_thread_name": "Announcements"}, "12"),
        ("object target, message_thread_id", {"target": {"chat_id": int(chat), "message_thread_id": 12}}, "12"),
        ("object target, thread_id", {"target": {"chat_id": chat, "thread_id": "12"}}, "12"),
        ("thread_name", {"target": chat, "thread_name": "ANNOUNCEMENTS"}, "12"),
        ("the same thread twice", {"target": {"chat_id": chat, "thread_id": 12}, "message_thread_id": "12"}, "12"),
        ("target and its own chat_name", {"target": chat, "chat_name": name}, None),
    ]
    runs = [chat_stack.run("message_telegram_bot", {"text": text, **fields}, TG) for text, fields, _ in sends]
    assert [r["status"] for r in runs] == ["succeeded"] * len(sends), [r["error"] for r in runs]
    assert runs[1]["payload"] == {"text": "int target, message_thread_id", "target": int(chat), "thread_id": 12}
    got = {r.data["text"]: _thread_of(r) for r in tg.sends(chat)}
    assert got == {text: thread for text, _, thread in sends}


def test_telegram_destination_mistakes_are_refused_clearly_and_nothing_is_sent(chat_stack: Stack, tg) -> None:
    chat, name = _named_chat_with_a_topic(chat_stack)
    other, other_name = _named_chat_with_a_topic(chat_stack)
    stored = chat_stack.run("store_link", {"chat_id": chat, "interface": "telegram_bot", "link": "l",
                                           "thread_id": "13", "thread_name": "Twins"}, TRAINER)
    twin = chat_stack.run("store_link", {"chat_id": chat, "interface": "telegram_bot", "link": "l",
                                         "thread_id": "14", "thread_name": "twins"}, TRAINER)
    assert stored["status"] == twin["status"] == "succeeded"
    at_the_ingress = [
        ({"target": chat, "thread_id": 5, "message_thread_id": 6},
         "Fields 'thread_id' and 'message_thread_id' (its older name) differ for action 'message_telegram_bot': "
         "give only one"),
        ({"target": {"chat_id": chat, "thread_id": 5}, "thread_id": 6},
         "Fields 'target.thread_id' and 'thread_id' differ for action 'message_telegram_bot': give the thread once"),
        ({"target": {"chat_id": chat, "thread_id": 5, "message_thread_id": 6}},
         "Fields 'target.thread_id' and 'target.message_thread_id' differ for action 'message_telegram_bot': "
         "give the thread once"),
        ({"target": {"message_thread_id": 5}},
         "Field 'target.chat_id' is missing for action 'message_telegram_bot' (an object target names its chat)"),
        ({"target": {"chat_id": chat, "topic": 5}},
         "Field 'target' has unknown keys 'topic' for action 'message_telegram_bot' (an object target takes "
         "chat_id, thread_id or message_thread_id, thread_name or message_thread_name)"),
        ({"chat_name": 5}, "Field 'chat_name' must be a string for action 'message_telegram_bot'"),
        ({"target": chat, "message_thread_name": ["x"]},
         "Field 'thread_name' must be a string for action 'message_telegram_bot'"),
    ]
    answer = chat_stack.submit([{"type": "message_telegram_bot", "payload": {"text": "no", **fields}}
                                for fields, _ in at_the_ingress], TG)
    assert answer["accepted"] == []
    assert [r["errors"] for r in answer["rejected"]] == [[error] for _, error in at_the_ingress]
    in_the_worker = [
        ({"target": chat, "thread_name": "Nope"}, f"Unknown thread 'Nope' in chat telegram_bot:{chat}"),
        ({"target": chat, "thread_name": "TWINS"},
         f"Ambiguous thread name 'TWINS' in chat telegram_bot:{chat}: it matches threads 13, 14; use the numeric "
         "thread_id instead"),
        ({"chat_name": f"Nobody {uuid.uuid4().hex[:6]}"}, "no stored chat has that id or name"),
        ({"target": chat, "chat_name": other_name},
         f"Fields 'target' and 'chat_name' name different chats for action 'message_telegram_bot': target is "
         f"{chat}, chat '{other_name}' is {other}; give one"),
        ({"chat_name": name, "thread_id": 13, "thread_name": "Announcements"},
         "Fields 'thread_id' and 'thread_name' name different threads for action 'message_telegram_bot': "
         "thread_id is 13, thread 'Announcements' is 12; give one"),
    ]
    for fields, error in in_the_worker:
        run = chat_stack.run("message_telegram_bot", {"text": "no", **fields}, TG)
        assert run["status"] == "failed" and error in run["error"], (fields, run["error"])
    assert tg.sends(chat) == [] and tg.sends(other) == []


def test_the_originals_interfaces_that_are_not_here_are_refused_naming_the_ones_that_are(chat_stack: Stack) -> None:
    sends = [("message_webui", {"text": "hi"}, "webui"), ("message_x", {"text": "hi", "target_user": "bob"}, "x"),
             ("x_timeline_read", {}, "x"), ("x_search", {"query": "rekku"}, "x"),
             ("message_myspace", {"text": "hi"}, "myspace")]
    resp = chat_stack.post("/v1/actions", {"actions": [{"type": t, "payload": p} for t, p, _ in sends],
                                           "context": {**TG, "chat_id": _chat()}})
    assert resp.status_code == 422, resp.text
    here = "available: discord_bot, outbox, telegram_bot, webhook (not configured: reddit)"
    assert [r["errors"] for r in resp.json()["rejected"]] == [
        [f"Unsupported type '{t}' - no plugin or interface found to handle it: interface '{i}' is not available "
         f"here; {here}"] for t, _, i in sends]
    assert "interface 'webui' is not available here" in json.dumps(resp.json()["correction"])


# ----------------------------------------------------------------------------- a reply with no JSON at all
def test_a_plain_prose_reply_is_a_message_to_the_chat_it_answers(chat_stack: Stack, tg) -> None:
    from celery import Celery

    chat = _chat()
    resp = chat_stack.post("/v1/actions", {"text": "Ciao! Come stai?\n",
                                           "context": {**TG, "chat_id": chat, "thread_id": "5"}})
    assert resp.status_code == 202, resp.text
    [accepted] = resp.json()["accepted"]
    assert accepted["type"] == "message_telegram_bot" and resp.json()["rejected"] == []
    run = chat_stack.wait_action(accepted["id"])
    assert run["status"] == "succeeded" and run["payload"] == {"text": "Ciao! Come stai?"}, run
    [sent] = tg.sends(chat)
    assert sent.data["text"] == "Ciao! Come stai?" and _thread_of(sent) == "5"
    # rekku.ingest too; a context with a chat and no interface uses REKKU_DEFAULT_INTERFACE (the outbox)
    web = f"web-{uuid.uuid4().hex[:8]}"
    app = Celery(broker=chat_stack.broker_url, backend=chat_stack.broker_url)
    try:
        answer = app.send_task("rekku.ingest", kwargs={"body": "Sounds good, see you at 8.", "context": {
            "chat_id": web}}, queue="default").get(timeout=20)
    finally:
        app.close()
    assert [a["type"] for a in answer["accepted"]] == ["message_outbox"], answer
    assert chat_stack.wait_action(answer["accepted"][0]["id"])["status"] == "succeeded"
    messages = chat_stack.get("/v1/outbox", params={"chat_id": web}).json()["messages"]
    assert [m["text"] for m in messages] == ["Sounds good, see you at 8."]


def test_json_that_is_not_actions_and_prose_from_no_chat_stay_corrections(chat_stack: Stack, tg) -> None:
    chat = _chat()
    for text in ('Sure! {"type": "message_telegram_bot", "payload": {"text": "hi"',  # cut off
                 'Here you go: {"mood": "happy"}', "```json\nI will answer later\n```"):
        resp = chat_stack.post("/v1/actions", {"text": text, "context": {**TG, "chat_id": chat}})
        assert resp.status_code == 422, (text, resp.text)
        assert resp.json()["accepted"] == [] and "No JSON actions found" in resp.json()["rejected"][0]["errors"][0]
        assert resp.json()["correction"]["system_message"]["your_reply"] == text
    alone = chat_stack.post("/v1/actions", {"text": "Hello?", "context": {"user_id": "5"}})
    assert alone.status_code == 422 and "No JSON actions found" in alone.json()["rejected"][0]["errors"][0]
    assert alone.json()["correction"] is not None
    assert tg.sends(chat) == []


def test_plain_prose_replies_can_be_turned_off(make_stack) -> None:
    stack = make_stack(REKKU_PLAIN_REPLY_AS_MESSAGE="false")
    resp = stack.post("/v1/actions", {"text": "Ciao!", "context": {"interface": "outbox", "chat_id": "web-1"}})
    assert resp.status_code == 422, resp.text
    assert resp.json()["rejected"] == [{"index": None, "type": None, "errors": [
        "No JSON actions found in the reply (Expecting value: line 1 column 1 (char 0))"]}]
    assert resp.json()["correction"]["system_message"]["your_reply"] == "Ciao!"


# ----------------------------------------------------------------------------- never twice
def _redeliver(stack: Stack, run: dict) -> None:
    from celery import Celery

    app = Celery(broker=stack.broker_url)
    app.send_task(f"rekku.action.{run['type']}", task_id=run["id"], queue="io",
                  kwargs={"action_id": run["id"], "payload": run["payload"], "context": run["context"]})
    app.close()


def test_redelivered_send_task_is_not_sent_again(chat_stack: Stack, tg) -> None:
    chat = _chat()
    run = chat_stack.run("message_telegram_bot", {"text": "once", "target": chat})
    assert run["status"] == "succeeded"
    _redeliver(chat_stack, run)
    wait_until(twice(lambda: chat_stack.consumed(run["id"])), what="the redelivery to be consumed")
    assert len(tg.sends(chat)) == 1
    assert chat_stack.get(f"/v1/actions/{run['id']}").json()["attempts"] == 1


def test_worker_killed_mid_send_never_sends_a_part_twice(chat_stack: Stack, tg) -> None:
    """Part 0 sent, the worker dies while the Bot API holds part 1: the redelivery sends part 2 only."""
    chat, text = _chat(), " ".join(["alpha" * 700, "bravo" * 700, "charlie" * 500])
    tg.hold("bravo")
    answer = chat_stack.submit([{"type": "message_telegram_bot", "payload": {"text": text, "target": chat}}])
    action_id = answer["accepted"][0]["id"]
    io = next(p for p in chat_stack.processes if getattr(p, "node", "").startswith("io@") and p.poll() is None)
    assert tg.held.wait(30), "the second part never reached the fake API"
    wait_until(lambda: chat_stack.get(f"/v1/actions/{action_id}").json()["status"] == "running", timeout=10,
               interval=0.01, what="its claim")
    os.killpg(io.pid, signal.SIGKILL)
    stop_process(io)
    tg.release.set()
    chat_stack.start_worker("io", concurrency=4, node=f"chat-io-{uuid.uuid4().hex[:4]}")
    run = chat_stack.get(f"/v1/actions/{action_id}").json()
    assert run["status"] == "running"
    _redeliver(chat_stack, run)  # what Redis does once the visibility timeout passes
    run = wait_until(lambda: (r := chat_stack.get(f"/v1/actions/{action_id}").json())["status"] != "running" and r,
                     timeout=30, what="the redelivered action to finish")
    assert run["status"] == "succeeded", run
    texts = [r.data["text"][:5] for r in tg.sends(chat)]
    assert texts == ["alpha", "bravo", "charl"]
    assert run["result"]["uncertain"] == [1] and run["attempts"] == 2


# ----------------------------------------------------------------------------- discord and webhook
def test_discord_webhook_gets_split_text_into_the_thread(chat_stack: Stack, fakes: dict) -> None:
    discord = fakes["discord"]
    discord.reset()
    discord.rate_limited = 1
    text = words(300)  # 2,999 characters: two Discord messages
    run = chat_stack.run("message_discord_bot", {"text": text, "target": "chan", "thread_id": "th9"}, timeout=40)
    assert run["status"] == "succeeded", run
    posts = [r for r in discord.requests if r.data.get("content")]
    assert all(r.path == discord.path and r.query == {"wait": "true", "thread_id": "th9"} for r in posts)
    assert " ".join(r.data["content"] for r in posts[1:]) == text and len(posts) == 3  # one 429, then two
    assert all(len(r.data["content"]) <= 2000 for r in posts)
    assert run["attempts"] == 2


def test_webhook_posts_signed_json(chat_stack: Stack, fakes: dict) -> None:
    hook = fakes["webhook"]
    hook.reset()
    hook.fail_next = 1
    run = chat_stack.run("message_webhook", {"text": "héllo"}, {"interface": "webhook", "chat_id": "room-1",
                                                                "thread_id": "t"}, timeout=40)
    assert run["status"] == "succeeded", run
    failed, delivered = hook.requests
    assert failed.raw == delivered.raw or json.loads(failed.raw)["id"] == json.loads(delivered.raw)["id"]
    body = json.loads(delivered.raw)
    assert delivered.path == "/hook"
    assert body["text"] == "héllo" and body["chat_id"] == "room-1" and body["thread_id"] == "t"
    assert body["action_id"] == run["id"] and body["parts"] == 1
    timestamp = delivered.headers["x-rekku-timestamp"]
    expected = hmac.new(WEBHOOK_SECRET.encode(), timestamp.encode() + b"." + delivered.raw, hashlib.sha256).hexdigest()
    assert delivered.headers["x-rekku-signature"] == f"sha256={expected}"
    assert delivered.headers["x-rekku-delivery"] == body["id"]
