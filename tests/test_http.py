"""HTTP contract details: auth, status codes for bad input, body limit, and no 5xx for any JSON body."""

from __future__ import annotations

import json

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Stack, wait_until

KEYS = ["actions", "text", "context", "type", "payload", "idempotency_key", "chat_id", "user_id", "x"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(KEYS), c, max_size=5),
    max_leaves=25)


def test_health_routes_need_no_token(stack: Stack) -> None:
    assert requests.get(stack.base_url + "/healthz", timeout=5).json() == {"status": "ok", "checks": {}}
    ready = requests.get(stack.base_url + "/readyz", timeout=5).json()
    assert ready == {"status": "ok", "checks": {"broker": "ok", "database": "ok"}}


def test_every_v1_route_needs_the_token(stack: Stack) -> None:
    routes = [("post", "/v1/actions"), ("get", "/v1/actions/x"), ("get", "/v1/batches/x"),
              ("post", "/v1/actions/x/cancel"), ("get", "/v1/capabilities")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            resp = requests.request(method, stack.base_url + path, headers=headers, json={}, timeout=5)
            assert resp.status_code == 401, (method, path, headers)
            assert resp.json()["detail"] == "missing or wrong bearer token"
            assert stack.token not in resp.text


def test_not_json_is_400_and_wrong_shape_is_422(stack: Stack) -> None:
    resp = requests.post(stack.base_url + "/v1/actions", data="{nope", timeout=5,
                         headers={**stack.headers, "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["detail"] == "the request body is not valid JSON"
    resp = stack.post("/v1/actions", {"actions": 5})
    assert resp.status_code == 422 and resp.json()["errors"]
    resp = stack.post("/v1/actions", {"context": {}})
    assert resp.status_code == 422 and "send 'actions'" in resp.json()["detail"]


def test_body_over_the_limit_is_413(stack: Stack) -> None:
    big = {"actions": [{"type": "echo", "payload": {"text": "x" * (1024 * 1024 + 10)}}]}
    resp = stack.post("/v1/actions", big)
    assert resp.status_code == 413 and "REKKU_MAX_BODY_BYTES" in resp.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"text": "'
        for _ in range(1100):
            yield b"y" * 1024
        yield b'"}'

    resp = requests.post(stack.base_url + "/v1/actions", data=chunks(), timeout=30,
                         headers={**stack.headers, "Content-Type": "application/json"})
    assert resp.status_code == 413


def test_unknown_ids_are_404(stack: Stack) -> None:
    assert stack.get("/v1/actions/does-not-exist").status_code == 404
    assert stack.get("/v1/batches/does-not-exist").status_code == 404
    assert stack.post("/v1/actions/does-not-exist/cancel").status_code == 404


def test_capabilities_list_actions_queues_and_plugin_errors(stack: Stack) -> None:
    caps = stack.get("/v1/capabilities").json()
    assert caps["actions"]["echo"]["queue"] == "default" and caps["actions"]["tk_io"]["queue"] == "io"
    assert caps["actions"]["tk_trainer"]["restricted"] is True
    assert any("broken_plugin.py: ModuleNotFoundError" in e for e in caps["errors"])


def test_openapi_documents_the_routes(stack: Stack) -> None:
    spec = requests.get(stack.base_url + "/openapi.json", timeout=5).json()
    assert {"/v1/actions", "/v1/actions/{action_id}", "/v1/batches/{batch_id}", "/v1/actions/{action_id}/cancel",
            "/v1/capabilities", "/healthz", "/readyz"} <= set(spec["paths"])


@given(json_values)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_body_gets_2xx_or_4xx_never_5xx(stack: Stack, body) -> None:
    resp = requests.post(stack.base_url + "/v1/actions", data=json.dumps(body), timeout=30,
                         headers={**stack.headers, "Content-Type": "application/json"})
    assert 200 <= resp.status_code < 500, (resp.status_code, resp.text)
    assert isinstance(resp.json(), dict)


@given(st.text(max_size=300))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_llm_text_gets_2xx_or_4xx_never_5xx(stack: Stack, text) -> None:
    resp = stack.post("/v1/actions", {"text": text, "context": {"chat_id": "fuzz"}})
    assert resp.status_code in (202, 422), resp.text


def test_nan_duplicate_keys_and_deep_nesting_in_the_body_are_400(stack: Stack) -> None:
    headers = {**stack.headers, "Content-Type": "application/json"}
    for raw, reason in (('{"actions": [Infinity]}', "Infinity is not valid JSON"),
                        ('{"text": "a", "text": "b"}', "duplicate key 'text'"),
                        ('{"actions": ' + "[" * 100_000, "nested too deeply"),
                        (b'{"text": "\xff"}', "not UTF-8")):
        resp = requests.post(stack.base_url + "/v1/actions", data=raw, headers=headers, timeout=10)
        assert resp.status_code == 400, (raw[:30], resp.text)
        assert reason in json.dumps(resp.json()), resp.text


def test_metrics_count_accepted_rejected_runs_durations_and_queue_depth(stack: Stack) -> None:
    assert requests.get(stack.base_url + "/metrics", timeout=5).status_code == 401
    stack.submit([{"type": "nope", "payload": {}}])
    stack.run("echo")
    stack.run("tk_fail")
    # workers send their run metrics every REKKU_METRICS_FLUSH_SECONDS (1 s); the stack is shared, so an
    # earlier test's runs may already be counted: wait for every run this test made to be
    runs = ['rekku_action_runs_total{status="failed",type="tk_fail"}',
            'rekku_action_runs_total{status="succeeded",type="echo"}']
    text = wait_until(lambda: all(r in (t := stack.get("/metrics").text) for r in runs) and t, timeout=30,
                      what="the workers' run metrics")
    assert 'rekku_actions_accepted_total{type="echo"}' in text
    assert 'rekku_actions_rejected_total{type="(unknown)"}' in text  # invented types share one label
    assert 'rekku_action_runs_total{status="succeeded",type="echo"}' in text
    assert 'rekku_action_runs_total{status="failed",type="tk_fail"}' in text
    assert 'rekku_action_run_seconds_bucket{le="+Inf",type="echo"}' in text
    assert 'rekku_queue_depth{pool="default"}' in text and "rekku_reconciler_requeued" in text
