"""Telegram's messages in (docs/contracts.md §8): `rekku receive` long-polls the fake Bot API's getUpdates
over real HTTP, and POST /v1/telegram/webhook takes the same updates in webhook mode; both store through
rekku.messages.receive, so what they store reaches GET /v1/feed of a real ingress, on SQLite and MariaDB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import TELEGRAM_TOKEN
from tests.fakes.telegram import FakeTelegram
from tests.plugins.gatekeeper import HANG_USER
from tests.support import ROOT, Stack, child_env, free_port, stop_process, wait_until

#: The webhook secret of the second ingress these tests start (TELEGRAM_WEBHOOK_SECRET).
HOOK_SECRET = "hook-secret-0123456789abcdef"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def _chat() -> int:
    return -(10**12) - uuid.uuid4().int % 10**9


def _log(stack: Stack, name: str) -> str:
    path = stack.home / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def receiver(stack: Stack, tg: FakeTelegram) -> Iterator[Callable[..., subprocess.Popen]]:
    """``start(name, **env)``: a `rekku receive` process on the stack's database and the fake Bot API,
    logging at DEBUG to ``logs/<name>.log``, once it has asked for updates; all stopped afterwards."""
    started: list[subprocess.Popen] = []

    def start(name: str, **env: str) -> subprocess.Popen:
        polls = len(tg.polls())
        proc = stack.spawn("receive", "--no-migrate", log_name=name, **{
            "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "TELEGRAM_API_URL": tg.url, "REKKU_RECEIVE_POLL_TIMEOUT": "2",
            "REKKU_LOG_LEVEL": "DEBUG", **env})
        started.append(proc)
        if env.get("TELEGRAM_API_URL", tg.url) == tg.url:
            wait_until(lambda: len(tg.polls()) > polls or proc.poll() is not None, timeout=60,
                       what="the receiver's first getUpdates")
            assert proc.poll() is None, _log(stack, name)
        return proc

    yield start
    for proc in started:
        stop_process(proc)
        if proc in stack.processes:
            stack.processes.remove(proc)


def _stored(stack: Stack, chat: int, count: int = 1) -> list[dict]:
    return wait_until(lambda: (found := stack.feed(type="message", chat_id=str(chat))) and len(found) >= count
                      and found, timeout=30, what=f"{count} message(s) of chat {chat} on the feed")


# ----------------------------------------------------------------------------- the one conversion
def test_an_update_becomes_the_message_it_holds() -> None:
    from rekku.telegram_updates import incoming_message

    base = {"message_id": 5, "date": 1_700_000_000, "chat": {"id": -100, "type": "supergroup", "title": "Forum"},
            "from": {"id": 9, "username": "eve", "first_name": "Eve"}}
    # in a forum topic every message points at the topic's first message: that is no reply
    topic, _ = incoming_message({"update_id": 1, "message": {**base, "text": "t", "message_thread_id": 40,
                                                             "is_topic_message": True,
                                                             "reply_to_message": {"message_id": 40}}})
    assert topic.thread_id == "40" and topic.reply_to_message_id is None and topic.chat_name == "Forum"
    reply, _ = incoming_message({"update_id": 2, "message": {**base, "text": "r", "message_thread_id": 40,
                                                             "reply_to_message": {"message_id": 41}}})
    assert reply.reply_to_message_id == "41" and reply.date.isoformat() == "2023-11-14T22:13:20+00:00"
    anonymous, _ = incoming_message({"update_id": 3, "message": {
        **{k: v for k, v in base.items() if k != "from"}, "text": "a",
        "sender_chat": {"id": -100, "type": "supergroup", "title": "Forum"}}})
    assert anonymous.user_id == "-100"
    for update, why in (({"update_id": 4, "edited_message": {**base, "text": "e"}}, "not a message (edited_message)"),
                        ({"update_id": 5, "message": {**base, "text": "   "}}, "a message without text (text)"),
                        ({"update_id": 6, "message": {**base, "new_chat_members": [{"id": 1}]}},
                         "a message without text (new_chat_members)"),
                        ({"update_id": 7, "message": {**base, "chat": {}, "text": "x"}},
                         "a message Rekku cannot take")):
        message, skipped = incoming_message(update)
        assert message is None and skipped.startswith(why), skipped


# ----------------------------------------------------------------------------- the poller
def test_the_receiver_stores_a_text_a_caption_and_skips_a_sticker(stack: Stack, tg: FakeTelegram,
                                                                  receiver: Callable) -> None:
    receiver("receive-kinds")
    group = _chat()
    text = tg.add_message(group, "hello Rekku", chat_type="supergroup", title="Book club", user_id=501,
                          username="ann", message_thread_id=9, reply_to_message={"message_id": 3})
    photo = tg.add_message(group, None, user_id=502, username=None, first_name="Bo", chat_type="supergroup",
                           title="Book club", photo=[{"file_id": "p1", "width": 1, "height": 1}], caption="look!")
    sticker = tg.add_message(group, None, user_id=503, chat_type="supergroup", title="Book club",
                             sticker={"file_id": "s1", "emoji": "👍"})
    stored = _stored(stack, group, 2)
    data = [item["data"] for item in stored]
    assert [d["text"] for d in data] == ["hello Rekku", "look!"]
    first = data[0]
    assert first["interface"] == "telegram_bot" and first["chat_id"] == str(group)
    assert first["thread_id"] == "9" and first["message_id"] == str(text["message"]["message_id"])
    assert first["user_id"] == "501" and first["username"] == "ann" and first["chat_name"] == "Book club"
    assert first["reply_to_message_id"] == "3"
    assert first["date"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(text["message"]["date"])))
    assert stored[0]["chat"] == {"interface": "telegram_bot", "chat_id": str(group), "thread_id": "9"}
    assert data[1]["message_id"] == str(photo["message"]["message_id"]) and data[1]["username"] is None
    # the sticker was read, skipped with a debug line, and confirmed (the next poll's offset is past it)
    wait_until(lambda: any(r.data.get("offset") == str(sticker["update_id"] + 1) for r in tg.polls()),
               what="the offset past the sticker")
    assert f"telegram update {sticker['update_id']} skipped: a message without text (sticker)" \
        in _log(stack, "receive-kinds")
    time.sleep(0.5)
    assert len(stack.feed(type="message", chat_id=str(group))) == 2
    polls = tg.polls()
    assert all(r.data.get("allowed_updates") == '["message"]' and r.data.get("timeout") == "2" for r in polls)


def test_a_private_chat_is_named_after_its_user(stack: Stack, tg: FakeTelegram, receiver: Callable) -> None:
    receiver("receive-private")
    chat = 700_000 + uuid.uuid4().int % 10**6
    tg.add_message(chat, "hi", user_id=chat, first_name="Carla", username="carla")
    item = _stored(stack, chat)[0]
    assert item["data"]["chat_name"] == "Carla" and item["data"]["thread_id"] is None
    assert item["data"]["reply_to_message_id"] is None


def test_a_long_poll_brings_a_message_as_soon_as_it_is_sent(stack: Stack, tg: FakeTelegram,
                                                            receiver: Callable) -> None:
    receiver("receive-long", REKKU_RECEIVE_POLL_TIMEOUT="25")
    time.sleep(1.0)  # the receiver is now held in its long poll
    chat = _chat()
    sent = time.monotonic()
    tg.add_message(chat, "right away")
    _stored(stack, chat)
    assert time.monotonic() - sent < 5
    assert any(r.data.get("timeout") == "25" for r in tg.polls())


def test_an_update_stored_just_before_a_crash_is_stored_once(stack: Stack, tg: FakeTelegram,
                                                             receiver: Callable) -> None:
    """SIGKILL between storing the message and saving the offset: the restarted receiver gets the
    update again (it was never confirmed) and stores nothing new."""
    first = receiver("receive-crash")
    chat = _chat()
    update = tg.add_message(chat, "only once", user_id=int(HANG_USER))
    # the test plugin's on_request (called by receive after the commit) hangs: the offset is not saved yet
    wait_until(lambda: (stack.home / "testkit" / f"hang-{chat}.log").exists(), what="the message to be stored")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    assert len(stack.feed(type="message", chat_id=str(chat))) == 1
    polls_before = len(tg.polls())
    receiver("receive-crash-2")
    # the update comes again (its offset was never sent), and the poll after it confirms it
    wait_until(lambda: any(r.data.get("offset") == str(update["update_id"] + 1) for r in tg.polls()[polls_before:]),
               what="the offset past the re-read update")
    first_offset = tg.polls()[polls_before].data.get("offset")
    assert first_offset is None or int(first_offset) <= update["update_id"], first_offset
    assert f"telegram update {update['update_id']}: message {update['message']['message_id']} in chat {chat} " \
           "already stored" in _log(stack, "receive-crash-2")
    assert len(stack.feed(type="message", chat_id=str(chat))) == 1


def test_a_restarted_receiver_goes_on_from_the_saved_offset(stack: Stack, tg: FakeTelegram,
                                                            receiver: Callable) -> None:
    first = receiver("receive-resume")
    chat = _chat()
    update = tg.add_message(chat, "before the restart")
    _stored(stack, chat)
    wait_until(lambda: any(r.data.get("offset") == str(update["update_id"] + 1) for r in tg.polls()),
               what="the offset to be confirmed")
    os.killpg(first.pid, signal.SIGTERM)  # a clean stop, while it waits on Telegram
    assert first.wait(10) == 0, _log(stack, "receive-resume")
    assert "stopped (next update" in _log(stack, "receive-resume")
    polls_before = len(tg.polls())
    receiver("receive-resume-2")
    assert tg.polls()[polls_before].data.get("offset") == str(update["update_id"] + 1)
    later = tg.add_message(chat, "after the restart")
    assert [i["data"]["text"] for i in _stored(stack, chat, 2)] == ["before the restart", "after the restart"]
    assert later["update_id"] > update["update_id"]


@pytest.mark.parametrize("status", [429, 502])
def test_a_429_or_a_5xx_is_retried(stack: Stack, tg: FakeTelegram, receiver: Callable, status: int) -> None:
    receiver(f"receive-retry-{status}")
    chat = _chat()
    tg.fail_updates(status, retry_after=2)
    failed = wait_until(lambda: [r for r in tg.polls() if (r.response or {}).get("error_code") == status],
                        what=f"a getUpdates answered {status}")[0]
    tg.add_message(chat, f"after a {status}")
    _stored(stack, chat)
    log = _log(stack, f"receive-retry-{status}")
    retried = [r for r in tg.polls() if r.at > failed.at][0]
    if status == 429:
        assert retried.at - failed.at >= 1.9  # retry_after was honoured
        assert "Telegram asks to slow down (429 Too Many Requests: retry after 2); retrying in 2 s" in log
    else:
        assert retried.at - failed.at >= 0.9  # the first backoff
        assert f"Telegram answered {status} Internal Server Error; retrying in 1 s" in log


def test_the_token_never_reaches_the_receivers_log(stack: Stack, tg: FakeTelegram, receiver: Callable) -> None:
    receiver("receive-secret")
    chat = _chat()
    tg.fail_updates(500)
    tg.add_message(chat, "with DEBUG logs on")
    _stored(stack, chat)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: a network error, whose text names the URL
    unreachable = receiver("receive-unreachable", TELEGRAM_API_URL=closed)
    wait_until(lambda: "cannot reach Telegram" in _log(stack, "receive-unreachable"), what="a network error")
    stop_process(unreachable)
    for name in ("receive-secret", "receive-unreachable"):
        log = _log(stack, name)
        assert "/getUpdates" in log or "cannot reach Telegram" in log, log  # the lines are there, redacted
        assert TELEGRAM_TOKEN not in log and TELEGRAM_TOKEN.split(":")[1] not in log, log
    assert "/bot***/getUpdates" in _log(stack, "receive-secret")  # urllib3's DEBUG request line


def test_receive_needs_a_bot_token_and_no_webhook_secret(tmp_path: Path) -> None:
    for env, said in (({}, "TELEGRAM_BOT_TOKEN is not set"),
                      ({"TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "TELEGRAM_WEBHOOK_SECRET": HOOK_SECRET},
                       "TELEGRAM_WEBHOOK_SECRET is set")):
        done = subprocess.run([sys.executable, "-m", "rekku", "receive"], cwd=str(ROOT), capture_output=True,
                              text=True, timeout=60, env=child_env(REKKU_HOME=str(tmp_path), **env))
        assert done.returncode == 1 and said in done.stderr, done.stderr
        assert HOOK_SECRET not in done.stderr + done.stdout


# ----------------------------------------------------------------------------- webhook mode
@pytest.fixture
def hook_ingress(stack: Stack) -> Iterator[str]:
    """A second ingress on the stack's database, in webhook mode (TELEGRAM_WEBHOOK_SECRET); its base URL."""
    port = free_port()
    proc = stack.spawn("ingress", "--port", str(port), "--no-migrate", log_name="ingress-webhook",
                       TELEGRAM_WEBHOOK_SECRET=HOOK_SECRET)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(base + "/readyz", timeout=2).status_code == 200
        except requests.ConnectionError:
            assert proc.poll() is None, _log(stack, "ingress-webhook")
            return False

    wait_until(ready, timeout=60, what="the webhook ingress")
    try:
        yield base
    finally:
        stop_process(proc)
        stack.processes.remove(proc)


def _update(chat: int, text: str = "via the webhook") -> dict:
    return {"update_id": uuid.uuid4().int % 10**8, "message": {
        "message_id": uuid.uuid4().int % 10**6, "date": int(time.time()), "text": text,
        "chat": {"id": chat, "type": "group", "title": "Hooked"}, "from": {"id": 88, "username": "dee"}}}


def test_the_webhook_stores_an_update_once_with_the_right_secret(stack: Stack, hook_ingress: str) -> None:
    chat = _chat()
    update = _update(chat)
    first = requests.post(hook_ingress + "/v1/telegram/webhook", json=update, headers={SECRET_HEADER: HOOK_SECRET},
                          timeout=10)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["update_id"] == update["update_id"] and answer["dropped"] is None and answer["skipped"] is None
    assert answer["message"]["text"] == "via the webhook" and answer["message"]["chat_name"] == "Hooked"
    again = requests.post(hook_ingress + "/v1/telegram/webhook", json=update, headers={SECRET_HEADER: HOOK_SECRET},
                          timeout=10)
    assert again.status_code == 200 and again.json()["dropped"] == "duplicate"
    item = stack.feed_item(type="message", chat_id=str(chat))
    assert item["data"] == answer["message"]
    sticker = {"update_id": 1, "message": {**update["message"], "message_id": 1, "text": None}}
    skipped = requests.post(hook_ingress + "/v1/telegram/webhook", json=sticker,
                            headers={SECRET_HEADER: HOOK_SECRET}, timeout=10)
    assert skipped.status_code == 200 and skipped.json()["skipped"].startswith("a message without text")


@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({SECRET_HEADER: "wrong-secret-0123456789"}, 403), ({SECRET_HEADER: ""}, 403),
    ({SECRET_HEADER: HOOK_SECRET[:-1]}, 403), ({"Authorization": "Bearer {token}"}, 401)])
def test_the_webhook_refuses_a_missing_or_wrong_secret_and_stores_nothing(stack: Stack, hook_ingress: str,
                                                                           headers: dict, status: int) -> None:
    chat = _chat()
    headers = {k: v.format(token=stack.token) for k, v in headers.items()}  # the API token is no secret here
    resp = requests.post(hook_ingress + "/v1/telegram/webhook", json=_update(chat), headers=headers, timeout=10)
    assert resp.status_code == status, resp.text
    assert HOOK_SECRET not in resp.text
    # positive evidence the webhook stores (a right call for another chat), then nothing for this one
    other = _chat()
    assert requests.post(hook_ingress + "/v1/telegram/webhook", json=_update(other),
                         headers={SECRET_HEADER: HOOK_SECRET}, timeout=10).status_code == 200
    stack.feed_item(type="message", chat_id=str(other))
    assert stack.feed(type="message", chat_id=str(chat)) == []
    assert HOOK_SECRET not in _log(stack, "ingress-webhook")


def test_the_webhook_takes_only_json_updates(stack: Stack, hook_ingress: str) -> None:
    url, secret = hook_ingress + "/v1/telegram/webhook", {SECRET_HEADER: HOOK_SECRET}
    assert requests.post(url, data="update_id=1", headers=secret, timeout=10).status_code == 415
    resp = requests.post(url, data="{nope", headers={**secret, "Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 400 and resp.json()["detail"] == "the request body is not valid JSON"
    for body in ([1], {"message": {}}, {"update_id": "1"}):
        assert requests.post(url, json=body, headers=secret, timeout=10).status_code == 422
    big = _update(_chat(), "x" * (1024 * 1024 + 10))
    assert requests.post(url, json=big, headers=secret, timeout=10).status_code == 413


def test_without_a_webhook_secret_the_route_is_not_there(stack: Stack) -> None:
    for headers in ({}, {SECRET_HEADER: "anything-at-all-0123"}, stack.headers):
        resp = requests.post(stack.base_url + "/v1/telegram/webhook", json=_update(_chat()), headers=headers,
                             timeout=10)
        assert resp.status_code == 404, resp.text


def test_the_webhook_secret_is_checked_and_kept_out_of_logs(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from rekku.logs import configured_secrets
    from rekku.settings import Settings

    settings = Settings(_env_file=None, REKKU_HOME=str(tmp_path), TELEGRAM_WEBHOOK_SECRET=HOOK_SECRET)
    assert HOOK_SECRET in configured_secrets(settings)
    assert Settings(_env_file=None, TELEGRAM_WEBHOOK_SECRET="").telegram_webhook_secret is None
    for bad in ("short", "has spaces in it, sixteen+", "x" * 257):
        with pytest.raises(ValidationError, match="TELEGRAM_WEBHOOK_SECRET must be 16 to 256"):
            Settings(_env_file=None, TELEGRAM_WEBHOOK_SECRET=bad)


# ----------------------------------------------------------------------------- rekku up
def test_rekku_up_polls_only_with_a_bot_token_and_no_webhook_secret(tmp_path: Path) -> None:
    from rekku.settings import Settings
    from rekku.supervisor import receives_telegram

    def settings(**env: str) -> Settings:
        return Settings(_env_file=None, REKKU_HOME=str(tmp_path), **env)

    assert receives_telegram(settings(TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN))
    assert not receives_telegram(settings())
    assert not receives_telegram(settings(TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN, TELEGRAM_WEBHOOK_SECRET=HOOK_SECRET))


def test_rekku_up_with_a_bot_token_receives_telegram_messages(tmp_path: Path, tg: FakeTelegram) -> None:
    home = tmp_path / "home"
    port = free_port()
    env = child_env(REKKU_HOME=str(home), REKKU_PORT=str(port), FLOWER_PORT=str(free_port()), PYTHONUNBUFFERED="1",
                    TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN, TELEGRAM_API_URL=tg.url, REKKU_RECEIVE_POLL_TIMEOUT="2")
    out = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rekku", "up"], env=env, cwd=str(ROOT), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        chat = _chat()
        tg.add_message(chat, "hello from Telegram")
        base = f"http://127.0.0.1:{port}"

        def fed() -> list:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                token = (home / "api_token").read_text().strip()
                page = requests.get(base + "/v1/feed", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            except (OSError, requests.ConnectionError):
                return []
            return [i for i in page.json()["items"] if i["type"] == "message"] if page.status_code == 200 else []

        items = wait_until(fed, timeout=120, what="the Telegram message on rekku up's feed")
        assert [i["data"]["text"] for i in items] == ["hello from Telegram"]
        assert items[0]["chat"]["chat_id"] == str(chat)
        assert "receiving messages with getUpdates" in (tmp_path / "up.log").read_text()
        assert TELEGRAM_TOKEN not in (home / "logs" / "receive.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, (tmp_path / "up.log").read_text()
