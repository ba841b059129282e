"""The chat plugins end to end on MariaDB: chat_link (with cross-platform links), message_map,
recent_chats and blocklist; query results reach the model's feed as items of type output, never the
human chat."""

from __future__ import annotations

import uuid

from tests.conftest import TRAINER
from tests.support import Stack


def _chat(prefix: str = "web") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def outbox(stack: Stack, chat: str) -> list[dict]:
    return stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]


def output_for(stack: Stack, chat: str, action_id: str) -> dict:
    """The output the action gave the model of ``chat`` (an item of the feed); nothing of it reached
    the chat itself."""
    item = stack.feed_item(type="output", action_id=action_id)
    assert item["chat"]["chat_id"] == chat, item
    assert not any(action_id in (m["text"] or "") for m in outbox(stack, chat)), "an output reached the human chat"
    return item["data"]


def ok(run: dict) -> dict:
    assert run["status"] == "succeeded", run
    return run["result"]


# ----------------------------------------------------------------------------- chat_link
def test_store_link_then_get_it_by_name_and_the_answer_reaches_the_chat(chat_stack: Stack) -> None:
    asking = _chat()
    name = f"Book club {uuid.uuid4().hex[:6]}"
    ok(chat_stack.run("store_link", {"chat_id": "-100501", "link": "https://t.me/bookclub", "interface": "telegram_bot",
                                     "chat_name": name}, TRAINER))
    run = chat_stack.run("get_link", {"chat_id": name.upper()}, {"interface": "outbox", "chat_id": asking})
    assert ok(run) == {"found": True, "interface": "telegram_bot", "chat_id": "-100501", "thread_id": None,
                       "link": "https://t.me/bookclub", "chat_name": name, "thread_name": None}
    output = output_for(chat_stack, asking, run["id"])
    assert output["type"] == "output" and output["action"] == "get_link" and output["result"] == run["result"]


def test_an_ambiguous_name_asks_for_the_numeric_id(chat_stack: Stack) -> None:
    name = f"General {uuid.uuid4().hex[:6]}"
    ok(chat_stack.run("store_link", {"chat_id": "-100601", "link": "l1", "interface": "telegram_bot",
                                     "chat_name": name}, TRAINER))
    ok(chat_stack.run("store_link", {"chat_id": "602", "link": "l2", "interface": "discord_bot", "chat_name": name},
                      TRAINER))
    run = chat_stack.run("resolve_chat", {"identifier": name})
    assert run["status"] == "failed"
    assert f"Ambiguous name '{name}'" in run["error"] and "use the numeric chat_id" in run["error"]
    assert "telegram_bot:-100601" in run["error"] and "discord_bot:602" in run["error"]
    assert ok(chat_stack.run("resolve_chat", {"identifier": name, "interface": "discord_bot"}))["chat_id"] == "602"
    assert ok(chat_stack.run("resolve_chat", {"identifier": "-100601"}))["chat_name"] == name
    missing = chat_stack.run("resolve_chat", {"identifier": "Nobody's chat"})
    assert missing["status"] == "failed" and "Unknown chat" in missing["error"]


def test_update_chat_names_asks_telegram_when_no_name_is_given(chat_stack: Stack, tg) -> None:
    tg.chats["-100700"] = {"id": -100700, "type": "supergroup", "title": "Gardening", "username": "garden"}
    result = ok(chat_stack.run("update_chat_names", {"chat_id": "-100700"}, TRAINER))
    assert result["chat_name"] == "Gardening" and result["link"] == "https://t.me/garden"
    assert tg.received("/getChat", chat_id="-100700")
    assert ok(chat_stack.run("resolve_chat", {"identifier": "gardening"}))["chat_id"] == "-100700"
    ok(chat_stack.run("update_chat_names", {"chat_id": "-100700", "chat_name": "Orto"}, TRAINER))
    listed = ok(chat_stack.run("list_links", {"interface": "telegram_bot"}))["links"]
    assert {"chat_id": "-100700", "chat_name": "Orto"}.items() <= next(
        link for link in listed if link["chat_id"] == "-100700").items()


def test_linked_chats_get_every_message_across_platforms_once(chat_stack: Stack, tg) -> None:
    web, group = _chat(), "-100800"
    linked = ok(chat_stack.run("link_chats", {"from_chat": web, "from_interface": "outbox", "to_chat": group,
                                              "to_interface": "telegram_bot", "bidirectional": True}, TRAINER))
    assert linked["linked"] == [{"from": f"outbox:{web}", "to": f"telegram_bot:{group}"},
                                {"from": f"telegram_bot:{group}", "to": f"outbox:{web}"}]
    # A message to the web chat also reaches the Telegram group, and does not come back (loop protection).
    run = chat_stack.run("message_outbox", {"text": "from the web"}, {"interface": "outbox", "chat_id": web})
    assert ok(run)["forwarded"][0]["interface"] == "telegram_bot"
    assert [r.data["text"] for r in tg.sends(group)] == ["from the web"]
    assert [m["text"] for m in outbox(chat_stack, web)] == ["from the web"]
    # And the other way round.
    ok(chat_stack.run("message_telegram_bot", {"text": "from telegram"}, {"interface": "telegram_bot",
                                                                          "chat_id": group}))
    assert [m["text"] for m in outbox(chat_stack, web)] == ["from the web", "from telegram"]
    assert [r.data["text"] for r in tg.sends(group)] == ["from the web", "from telegram"]
    # Unlinked: no more forwarding.
    assert ok(chat_stack.run("unlink_chats", {"from_chat": web, "from_interface": "outbox", "to_chat": group,
                                              "to_interface": "telegram_bot", "bidirectional": True},
                             TRAINER))["removed"] == 2
    ok(chat_stack.run("message_outbox", {"text": "alone"}, {"interface": "outbox", "chat_id": web}))
    assert len(tg.sends(group)) == 2


def test_a_cycle_of_links_delivers_to_each_chat_once(chat_stack: Stack) -> None:
    a, b, c = _chat("a"), _chat("b"), _chat("c")
    for src, dst in ((a, b), (b, c), (c, a)):
        ok(chat_stack.run("link_chats", {"from_chat": src, "from_interface": "outbox", "to_chat": dst,
                                         "to_interface": "outbox"}, TRAINER))
    result = ok(chat_stack.run("message_outbox", {"text": "round"}, {"chat_id": a}))
    assert [f["chat_id"] for f in result["forwarded"]] == [b, c]
    assert [len(outbox(chat_stack, chat)) for chat in (a, b, c)] == [1, 1, 1]


def test_a_message_target_may_be_a_stored_chat_name(chat_stack: Stack, tg) -> None:
    name = f"Family {uuid.uuid4().hex[:6]}"
    ok(chat_stack.run("store_link", {"chat_id": "-100900", "link": "l", "interface": "telegram_bot",
                                     "chat_name": name}, TRAINER))
    ok(chat_stack.run("message_telegram_bot", {"text": "by name", "target": name}))
    assert [r.data["text"] for r in tg.sends("-100900")] == ["by name"]


def test_chat_link_takes_the_original_thread_field_names(chat_stack: Stack) -> None:
    chat, name = "-100950", f"News {uuid.uuid4().hex[:6]}"
    stored = chat_stack.run("store_link", {"chat_id": chat, "link": "https://t.me/c/950/7", "interface": "telegram_bot",
                                           "message_thread_id": 7, "message_thread_name": name}, TRAINER)
    assert ok(stored)["thread_id"] == 7 and stored["result"]["thread_name"] == name
    assert stored["payload"] == {"chat_id": chat, "link": "https://t.me/c/950/7", "interface": "telegram_bot",
                                 "thread_id": 7, "thread_name": name}  # the log keeps the current names
    expected = {"found": True, "interface": "telegram_bot", "chat_id": chat, "thread_id": "7",
                "link": "https://t.me/c/950/7", "chat_name": None, "thread_name": name}
    assert ok(chat_stack.run("get_link", {"chat_id": chat, "message_thread_id": "7"}, TRAINER)) == expected
    assert ok(chat_stack.run("get_link", {"chat_id": chat, "message_thread_name": name.lower()}, TRAINER)) == expected
    renamed = chat_stack.run("update_chat_names", {"chat_id": chat, "interface": "telegram_bot",
                                                   "message_thread_id": 7, "message_thread_name": f"Old {name}"},
                             TRAINER)
    assert ok(renamed)["thread_name"] == f"Old {name}"
    assert ok(chat_stack.run("get_link", {"chat_id": chat, "thread_id": 7}, TRAINER))["thread_name"] == f"Old {name}"
    unknown = chat_stack.run("get_link", {"chat_id": chat, "thread_name": "Nothing here"}, TRAINER)
    assert unknown["status"] == "failed" and f"Unknown thread 'Nothing here' in chat telegram_bot:{chat}" in \
        unknown["error"]
    # Both names of one field, with different values: refused at the ingress, nothing stored.
    answer = chat_stack.submit([{"type": t, "payload": {"chat_id": chat, "link": "l", "thread_id": 7,
                                                        "message_thread_id": 8}}
                                for t in ("store_link", "update_chat_names", "get_link")], TRAINER)
    assert not answer["accepted"]
    assert [r["errors"] for r in answer["rejected"]] == [
        [f"Fields 'thread_id' and 'message_thread_id' (its older name) differ for action '{t}': give only one"]
        for t in ("store_link", "update_chat_names", "get_link")]
    names = chat_stack.submit([{"type": "store_link", "payload": {"chat_id": chat, "link": "l", "thread_id": 7,
                                                                  "thread_name": "A", "message_thread_name": "B"}}],
                              TRAINER)
    assert names["rejected"][0]["errors"] == [
        "Fields 'thread_name' and 'message_thread_name' (its older name) differ for action 'store_link': give only one"]


# ----------------------------------------------------------------------------- message_map
def test_message_map_stores_finds_counts_and_cleans_up(chat_stack: Stack) -> None:
    asking, trainer_message = _chat(), f"tm-{uuid.uuid4().hex[:6]}"
    ok(chat_stack.run("store_message_mapping", {"trainer_message_id": trainer_message, "chat_id": "-1001",
                                                "message_id": 55}, {"interface": "telegram_bot"}))
    run = chat_stack.run("get_original_message", {"trainer_message_id": trainer_message}, {"chat_id": asking})
    found = ok(run)
    assert (found["found"], found["chat_id"], found["message_id"], found["interface"]) == (True, "-1001", "55",
                                                                                           "telegram_bot")
    assert output_for(chat_stack, asking, run["id"])["result"]["chat_id"] == "-1001"
    stats = chat_stack.run("get_mapping_stats", {}, {"chat_id": asking})
    assert ok(stats)["total"] >= 1
    assert output_for(chat_stack, asking, stats["id"])["action"] == "get_mapping_stats"
    assert ok(chat_stack.run("cleanup_old_mappings", {"older_than_hours": 0}))["removed"] >= 1
    assert ok(chat_stack.run("get_original_message", {"trainer_message_id": trainer_message}))["found"] is False


def test_get_original_message_resolves_a_stored_reply_to_a_forwarded_message(chat_stack: Stack) -> None:
    trainer_chat, forwarded, reply = _chat("trainer"), str(uuid.uuid4().int % 10**9), str(uuid.uuid4().int % 10**9)
    ok(chat_stack.run("store_message_mapping", {"trainer_message_id": forwarded, "chat_id": "-1002",
                                                "message_id": 66}, {"interface": "telegram_bot"}))
    resp = chat_stack.post("/v1/messages", {"interface": "telegram_bot", "chat_id": trainer_chat, "message_id": reply,
                                            "user_id": "42", "text": "tell them yes",
                                            "reply_to_message_id": forwarded})
    assert resp.status_code == 202, resp.text
    context = {"interface": "telegram_bot", "chat_id": trainer_chat}
    found = ok(chat_stack.run("get_original_message", {"trainer_message_id": reply}, context))
    assert (found["found"], found["chat_id"], found["message_id"], found["reply_to"]) == (True, "-1002", "66",
                                                                                          forwarded)
    elsewhere = ok(chat_stack.run("get_original_message", {"trainer_message_id": reply},
                                  {"interface": "telegram_bot", "chat_id": trainer_chat + "-x"}))
    assert elsewhere == {"found": False, "trainer_message_id": reply}, "a reply is looked up in the asking chat"


# ----------------------------------------------------------------------------- recent_chats
def test_the_ingress_records_every_chat_it_hears_from(chat_stack: Stack) -> None:
    chat = _chat("recent")
    chat_stack.submit([{"type": "nope", "payload": {}}], {"interface": "outbox", "chat_id": chat})  # rejected
    run = chat_stack.run("get_recent_chats", {"limit": 5}, {"interface": "outbox", "chat_id": chat})
    chats = ok(run)["chats"]
    assert chats[0]["chat_id"] == chat and chats[0]["interface"] == "outbox" and len(chats) <= 5
    assert output_for(chat_stack, chat, run["id"])["result"]["chats"][0]["chat_id"] == chat


def test_chat_activity_metadata_and_cleanup(chat_stack: Stack) -> None:
    chat = _chat("meta")
    ok(chat_stack.run("update_chat_activity", {"chat_id": chat, "metadata": {"topic": "cats"}, "interface": "outbox"}))
    chats = ok(chat_stack.run("get_recent_chats", {}))["chats"]
    assert next(c for c in chats if c["chat_id"] == chat)["metadata"] == {"topic": "cats"}
    assert ok(chat_stack.run("cleanup_old_chats", {"older_than_days": 30}))["removed"] == 0
    assert ok(chat_stack.run("cleanup_old_chats", {"older_than_days": 0}))["removed"] >= 1
    bad = chat_stack.submit([{"type": "get_recent_chats", "payload": {"limit": 0}}])
    assert "Field 'limit' must be an integer from 1 to 1000" in bad["rejected"][0]["errors"][0]


# ----------------------------------------------------------------------------- blocklist
def test_a_blocked_user_is_refused_at_the_ingress_until_unblocked(chat_stack: Stack) -> None:
    user, asking = f"u{uuid.uuid4().hex[:6]}", _chat()
    echo = {"actions": [{"type": "echo", "payload": {}}],
            "context": {"interface": "discord_bot", "user_id": user, "chat_id": "d1"}}
    assert chat_stack.post("/v1/actions", echo).status_code == 202
    ok(chat_stack.run("block_user", {"user_id": user, "reason": "spam"}))
    refused = chat_stack.post("/v1/actions", echo)
    assert refused.status_code == 403
    assert refused.json()["rejected"] == [{"index": None, "type": None, "errors": [f"User {user} is blocked"]}]
    run = chat_stack.run("is_user_blocked", {"user_id": user}, {"chat_id": asking})
    assert ok(run)["blocked"] is True and run["result"]["reason"] == "spam"
    assert output_for(chat_stack, asking, run["id"])["result"]["blocked"] is True
    listed = ok(chat_stack.run("get_blocked_users", {}))["users"]
    assert {"user_id": user, "reason": "spam"}.items() <= next(u for u in listed if u["user_id"] == user).items()
    assert ok(chat_stack.run("unblock_user", {"user_id": user}))["unblocked"] is True
    assert chat_stack.post("/v1/actions", echo).status_code == 202
    assert ok(chat_stack.run("is_user_blocked", {"user_id": user}))["blocked"] is False


def test_a_blocked_trainer_is_still_served_on_their_trainer_interface(chat_stack: Stack) -> None:
    ok(chat_stack.run("block_user", {"user_id": "42"}))
    try:
        as_trainer = {"interface": "telegram_bot", "user_id": "42"}
        assert chat_stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                               "context": as_trainer}).status_code == 202
        elsewhere = {"interface": "discord_bot", "user_id": "42"}
        assert chat_stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                               "context": elsewhere}).status_code == 403
    finally:
        ok(chat_stack.run("unblock_user", {"user_id": "42"}, {"interface": "telegram_bot", "user_id": "42"}))
