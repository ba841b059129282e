"""Flower as `rekku flower` runs it, against a real stack: basic auth always, read-only by default
(its control API answers 404), control only with REKKU_FLOWER_CONTROL, and the task arguments it
shows carry no secret."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import requests

from tests.support import Stack, free_port, stop_process, wait_until

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

AUTH = ("watcher", "flower-test-pass")


def _start_flower(stack: Stack, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = stack.spawn("flower", "--port", str(port), log_name=f"flower-{port}",
                       FLOWER_BASIC_AUTH=":".join(AUTH), **env)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (stack.home / "logs" / f"flower-{port}.log").read_text()
        try:
            return requests.get(base + "/healthcheck", auth=AUTH, timeout=2).status_code == 200  # behind auth too
        except requests.ConnectionError:
            return False

    wait_until(up, timeout=60, what="flower")

    def events_flow() -> bool:  # Flower answers before its event receiver listens: probe until it sees a task
        probe = stack.submit([{"type": "echo", "payload": {"text": "probe"}}])["accepted"][0]["id"]
        stack.wait_action(probe)
        info = requests.get(f"{base}/api/task/info/{probe}", auth=AUTH, timeout=5)
        return info.status_code == 200 and info.json().get("received") is not None

    wait_until(events_flow, timeout=60, interval=0.5, what="flower to receive task events")
    return proc, base


@pytest.fixture
def flower(stack: Stack) -> Iterator[str]:
    proc, base = _start_flower(stack)
    try:
        yield base
    finally:
        stop_process(proc)


def test_flower_needs_credentials_and_refuses_every_control_route(stack: Stack, flower: str) -> None:
    assert requests.get(flower + "/", timeout=5).status_code == 401
    assert requests.get(flower + "/api/workers", timeout=5).status_code == 401
    assert requests.get(flower + "/", auth=AUTH, timeout=5).status_code == 200
    assert requests.get(flower + "/api/workers", auth=AUTH, timeout=10).status_code == 200
    task_id = stack.submit([{"type": "echo", "payload": {"text": "x"}}])["accepted"][0]["id"]
    for path in (f"/api/task/revoke/{task_id}", f"/api/task/abort/{task_id}", "/api/task/rate-limit/rekku.action.echo",
                 "/api/task/timeout/rekku.action.echo", "/api/task/async-apply/rekku.action.echo",
                 "/api/task/apply/rekku.action.echo", "/api/task/send-task/rekku.action.echo",
                 "/api/worker/shutdown/x", "/api/worker/pool/restart/x", "/api/worker/pool/grow/x",
                 "/api/worker/queue/add-consumer/x"):
        assert requests.post(flower + path, auth=AUTH, json={}, timeout=10).status_code == 404, path
    assert stack.wait_action(task_id)["status"] == "succeeded"


def test_flower_shows_task_arguments_with_secrets_hidden(stack: Stack, flower: str) -> None:
    payload = {"text": "visible", "password": "hunter2-flower", "login": {"api_key": "k-123-flower"}}
    task_id = stack.submit([{"type": "echo", "payload": payload}])["accepted"][0]["id"]
    assert stack.wait_action(task_id)["status"] == "succeeded"
    info = wait_until(lambda: (r := requests.get(f"{flower}/api/task/info/{task_id}", auth=AUTH, timeout=5))
                      .status_code == 200 and r.json().get("kwargs") and r.json(), timeout=20,
                      what="the task in Flower")
    assert "visible" in info["kwargs"] and "'***'" in info["kwargs"]
    listed = requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=10).text
    for secret in ("hunter2-flower", "k-123-flower"):
        assert secret not in info["kwargs"] and secret not in listed
    for path in (stack.home / "logs").glob("*.log"):  # nor in the worker's "succeeded: <result>" line
        text = path.read_text(errors="replace")
        assert "hunter2-flower" not in text and "k-123-flower" not in text, path.name


def test_flower_control_is_there_when_asked_for(stack: Stack) -> None:
    proc, base = _start_flower(stack, REKKU_FLOWER_CONTROL="true")
    try:
        answer = requests.post(f"{base}/api/task/revoke/00000000-0000-0000-0000-000000000000", auth=AUTH,
                               timeout=10)
        assert answer.status_code == 200, answer.text
    finally:
        stop_process(proc)
