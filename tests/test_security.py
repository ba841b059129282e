"""Security properties that are easy to lose: JSON only on the broker, no secret in logs or task args."""

from __future__ import annotations

import pickle
import uuid

import pytest
from kombu import Connection

from tests.support import Stack, twice, wait_until

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def test_a_pickled_message_is_refused_and_logged_never_executed(stack: Stack) -> None:
    action_id = str(uuid.uuid4())
    body = pickle.dumps(((), {"action_id": action_id, "payload": {"seconds": 0}, "context": {}}, {}))
    with Connection(stack.broker_url) as conn:
        conn.Producer().publish(
            body, routing_key="default", serializer=None, content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "rekku.action.tk_sleep", "id": action_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""})
    logs = list((stack.home / "logs").glob("worker-default-*.log"))
    wait_until(lambda: any("untrusted content" in p.read_text(errors="replace") or "ContentDisallowed" in
                           p.read_text(errors="replace") for p in logs), timeout=20, what="the refusal in the log")
    wait_until(twice(lambda: stack.consumed(action_id)), what="the refused message to be dropped, not requeued")
    assert stack.journal(action_id) == []  # the handler never ran
    assert stack.run("echo")["status"] == "succeeded"  # and the worker still serves


def test_tokens_never_appear_in_logs_or_error_answers(stack: Stack) -> None:
    stack.get("/v1/actions/x", headers={"Authorization": f"Bearer {stack.token}-wrong"})
    stack.post("/v1/actions", {"actions": [{"type": "nope", "payload": {}}]})
    stack.run("tk_fail", {"message": "boom"})
    for path in (stack.home / "logs").glob("*.log"):
        text = path.read_text(errors="replace")
        assert stack.token not in text, f"the API token leaked into {path.name}"


def test_json_logs_carry_the_action_and_batch_id_on_every_line_of_that_action(stack: Stack) -> None:
    import json

    from tests.support import stop_process

    worker = stack.start_worker("io", concurrency=2, node="jsonlogs", REKKU_LOG_FORMAT="json")
    try:
        answer = stack.submit([{"type": "tk_io", "payload": {}}])
        run = stack.wait_action(answer["accepted"][0]["id"])
        assert run["status"] == "succeeded"
    finally:
        stop_process(worker)
    # JSON Lines end at "\n" only: a logged text may hold U+2028 or U+0085, which str.splitlines also splits at
    lines = (stack.home / "logs" / "worker-io-jsonlogs.log").read_text().split("\n")
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    mine = [e for e in entries if e["action_id"] == run["id"]]
    assert mine and all(e["batch_id"] == answer["batch_id"] for e in mine)
    assert any("succeeded" in e["message"] for e in mine)
