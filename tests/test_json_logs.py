"""REKKU_LOG_FORMAT=json: every line a Rekku process writes is one JSON object, uvicorn's and Celery's own
lines included, ``extra=`` fields are keys, and no secret is in any of it (rekku/logs.py)."""

from __future__ import annotations

import io
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import Stack, claim_redis_db, release_redis_db, stop_process, wait_until


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose every process logs JSON, with the ingress's access log on; nothing started yet."""
    home = tmp_path_factory.mktemp("json-logs")
    stack = Stack("json-logs", home, f"sqlite:///{home / 'rekku.db'}", claim_redis_db(),
                  extra_env={"REKKU_LOG_FORMAT": "json", "REKKU_ACCESS_LOG": "true"})
    try:
        yield stack
    finally:
        stack.stop()
        release_redis_db(stack.redis_db)


def json_lines(path: Path) -> list[dict]:
    """Every line of a process's output (stdout and stderr), each parsed: one that is not JSON fails."""
    entries = []
    for number, line in enumerate(path.read_text(errors="replace").split("\n"), 1):  # JSON Lines: "\n" only
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{path.name} line {number} is not JSON: {line[:300]!r}")
    return entries


def test_every_line_of_a_json_ingress_is_json_uvicorns_included_and_holds_no_token(json_stack: Stack) -> None:
    stack = json_stack
    proc = stack.spawn("ingress", "--port", str(stack.port), "--workers", "2", log_name="ingress")
    try:
        wait_until(stack._ready, timeout=60, what="the JSON ingress")
        assert stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}]}).status_code == 202
        assert stack.get("/metrics").status_code == 200
        # the token in a path: the access line is redacted too
        assert requests.get(f"{stack.base_url}/v1/actions/{stack.token}", headers=stack.headers,
                            timeout=10).status_code == 404
        assert requests.get(stack.base_url + "/metrics", timeout=10).status_code == 401
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:  # uvicorn.error: bad HTTP
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            sock.recv(1024)
    finally:
        stop_process(proc)
    log = stack.home / "logs" / "ingress.log"
    entries = json_lines(log)
    assert stack.token not in log.read_text()
    access = [e for e in entries if e["logger"] == "uvicorn.access"]
    assert {(e["method"], e["status"]) for e in access if e["path"] == "/v1/actions"} == {("POST", 202)}, access
    assert any(e["path"] == "/metrics" and e["status"] == 401 for e in access), access
    assert any(e["path"] == "/v1/actions/***" for e in access), access
    errors = [e for e in entries if e["logger"] == "uvicorn.error"]
    assert any("Invalid HTTP request" in e["message"] for e in errors), errors
    assert len({e["process"] for e in errors if "Started server process" in e["message"]}) == 2
    assert all({"ts", "level", "logger", "message", "action_id", "batch_id", "process"} <= set(e) for e in entries)


def test_every_line_of_a_json_celery_worker_is_json(json_stack: Stack) -> None:
    stack = json_stack
    if not stack._ready():
        stack.start_ingress()
    node = f"json-{uuid.uuid4().hex[:4]}"
    worker = stack.start_worker("default", concurrency=1, node=node)
    try:
        run = stack.run("echo", {"text": "hello"})
        assert run["status"] == "succeeded"
    finally:
        stop_process(worker)
    entries = json_lines(stack.home / "logs" / f"worker-default-{node}.log")
    messages = [e["message"] for e in entries]
    assert any(m == f"default@{node} ready." for m in messages), messages  # Celery's own lines
    assert any(e["action_id"] == run["id"] and e["batch_id"] for e in entries), messages  # Rekku's context
    done = [e for e in entries if e["logger"] == "celery.app.trace" and run["id"] in e["message"]]
    assert done and "succeeded in" in done[0]["message"] and done[0]["data"]["id"] == run["id"]  # extra= as keys
    assert any("shutdown" in m for m in messages), messages  # what Celery's worker prints itself


def test_extra_fields_are_keys_of_their_own_and_secrets_in_them_are_hidden(tmp_path: Path) -> None:
    from rekku.logs import HIDDEN, install
    from rekku.settings import Settings

    secret = f"secret-{uuid.uuid4().hex}"
    settings = Settings(home=tmp_path, api_token=secret, log_format="json")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    install([handler], settings)
    logger = logging.getLogger(f"rekku.test.json.{uuid.uuid4().hex[:6]}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info("pool %s is idle", "io", extra={"pool": "io", "waiting": 3, "url": f"http://x/?t={secret}"})
    try:
        raise RuntimeError(f"failed with {secret}")
    except RuntimeError:
        logger.exception("it broke")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "pool io is idle" and first["pool"] == "io" and first["waiting"] == 3
    assert first["url"] == f"http://x/?t={HIDDEN}"
    assert "action_tag" not in first and not any(k.startswith("_") for k in first)
    assert first["level"] == "INFO" and first["logger"] == logger.name and first["ts"].endswith("+00:00")
    assert "RuntimeError" in second["exception"] and secret not in out.getvalue()
