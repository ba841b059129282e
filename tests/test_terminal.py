"""The terminal plugin through real processes: HTTP ingress, two terminal worker nodes, Redis, SQLite.

The nodes ``term-a`` and ``term-b`` are separate `rekku worker --pool terminal` processes; a
persistent session lives in one of them and its commands must always reach it. The node-loss test
kills one node, so it runs last.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from rekku.action_log import ActionLog, NewRun
from tests.conftest import TRAINER
from tests.support import REDIS_HOST, REDIS_PORT, Stack, free_port, gone, stop_process, wait_until

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

NODES = ("term-a", "term-b")
#: Node heartbeat TTL for these workers, in seconds: a killed node is noticed that fast.
NODE_TTL = 3


@pytest.fixture(scope="module")
def nodes(stack: Stack) -> Iterator[dict]:
    procs = {name: stack.start_worker("terminal", concurrency=4, node=name, TERMINAL_NODE_TTL=str(NODE_TTL))
             for name in NODES}
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    wait_until(lambda: all(client.exists(f"rekku:terminal:node:{n}") for n in NODES), timeout=10,
               what="terminal nodes announced")
    yield procs
    for proc in procs.values():
        stop_process(proc)


def terminal(stack: Stack, payload: dict, context: dict | None = None, timeout: float = 30) -> dict:
    run = stack.run("terminal", payload, TRAINER if context is None else context, timeout=timeout)
    assert run["status"] == "succeeded", run
    return run


def in_session(stack: Stack, session: str, command: str, **more: object) -> dict:
    return terminal(stack, {"command": command, "persistent_session": True, "session": session, **more})


def celery_app(stack: Stack) -> Celery:
    return Celery(broker=stack.broker_url, backend=stack.broker_url)


def send_past_the_ingress(stack: Stack, payload: dict, context: dict, queue: str) -> dict:
    """Log and enqueue an action the way the ingress would, but skipping its checks and routing."""
    action_id, batch_id = str(uuid.uuid4()), str(uuid.uuid4())
    ActionLog(sa.create_engine(stack.database_url)).record_batch(
        batch_id, None, [NewRun(action_id, 0, "terminal", queue, payload, context)], {})
    app = celery_app(stack)
    try:
        app.send_task("rekku.action.terminal", kwargs={"action_id": action_id, "payload": payload,
                                                       "context": {**context, "batch_id": batch_id}},
                      task_id=action_id, queue=queue)
    finally:
        app.close()
    return stack.wait_action(action_id)


# ----------------------------------------------------------------------------- one-off commands
def test_one_off_command_returns_streams_exit_code_and_node(stack: Stack, nodes: dict) -> None:
    run = terminal(stack, {"command": "echo out; echo err >&2; exit 3"})
    result = run["result"]
    assert run["queue"] == "terminal" and run["worker"] in {f"terminal@{n}" for n in NODES}
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("out\n", "err\n", 3)
    assert result["node"] == run["worker"].split("@")[1] and result["session"] is None
    assert result["truncated"] is False and result["timed_out"] is False
    # the command's own time, in seconds: within the life of the action that ran it (created at the
    # ingress before it was enqueued, finished after the command ended)
    span = datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["created_at"])
    assert 0 < result["duration"] <= span.total_seconds() + 0.001, (result["duration"], span)


def test_one_off_timeout_kills_a_command_that_ignores_sigterm(stack: Stack, nodes: dict, tmp_path: Path) -> None:
    survivor, pid = tmp_path / "survived", tmp_path / "pid"
    run = terminal(stack, {"command": f"trap '' TERM; sleep 60 & echo $! > {pid}; wait $!; touch {survivor}",
                           "timeout": 1})
    result = run["result"]
    assert result["timed_out"] is True and result["exit_code"] is None and result["signal"] == "SIGKILL"
    assert "ignored SIGTERM" in result["notice"] and result["duration"] >= 1, "it had its whole timeout"
    # the sleep it waited for was killed with it (SIGKILLed, it may take a moment to end), so nothing survives
    wait_until(lambda: gone(int(pid.read_text())), timeout=10, what="the sleep to be killed")
    assert not survivor.exists()


def test_binary_and_invalid_utf8_output_is_replaced_never_dropped(stack: Stack, nodes: dict) -> None:
    result = terminal(stack, {"command": r"printf 'ok\377\376\000end'; printf 'caf\303\251 \200\n' >&2"})["result"]
    assert result["stdout"] == "ok\ufffd\ufffd\x00end"
    assert result["stderr"] == "café \ufffd\n"


def test_ten_megabytes_of_output_are_capped_and_say_so(stack: Stack, nodes: dict) -> None:
    result = terminal(stack, {"command": "head -c 10485760 /dev/urandom; echo done >&2"})["result"]
    assert result["truncated"] is True and result["exit_code"] == 0 and result["stderr"] == "done\n"
    assert "output is capped at 65536 bytes" in result["stdout"] and "10485760 bytes in all" in result["stdout"]
    assert len(result["stdout"].encode()) < 3 * 65536 and result["timed_out"] is False


# ----------------------------------------------------------------------------- authorization
def test_non_trainer_and_userless_actions_are_refused_before_any_process_starts(stack: Stack, nodes: dict,
                                                                                  tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = {"command": f"touch {marker}"}
    for context in ({"interface": "telegram_bot", "user_id": "99"}, {"interface": "telegram_bot"}, {}):
        answer = stack.submit([{"type": "terminal", "payload": payload}], context)
        assert answer["accepted"] == []
        assert answer["rejected"][0]["errors"] == ["Action 'terminal' is restricted to trainers"]
    # The worker checks again: an action that reaches it without passing the ingress is refused too.
    for context in ({"interface": "telegram_bot", "user_id": "99"}, {}):
        run = send_past_the_ingress(stack, payload, context, "terminal")
        assert run["status"] == "failed" and "restricted to trainers" in run["error"], run
    assert not marker.exists()


def test_without_a_trainer_the_terminal_actions_are_disabled_and_capabilities_say_so(stack: Stack,
                                                                                      nodes: dict) -> None:
    port = free_port()
    proc = stack.spawn("ingress", "--port", str(port), log_name="ingress-no-trainer", TRAINER_IDS="")
    try:
        url = f"http://127.0.0.1:{port}"
        import requests

        def ready() -> bool:
            try:
                return requests.get(url + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=30, what="second ingress")
        caps = requests.get(url + "/v1/capabilities", headers=stack.headers, timeout=10).json()
        assert "terminal" not in caps["actions"]
        for action in ("terminal", "terminal_close_session", "terminal_list_sessions"):
            assert "no trainer is configured" in caps["disabled"][action]
        answer = requests.post(url + "/v1/actions", headers=stack.headers, timeout=10,
                               json={"actions": [{"type": "terminal", "payload": {"command": "id"}}],
                                     "context": TRAINER}).json()
        assert "unavailable: no trainer is configured" in answer["rejected"][0]["errors"][0]
    finally:
        stop_process(proc)


def test_invalid_payloads_get_clear_errors(stack: Stack, nodes: dict) -> None:
    answer = stack.submit([
        {"type": "terminal", "payload": {"command": ""}},
        {"type": "terminal", "payload": {"command": "ls", "timeout": -1, "persistent_session": "yes"}},
        {"type": "terminal", "payload": {"command": "ls", "persistent_session": True, "session": "a b"}},
        {"type": "terminal", "payload": {"command": "x" * 20000}},
    ], TRAINER)
    errors = {r["index"]: r["errors"] for r in answer["rejected"]}
    assert errors[0] == ["Field 'command' cannot be empty for action 'terminal'"]
    assert errors[1] == ["Field 'persistent_session' must be true or false for action 'terminal'",
                         "Field 'timeout' must be a positive number of seconds for action 'terminal'"]
    assert "Field 'session' must be a name" in errors[2][0]
    assert "too long" in errors[3][0]


# ----------------------------------------------------------------------------- persistent sessions
def test_session_keeps_its_state_on_its_node_whichever_ingress_process_routes_it(stack: Stack,
                                                                                  nodes: dict) -> None:
    first = in_session(stack, "keeper", "cd /tmp; export KEPT=yes; sleep 300 &")
    owner = first["result"]["node"]
    assert first["result"]["new_session"] is True and first["queue"] == f"terminal.{owner}"
    app = celery_app(stack)
    try:
        for i in range(6):
            payload = {"command": "echo $PWD $KEPT $(jobs -p | wc -l)", "persistent_session": True,
                       "session": "keeper"}
            if i % 2:  # the HTTP ingress
                run = terminal(stack, payload)
            else:  # the rekku.ingest task, in the default worker's processes
                answer = app.send_task("rekku.ingest", kwargs={"body": {"actions": [
                    {"type": "terminal", "payload": payload}]}, "context": TRAINER}, queue="default").get(timeout=30)
                run = stack.wait_action(answer["accepted"][0]["id"])
            assert run["queue"] == f"terminal.{owner}" and run["result"]["node"] == owner, run
            assert run["result"]["stdout"] == "/tmp yes 1\n" and run["result"]["new_session"] is False
    finally:
        app.close()


def test_default_session_is_one_per_chat(stack: Stack, nodes: dict) -> None:
    chat_a, chat_b = {**TRAINER, "chat_id": "chat-a"}, {**TRAINER, "chat_id": "chat-b"}
    terminal(stack, {"command": "X=from-a", "persistent_session": True}, chat_a)
    terminal(stack, {"command": "X=from-b", "persistent_session": True}, chat_b)
    result = terminal(stack, {"command": "echo $X", "persistent_session": True}, chat_a)["result"]
    assert result["stdout"] == "from-a\n" and result["session"] == "telegram_bot:chat-a"


def test_two_sessions_used_at_once_do_not_mix_output(stack: Stack, nodes: dict) -> None:
    names = [f"mix-{i}" for i in range(4)]
    command = 'for i in $(seq 1 300); do echo "$S-$i"; echo "$S-err-$i" >&2; done; sleep 0.5; echo "$S-end"'
    for name in names:
        in_session(stack, name, f"S={name}")
    answer = stack.submit([{"type": "terminal", "payload": {"command": command, "persistent_session": True,
                                                            "session": name}} for name in names], TRAINER)
    batch = stack.get(f"/v1/batches/{answer['batch_id']}", params={"wait": 30}).json()
    starts = []
    for name, run in zip(names, batch["actions"]):
        assert run["status"] == "succeeded", run
        result = run["result"]
        assert result["stdout"] == "".join(f"{name}-{i}\n" for i in range(1, 301)) + f"{name}-end\n"
        assert result["stderr"] == "".join(f"{name}-err-{i}\n" for i in range(1, 301))
        starts.append((run["started_at"], run["finished_at"]))
    assert max(s for s, _ in starts) < min(f for _, f in starts), "the sessions' commands did not overlap"


def test_timed_out_session_command_is_interrupted_and_the_session_stays_usable(stack: Stack,
                                                                               nodes: dict) -> None:
    in_session(stack, "patient", "cd /var")
    result = in_session(stack, "patient", "trap '' INT TERM; sleep 60", timeout=1)["result"]
    assert result["timed_out"] is True and result["interrupted"] is True and result["session_reset"] is False
    assert "keeps its state" in result["notice"]
    assert in_session(stack, "patient", "pwd")["result"]["stdout"] == "/var\n"
    reset = in_session(stack, "patient", "while :; do :; done", timeout=1)["result"]
    assert reset["timed_out"] is True and reset["session_reset"] is True and "fresh one" in reset["notice"]
    after = in_session(stack, "patient", "pwd; echo ok")["result"]
    assert after["stdout"].endswith("ok\n") and after["session_lost"] is False


def test_sessions_can_be_listed_and_closed(stack: Stack, nodes: dict) -> None:
    owner = in_session(stack, "closable", "cd /tmp")["result"]["node"]
    listed = stack.run("terminal_list_sessions", {}, TRAINER)["result"]
    mine = [s for s in listed["sessions"] if s["session"] == "closable"]
    assert mine and mine[0]["node"] == owner and mine[0]["node_alive"] is True and mine[0]["open"] is True
    assert set(NODES) <= set(listed["nodes"])
    closed = stack.run("terminal_close_session", {"session": "closable"}, TRAINER)
    assert closed["queue"] == f"terminal.{owner}" and closed["result"]["closed"] is True, closed
    listed = stack.run("terminal_list_sessions", {}, TRAINER)["result"]
    assert "closable" not in [s["session"] for s in listed["sessions"]]
    fresh = in_session(stack, "closable", "pwd")["result"]
    assert fresh["new_session"] is True and fresh["session_lost"] is False and fresh["stdout"] != "/tmp\n"


def test_a_command_sent_to_the_wrong_node_is_refused_not_run_without_its_state(stack: Stack, nodes: dict,
                                                                               tmp_path: Path) -> None:
    owner = in_session(stack, "pinned", "cd /tmp")["result"]["node"]
    other = next(n for n in NODES if n != owner)
    marker = tmp_path / "ran"
    run = send_past_the_ingress(stack, {"command": f"touch {marker}", "persistent_session": True,
                                        "session": "pinned"}, TRAINER, f"terminal.{other}")
    assert run["status"] == "failed" and f"lives on terminal node '{owner}'" in run["error"], run
    assert not marker.exists()
    assert in_session(stack, "pinned", "pwd")["result"]["stdout"] == "/tmp\n"


# ----------------------------------------------------------------------------- node loss (kills a node: last)
def test_killing_the_owning_node_gives_session_lost_and_a_fresh_session(stack: Stack, nodes: dict,
                                                                         tmp_path: Path) -> None:
    owner = in_session(stack, "doomed", "cd /tmp")["result"]["node"]
    survivor = next(n for n in NODES if n != owner)
    os.killpg(nodes[owner].pid, signal.SIGKILL)
    nodes[owner].wait(10)
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    wait_until(lambda: not client.exists(f"rekku:terminal:node:{owner}"), timeout=NODE_TTL + 5,
               what="the killed node's heartbeat to expire")
    marker = tmp_path / "ran"
    lost = in_session(stack, "doomed", f"touch {marker}")
    result = lost["result"]
    assert lost["queue"] == f"terminal.{survivor}" and result["node"] == survivor
    assert result["session_lost"] is True and result["ran"] is False and result["exit_code"] is None
    assert f"its node '{owner}' is gone" in result["notice"] and "NOT run" in result["notice"]
    assert not marker.exists()
    again = in_session(stack, "doomed", "pwd")["result"]
    assert again["session_lost"] is False and again["new_session"] is False and again["node"] == survivor
