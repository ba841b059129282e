"""The model webhook (docs/contracts.md §8): every feed item POSTed, signed, in id order, at least once,
to a fake receiver on 127.0.0.1, by a real ingress, io worker and beat on MariaDB. The receiver fails,
refuses and goes away; the worker restarts; nothing is lost and nothing overtakes an earlier item."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from rekku.logs import configured_secrets
from rekku.settings import Settings
from tests.fakes.model_webhook import FakeModelReceiver, verify
from tests.support import ROOT, Stack, stop_process, wait_until

SECRET = f"model-hook-secret-{uuid.uuid4().hex}"
#: Quick retries for the tests: beat every half second, at most 1 s (the least allowed) between tries, 2 tries
#: of a refused item.
PUSH_ENV = {"REKKU_MODEL_WEBHOOK_SECRET": SECRET, "REKKU_MODEL_WEBHOOK_POLL_SECONDS": "0.5",
            "REKKU_MODEL_WEBHOOK_MAX_BACKOFF": "1", "REKKU_MODEL_WEBHOOK_REFUSED_ATTEMPTS": "2",
            "REKKU_MODEL_WEBHOOK_TIMEOUT": "3"}


@pytest.fixture
def receiver() -> Iterator[FakeModelReceiver]:
    fake = FakeModelReceiver().start()
    yield fake
    fake.stop()


def _stack(make_stack: Callable[..., Stack], receiver: FakeModelReceiver, *, beat: bool = True,
           **env: str) -> Stack:
    stack = make_stack(**{"REKKU_MODEL_WEBHOOK_URL": receiver.url + "/feed", **PUSH_ENV, **env})
    stack.start_worker("io", concurrency=4)
    if beat:
        stack.spawn("beat", log_name="beat")
    return stack


def _messages(stack: Stack, count: int, writers: int = 1) -> list[int]:
    """Post ``count`` messages (from ``writers`` threads at once); the ids of the feed items they made."""
    chat = f"-100{uuid.uuid4().int % 10**9}"
    errors: list[str] = []

    def post(numbers: range) -> None:
        for n in numbers:
            resp = stack.post("/v1/messages", {"interface": "telegram_bot", "chat_id": chat, "message_id": n,
                                               "user_id": "u1", "text": f"message {n}"})
            if resp.status_code != 202:
                errors.append(resp.text)

    threads = [threading.Thread(target=post, args=(range(w, count, writers),)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = [item["id"] for item in stack.feed(chat_id=chat)]
    assert len(ids) == count
    return ids


def _in_order(ids: list[int]) -> bool:
    """No item was sent before an earlier one was done with (a retry repeats the same id)."""
    return all(a <= b for a, b in zip(ids, ids[1:]))


def _cursor(stack: Stack) -> int:
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(sa.text("SELECT last_id FROM feed_push WHERE id = 1"))
    finally:
        engine.dispose()


def _logs(stack: Stack) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted((stack.home / "logs").glob("*.log")))


def _no_secret_in_logs(stack: Stack) -> None:
    logs = list((stack.home / "logs").glob("*.log"))
    assert logs
    for path in logs:
        assert SECRET not in path.read_text(errors="replace"), path.name


# ----------------------------------------------------------------------------- delivery
def test_items_arrive_signed_in_id_order_each_once_woken_without_beat(
        make_stack: Callable[..., Stack], receiver: FakeModelReceiver) -> None:
    """No beat: only the wake-up sent when items are committed pushes them."""
    stack = _stack(make_stack, receiver, beat=False)
    ids = _messages(stack, 24, writers=4)
    wait_until(lambda: set(receiver.acknowledged()) >= set(ids), timeout=60, what="every item pushed")
    assert receiver.ids() == sorted(ids)  # in order, and once each when the receiver answers 200 at once
    shown = {item["id"]: item for item in stack.feed()}
    for request in receiver.pushes():
        assert request.path == "/feed"
        item = verify(SECRET, request)
        assert item == shown[item["id"]]  # the item exactly as GET /v1/feed shows it
        assert request.headers["x-rekku-feed-id"] == str(item["id"])
        assert request.headers["x-rekku-delivery"] == f"feed:{item['id']}"
        assert request.headers["content-type"] == "application/json"
    wait_until(lambda: _cursor(stack) == ids[-1], what="the cursor at the last item")
    _no_secret_in_logs(stack)


def test_a_failing_receiver_gets_every_item_in_order_once_it_recovers(
        make_stack: Callable[..., Stack], receiver: FakeModelReceiver) -> None:
    stack = _stack(make_stack, receiver, REKKU_LOG_LEVEL="DEBUG")
    receiver.script = [500, 503, 429, 502, 500, 408, 500, 500]  # then 200s
    ids = _messages(stack, 10, writers=2)
    wait_until(lambda: set(receiver.acknowledged()) >= set(ids), timeout=90, what="every item pushed")
    assert not receiver.script, "the failures were all answered"
    sent = receiver.ids()
    assert _in_order(sent), sent
    assert sorted(set(sent)) == ids and receiver.acknowledged() == ids
    assert sent.count(ids[0]) == 9  # eight failures, one success: the first item waited for all of them
    assert "the model webhook answered 500" in stack.worker_logs()
    _no_secret_in_logs(stack)


def test_an_item_the_receiver_refuses_is_skipped_after_its_tries_and_logged(
        make_stack: Callable[..., Stack], receiver: FakeModelReceiver) -> None:
    stack = _stack(make_stack, receiver)
    first = _messages(stack, 1)
    wait_until(lambda: receiver.acknowledged() == first, what="the first item pushed")
    # the next item will be refused for what it is (400); the one after it is taken
    refused = first[0] + 1
    receiver.refuse[refused] = 400
    more = _messages(stack, 3)
    assert more[0] == refused
    wait_until(lambda: set(receiver.acknowledged()) >= set(more[1:]), timeout=60, what="the items after it")
    sent = receiver.ids()
    assert _in_order(sent), sent
    assert sent.count(refused) == 2  # REKKU_MODEL_WEBHOOK_REFUSED_ATTEMPTS
    assert f"feed item {refused} not pushed: the model webhook refused it: 400" in stack.worker_logs()


def test_a_receiver_refusing_rekku_itself_never_makes_it_skip_an_item(
        make_stack: Callable[..., Stack], receiver: FakeModelReceiver) -> None:
    """401, 403, 404 say the URL or the secret is wrong, not the item: skipping would drop every item."""
    stack = _stack(make_stack, receiver)
    receiver.script = [401, 403, 404, 401]  # twice the tries a refused item gets, then 200
    ids = _messages(stack, 3)
    wait_until(lambda: receiver.acknowledged() == ids, timeout=60, what="every item pushed, none skipped")
    assert receiver.ids() == [ids[0]] * 5 + ids[1:]
    assert "check REKKU_MODEL_WEBHOOK_URL and REKKU_MODEL_WEBHOOK_SECRET" in stack.worker_logs()


def test_the_cursor_survives_a_worker_restart_while_the_receiver_is_down(
        make_stack: Callable[..., Stack], receiver: FakeModelReceiver) -> None:
    stack = _stack(make_stack, receiver)
    before = _messages(stack, 5)
    wait_until(lambda: receiver.acknowledged() == before, timeout=60, what="the first items pushed")
    wait_until(lambda: _cursor(stack) == before[-1], what="the cursor at the last acknowledged item")
    port = int(receiver.url.rpartition(":")[2])
    receiver.stop()  # down: connections refused
    during = _messages(stack, 5)
    wait_until(lambda: f"feed item {during[0]}: the model webhook cannot reach it" in stack.worker_logs(),
               what="a failed try of the first item while the receiver is down")
    old_worker = next(p for p in stack.processes if getattr(p, "node", "").startswith("io@"))
    stop_process(old_worker)
    new_worker = stack.start_worker("io", concurrency=4)
    new_log = stack.home / "logs" / f"worker-io-{new_worker.node.partition('@')[2]}.log"
    wait_until(lambda: f"feed item {during[0]}: the model webhook cannot reach it" in new_log.read_text(),
               timeout=60, what="the restarted worker trying the same item")
    back = FakeModelReceiver(port).start()
    try:
        wait_until(lambda: set(back.acknowledged()) >= set(during), timeout=60, what="the items pushed after it")
        sent = back.ids()
        assert _in_order(receiver.ids() + sent), (receiver.ids(), sent)
        assert set(sent) == set(during)  # resumed at the cursor: nothing acknowledged before is sent again
        assert back.acknowledged()[:5] == during
        assert verify(SECRET, back.pushes()[0])["id"] == during[0]
    finally:
        back.stop()
    _no_secret_in_logs(stack)


# ----------------------------------------------------------------------------- no secret
def test_without_a_secret_nothing_is_pushed_and_doctor_and_the_worker_say_why(
        make_stack: Callable[..., Stack], receiver: FakeModelReceiver) -> None:
    stack = make_stack(REKKU_MODEL_WEBHOOK_URL=receiver.url + "/feed", REKKU_MODEL_WEBHOOK_POLL_SECONDS="0.5")
    _messages(stack, 2)
    doctor = subprocess.run([sys.executable, "-m", "rekku", "doctor"], capture_output=True, text=True, timeout=90,
                            env=stack.env(COLUMNS="400"), cwd=str(ROOT))
    assert doctor.returncode == 1, doctor.stdout
    line = next(line for line in doctor.stdout.splitlines() if "model webhook" in line)
    assert "FAIL" in line and "REKKU_MODEL_WEBHOOK_SECRET is not" in line and "not pushed" in line
    stack.start_worker("io", concurrency=2)
    stack.spawn("beat", log_name="beat")
    wait_until(lambda: stack.tasks_succeeded("rekku.feed.push") >= 3, timeout=60, what="several pusher passes")
    reason = "REKKU_MODEL_WEBHOOK_URL is set but REKKU_MODEL_WEBHOOK_SECRET is not: the feed is not pushed"
    assert any("ERROR" in line and reason in line for line in stack.worker_logs().splitlines())
    assert receiver.requests == []


def test_the_model_webhook_secret_is_redacted_from_logs(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, home=tmp_path, model_webhook_url="https://user:url-pass@hook.example/f",
                        model_webhook_secret=SECRET)
    assert {SECRET, "url-pass"} <= configured_secrets(settings)


def test_the_model_webhook_url_must_be_http_and_empty_values_are_unset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="REKKU_MODEL_WEBHOOK_URL must be an http"):
        Settings(_env_file=None, home=tmp_path, model_webhook_url="hook.example/feed")
    unset = Settings(_env_file=None, home=tmp_path, model_webhook_url=" ", model_webhook_secret="")
    assert unset.model_webhook_url is None and unset.model_webhook_secret is None
