"""The optional model loop (REKKU_LLM_URL): a stored message starts a turn on the io pool, the model is asked
through a real OpenAI-compatible HTTP endpoint (tests/fakes/openai.py), and its reply runs through the real
ingress and workers, on MariaDB. Nothing is mocked."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import TELEGRAM_TOKEN, _home, running_stack
from tests.fakes.openai import MALFORMED, FakeOpenAI
from tests.fakes.telegram import FakeTelegram
from tests.support import Stack, stop_process, wait_until

API_KEY = "sk-fake-loop-key-0123456789"
HELLO = {"actions": [{"type": "message_outbox", "payload": {"text": "hello"}},
                     {"type": "list_events", "payload": {}}]}
BAD = {"actions": [{"type": "no_such_action", "payload": {}}]}


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(API_KEY).start()
    yield fake
    fake.release.set()
    fake.stop()


@pytest.fixture(scope="module")
def loop_stack(tmp_home: Path, llm: FakeOpenAI, fakes: dict) -> Iterator[Stack]:
    """MariaDB, an ingress, a default and an io worker, with the model loop against the fake endpoint and
    Telegram against the fake Bot API."""
    env = {"TRAINER_IDS": "telegram_bot:42", "REKKU_LLM_URL": llm.url + "/v1", "REKKU_LLM_MODEL": "fake-model",
           "REKKU_LLM_API_KEY": API_KEY, "REKKU_LLM_TIMEOUT": "90", "CORRECTOR_RETRIES": "2",
           "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "TELEGRAM_API_URL": fakes["telegram"].url,
           "REKKU_INTERFACE_TIMEOUT": "5"}
    with running_stack("loop", _home(tmp_home, "loop"), "mariadb", env,
                       [("default", 2, "loop-main"), ("io", 4, "loop-io")]) as stack:
        yield stack


def _chat() -> str:
    return f"web-{uuid.uuid4().hex[:10]}"


def _say(stack: Stack, chat: str, text: str, user: str = "u-ann") -> dict:
    resp = stack.post("/v1/messages", {"interface": "outbox", "chat_id": chat, "message_id": uuid.uuid4().hex[:12],
                                       "user_id": user, "username": "ann", "text": text})
    assert resp.status_code == 202 and resp.json()["dropped"] is None, resp.text
    return resp.json()["message"]


def _outbox(stack: Stack, chat: str) -> list[str]:
    return [m["text"] for m in stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]]


def _prompts(llm: FakeOpenAI, chat: str, call: int) -> list[dict]:
    """The prompts (GET /v1/prompt's shape) call ``call`` of ``chat`` carried."""
    found = []
    for text in llm.texts(chat)[call]:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and "context" in value and "input" in value:
            found.append(value)
    return found


def _read_upto(stack: Stack, chat: str, interface: str = "outbox") -> int:
    """How far the chat's turns have read its feed (the durable cursor)."""
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(sa.text("SELECT read_upto FROM model_turns WHERE interface = :interface AND "
                                             "chat_id = :chat AND pending_upto IS NULL"),
                                     {"chat": chat, "interface": interface}) or 0
    finally:
        engine.dispose()


def _settled(stack: Stack, chat: str, timeout: float = 60) -> None:
    _settled_in(stack, "outbox", chat, timeout)


def _settled_in(stack: Stack, interface: str, chat: str, timeout: float = 60) -> None:
    """Every item of the chat's feed has been read by a finished turn (but the corrections of the loop's own
    replies, which the turn that made them sent back to the model itself)."""
    def done() -> bool:
        items = [i for i in stack.feed(chat_id=chat) if i["type"] != "correction"]
        return bool(items) and _read_upto(stack, chat, interface) >= max(i["id"] for i in items)
    wait_until(done, timeout=timeout, what=f"the turns of chat {chat} to read its whole feed")


# ----------------------------------------------------------------------------- the whole loop over Telegram
def test_telegram_to_the_model_and_back(loop_stack: Stack, llm: FakeOpenAI, tg: FakeTelegram) -> None:
    """The issue's end-to-end case: the fake Bot API serves a user's "hi" -> `rekku receive` stores it -> the
    model is asked with a prompt holding it -> its reply (a Telegram message and list_events) -> the fake
    Bot API receives the message; list_events's output reaches the feed and the model's next call, and
    nothing of the feed reaches the human chat."""
    chat = -(10**12) - uuid.uuid4().int % 10**9
    reply = {"actions": [{"type": "message_telegram_bot", "payload": {"text": "hi Ann, how are you?"}},
                         {"type": "list_events", "payload": {}}]}
    llm.script(str(chat), reply)
    receiver = loop_stack.spawn("receive", "--no-migrate", log_name="receive-e2e",
                                TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN, TELEGRAM_API_URL=tg.url,
                                REKKU_RECEIVE_POLL_TIMEOUT="2")
    try:
        update = tg.add_message(chat, "hi", user_id=501, username="ann", chat_type="supergroup", title="Book club")
        stored = loop_stack.feed_item(type="message", chat_id=str(chat), timeout=60)
        assert stored["data"]["text"] == "hi" and stored["data"]["user_id"] == "501"
        assert stored["data"]["message_id"] == str(update["message"]["message_id"])
        # the model was asked, with the prompt that /v1/prompt builds, holding the user's message
        wait_until(lambda: llm.calls[str(chat)], timeout=60, what="the model's first call")
        first = _prompts(llm, str(chat), 0)
        assert len(first) == 1 and first[0]["input"]["payload"]["text"] == "hi"
        assert first[0]["input"]["payload"]["source"]["interface"] == "telegram_bot"
        assert first[0]["input"]["payload"]["source"]["username"] == "ann"
        # the human answer reached the fake Telegram, in the chat the message came from
        sent = wait_until(lambda: tg.sends(str(chat)), timeout=60, what="the answer on the fake Telegram")
        assert [r.data.get("text") for r in sent] == ["hi Ann, how are you?"]
        # list_events's output: on the feed, then in the model's second call
        output = loop_stack.feed_item(type="output", chat_id=str(chat), timeout=60)
        assert output["data"]["action"] == "list_events"
        wait_until(lambda: len(llm.calls[str(chat)]) >= 2, timeout=60, what="the model's second call")
        said = llm.system_messages(str(chat), 1)
        assert [m["type"] for m in said] == ["output"] and said[0]["action_id"] == output["action_id"]
        _settled_in(loop_stack, "telegram_bot", str(chat))
    finally:
        stop_process(receiver)
        loop_stack.processes.remove(receiver)
    # nothing meant for the model reached the human chat: one send, the answer's text, no JSON
    assert [r.data.get("text") for r in tg.sends(str(chat))] == ["hi Ann, how are you?"]
    assert len(llm.calls[str(chat)]) == 2
    # and the conversation is remembered: what the user said and what Rekku said, in order
    history = loop_stack.get("/v1/prompt", params={"interface": "telegram_bot", "chat_id": str(chat),
                                                   "user_id": "501"}).json()["context"]["chat_history"]
    said_in_chat = [(e["from"], e["text"]) for e in history if e.get("text")]
    assert said_in_chat == [("user", "hi"), ("rekku", "hi Ann, how are you?")], history


# ----------------------------------------------------------------------------- a message and its answer
def test_a_message_is_answered_and_the_output_reaches_the_next_call_not_the_chat(loop_stack: Stack,
                                                                                llm: FakeOpenAI) -> None:
    chat = _chat()
    llm.script(chat, HELLO)
    _say(loop_stack, chat, "hi")
    wait_until(lambda: "hello" in _outbox(loop_stack, chat), timeout=60, what="hello in the outbox")
    first = _prompts(llm, chat, 0)
    assert len(first) == 1 and first[0]["input"]["payload"]["text"] == "hi"
    assert first[0]["input"]["payload"]["source"]["chat_id"] == chat and "actions" in first[0]
    assert llm.calls[chat][0][0]["role"] == "system" and "Rekku" in llm.calls[chat][0][0]["content"]
    sent = [r for r in llm.requests if r.data.get("messages") == llm.calls[chat][0]]
    assert sent[0].data["model"] == "fake-model"
    # list_events's output: on the feed, and in the model's next call as a system_message of type output
    output = loop_stack.feed_item(type="output", chat_id=chat, timeout=60)
    assert output["data"]["action"] == "list_events"
    wait_until(lambda: len(llm.calls[chat]) >= 2, timeout=60, what="the model's second call")
    said = llm.system_messages(chat, 1)
    assert [m["type"] for m in said] == ["output"] and said[0]["action"] == "list_events"
    assert said[0]["action_id"] == output["action_id"]
    _settled(loop_stack, chat)
    assert _outbox(loop_stack, chat) == ["hello"]  # no JSON, no system message in the human chat
    assert len(llm.calls[chat]) == 2


def test_a_rejected_reply_gets_its_correction_and_the_corrected_reply_runs(loop_stack: Stack,
                                                                          llm: FakeOpenAI) -> None:
    chat = _chat()
    fixed = {"actions": [{"type": "message_outbox", "payload": {"text": "fixed"}}]}
    llm.script(chat, BAD, fixed)
    _say(loop_stack, chat, "do something odd")
    wait_until(lambda: "fixed" in _outbox(loop_stack, chat), timeout=60, what="the corrected reply's message")
    second = llm.texts(chat)[1]
    assert json.loads(second[-2]) == BAD  # the rejected reply, as the assistant's turn
    assert llm.calls[chat][1][-2]["role"] == "assistant"
    correction = llm.system_messages(chat, 1)[-1]
    assert correction["type"] == "error" and "no_such_action" in " ".join(correction["errors"])
    _settled(loop_stack, chat)
    # the correction is on the feed for readers, and started no turn of its own
    assert [i["type"] for i in loop_stack.feed(chat_id=chat)] == ["message", "correction"]
    assert len(llm.calls[chat]) == 2 and _outbox(loop_stack, chat) == ["fixed"]


def test_corrections_stop_after_corrector_retries(loop_stack: Stack, llm: FakeOpenAI) -> None:
    chat = _chat()
    llm.script(chat, BAD, BAD, BAD, BAD, BAD)
    _say(loop_stack, chat, "keep failing")
    wait_until(lambda: len(loop_stack.feed(type="correction", chat_id=chat)) == 3, timeout=60,
               what="three corrections")
    _settled(loop_stack, chat)
    assert len(llm.calls[chat]) == 3  # the reply and CORRECTOR_RETRIES=2 corrected ones; the block ends it
    assert loop_stack.feed(type="correction", chat_id=chat)[-1]["data"]["system_message"]["blocked"] is True
    assert len(llm.scripts[chat]) == 2 and _outbox(loop_stack, chat) == []


# ----------------------------------------------------------------------------- one turn at a time
def test_a_burst_becomes_at_most_two_turns_never_two_at_once(loop_stack: Stack, llm: FakeOpenAI) -> None:
    chat = _chat()
    llm.hold(chat)
    try:
        _say(loop_stack, chat, "burst 1")
        assert llm.held.wait(60), "the first turn never reached the model"
        for n in range(2, 6):
            _say(loop_stack, chat, f"burst {n}")
    finally:
        llm.release.set()
    _settled(loop_stack, chat)
    assert 1 <= len(llm.calls[chat]) <= 2 and llm.most_open[chat] == 1
    every = " ".join(text for call in llm.texts(chat) for text in call)
    assert all(f"burst {n}" in every for n in range(1, 6))  # every message reached the model
    last = _prompts(llm, chat, len(llm.calls[chat]) - 1)
    assert last[0]["input"]["payload"]["text"] == "burst 5"


# ----------------------------------------------------------------------------- errors
def test_an_endpoint_failure_is_retried_and_the_message_is_answered(loop_stack: Stack, llm: FakeOpenAI) -> None:
    chat = _chat()
    llm.script(chat, 503, 429, {"actions": [{"type": "message_outbox", "payload": {"text": "at last"}}]})
    _say(loop_stack, chat, "are you there?")
    wait_until(lambda: "at last" in _outbox(loop_stack, chat), timeout=90, what="the answer after two failures")
    assert len(llm.calls[chat]) == 3
    assert all(_prompts(llm, chat, n)[0]["input"]["payload"]["text"] == "are you there?" for n in range(3))


def test_a_malformed_completion_ends_the_turn_and_the_message_is_sent_again(loop_stack: Stack,
                                                                          llm: FakeOpenAI) -> None:
    chat = _chat()
    llm.script(chat, MALFORMED, {"actions": [{"type": "message_outbox", "payload": {"text": "both"}}]})
    _say(loop_stack, chat, "first words")
    wait_until(lambda: len(llm.calls[chat]) == 1, timeout=60, what="the first call")
    wait_until(lambda: "model turn of chat outbox:" + chat + " ended" in loop_stack.worker_logs(), timeout=60,
               what="the malformed completion logged")
    _say(loop_stack, chat, "second words")
    wait_until(lambda: "both" in _outbox(loop_stack, chat), timeout=60, what="the second turn's answer")
    again = " ".join(llm.texts(chat)[1])
    assert "first words" in again and "second words" in again  # the cursor had not moved
    assert API_KEY not in loop_stack.worker_logs()


# ----------------------------------------------------------------------------- off
def test_without_an_llm_url_a_message_starts_nothing(make_stack) -> None:
    stack = make_stack()
    stack.start_worker("io", concurrency=1)
    chat = _chat()
    _say(stack, chat, "hi")
    # an action published after the message runs on the io pool: a turn published before it would be seen first
    run = stack.run("message_outbox", {"text": "plain"}, {"interface": "outbox", "chat_id": chat})
    assert run["status"] == "succeeded", run
    logs = stack.worker_logs() + (stack.home / "logs" / "ingress.log").read_text(errors="replace")
    assert "rekku.model.turn" not in logs
    assert not [m for m in stack.broker_messages() if m["task"] == "rekku.model.turn"]


def test_the_api_key_is_a_secret_the_logs_hide() -> None:
    from rekku.logs import configured_secrets
    from rekku.settings import Settings

    assert API_KEY in configured_secrets(Settings(_env_file=None, llm_api_key=API_KEY))


# ----------------------------------------------------------------------------- chains of outputs
def test_outputs_alone_start_at_most_max_chained_turns(loop_stack: Stack, llm: FakeOpenAI) -> None:
    """A model that answers every output with another query: the chat gets the message's turn and three
    (REKKU_LLM_MAX_CHAINED_TURNS' default) more, not an endless loop; the next message asks it again and
    carries the output held back."""
    chat = _chat()
    query = {"actions": [{"type": "list_events", "payload": {}}]}
    llm.script(chat, *[query] * 8)
    _say(loop_stack, chat, "what is planned?")
    wait_until(lambda: len(loop_stack.feed(type="output", chat_id=chat)) == 4, timeout=90,
               what="four list_events outputs")
    wait_until(lambda: f"model turn of chat outbox:{chat} not started: 3 turns in a row" in loop_stack.worker_logs(),
               timeout=60, what="the chain stopped")
    assert len(llm.calls[chat]) == 4  # the message's turn and three chained ones
    _say(loop_stack, chat, "and now?")
    wait_until(lambda: len(llm.calls[chat]) >= 5, timeout=60, what="the next message's turn")
    last = llm.system_messages(chat, 4)
    assert [m["type"] for m in last] == ["output"]  # the fourth output, held back, went with the message
    assert _prompts(llm, chat, 4)[0]["input"]["payload"]["text"] == "and now?"
