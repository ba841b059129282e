"""The `rekku` CLI against a running stack: submit with --wait, status, actions, doctor, migrate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT, Stack

#: The CLI talks HTTP; which database backs the ingress does not matter here.
pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def rekku(stack: Stack, *args: str, stdin: str | None = None, timeout: float = 90,
          **more_env: str) -> subprocess.CompletedProcess:
    env = stack.env(REKKU_PORT=str(stack.port), REKKU_HOST="127.0.0.1", COLUMNS="200", **more_env)
    return subprocess.run([sys.executable, "-m", "rekku", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=timeout)


def test_submit_wait_shows_progress_and_exits_0_when_all_succeed(stack: Stack) -> None:
    text = ('Here:\n```json\n[{"type": "echo", "payload": {"text": "cli-1"}},'
            ' {"type": "tk_sleep", "payload": {"seconds": 1}}]\n```')
    done = rekku(stack, "submit", "-", "--wait", "--context", '{"chat_id": "cli"}', stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 accepted" in done.stdout and "succeeded" in done.stdout and "tk_sleep" in done.stdout


def test_submit_reports_rejections_and_failures_in_its_exit_code(stack: Stack, tmp_path) -> None:
    path = tmp_path / "reply.json"
    path.write_text(json.dumps({"actions": [{"type": "tk_fail", "payload": {}}, {"type": "nope", "payload": {}}]}))
    done = rekku(stack, "submit", str(path), "--wait")
    assert done.returncode == 1
    assert "Unsupported type 'nope'" in done.stdout and "failed" in done.stdout
    nothing = rekku(stack, "submit", "-", stdin='{"type": "nope", "payload": {}}')
    assert nothing.returncode == 2


def test_status_prints_the_action_as_json(stack: Stack) -> None:
    run = stack.run("echo", {"text": "status"})
    done = rekku(stack, "status", run["id"])
    assert done.returncode == 0 and json.loads(done.stdout)["result"] == {"text": "status"}
    missing = rekku(stack, "status", "nope")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_actions_table_lists_types_queues_and_plugin_errors(stack: Stack) -> None:
    # the seed's example is opt-in (issue 14): loaded when its folder is in REKKU_PLUGIN_PATH
    path = os.pathsep.join([stack.env()["REKKU_PLUGIN_PATH"], "plugins/examples"])
    done = rekku(stack, "actions", REKKU_PLUGIN_PATH=path)
    assert done.returncode == 0
    for fragment in ("echo", "my_action", "tk_io", "io", "broken_plugin.py"):
        assert fragment in done.stdout


def test_doctor_reports_broker_database_workers_and_plugins(stack: Stack) -> None:
    done = rekku(stack, "doctor")
    out = done.stdout
    assert done.returncode == 0, out
    assert "broker" in out and "database" in out and f"default@{stack.name}-main" in out
    assert "start one: rekku worker --pool io" in out  # no io worker in this stack
    assert "broken_plugin.py" in out


def test_doctor_fails_with_advice_when_the_broker_is_down(stack: Stack) -> None:
    env_broker = "redis://127.0.0.1:1/0"
    done = subprocess.run([sys.executable, "-m", "rekku", "doctor"], capture_output=True, text=True, timeout=60,
                          env=stack.env(REKKU_BROKER_URL=env_broker, COLUMNS="200"), cwd=str(ROOT))
    assert done.returncode == 1 and "FAIL" in done.stdout and "REKKU_BROKER_URL" in done.stdout


def test_cli_without_an_ingress_says_how_to_start_one(stack: Stack) -> None:
    env = stack.env(REKKU_PORT="1", COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", "rekku", "status", "x"], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=60)
    assert done.returncode == 1 and "cannot reach the ingress" in done.stderr


def test_status_stuck_lists_actions_that_do_not_move(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_io", "payload": {}}])  # no io worker: it stays queued
    env = stack.env(REKKU_RECONCILE_GRACE="0", COLUMNS="250")
    done = subprocess.run([sys.executable, "-m", "rekku", "status", "--stuck"], capture_output=True, text=True,
                          env=env, cwd=str(ROOT), timeout=60)
    assert done.returncode == 1 and answer["accepted"][0]["id"] in done.stdout and "stuck actions" in done.stdout


def test_retry_command_requeues_a_failed_action(stack: Stack) -> None:
    run = stack.run("tk_fail")
    done = rekku(stack, "retry", run["id"])
    assert done.returncode == 0 and "queued again" in done.stdout
    assert rekku(stack, "retry", run["id"] + "x").returncode == 1
