"""Untrusted input at the ingress (SECURITY.md): poison strings, deep nesting, invented action
types, reused idempotency keys, oversized requests and context ids. Each test is an attack that
once got a 500, a 503, unbounded memory or the wrong answer."""

from __future__ import annotations

import uuid

import requests
import sqlalchemy as sa

from tests.support import Stack


def _post_raw(stack: Stack, body: str, **headers: str) -> requests.Response:
    """POST a JSON text as is (``\\ud800`` escapes and all), the way a client's encoder writes it."""
    return requests.post(stack.base_url + "/v1/actions", data=body.encode(), timeout=30,
                         headers={**stack.headers, "Content-Type": "application/json", **headers})


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_a_lone_surrogate_is_refused_at_validation_and_the_rest_runs(stack: Stack) -> None:
    chat = f"surrogate-{uuid.uuid4().hex[:6]}"
    body = ('{"actions": [{"type": "echo", "payload": {"text": "bad \\ud800 text"}},'
            ' {"type": "echo", "payload": {"\\udfff": "key"}},'
            ' {"type": "echo", "payload": {"text": "fine"}}], "context": {"chat_id": "%s"}}' % chat)
    resp = _post_raw(stack, body)
    assert resp.status_code == 202, resp.text
    answer = resp.json()
    assert [a["index"] for a in answer["accepted"]] == [2]
    errors = {r["index"]: " ".join(r["errors"]) for r in answer["rejected"]}
    assert "not valid UTF-8" in errors[0] and "'text'" in errors[0]
    assert "not valid UTF-8" in errors[1]
    assert answer["correction"]["system_message"]["type"] == "error"
    assert stack.wait_action(answer["accepted"][0]["id"])["status"] == "succeeded"
    # every read route that shows this chat still answers
    assert stack.get("/v1/prompt", params={"chat_id": chat}).status_code == 200
    assert stack.get("/v1/dead-letters").status_code == 200


def test_a_lone_surrogate_in_reply_text_or_context_gets_a_4xx_never_a_500(stack: Stack) -> None:
    reply = '{"text": "prose \\ud800 {\\"type\\": \\"echo\\", \\"payload\\": {\\"text\\": \\"x\\ud83d\\"}}"}'
    resp = _post_raw(stack, reply)
    assert resp.status_code == 422, resp.text
    assert "not valid UTF-8" in resp.json()["detail"]
    resp = _post_raw(stack, '{"actions": [{"type": "echo", "payload": {}}], "context": {"username": "a\\ud800"}}')
    assert resp.status_code == 422, resp.text
    assert "not valid UTF-8" in resp.json()["detail"]
    resp = _post_raw(stack, '{"actions": [{"type": "echo", "payload": {}}], "context": {"chat_id": 1}, '
                            '"idempotency_key": "k\\ud800"}')
    assert resp.status_code == 422, resp.text
    resp = _post_raw(stack, '{"actions": {"type": "\\ud800", "payload": {}}}')
    assert resp.status_code == 422 and "Unsupported type" in resp.text


def test_a_stored_lone_surrogate_never_breaks_a_read_route(stack: Stack) -> None:
    """Rows written before the ingress refused such text must still be readable."""
    if not stack.database_url.startswith("sqlite"):
        return  # MariaDB never stored one: its JSON column refuses the escape
    from rekku.action_log import ActionLog, NewRun

    engine = sa.create_engine(stack.database_url)
    chat, action_id = f"stored-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    try:
        ActionLog(engine).record_batch(str(uuid.uuid4()), None, [NewRun(
            action_id, 0, "echo", "default", {"text": "old \ud800 row"}, {"chat_id": chat})], {})
        ActionLog(engine).fail_unsent([action_id], "failed before it ran")
    finally:
        engine.dispose()
    for path, params in ((f"/v1/actions/{action_id}", {}), ("/v1/prompt", {"chat_id": chat}),
                         ("/v1/dead-letters", {})):
        resp = stack.get(path, params=params)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    assert stack.get(f"/v1/actions/{action_id}").json()["payload"] == {"text": "old \ud800 row"}


def test_deep_nesting_is_refused_with_422_and_the_limit(stack: Stack) -> None:
    # 31 objects around a number: 32 levels, the most MariaDB's JSON column stores
    ok = stack.submit([{"type": "echo", "payload": _nested(31)}, {"type": "echo", "payload": [_nested(27)]}])
    assert [a["index"] for a in ok["accepted"]] == [0], ok
    assert stack.wait_action(ok["accepted"][0]["id"])["status"] == "succeeded"
    assert isinstance(ok["correction"]["system_message"]["your_reply"], str)  # too deep to echo as JSON
    too_deep = stack.submit([{"type": "echo", "payload": _nested(32)}])
    assert not too_deep["accepted"]
    assert "nested too deeply" in too_deep["rejected"][0]["errors"][0]
    assert "32 levels" in too_deep["rejected"][0]["errors"][0]
    for depth in (800, 950):  # once: RecursionError in kombu, answered 503 "broker is unreachable"
        payload = '{"a": ' * (depth - 1) + '{"leaf": 1}' + "}" * (depth - 1)
        resp = _post_raw(stack, '{"actions": [{"type": "echo", "payload": %s}]}' % payload)
        assert resp.status_code == 422, (depth, resp.status_code, resp.text[:200])
        assert "32 levels" in resp.text
    deep_text = "[" * 980 + "]" * 980
    reply = '{"type": "echo", "payload": ' + "[" * 970 + "]" * 970 + "}"
    for text in (deep_text, reply):  # once: RecursionError while checking field lengths, a 500
        resp = stack.post("/v1/actions", {"text": text})
        assert resp.status_code in (400, 422), (resp.status_code, resp.text[:200])


def test_invented_action_types_share_one_metrics_label(stack: Stack) -> None:
    invented = [f"made_up_{uuid.uuid4().hex[:8]}" for _ in range(40)]
    answer = stack.submit([{"type": t, "payload": {}} for t in invented])
    assert len(answer["rejected"]) == 40
    text = stack.get("/metrics").text
    assert not any(t in text for t in invented)
    assert 'rekku_actions_rejected_total{type="(unknown)"}' in text


def test_an_idempotency_key_reused_with_another_request_is_a_409(stack: Stack) -> None:
    key = f"client-{uuid.uuid4().hex}"
    first = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "one"}}],
                                       "idempotency_key": key})
    assert first.status_code == 202
    again = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "one"}}]},
                       headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json() == first.json()
    for body in ({"actions": [{"type": "echo", "payload": {"text": "two"}}], "idempotency_key": key},
                 {"actions": [{"type": "echo", "payload": {"text": "one"}}], "idempotency_key": key,
                  "context": {"chat_id": "other"}}):
        clash = stack.post("/v1/actions", body)
        assert clash.status_code == 409, clash.text
        assert "already used for a different request" in clash.json()["detail"]
        assert first.json()["batch_id"] in clash.json()["detail"]
    mismatch = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}], "idempotency_key": "a"},
                          headers={"Idempotency-Key": "b"})
    assert mismatch.status_code == 422


def test_rekkus_own_idempotency_prefixes_are_reserved(stack: Stack) -> None:
    for key in ("event:1:2026-01-01T00:00:00+00:00:actions", "output:some-action", "speech:x",
                "celery-task:abc", "EVENT:1:x", "Évent:1:x"):  # MariaDB compares keys without case or accents
        resp = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}], "idempotency_key": key})
        assert resp.status_code == 422, (key, resp.text)
        assert "reserved" in resp.json()["detail"]


def test_too_many_actions_in_one_request_is_413_with_the_limit(stack: Stack) -> None:
    actions = [{"type": "nope", "payload": {}}] * 1001
    resp = stack.post("/v1/actions", {"actions": actions})
    assert resp.status_code == 413, resp.status_code
    assert "at most 1000" in resp.json()["detail"] and "REKKU_MAX_ACTIONS_PER_REQUEST" in resp.json()["detail"]
    assert len(resp.content) < 2000  # not a rejection per action
    assert stack.post("/v1/actions", {"actions": actions[:1000]}).status_code == 422  # at the limit: validated


def test_context_ids_longer_than_their_columns_are_refused(stack: Stack) -> None:
    for field in ("chat_id", "user_id", "thread_id", "message_id", "username"):
        resp = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                          "context": {field: "9" * 192}})
        assert resp.status_code == 422, (field, resp.text[:200])
        assert "191" in resp.text
    assert stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                      "context": {"chat_id": "9" * 191}}).status_code == 202


def test_long_field_names_and_numbers_out_of_range_are_refused(stack: Stack) -> None:
    answer = stack.submit([{"type": "echo", "payload": {"k" * 300: [0] * 1000}}])
    assert not answer["accepted"] and "field name" in answer["rejected"][0]["errors"][0]
    assert "at most 256" in answer["rejected"][0]["errors"][0]
    for body in ('{"actions": [{"type": "echo", "payload": {"x": 1e400}}]}',  # once: inf stored, reads 500
                 '{"actions": [{"type": "no_such", "payload": {"x": -1e999}}]}'):  # once: a 500 echoing it
        resp = _post_raw(stack, body)
        assert resp.status_code == 400 and "out of range" in resp.text, resp.text


def test_a_celery_client_gets_the_same_bounds_as_http(stack: Stack) -> None:
    """rekku.ingest has no HTTP body limit in front of it: the ingress applies the same bounds itself."""
    import pytest
    from celery import Celery

    client = Celery("plain-client", broker=stack.broker_url, backend=stack.broker_url)
    try:
        def ingest(**kwargs: object) -> object:
            return client.send_task("rekku.ingest", kwargs=kwargs, queue="default").get(timeout=30)

        answer = ingest(body={"actions": [{"type": "echo", "payload": {"x": float("inf")}}]})
        assert not answer["accepted"] and "not a finite number" in answer["rejected"][0]["errors"][0]
        with pytest.raises(Exception, match="REKKU_MAX_BODY_BYTES"):
            ingest(body={"actions": [{"type": "echo", "payload": {"text": "x" * 90_000}}] * 12})
        with pytest.raises(Exception, match="reserved"):
            ingest(body={"actions": [{"type": "echo", "payload": {}}]}, idempotency_key="EVENT:1:x")
    finally:
        client.close()
