"""GET /v1/prompt and `rekku prompt`: the shape, chat history, slow and failing injections, the budget."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from rekku.prompt import fit_budget
from tests.plugins.slow_injector import record_dir
from tests.support import ROOT, Stack, wait_until


def prompt(stack: Stack, **params: object) -> dict:
    resp = stack.get("/v1/prompt", params=params)
    assert resp.status_code == 200, resp.text
    assert len(resp.text) <= params.get("max_chars", 100_000)
    return resp.json()


def test_prompt_has_upstream_s_shape_and_the_capabilities(memory_stack: Stack) -> None:
    params = dict(interface="telegram_bot", chat_id="-100", thread_id="3", user_id="42", username="marco",
                  message_id="77", text="Ciao Rekku!")
    # (the slow test plugin is left out while an earlier call of it still runs)
    body = wait_until(lambda: (b := prompt(memory_stack, **params)) and "slow_injector" not in
                      b["meta"]["skipped_injections"] and b, timeout=15, what="the slow injector to be free")
    context = body["context"]
    assert {"time", "date", "location", "weather", "participants", "latest_diary_entries",
            "chat_history"} <= set(context)
    assert context["location"] == "Rome" and "UTC)" in context["time"]
    assert context["quick_value"] == "on time", "a test plugin's own key reaches the context"
    assert body["input"] == {"type": "message", "interface": "telegram_bot", "payload": {
        "text": "Ciao Rekku!", "timestamp": body["input"]["payload"]["timestamp"],
        "source": {"chat_id": "-100", "message_id": "77", "username": "marco", "usertag": "@marco",
                   "thread_id": "3", "interface": "telegram_bot", "user_id": "42"}}}
    assert "JSON" in body["instructions"] and "actions" in body["instructions"]
    capabilities = memory_stack.get("/v1/capabilities").json()["actions"]
    assert body["actions"] == capabilities
    assert {"bio_update", "create_personal_diary_entry"} <= set(body["actions"])
    assert body["meta"]["fits"] is True and body["meta"]["dropped"] == []


def test_prompt_needs_the_token(memory_stack: Stack) -> None:
    import requests

    assert requests.get(memory_stack.base_url + "/v1/prompt", timeout=10).status_code == 401


def test_a_slow_or_failing_injection_is_left_out_and_the_prompt_does_not_wait(memory_stack: Stack) -> None:
    """The slow test injection hangs until this test releases it (tests/plugins/slow_injector.py), so
    an answer at all, while its record says "started" and not "finished", is the prompt not waiting."""
    records = record_dir(memory_stack.home)
    records.mkdir(exist_ok=True)
    (records / "release").unlink(missing_ok=True)
    calls = lambda: (records / "calls").read_text().split() if (records / "calls").exists() else []  # noqa: E731
    earlier = calls()
    try:
        body = prompt(memory_stack, chat_id="slow", text="please be slow")
        assert calls()[len(earlier):] == ["started"], "the prompt answered while the injection still ran"
        skipped = body["meta"]["skipped_injections"]
        assert skipped["slow_injector"] == "timed out after 1 s"
        assert skipped["failing_injector"].startswith("failed: RuntimeError: the failing injector failed")
        assert "slow_value" not in body["context"]
        assert body["context"]["location"] == "Rome" and body["context"]["date"], "the others still answered"
        log = (memory_stack.home / "logs" / "ingress.log").read_text()
        assert "prompt injection of plugin slow_injector took longer than 1 s; left out" in log

        again = prompt(memory_stack, chat_id="slow", text="slow again")
        assert again["meta"]["skipped_injections"]["slow_injector"] == "still busy with an earlier prompt"
        assert calls()[len(earlier):] == ["started"], \
            "a plugin still hung from an earlier prompt is neither called again nor waited for"
    finally:
        (records / "release").touch()
        wait_until(lambda: calls().count("finished") == calls().count("started"), timeout=30,
                   what="the released injection to finish")
        (records / "release").unlink()


def test_chat_history_keeps_this_chat_s_other_actions_oldest_first(memory_stack: Stack) -> None:
    """Actions that are not messages stay in the history (what Rekku did here, and a query's result);
    the conversation itself is tests/test_history.py."""
    chat = "hist-" + uuid.uuid4().hex[:8]
    ctx = {"chat_id": chat, "interface": "telegram_bot", "user_id": "42", "username": "marco"}
    for text in ("one", "two"):
        assert memory_stack.run("echo", {"text": text}, ctx)["status"] == "succeeded"
    memory_stack.run("echo", {"text": "other thread"}, {**ctx, "thread_id": "9"})
    memory_stack.run("echo", {"text": "other chat"}, {**ctx, "chat_id": chat + "-x"})
    memory_stack.run("echo", {"text": "other platform"}, {**ctx, "interface": "discord_bot"})
    history = prompt(memory_stack, interface="telegram_bot", chat_id=chat)["context"]["chat_history"]
    assert [h["payload"]["text"] for h in history] == ["one", "two", "other thread"]
    assert history[0] == {"time": history[0]["time"], "from": "rekku", "action": "echo", "status": "succeeded",
                          "payload": {"text": "one"}, "result": {"text": "one"}, "user_id": "42",
                          "username": "marco"}
    assert history[2]["thread_id"] == "9"
    thread = prompt(memory_stack, interface="telegram_bot", chat_id=chat, thread_id="9")["context"]["chat_history"]
    assert [h["payload"]["text"] for h in thread] == ["other thread"]


def test_a_tight_budget_drops_the_diary_first_then_older_chat_history(memory_stack: Stack) -> None:
    chat = "budget-" + uuid.uuid4().hex[:8]
    ctx = {"chat_id": chat, "interface": "telegram_bot"}
    for i in range(6):
        memory_stack.run("create_personal_diary_entry", {"interaction_summary": f"entry {i} " + "d" * 300})
        memory_stack.run("echo", {"text": f"msg {i} " + "h" * 300}, ctx)
    params = {"interface": "telegram_bot", "chat_id": chat, "text": "hi"}
    full = prompt(memory_stack, **params)
    assert len(full["context"]["chat_history"]) == 6 and len(full["context"]["latest_diary_entries"]) >= 6
    size = full["meta"]["chars"]

    some = prompt(memory_stack, **params, max_chars=size - 500)
    assert some["meta"]["fits"] is True and some["meta"]["chars"] <= size - 500
    assert 0 < len(some["context"]["latest_diary_entries"]) < len(full["context"]["latest_diary_entries"])
    kept = some["context"]["latest_diary_entries"]
    assert kept == full["context"]["latest_diary_entries"][:len(kept)], "the newest entries are the ones kept"
    assert len(some["context"]["chat_history"]) == 6, "chat history is kept while the diary can go"
    assert some["meta"]["dropped"][0].startswith("latest_diary_entries (oldest first): dropped ")

    diary_chars = len(json.dumps(full["context"]["latest_diary_entries"], ensure_ascii=False))
    tight = prompt(memory_stack, **params, max_chars=size - diary_chars - 700)
    assert tight["meta"]["fits"] is True
    assert tight["context"]["latest_diary_entries"] == []
    history = tight["context"]["chat_history"]
    assert 0 < len(history) < 6 and history[-1]["payload"]["text"].startswith("msg 5"), "newest history kept"
    assert tight["context"]["time"] and tight["actions"] == full["actions"]


def test_fit_budget_reports_when_even_the_essentials_do_not_fit() -> None:
    body = {"context": {"time": "t", "latest_diary_entries": [{"x": "y" * 50}], "chat_history": [{"a": 1}],
                        "participants": [], "weather": "sunny", "extra": "z" * 100},
            "input": {}, "instructions": "i" * 500, "actions": {},
            "meta": {"max_chars": 300, "chars": 0, "fits": True, "dropped": [], "skipped_injections": {}}}
    out = fit_budget(body)
    assert out["meta"]["fits"] is False and out["meta"]["chars"] > 300
    assert out["context"]["latest_diary_entries"] == [] and out["context"]["chat_history"] == []
    assert "extra" not in out["context"] and "weather" not in out["context"] and out["context"]["time"] == "t"


def test_rekku_prompt_cli_prints_the_same_prompt(memory_stack: Stack) -> None:
    wait_until(lambda: prompt(memory_stack, chat_id="cli")["context"]["weather"], timeout=30, what="weather")
    done = subprocess.run([sys.executable, "-m", "rekku", "prompt", "--chat-id", "cli", "--interface", "webui",
                           "--text", "hello"], env=memory_stack.env(), cwd=str(ROOT), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["input"]["payload"]["text"] == "hello" and body["input"]["interface"] == "webui"
    assert body["context"]["weather"].startswith("Rome: ")
    assert "failing_injector" in body["meta"]["skipped_injections"]
    assert "left out: failing_injector" in done.stderr
    assert body["actions"] == memory_stack.get("/v1/capabilities").json()["actions"]
