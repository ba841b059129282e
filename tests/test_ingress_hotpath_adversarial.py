"""Adversarial tests of the ingress hot path (async token check, the submit route on an executor of its
own, kwargsrepr by repr, no re-declare per publish), black box: a real ingress over HTTP, a real Redis
and database, real workers. Each test waits for evidence (the broker's messages, the action log, a
worker's run) rather than for time to pass.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import running_stack
from tests.support import REDIS_HOST, REDIS_PORT, Stack, free_port, wait_until


def _idle_stack(home: Path, database: str, **env: str):
    """An ingress and no worker: what it publishes stays on the broker, to be counted."""
    return running_stack(f"hot-{database}", home, database, {"TRAINER_IDS": "telegram_bot:42", **env}, [])


def _messages_by_id(stack: Stack) -> Counter:
    return Counter(m["id"] for m in stack.broker_messages() if (m["task"] or "").startswith("rekku.action."))


# ----------------------------------------------------------------------------- many clients at once
@pytest.mark.parametrize("database", ["sqlite", "mariadb"])
def test_many_concurrent_clients_every_action_logged_and_published_exactly_once(tmp_path: Path,
                                                                              database: str) -> None:
    clients, per_request = 120, 3
    with _idle_stack(tmp_path, database) as stack:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))

        def one(n: int) -> requests.Response:
            body = {"actions": [{"type": "echo", "payload": {"text": f"c{n}-{i}", "token": "hunter2"}}
                                for i in range(per_request)], "context": {"chat_id": str(n)}}
            headers = {**stack.headers, **({"Idempotency-Key": f"k-{n}"} if n % 2 else {})}
            return session.post(stack.base_url + "/v1/actions", json=body, headers=headers, timeout=120)

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(one, range(clients)))
        statuses = Counter(r.status_code for r in answers)
        assert statuses == {202: clients}, (statuses, [r.text for r in answers if r.status_code != 202][:3])
        accepted = [a["id"] for r in answers for a in r.json()["accepted"]]
        assert len(accepted) == len(set(accepted)) == clients * per_request

        published = wait_until(lambda: (m := _messages_by_id(stack)) and len(m) >= len(accepted) and m,
                               timeout=30, what="every message on the broker")
        assert set(published) == set(accepted) and set(published.values()) == {1}, published.most_common(3)
        for r in answers:
            batch = stack.get(f"/v1/batches/{r.json()['batch_id']}").json()
            assert sorted(a["id"] for a in batch["actions"]) == sorted(a["id"] for a in r.json()["accepted"])
            assert {a["status"] for a in batch["actions"]} == {"queued"}

        # the idempotent half again, all at once: the first answers, and no second message
        with ThreadPoolExecutor(64) as pool:
            again = list(pool.map(one, range(1, clients, 2)))
        assert [r.json() for r in again] == [answers[n].json() for n in range(1, clients, 2)]
        assert _messages_by_id(stack) == published

        # a worker runs each once
        stack.start_worker("default", concurrency=2)
        for action_id in accepted[:: per_request * 10]:
            assert stack.wait_action(action_id, timeout=60)["status"] == "succeeded"


# ----------------------------------------------------------------------------- clients that go away
def _raw_post(stack: Stack, body: bytes, *, send: int | None = None, extra_headers: str = "") -> None:
    """Send a POST (all of ``body``, or its first ``send`` bytes) and hang up without reading the answer."""
    head = (f"POST /v1/actions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {stack.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n").encode()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=5) as sock:
        sock.sendall(head + body[:send] if send is not None else head + body)
        sock.shutdown(socket.SHUT_RDWR)


def test_clients_hanging_up_mid_request_leave_each_action_published_once(tmp_path: Path) -> None:
    with _idle_stack(tmp_path, "sqlite") as stack:
        keys = [f"gone-{i}" for i in range(30)]
        bodies = {k: json.dumps({"actions": [{"type": "echo", "payload": {"text": k}}] * 2,
                                 "idempotency_key": k}).encode() for k in keys}
        threads = [threading.Thread(target=_raw_post, args=(stack, bodies[k])) for k in keys]
        threads += [threading.Thread(target=_raw_post, args=(stack, bodies[k]), kwargs={"send": 20}) for k in keys[:10]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # every key again, from a client that stays: the first answer if the hung-up one got through
        answers = {k: stack.post("/v1/actions", json.loads(bodies[k])) for k in keys}
        assert {r.status_code for r in answers.values()} == {202}, [r.text for r in answers.values()][:3]
        accepted = [a["id"] for r in answers.values() for a in r.json()["accepted"]]
        assert len(accepted) == 2 * len(keys)
        published = _messages_by_id(stack)
        assert set(published) == set(accepted) and set(published.values()) == {1}, published
        assert requests.get(stack.base_url + "/healthz", timeout=5).status_code == 200


# ----------------------------------------------------------------------------- the error shapes
def test_errors_keep_their_status_and_shape_on_the_async_route(tmp_path: Path) -> None:
    with _idle_stack(tmp_path, "sqlite", REKKU_MAX_ACTIONS_PER_REQUEST="5") as stack:
        url = stack.base_url + "/v1/actions"
        body = {"actions": [{"type": "echo", "payload": {"text": "x"}}]}
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                        {"Authorization": "Bearer " + stack.token + "x"}, {"Authorization": "bearer"}):
            resp = requests.post(url, json=body, headers=headers, timeout=10)
            assert resp.status_code == 401 and resp.headers.get("WWW-Authenticate") == "Bearer", resp.text
            assert set(resp.json()) == {"detail", "errors"}

        def shape(resp: requests.Response, status: int) -> dict:
            assert resp.status_code == status, resp.text
            assert resp.headers["content-type"].startswith("application/json")
            return resp.json()

        huge = {"actions": [{"type": "echo", "payload": {"text": "y" * (1 << 20)}}]}
        assert set(shape(stack.post("/v1/actions", huge), 413)) == {"detail", "errors"}
        assert set(shape(stack.post("/v1/actions", {"actions": 7}), 422)) == {"detail", "errors"}
        too_many = shape(stack.post("/v1/actions", {"actions": [body["actions"][0]] * 6}), 413)
        assert "REKKU_MAX_ACTIONS_PER_REQUEST" in too_many["detail"]
        reserved = shape(stack.post("/v1/actions", {**body, "idempotency_key": "event:x"}), 422)
        assert set(reserved) == {"detail", "errors"}
        first = shape(stack.post("/v1/actions", {**body, "idempotency_key": "same"}), 202)
        assert shape(stack.post("/v1/actions", {**body, "idempotency_key": "same"}), 202) == first
        conflict = shape(stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "other"}}],
                                                    "idempotency_key": "same"}), 409)
        assert set(conflict) == {"detail", "errors"} and first["batch_id"] in conflict["detail"]
        rejected = shape(stack.post("/v1/actions", {"actions": [{"type": "no_such_action", "payload": {}}]}), 422)
        assert rejected["rejected"] and rejected["batch_id"] is None


# ----------------------------------------------------------------------------- what Flower is shown
def test_kwargsrepr_of_awkward_payloads_hides_secrets_and_stays_short(tmp_path: Path) -> None:
    with _idle_stack(tmp_path, "sqlite") as stack:
        deep: dict = {"password": "hunter2", "emoji": "\U0001f600 \u00e9 \u202e"}
        for i in range(14):  # a dict and a list per level: 29 levels, within the 32 allowed
            deep = {f"l{i}": [deep], "apiKey": "k-secret-9"}
        big = {"parts": ["z" * 90_000] * 10, "Authorization": "Bearer s3cr3t-bearer"}  # near the 1 MiB body limit
        wide = {"keys": {str(i): i for i in range(20_000)}, "secret": "wide-secret"}
        answer = stack.submit([{"type": "echo", "payload": deep}, {"type": "echo", "payload": wide}])
        assert len(answer["accepted"]) == 2, answer
        started = time.monotonic()
        answer2 = stack.submit([{"type": "echo", "payload": big}])
        assert len(answer2["accepted"]) == 1 and time.monotonic() - started < 10, answer2
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
        shown = [json.loads(item)["headers"]["kwargsrepr"] for item in client.lrange("default", 0, -1)]
        assert len(shown) == 3
        for text in shown:
            assert len(text) <= 1024
            assert not any(s in text for s in ("hunter2", "k-secret-9", "s3cr3t-bearer", "wide-secret")), text
        surrogate = requests.post(stack.base_url + "/v1/actions", timeout=10,
                                  data=b'{"actions": [{"type": "echo", "payload": {"text": "\\ud800"}}]}',
                                  headers={**stack.headers, "Content-Type": "application/json"})
        assert surrogate.status_code == 422 and surrogate.json()["rejected"], surrogate.text  # refused, not a 500


# ----------------------------------------------------------------------------- a broker that forgets
def _start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _pings(port), timeout=10, what=f"redis on {port}")
    return proc


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis("127.0.0.1", port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)


def test_broker_flushed_or_restarted_then_503_then_publishes_reach_a_worker(tmp_path: Path) -> None:
    """The ingress publishes, the broker loses every key (FLUSHALL), then goes away (503, the one error
    shape) and comes back empty: each later action still reaches the worker (the declare cache)."""
    port = free_port()
    server = _start_redis(port)
    stack = Stack("hot-broker", tmp_path, f"sqlite:///{tmp_path / 'rekku.db'}", 0)
    # the broker is this test's own server: a restart must not touch the shared one
    stack.extra_env = {"REKKU_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        stack.spawn("ingress", "--port", str(stack.port), log_name="ingress")
        wait_until(stack._ready, timeout=60, what="ingress")
        stack.spawn("worker", "--pool", "default", "--concurrency", "1", "--node", "hot", log_name="worker-hot")
        assert stack.run("echo", {"text": "before"}, timeout=60)["status"] == "succeeded"

        redis.Redis("127.0.0.1", port).flushall()
        assert stack.run("echo", {"text": "after flush"}, timeout=60)["status"] == "succeeded"

        _stop_redis(server)
        down = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "down"}}]}, timeout=60)
        assert down.status_code == 503 and set(down.json()) == {"detail", "errors"}, down.text

        server = _start_redis(port)
        deadline = time.monotonic() + 60
        while True:  # the first publishes after the restart may still meet the dead connections: 503
            resp = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "back"}}]}, timeout=60)
            if resp.status_code == 202 or time.monotonic() > deadline:
                break
            assert resp.status_code == 503, resp.text
        assert resp.status_code == 202, resp.text
        assert stack.wait_action(resp.json()["accepted"][0]["id"], timeout=60)["status"] == "succeeded"
    finally:
        stack.stop()
        _stop_redis(server)


# ----------------------------------------------------------------------------- the event loop stays free
SLOW_PLUGIN = '''
import time
from rekku.plugin import AIPluginBase, register_plugin

time.sleep(4)  # a plugin whose import is slow (a heavy library, a file share)


class Slow(AIPluginBase):
    def __init__(self):
        register_plugin("slowload", self)

    @staticmethod
    def get_supported_action_types():
        return ["slowload_noop"]

    def get_supported_actions(self):
        return {"slowload_noop": {"description": "nothing", "required_fields": [], "optional_fields": []}}

    async def handle_custom_action(self, action_type, payload):
        return {}


PLUGIN_CLASS = Slow
'''


def test_the_first_submit_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    """The ingress builds its plugin registry on the first request that needs it; on the submit route
    that must happen off the event loop, as every other blocking step does, so /healthz answers at
    once while it loads."""
    plugins = tmp_path / "slow_plugins"
    plugins.mkdir()
    (plugins / "slowload.py").write_text(SLOW_PLUGIN)
    with _idle_stack(tmp_path, "sqlite", REKKU_PLUGIN_PATH=str(plugins)) as stack:
        result: dict = {}

        def submit() -> None:
            result["resp"] = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "x"}}]},
                                        timeout=60)

        first = threading.Thread(target=submit)
        first.start()
        time.sleep(1.0)  # the first request is loading the plugins now
        started = time.monotonic()
        health = requests.get(stack.base_url + "/healthz", timeout=30)
        waited = time.monotonic() - started
        first.join()
        assert health.status_code == 200
        assert result["resp"].status_code == 202, result["resp"].text
        assert waited < 1.5, f"/healthz waited {waited:.1f} s behind the first POST /v1/actions"


# ----------------------------------------------------------------------------- one key, many clients
def test_one_idempotency_key_raced_by_many_clients_gives_one_batch(tmp_path: Path) -> None:
    """Forty clients send the same key at the same moment (MariaDB): those with the first body all get
    one answer, those with another body a 409, and the broker holds the batch's messages once."""
    with _idle_stack(tmp_path, "mariadb") as stack:
        start = threading.Barrier(40)

        def one(n: int) -> requests.Response:
            text = "same" if n % 4 else f"other-{n}"
            start.wait()
            return requests.post(stack.base_url + "/v1/actions", timeout=60,
                                 json={"actions": [{"type": "echo", "payload": {"text": text}}] * 2,
                                       "idempotency_key": "raced"}, headers=stack.headers)

        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(one, range(40)))
        statuses = Counter(r.status_code for r in answers)
        assert set(statuses) <= {202, 409} and statuses[202] >= 1, (statuses, [r.text for r in answers][:3])
        winners = {json.dumps(r.json(), sort_keys=True) for r in answers if r.status_code == 202}
        assert len(winners) == 1, winners
        for r in answers:
            if r.status_code == 409:
                assert set(r.json()) == {"detail", "errors"}
        accepted = [a["id"] for a in json.loads(winners.pop())["accepted"]]
        published = _messages_by_id(stack)
        assert set(published) == set(accepted) and set(published.values()) == {1}, published


def test_broker_gone_under_concurrent_clients_answers_503_to_each_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    server = _start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    stack = Stack("hot-down", tmp_path, f"sqlite:///{tmp_path / 'rekku.db'}", 0, extra_env={"REKKU_BROKER_URL": url})
    try:
        stack.spawn("ingress", "--port", str(stack.port), log_name="ingress")
        wait_until(stack._ready, timeout=60, what="ingress")
        assert stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": "up"}}]}).status_code == 202
        _stop_redis(server)

        def one(n: int) -> requests.Response:
            return stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {"text": f"d{n}"}}]}, timeout=120)

        with ThreadPoolExecutor(20) as pool:  # within the ingress's 40 submit threads: one wave of retries
            answers = list(pool.map(one, range(20)))
        assert Counter(r.status_code for r in answers) == {503: 20}, [r.text for r in answers][:3]
        assert all(set(r.json()) == {"detail", "errors"} for r in answers)
        assert requests.get(stack.base_url + "/healthz", timeout=5).status_code == 200
        server = _start_redis(port)
        resp = wait_until(lambda: (r := one(99)).status_code == 202 and r, timeout=60, what="a 202 again")
        assert redis.Redis("127.0.0.1", port).llen("default") >= 1, resp.text
    finally:
        stack.stop()
        _stop_redis(server)
