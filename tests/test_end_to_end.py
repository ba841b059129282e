"""HTTP → action log → Redis → Celery worker → result over HTTP, on SQLite and MariaDB."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TRAINER, running_stack
from tests.support import TEST_PLUGINS, Stack, twice, wait_until


def test_echo_result_is_readable_over_http(stack: Stack) -> None:
    run = stack.run("echo", {"text": "hello", "data": {"n": [1, 2]}}, {"chat_id": 5, "interface": "webhook"})
    assert run["status"] == "succeeded", run
    assert run["result"] == {"text": "hello", "data": {"n": [1, 2]}}
    assert run["attempts"] == 1
    assert run["worker"].startswith("default@")
    assert run["queue"] == "default"
    assert run["context"]["chat_id"] == "5"
    assert run["started_at"] and run["finished_at"] and run["created_at"] <= run["started_at"]
    assert run["progress"] is None


def test_progress_reported_by_a_handler_is_readable_while_it_runs(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_sleep", "payload": {"seconds": 5}}])
    action_id = answer["accepted"][0]["id"]
    running = wait_until(lambda: (r := stack.get(f"/v1/actions/{action_id}").json())["progress"] and r,
                         timeout=30, what="progress to show")
    assert running["status"] == "running" and running["progress"] == {"step": "sleeping", "seconds": 5}
    assert stack.wait_action(action_id)["status"] == "succeeded"


def test_raw_llm_text_with_fences_and_a_bare_array_runs_every_action(stack: Stack) -> None:
    text = ('Sure, here you go:\n```json\n[{"type": "echo", "payload": {"text": "one"}},'
            ' {"type": "echo", "payload": {"text": "two"}}]\n```\nAnything else?')
    resp = stack.post("/v1/actions", {"text": text})
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    assert [a["index"] for a in answer["accepted"]] == [0, 1]
    batch = stack.get(f"/v1/batches/{answer['batch_id']}", params={"wait": 30}).json()
    assert batch["done"] is True
    assert [a["result"]["text"] for a in batch["actions"]] == ["one", "two"]


def test_valid_actions_run_and_invalid_ones_get_a_correction(stack: Stack) -> None:
    answer = stack.submit([
        {"type": "echo", "payload": {}},
        {"type": "nope", "payload": {}},
        {"type": "tk_sleep", "payload": {"seconds": ""}},
        {"type": "tk_sleep"},
    ], {"chat_id": "corr-1", "interface": "telegram_bot"})
    assert [a["type"] for a in answer["accepted"]] == ["echo"]
    assert answer["rejected"] == [
        {"index": 1, "type": "nope", "errors": ["Unsupported type 'nope' - no plugin or interface found to handle it"]},
        {"index": 2, "type": "tk_sleep", "errors": ["Field 'seconds' cannot be empty for action 'tk_sleep'"]},
        {"index": 3, "type": "tk_sleep", "errors": ["Missing 'payload'"]},
    ]
    message = answer["correction"]["system_message"]
    assert message["type"] == "error"
    assert "echo" in message["full_json_instructions"]["actions"]
    assert message["your_reply"][1]["type"] == "nope"
    assert "only the invalid part" in message["error_retry_policy"]


def test_nothing_accepted_answers_422_with_the_same_shape(stack: Stack) -> None:
    resp = stack.post("/v1/actions", {"actions": [{"type": "nope", "payload": {}}]})
    assert resp.status_code == 422
    body = resp.json()
    assert body["batch_id"] is None and body["accepted"] == [] and body["rejected"][0]["index"] == 0
    assert body["correction"]["system_message"]["type"] == "error"


def test_system_message_is_never_executed(stack: Stack) -> None:
    resp = stack.post("/v1/actions", {"text": '{"system_message": {"type": "output", "message": "done"}}'})
    assert resp.status_code == 422
    assert "never executed" in resp.json()["rejected"][0]["errors"][0]


def test_corrections_are_bounded_per_chat(stack: Stack) -> None:
    ctx = {"chat_id": f"bound-{stack.name}", "interface": "telegram_bot"}
    bad = [{"type": "nope", "payload": {}}]
    first, second, third = (stack.submit(bad, ctx)["correction"]["system_message"] for _ in range(3))
    assert not first.get("blocked") and not second.get("blocked")
    assert third["blocked"] is True and "blocked from further corrections" in third["message"]
    stack.submit([{"type": "echo", "payload": {}}], ctx)  # a good reply resets the count
    assert not stack.submit(bad, ctx)["correction"]["system_message"].get("blocked")


def test_idempotency_key_returns_the_first_answer_and_no_new_work(stack: Stack) -> None:
    key = f"idem-{stack.name}-{time.time()}"
    first = stack.submit([{"type": "echo", "payload": {"text": "once"}}], idempotency_key=key)
    again = stack.submit([{"type": "echo", "payload": {"text": "once"}}], idempotency_key=key)
    assert again == first  # (the same key with another request is a 409: tests/test_trust_input.py)
    batch = stack.get(f"/v1/batches/{first['batch_id']}", params={"wait": 20}).json()
    assert len(batch["actions"]) == 1 and batch["actions"][0]["result"] == {"text": "once"}


def test_a_raising_handler_fails_its_action_not_the_worker(stack: Stack) -> None:
    run = stack.run("tk_fail", {"message": "boom"})
    assert run["status"] == "failed" and run["error"] == "ValueError: boom"
    assert stack.run("echo", {"text": "still alive"})["status"] == "succeeded"


def test_transient_errors_are_retried_until_success(stack: Stack) -> None:
    run = stack.run("tk_flaky", {"succeed_on": 3}, timeout=60)
    assert run["status"] == "succeeded", run
    assert run["result"] == {"attempt": 3} and run["attempts"] == 3
    assert [line.split()[0] for line in stack.journal(run["id"])] == ["attempt1", "attempt2", "attempt3"]


def test_a_hung_handler_hits_its_time_limit_and_the_worker_keeps_serving(stack: Stack) -> None:
    run = stack.run("tk_hang", timeout=40)
    assert run["status"] == "failed" and run["error"] == "time limit of 2 s exceeded"
    assert stack.run("echo")["status"] == "succeeded"


def test_sync_handlers_run_too(stack: Stack) -> None:
    run = stack.run("tk_sync")
    assert run["status"] == "succeeded" and run["result"]["sync"] is True and run["result"]["action_id"] == run["id"]


def test_async_handlers_share_one_event_loop_per_worker_process(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_whoami", "payload": {}} for _ in range(12)])
    batch = stack.get(f"/v1/batches/{answer['batch_id']}", params={"wait": 30}).json()
    loops_by_pid: dict[int, set[int]] = {}
    for action in batch["actions"]:
        assert action["status"] == "succeeded"
        loops_by_pid.setdefault(action["result"]["pid"], set()).add(action["result"]["loop"])
    assert all(len(loops) == 1 for loops in loops_by_pid.values()), loops_by_pid


def test_trainer_only_actions_need_a_trainer_in_the_context(stack: Stack) -> None:
    assert stack.run("tk_trainer", context=TRAINER)["status"] == "succeeded"
    for ctx in ({"interface": "telegram_bot", "user_id": "7"}, {"interface": "discord_bot", "user_id": "42"}, {}):
        answer = stack.submit([{"type": "tk_trainer", "payload": {}}], ctx)
        assert answer["rejected"][0]["errors"] == ["Action 'tk_trainer' is restricted to trainers"], ctx


def test_the_worker_checks_authorization_again(stack: Stack) -> None:
    """A message that reached the queue without the ingress (e.g. another Celery app) is refused too."""
    import uuid

    import sqlalchemy as sa
    from celery import Celery

    from rekku.models import ActionRun, utcnow

    action_id = str(uuid.uuid4())
    engine = sa.create_engine(stack.database_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(ActionRun.__table__).values(
            id=action_id, batch_id=action_id, position=0, type="tk_trainer", queue="default", status="queued",
            payload={}, context={"user_id": "7"}, attempts=0, cancel_requested=False,
            created_at=utcnow(), updated_at=utcnow()))
    engine.dispose()
    app = Celery(broker=stack.broker_url)
    app.send_task("rekku.action.tk_trainer", kwargs={"action_id": action_id, "payload": {},
                                                      "context": {"user_id": "7"}}, task_id=action_id, queue="default")
    app.close()
    run = stack.wait_action(action_id)
    assert run["status"] == "failed" and "restricted to trainers" in run["error"]


def _wait_running(stack: Stack, action_id: str) -> None:
    wait_until(lambda: stack.get(f"/v1/actions/{action_id}").json()["status"] == "running", timeout=10,
               interval=0.01, what="the log to say running")


def test_cancel_a_queued_action(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_io", "payload": {}}])  # no io worker runs in this stack
    action_id = answer["accepted"][0]["id"]
    assert answer["accepted"][0]["queue"] == "io"
    resp = stack.post(f"/v1/actions/{action_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert stack.get(f"/v1/actions/{action_id}").json()["status"] == "cancelled"
    assert stack.post(f"/v1/actions/{action_id}/cancel").status_code == 409


def test_cancel_a_running_action(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_sleep", "payload": {"seconds": 30}}])
    action_id = answer["accepted"][0]["id"]
    wait_until(lambda: stack.journal(action_id), timeout=20, what="the sleep to start")
    _wait_running(stack, action_id)
    resp = stack.post(f"/v1/actions/{action_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "running"
    run = stack.wait_action(action_id, timeout=20)
    assert run["status"] == "cancelled", run
    assert [line.split()[0] for line in stack.journal(action_id)] == ["start"]
    assert stack.run("echo")["status"] == "succeeded"


def test_worker_process_killed_mid_action_reruns_it_exactly_once(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_sleep", "payload": {"seconds": 1.5}}])
    action_id = answer["accepted"][0]["id"]
    first = wait_until(lambda: stack.journal(action_id), timeout=20, what="the action to start")
    _wait_running(stack, action_id)  # attempts are counted by the claim, written just after the start
    os.kill(int(first[0].split()[1]), signal.SIGKILL)
    run = stack.wait_action(action_id, timeout=60)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == 2
    events = [line.split()[0] for line in stack.journal(action_id)]
    assert events == ["start", "start", "done"]


def test_redelivered_finished_action_is_not_run_again(stack: Stack) -> None:
    from celery import Celery

    run = stack.run("tk_sleep", {"seconds": 0})
    assert run["status"] == "succeeded"
    app = Celery(broker=stack.broker_url)
    app.send_task("rekku.action.tk_sleep", kwargs={"action_id": run["id"], "payload": {"seconds": 0}, "context": {}},
                  task_id=run["id"], queue="default")
    app.close()
    wait_until(twice(lambda: stack.consumed(run["id"])), what="the redelivery to be consumed")
    again = stack.get(f"/v1/actions/{run['id']}").json()
    assert again["attempts"] == 1 and again["finished_at"] == run["finished_at"]
    assert len(stack.journal(run["id"])) == 2  # one start, one done


def test_rekku_ingest_task_answers_like_the_http_route(stack: Stack) -> None:
    import uuid

    from celery import Celery

    app = Celery(broker=stack.broker_url, backend=stack.broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    kwargs = {"body": '```json\n{"actions": [{"type": "echo", "payload": {"text": "via celery"}}, {"type": "x"}]}\n```',
              "context": {"chat_id": 9}}
    task_id = str(uuid.uuid4())
    answer = app.send_task("rekku.ingest", kwargs=kwargs, queue="default", task_id=task_id).get(timeout=20)
    # The same message delivered again (its worker died after accepting) must not enqueue twice.
    again = app.send_task("rekku.ingest", kwargs=kwargs, queue="default", task_id=task_id).get(timeout=20)
    app.close()
    assert again == answer
    assert answer["rejected"][0]["index"] == 1
    run = stack.wait_action(answer["accepted"][0]["id"])
    assert run["status"] == "succeeded" and run["result"] == {"text": "via celery"} and run["context"]["chat_id"] == "9"
    assert len(stack.get(f"/v1/batches/{answer['batch_id']}").json()["actions"]) == 1


@pytest.fixture(scope="module")
def seed_stack(tmp_home: Path) -> Iterator[Stack]:
    """An ingress and a default worker that load the seed's example, which is opt-in (issue 14)."""
    home = tmp_home / "seed-example"
    home.mkdir()
    path = os.pathsep.join([str(TEST_PLUGINS), "plugins/examples"])
    with running_stack("seed", home, "sqlite", {"REKKU_PLUGIN_PATH": path}, [("default", 1, "seed-main")]) as running:
        yield running


@pytest.mark.parametrize("value", ["x", 1, None])
def test_seed_example_plugin_loads_validates_and_runs_unchanged(seed_stack: Stack, value) -> None:
    stack = seed_stack
    caps = stack.get("/v1/capabilities").json()
    assert caps["actions"]["my_action"]["required_fields"] == ["value"]
    assert caps["actions"]["my_action"]["instructions"]["description"] == "Execute my custom action with a value."
    if value is None:
        answer = stack.submit([{"type": "my_action", "payload": {}}])
        assert answer["rejected"][0]["errors"] == ["Missing required field 'value' for action 'my_action'"]
        return
    run = stack.run("my_action", {"value": value})
    # The seed's handler calls process_value, a placeholder the docs never define: its run reaches
    # the handler in a worker, and the plugin's own error fails the action, not the worker.
    assert run["status"] == "failed" and run["error"] == "NameError: name 'process_value' is not defined"


def test_failed_actions_are_dead_letters_and_can_be_retried(stack: Stack) -> None:
    run = stack.run("tk_fail", {"message": "dead letter"})
    letters = stack.get("/v1/dead-letters", params={"limit": 1000}).json()["actions"]
    assert run["id"] in [a["id"] for a in letters]
    resp = stack.post(f"/v1/actions/{run['id']}/retry")
    assert resp.status_code == 200 and resp.json()["status"] == "queued"
    again = wait_until(lambda: (r := stack.get(f"/v1/actions/{run['id']}").json())["attempts"] == 2
                       and r["status"] == "failed" and r, timeout=30, what="the retried run to fail again")
    assert again["error"] == "ValueError: dead letter"
    ok = stack.run("echo")
    assert stack.post(f"/v1/actions/{ok['id']}/retry").status_code == 409
    assert stack.post("/v1/actions/nope/retry").status_code == 404
