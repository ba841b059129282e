"""The prompt's chat history is the conversation: the chat's user messages (POST /v1/messages) and what
Rekku delivered there (any interface, the outbox included), in time order, within the limit, the days
and the character budget; participants from the messages. End to end through the memory stack's
ingress and workers (MariaDB), and rekku.prompt.chat_history itself on SQLite and MariaDB."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from rekku.db import get_engine
from rekku.interfaces.delivery import deliver
from rekku.interfaces.links import Chat
from rekku.interfaces.models import ChatForward, Delivery
from rekku.messages import IncomingMessage, receive
from rekku.models import utcnow
from rekku.prompt import chat_history
from tests.support import Stack
from tests.test_event_dispatch import event_db  # noqa: F401 - a MariaDB and a SQLite database, migrated


def new_chat(prefix: str = "conv") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def say(stack: Stack, chat: str, text: str, user: str = "u1", interface: str = "telegram_bot",
        **fields: Any) -> dict:
    """A user's message in, through POST /v1/messages; returns it as stored."""
    body = {"interface": interface, "chat_id": chat, "message_id": str(uuid.uuid4().int % 10**12),
            "user_id": user, "username": f"name-{user}", "text": text, **fields}
    resp = stack.post("/v1/messages", body)
    assert resp.status_code == 202 and resp.json()["dropped"] is None, resp.text
    return resp.json()["message"]


def reply(stack: Stack, message: dict, text: str, **payload: Any) -> dict:
    """Rekku's answer to ``message`` through the outbox, with the context the model's turn carries."""
    context = {k: message[k] for k in ("interface", "chat_id", "thread_id", "user_id", "username", "message_id")
               if message.get(k)}
    extra = {"thread_id": message["thread_id"]} if message.get("thread_id") else {}
    run = stack.run("message_outbox", {"text": text, "target": message["chat_id"], **extra, **payload}, context)
    assert run["status"] == "succeeded", run
    return run


def prompt(stack: Stack, **params: Any) -> dict:
    resp = stack.get("/v1/prompt", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def history(stack: Stack, **params: Any) -> list[dict]:
    return prompt(stack, **params)["context"]["chat_history"]


def said(entries: list[dict]) -> list[tuple[str, str]]:
    return [(e["from"], e.get("text") or e.get("action", "")) for e in entries]


# ----------------------------------------------------------------------------- end to end
def test_history_interleaves_user_messages_and_rekku_s_replies_in_order(memory_stack: Stack) -> None:
    chat = new_chat()
    first = say(memory_stack, chat, "hi Rekku", user="u1")
    reply(memory_stack, first, "hello u1!")
    second = say(memory_stack, chat, "what's up?", user="u2")
    assert memory_stack.run("echo", {"text": "thinking"}, {"interface": "telegram_bot", "chat_id": chat})["status"] \
        == "succeeded"
    reply(memory_stack, second, "not much")
    say(memory_stack, chat, "on discord, same id", user="u3", interface="discord_bot")
    asking = say(memory_stack, chat, "and now?", user="u1")

    entries = history(memory_stack, interface="telegram_bot", chat_id=chat, message_id=asking["message_id"])
    assert said(entries) == [("user", "hi Rekku"), ("rekku", "hello u1!"), ("user", "what's up?"),
                             ("rekku", "echo"), ("rekku", "not much")], \
        "in order; the discord chat of the same id is another chat; the message answered is the input"
    assert entries[0] == {"time": entries[0]["time"], "from": "user", "user_id": "u1", "username": "name-u1",
                          "text": "hi Rekku", "message_id": first["message_id"]}
    assert entries[1]["interface"] == "outbox" and entries[1]["message_id"], "the outbox's own message id"
    assert set(entries[1]) == {"time", "from", "text", "message_id", "interface"}
    assert entries[3]["payload"] == {"text": "thinking"} and entries[3]["result"] == {"text": "thinking"}
    assert not any(e.get("action", "").startswith("message_") for e in entries), \
        "a message action is its delivered text, once"
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)

    everywhere = history(memory_stack, chat_id=chat)
    assert said(everywhere)[-2:] == [("user", "on discord, same id"), ("user", "and now?")]
    assert everywhere[-2]["interface"] == "discord_bot", "with no interface asked, each entry says its own"


def test_history_of_a_thread_is_that_thread_s_conversation(memory_stack: Stack) -> None:
    chat = new_chat("thread")
    general = say(memory_stack, chat, "in the chat")
    reply(memory_stack, general, "answer in the chat")
    topic = say(memory_stack, chat, "in thread 9", thread_id="9")
    reply(memory_stack, topic, "answer in thread 9")

    thread = history(memory_stack, interface="telegram_bot", chat_id=chat, thread_id="9")
    assert said(thread) == [("user", "in thread 9"), ("rekku", "answer in thread 9")]
    assert all("thread_id" not in e for e in thread), "the thread asked for is not repeated"
    whole = history(memory_stack, interface="telegram_bot", chat_id=chat)
    assert said(whole) == [("user", "in the chat"), ("rekku", "answer in the chat"), ("user", "in thread 9"),
                           ("rekku", "answer in thread 9")]
    assert [e.get("thread_id") for e in whole] == [None, None, "9", "9"]


def test_history_keeps_the_newest_entries_within_the_limit_and_the_days(memory_stack: Stack) -> None:
    """The memory stack runs with the defaults: REKKU_PROMPT_HISTORY_LIMIT 30, REKKU_PROMPT_HISTORY_DAYS 7."""
    chat = new_chat("bounds")
    say(memory_stack, chat, "eight days ago", date=(utcnow() - timedelta(days=8)).isoformat())
    say(memory_stack, chat, "six days ago", date=(utcnow() - timedelta(days=6)).isoformat())
    assert said(history(memory_stack, interface="telegram_bot", chat_id=chat)) == [("user", "six days ago")]
    for n in range(31):
        say(memory_stack, chat, f"message {n}")
    entries = history(memory_stack, interface="telegram_bot", chat_id=chat)
    assert said(entries) == [("user", f"message {n}") for n in range(1, 31)], "the 30 newest, oldest first"


def test_a_tight_budget_cuts_the_oldest_messages_first(memory_stack: Stack) -> None:
    chat = new_chat("budget")
    for n in range(6):
        reply(memory_stack, say(memory_stack, chat, f"question {n} " + "q" * 300), f"answer {n} " + "a" * 300)
    params = {"interface": "telegram_bot", "chat_id": chat, "text": "hi"}
    full = prompt(memory_stack, **params)
    assert len(full["context"]["chat_history"]) == 12
    diary = len(json.dumps(full["context"]["latest_diary_entries"], ensure_ascii=False))
    tight = prompt(memory_stack, **params, max_chars=full["meta"]["chars"] - diary - 1500)
    assert tight["meta"]["fits"] is True
    kept = tight["context"]["chat_history"]
    assert 0 < len(kept) < 12 and kept == full["context"]["chat_history"][-len(kept):], "the newest are kept"
    assert any(d.startswith("chat_history (oldest first): dropped ") for d in tight["meta"]["dropped"])


def test_participants_are_the_asking_user_then_the_authors_of_the_chat_s_messages(memory_stack: Stack) -> None:
    chat = new_chat("people")
    for user in ("p1", "p2", "p1"):
        say(memory_stack, chat, f"{user} here", user=user)
    reply(memory_stack, say(memory_stack, chat, "p3 here", user="p3"), "hi p3")
    people = prompt(memory_stack, interface="telegram_bot", chat_id=chat, user_id="p9", username="nine")
    assert [p["id"] for p in people["context"]["participants"]] == ["p9", "p3", "p1", "p2"]
    assert people["context"]["participants"][1]["user_name"] == "name-p3"


# ----------------------------------------------------------------------------- the builder, on SQLite and MariaDB
def _receive(chat: str, text: str, **fields: Any) -> dict:
    message = IncomingMessage(**{"interface": "telegram_bot", "chat_id": chat, "message_id": uuid.uuid4().hex,
                                 "user_id": "u1", "text": text, **fields})
    answer = receive(message)
    assert answer["dropped"] is None, answer
    return answer["message"]


@pytest.mark.usefixtures("event_db")
def test_a_message_of_many_parts_counts_once_and_forwarded_copies_count_where_they_arrived() -> None:
    chat, linked = new_chat("parts"), new_chat("linked")
    with get_engine().begin() as conn:
        conn.execute(sa.insert(ChatForward).values(source_interface="outbox", source_chat_id=chat,
                                                   target_interface="outbox", target_chat_id=linked,
                                                   target_thread_id="", created_at=utcnow()))
    _receive(chat, "tell me everything")
    long = "word " * 30_000  # 150 000 characters: two parts of the outbox's 100 000
    report = deliver(Chat("outbox", chat), str(uuid.uuid4()), text=long)
    assert report["parts"] == 2 and report["forwarded"][0]["parts"] == 2
    entries = chat_history("telegram_bot", chat)
    assert said(entries)[0] == ("user", "tell me everything")
    assert [e["from"] for e in entries] == ["user", "rekku"], "two parts, one message"
    assert entries[1]["text"].startswith("word word") and entries[1]["text"].endswith("more characters]")
    assert [e["from"] for e in chat_history("outbox", linked)] == ["rekku"], "the forwarded copy"
    assert chat_history("outbox", chat)[0]["from"] == "rekku" and len(chat_history("outbox", chat)) == 1, \
        "an outbox chat is its messages from the outbox only"


@pytest.mark.usefixtures("event_db")
def test_the_builder_merges_by_time_within_the_limit_and_the_days() -> None:
    chat = new_chat("merge")
    _receive(chat, "long ago", date=utcnow() - timedelta(days=3))
    old = deliver(Chat("outbox", chat), str(uuid.uuid4()), text="old answer")
    with get_engine().begin() as conn:  # delivered three days ago too, just after the message
        conn.execute(sa.update(Delivery).where(Delivery.remote_id == str(old["sent"][0]), Delivery.chat_id == chat)
                     .values(created_at=utcnow() - timedelta(days=3) + timedelta(seconds=1)))
    for n in range(3):
        _receive(chat, f"now {n}")
        deliver(Chat("outbox", chat), str(uuid.uuid4()), text=f"answer {n}")
    assert said(chat_history("telegram_bot", chat)) == [
        ("user", "long ago"), ("rekku", "old answer"), ("user", "now 0"), ("rekku", "answer 0"), ("user", "now 1"),
        ("rekku", "answer 1"), ("user", "now 2"), ("rekku", "answer 2")]
    assert said(chat_history("telegram_bot", chat, days=2))[:2] == [("user", "now 0"), ("rekku", "answer 0")]
    assert said(chat_history("telegram_bot", chat, limit=3)) == [("rekku", "answer 1"), ("user", "now 2"),
                                                                  ("rekku", "answer 2")]
    assert chat_history("telegram_bot", chat.upper()) == [], "the chat id is exact"


@pytest.mark.parametrize("event_db", ["mariadb"], indirect=True)
def test_the_history_reads_messages_and_deliveries_by_index(event_db: str) -> None:  # noqa: F811
    now = utcnow()
    with get_engine().begin() as conn:
        conn.execute(sa.insert(sa.table("messages", *(sa.column(n) for n in (
            "interface", "chat_id", "thread_id", "message_id", "user_id", "text", "date", "received_at")))),
            [{"interface": "telegram_bot", "chat_id": f"chat-{n % 50}", "thread_id": "", "message_id": str(n),
              "user_id": "u", "text": str(n), "date": now.replace(tzinfo=None), "received_at": now.replace(tzinfo=None)}
             for n in range(500)])
        conn.execute(sa.insert(Delivery), [
            {"action_id": str(uuid.uuid4()), "part_key": "k", "interface": "outbox", "chat_id": f"chat-{n % 50}",
             "thread_id": "", "status": "sent", "remote_id": str(n), "text": str(n), "created_at": now,
             "updated_at": now} for n in range(500)])
        conn.exec_driver_sql("ANALYZE TABLE messages, interface_deliveries")
    engine = get_engine()
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if "FROM messages" in statement or "FROM interface_deliveries" in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        assert len(chat_history("telegram_bot", "chat-7", limit=100)) == 20
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert len(statements) == 3, statements  # the messages, the deliveries' messages, their parts
    keys = []
    with engine.connect() as conn:
        for statement, parameters in statements:
            plan = conn.exec_driver_sql("EXPLAIN " + statement, parameters).mappings().all()
            keys.append([row["key"] for row in plan])
    assert keys[0] == ["ix_messages_chat_date"], keys
    assert keys[1] == ["ix_interface_deliveries_chat_created"], keys
    assert keys[2] and keys[2][0] in ("uq_interface_deliveries_part", "ix_interface_deliveries_chat_created"), keys
