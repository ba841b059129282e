"""ai_diary: every field stored, the bounded injection, and `rekku diary reset` (end to end on MariaDB)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import timedelta

import sqlalchemy as sa
from rekku_plugins.ai_diary import ai_diary, select_entries

from rekku.models import utcnow
from tests.support import ROOT, Stack

FULL = {
    "interaction_summary": "Talked about jazz with Marco",
    "content": "Marco played me a Coltrane record.",
    "personal_thought": "I should listen to more jazz.",
    "emotions": [{"type": "joy", "intensity": 8}, {"type": "curiosity", "intensity": 5}],
    "context_tags": ["music", "jazz"],
    "involved_users": ["Marco", "123456"],
}


def engine(stack: Stack) -> sa.Engine:
    return sa.create_engine(stack.database_url)


def rows(stack: Stack, **where: str) -> list[dict]:
    eng = engine(stack)
    with eng.connect() as c:
        query = sa.select(ai_diary).where(*(ai_diary.c[k] == v for k, v in where.items())).order_by(ai_diary.c.id)
        out = [dict(r) for r in c.execute(query).mappings().all()]
    eng.dispose()
    return out


def cli(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rekku", *args], env=stack.env(), cwd=str(ROOT), input=stdin,
                          capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- pure
def test_select_entries_keeps_whole_newest_entries_within_the_bound() -> None:
    entries = [{"n": i, "text": "x" * 40} for i in range(10)]
    one = len('{"n": 0, "text": "' + "x" * 40 + '"}')
    assert select_entries(entries, one * 3 + 4) == entries[:3]
    assert select_entries(entries, one * 3 + 3) == entries[:2], "a partial entry is never included"
    assert select_entries(entries, 0) == []
    assert select_entries([{"big": "y" * 500}, {"n": 1}], 100) == [], "no older entry jumps the queue"


# ----------------------------------------------------------------------------- end to end
def test_a_diary_entry_keeps_every_field_and_the_chat_it_came_from(memory_stack: Stack) -> None:
    chat = "diary-" + uuid.uuid4().hex[:8]
    run = memory_stack.run("create_personal_diary_entry", FULL,
                           {"chat_id": chat, "thread_id": "7", "interface": "telegram_bot", "user_id": "42"})
    assert run["status"] == "succeeded", run
    assert run["result"]["stored"] is True
    (row,) = rows(memory_stack, chat_id=chat)
    assert row["id"] == run["result"]["id"]
    for name, value in FULL.items():
        assert row[name] == value, name
    assert (row["interface"], row["thread_id"]) == ("telegram_bot", "7")
    assert abs((utcnow() - row["timestamp"]).total_seconds()) < 60


def test_the_summary_is_kept_without_content(memory_stack: Stack) -> None:
    """Upstream lost the summary when `content` was absent."""
    chat = "diary-" + uuid.uuid4().hex[:8]
    run = memory_stack.run("create_personal_diary_entry", {"interaction_summary": "A short chat"}, {"chat_id": chat})
    assert run["status"] == "succeeded", run
    (row,) = rows(memory_stack, chat_id=chat)
    assert row["interaction_summary"] == "A short chat" and row["content"] is None
    assert row["involved_users"] == [] and row["emotions"] == []


def test_an_entry_keeps_the_message_its_turn_answers_unless_the_payload_gives_one(memory_stack: Stack) -> None:
    chat = "diary-" + uuid.uuid4().hex[:8]
    message = {"interface": "telegram_bot", "chat_id": chat, "thread_id": "7", "message_id": "501", "user_id": "77",
               "username": "marco", "text": "I adopted a cat!"}
    resp = memory_stack.post("/v1/messages", message)
    assert resp.status_code == 202 and resp.json()["dropped"] is None, resp.text
    context = {k: message[k] for k in ("interface", "chat_id", "thread_id", "message_id", "user_id", "username")}

    filled = memory_stack.run("create_personal_diary_entry", {"interaction_summary": "Marco's cat"}, context)
    given = memory_stack.run("create_personal_diary_entry",
                             {"interaction_summary": "quoted", "user_message": "my own quote"}, context)
    unknown = memory_stack.run("create_personal_diary_entry", {"interaction_summary": "no such message"},
                               {**context, "message_id": "502"})
    other_chat = memory_stack.run("create_personal_diary_entry", {"interaction_summary": "another chat"},
                                  {**context, "chat_id": chat + "-x"})
    assert all(r["status"] == "succeeded" for r in (filled, given, unknown, other_chat))
    by_summary = {row["interaction_summary"]: row["user_message"] for row in rows(memory_stack, chat_id=chat)}
    assert by_summary == {"Marco's cat": "I adopted a cat!", "quoted": "my own quote", "no such message": None}
    assert rows(memory_stack, chat_id=chat + "-x")[0]["user_message"] is None, "a message is found in its own chat"


def test_a_user_message_that_is_not_text_is_rejected(memory_stack: Stack) -> None:
    answer = memory_stack.submit([{"type": "create_personal_diary_entry",
                                   "payload": {"interaction_summary": "x", "user_message": ["not", "text"]}}])
    assert answer["accepted"] == [] and answer["rejected"][0]["errors"] == [
        "Field 'user_message' must be a string for action 'create_personal_diary_entry'"]


def test_invalid_entries_are_rejected_at_the_ingress(memory_stack: Stack) -> None:
    answer = memory_stack.submit([
        {"type": "create_personal_diary_entry", "payload": {"content": "no summary"}},
        {"type": "create_personal_diary_entry", "payload": {"interaction_summary": "x",
                                                            "emotions": [{"type": "joy", "intensity": 11}],
                                                            "involved_users": "Marco"}},
    ])
    assert answer["accepted"] == []
    assert answer["rejected"][0]["errors"] == [
        "Missing required field 'interaction_summary' for action 'create_personal_diary_entry'"]
    assert answer["rejected"][1]["errors"] == [
        "Field 'emotions' must be a list of {\"type\": str, \"intensity\": 1-10} for action "
        "'create_personal_diary_entry'",
        "Field 'involved_users' must be a list of strings for action 'create_personal_diary_entry'"]


def test_prompt_gets_recent_entries_newest_first_and_not_older_than_the_day_bound(memory_stack: Stack) -> None:
    reset = cli(memory_stack, "diary", "reset", "--yes")
    assert reset.returncode == 0, reset.stderr
    for summary in ("first", "second", "third"):
        assert memory_stack.run("create_personal_diary_entry", {"interaction_summary": summary,
                                                                "involved_users": ["u1"]})["status"] == "succeeded"
    _insert_old(memory_stack, days=8)
    prompt = memory_stack.get("/v1/prompt", params={"chat_id": "diary-prompt", "text": "hi"}).json()
    entries = prompt["context"]["latest_diary_entries"]
    assert [e["interaction_summary"] for e in entries] == ["third", "second", "first"]
    assert entries[0]["involved_users"] == ["u1"] and "content" not in entries[0]
    assert "eight days ago" not in [e["interaction_summary"] for e in entries]


def _insert_old(stack: Stack, days: float) -> int:
    """An entry written ``days`` ago (an action can only write one now)."""
    eng = engine(stack)
    with eng.begin() as c:
        entry_id = c.execute(sa.insert(ai_diary).values(
            interaction_summary="eight days ago", timestamp=utcnow() - timedelta(days=days),
            emotions=[], context_tags=[], involved_users=[])).inserted_primary_key[0]
    eng.dispose()
    return entry_id


def test_diary_reset_asks_first_and_deletes_every_entry(memory_stack: Stack) -> None:
    memory_stack.run("create_personal_diary_entry", {"interaction_summary": "to be forgotten"})
    refused = cli(memory_stack, "diary", "reset", stdin="n\n")
    assert refused.returncode != 0 and "Aborted" in refused.stderr + refused.stdout
    assert rows(memory_stack)
    done = cli(memory_stack, "diary", "reset", stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert "entries deleted" in done.stdout
    assert rows(memory_stack) == []
