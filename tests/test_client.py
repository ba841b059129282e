"""rekku.client against a real ingress and real workers: submit and wait, typed errors, cancel, the
feed, the Location header, the async client the same; and a submit whose answer is lost while the
ingress restarts, retried with the same idempotency key, runs its action exactly once. What is
retried and what is not is checked against a scripted HTTP server that counts the attempts."""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa

from rekku.client import (
    AsyncClient,
    Client,
    Conflict,
    Forbidden,
    NotFound,
    Rejected,
    Retry,
    TooLarge,
    TransportError,
    Unauthorized,
    Unavailable,
)
from rekku.schemas import ActionState, BatchState, CancelResponse, SubmitResponse
from tests.fakes.server import FakeServer, Recorded
from tests.support import Stack, child_env, free_port, stop_process, wait_until

#: Quick retries for the tests: the policy, not its patience, is what they check.
QUICK = Retry(attempts=3, backoff=0.01, max_backoff=0.05)
SLEEP0 = [{"type": "tk_sleep", "payload": {"seconds": 0}}]


def _message(chat: str) -> dict:
    return {"interface": "telegram_bot", "chat_id": chat, "message_id": uuid.uuid4().int % 10**9,
            "user_id": "u1", "text": "hi Rekku"}


# ----------------------------------------------------------------------------- against a real ingress
def test_submit_and_wait_end_to_end(stack: Stack) -> None:
    with Client(stack.base_url, stack.token) as client:
        answer = client.submit(SLEEP0 + [{"type": "echo", "payload": {"text": "hi"}}], context={"chat_id": "1"})
        assert isinstance(answer, SubmitResponse) and answer.batch_id and not answer.rejected
        assert [a.type for a in answer.accepted] == ["tk_sleep", "echo"]
        runs = client.wait(answer, timeout=30)
        assert [r.status for r in runs] == ["succeeded", "succeeded"] and isinstance(runs[0], ActionState)
        assert runs[1].result == {"text": "hi"} and runs[1].context["chat_id"] == "1"
        batch = client.batch(answer.batch_id)
        assert isinstance(batch, BatchState) and batch.done and [r.id for r in batch.actions] == [r.id for r in runs]
        assert client.status(runs[0].id).status == "succeeded"
        assert [r.id for r in client.wait([runs[1].id, runs[0].id], timeout=30)] == [runs[1].id, runs[0].id]
        # a raw LLM reply, fences and prose around it
        reply = client.submit('Sure!\n```json\n{"type": "echo", "payload": {"text": "fenced"}}\n```')
        assert client.wait(reply.batch_id, timeout=30)[0].result == {"text": "fenced"}


def test_the_same_key_answers_the_first_batch(stack: Stack) -> None:
    with Client(stack.base_url, stack.token) as client:
        key = f"svc-{uuid.uuid4()}"
        first = client.submit(SLEEP0, idempotency_key=key)
        assert client.submit(SLEEP0, idempotency_key=key) == first
        assert len(client.batch(first.batch_id, wait=30).actions) == 1


def test_typed_errors(stack: Stack) -> None:
    with Client(stack.base_url, "not-the-token", retry=QUICK) as stranger:
        with pytest.raises(Unauthorized) as denied:
            stranger.submit(SLEEP0)
        assert denied.value.status == 401 and denied.value.detail == "missing or wrong bearer token"
    with Client(stack.base_url, stack.token, retry=QUICK) as client:
        with pytest.raises(Rejected) as rejected:
            client.submit([{"type": "no_such_action", "payload": {}}])
        error = rejected.value
        assert error.status == 422 and "no_such_action" in error.detail and error.errors[0]["type"] == "no_such_action"
        assert error.answer is not None and error.answer.batch_id is None and error.answer.correction
        with pytest.raises(Rejected) as reserved:  # the {"detail", "errors"} shape
            client.submit(SLEEP0, idempotency_key="event:mine")
        assert "reserved" in reserved.value.detail and reserved.value.answer is None
        key = f"svc-{uuid.uuid4()}"
        client.submit(SLEEP0, idempotency_key=key)
        with pytest.raises(Conflict) as reused:
            client.submit([{"type": "echo", "payload": {"text": "other"}}], idempotency_key=key)
        assert reused.value.status == 409 and "already used" in reused.value.detail
        assert reused.value.idempotency_key == key
        with pytest.raises(NotFound):
            client.status(str(uuid.uuid4()))
        with pytest.raises(TooLarge):
            client.submit(SLEEP0 * 1001)


def test_cancel(stack: Stack) -> None:
    with Client(stack.base_url, stack.token, retry=QUICK) as client:
        answer = client.submit([{"type": "tk_io", "payload": {}}])  # no io worker in this stack: it stays queued
        action_id = answer.accepted[0].id
        cancelled = client.cancel(action_id)
        assert isinstance(cancelled, CancelResponse) and cancelled.status == "cancelled"
        assert client.wait(answer, timeout=5)[0].status == "cancelled"
        with pytest.raises(Conflict):
            client.cancel(action_id)


def test_location_header_names_the_batch(stack: Stack) -> None:
    key = f"svc-{uuid.uuid4()}"
    first = stack.post("/v1/actions", {"actions": SLEEP0}, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    assert first.headers["Location"] == f"/v1/batches/{first.json()['batch_id']}"
    batch = stack.get(first.headers["Location"], params={"wait": 30}).json()  # where it points
    assert batch["batch_id"] == first.json()["batch_id"] and batch["done"]
    again = stack.post("/v1/actions", {"actions": SLEEP0}, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.headers["Location"] == first.headers["Location"]
    refused = stack.post("/v1/actions", {"actions": [{"type": "no_such_action"}]})
    assert refused.status_code == 422 and "Location" not in refused.headers
    silent = stack.post("/v1/actions", {"actions": []})  # nothing to do: no batch to point at
    assert silent.status_code == 202 and silent.json()["batch_id"] is None and "Location" not in silent.headers


def test_feed_iteration(stack: Stack) -> None:
    chats = [f"-100{uuid.uuid4().int % 10**9}" for _ in range(3)]
    with Client(stack.base_url, stack.token) as client:
        assert stack.post("/v1/messages", _message(chats[0])).status_code == 202
        items = client.feed(wait=20)
        first = next(i for i in items if i["chat"]["chat_id"] == chats[0])
        assert first["type"] == "message" and first["data"]["text"] == "hi Rekku"
        for chat in chats[1:]:
            assert stack.post("/v1/messages", _message(chat)).status_code == 202
        seen = [next(i for i in items if i["chat"]["chat_id"] == chat) for chat in chats[1:]]  # long-polls
        assert first["id"] < seen[0]["id"] < seen[1]["id"]
        # resumed from an item's id, without following: what came after it, page by page, then the end
        rest = [i["id"] for i in itertools.islice(client.feed(after=first["id"], follow=False, limit=1), 10_000)]
        assert rest == sorted(set(rest)) and rest[0] > first["id"]  # each once, in order
        assert [s["id"] for s in seen] == [i for i in rest if i in {s["id"] for s in seen}]


def test_async_client(stack: Stack) -> None:
    chat = f"-100{uuid.uuid4().int % 10**9}"

    async def scenario() -> None:
        async with AsyncClient(stack.base_url, stack.token, retry=QUICK) as client:
            answer = await client.submit(SLEEP0 * 2, context={"chat_id": chat})
            runs = await client.wait(answer, timeout=30)
            assert [r.status for r in runs] == ["succeeded", "succeeded"]
            assert [r.id for r in await client.wait([a.id for a in answer.accepted], timeout=30)] == [
                a.id for a in answer.accepted]
            assert (await client.batch(answer.batch_id)).done
            assert (await client.status(runs[0].id)).status == "succeeded"
            queued = await client.submit([{"type": "tk_io", "payload": {}}])
            assert (await client.cancel(queued.accepted[0].id)).status == "cancelled"
            with pytest.raises(Conflict):
                await client.cancel(queued.accepted[0].id)
            with pytest.raises(Rejected) as rejected:
                await client.submit([{"type": "no_such_action"}])
            assert rejected.value.answer.correction
            async with AsyncClient(stack.base_url, "wrong", retry=QUICK) as stranger:
                with pytest.raises(Unauthorized):
                    await stranger.status(runs[0].id)
            assert stack.post("/v1/messages", _message(chat)).status_code == 202
            async for item in client.feed(wait=20):
                if item["chat"]["chat_id"] == chat:
                    assert item["type"] == "message"
                    break

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- the answer lost in a restart
def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    """Close ``sock`` so that its peer sees the connection end now: a plain ``close()`` leaves the socket
    open while another thread still waits in ``recv`` on it (this proxy's forwarding thread does), and the
    client would only give up on it after its 30 s read timeout, not because the connection closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (the listener), or already gone
    sock.close()


class AnswerDroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of the ingress, forwarding both ways, except once: the first
    ``POST /v1/actions`` goes through and the ingress's whole answer is read (the work is done: it
    answers after recording and enqueueing), then, once ``release`` is set, the client's connection
    is closed without it. A connection that cannot reach the ingress is closed at once."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed, self.lock = True, threading.Lock()
        self.held, self.release = threading.Event(), threading.Event()
        self.dropped = b""
        self.connections = 0
        self.sockets: list[socket.socket] = []

    def start(self) -> AnswerDroppingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        for sock in [self.listener, *self.sockets]:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self.sockets += [client, upstream]
        drop = threading.Event()

        def forward_requests() -> None:
            while data := _recv(client):
                with self.lock:
                    if self.armed and data.startswith(b"POST /v1/actions "):
                        self.armed = False
                        drop.set()
                upstream.sendall(data)

        threading.Thread(target=forward_requests, daemon=True).start()
        while data := _recv(upstream):
            if drop.is_set():
                self._hold(upstream, data, client)
                return
            client.sendall(data)
        client.close()

    def _hold(self, upstream: socket.socket, data: bytes, client: socket.socket) -> None:
        head, end, body = data.partition(b"\r\n\r\n")
        while not end and (more := _recv(upstream)):
            data += more
            head, end, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length and (more := _recv(upstream)):
            body += more
        self.dropped = head + b"\r\n\r\n" + body
        upstream.close()
        self.held.set()
        self.release.wait(120)
        _close(client)


def test_a_submit_retried_after_the_ingress_restarted_mid_request_runs_once(make_stack: Any) -> None:
    stack = make_stack()
    stack.start_worker("default", concurrency=1, node="client-main")
    proxy = AnswerDroppingProxy(stack.port).start()
    try:
        with Client(proxy.url, stack.token, retry=Retry(attempts=4, backoff=0.05, max_backoff=0.5)) as client, \
                ThreadPoolExecutor(1) as pool:
            submitted = pool.submit(client.submit, SLEEP0)
            wait_until(proxy.held.is_set, what="the ingress to answer the first attempt")
            ingress = stack.processes[0]
            stop_process(ingress)  # the ingress goes, with the client's request in flight
            stack.processes.remove(ingress)
            stack.start_ingress()
            proxy.release.set()  # the client's connection closes, unanswered
            answer = submitted.result(timeout=60)
            runs = client.wait(answer, timeout=30)
    finally:
        proxy.stop()
    assert proxy.dropped.startswith(b"HTTP/1.1 202")  # the first attempt did the work; its answer was lost
    assert proxy.connections >= 2  # the retry came on a new connection, to the new ingress
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as db:
            batches = db.scalar(sa.text("SELECT COUNT(*) FROM action_batches"))
            actions = db.scalar(sa.text("SELECT COUNT(*) FROM action_runs"))
    finally:
        engine.dispose()
    assert (batches, actions) == (1, 1)
    assert answer.batch_id.encode() in proxy.dropped  # the retry was answered with the lost answer's batch
    assert [r.status for r in runs] == ["succeeded"]
    assert [line.split()[0] for line in stack.journal(runs[0].id)] == ["start", "done"]  # the handler ran once


# ----------------------------------------------------------------------------- the retry policy
class ScriptedIngress(FakeServer):
    """Answers each request with the next (status, body) of ``script``; the last one thereafter."""

    def __init__(self, *script: tuple[int, Any]) -> None:
        super().__init__()
        self.script = list(script)

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        with self.lock:
            status, body = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return status, body, None


ACCEPTED = {"batch_id": "b1", "accepted": [{"index": 0, "id": "a1", "type": "tk_sleep", "queue": "default"}],
            "rejected": [], "correction": None}
BUSY = (503, {"detail": "the broker is unreachable", "errors": []})


def _scripted(*script: tuple[int, Any]) -> ScriptedIngress:
    return ScriptedIngress(*script).start()


def test_503_is_retried_with_the_same_key() -> None:
    fake = _scripted(BUSY, (502, {"detail": "bad gateway"}), (202, ACCEPTED))
    try:
        with Client(fake.url, "t", retry=QUICK) as client:
            assert client.submit(SLEEP0).batch_id == "b1"
        keys = [r.headers["idempotency-key"] for r in fake.requests]
        assert len(keys) == 3 and len(set(keys)) == 1 and keys[0].startswith("client-")
    finally:
        fake.stop()


def test_attempts_are_bounded_and_the_error_says_what_and_which_key() -> None:
    fake = _scripted(BUSY)
    try:
        with Client(fake.url, "t", retry=QUICK) as client:
            with pytest.raises(Unavailable) as busy:
                client.submit(SLEEP0, idempotency_key="mine")
        assert busy.value.status == 503 and busy.value.detail == "the broker is unreachable"
        assert busy.value.idempotency_key == "mine" and len(fake.requests) == QUICK.attempts
    finally:
        fake.stop()
    with Client(f"http://127.0.0.1:{free_port()}", "t", retry=QUICK) as client:  # nothing listens there
        with pytest.raises(TransportError) as unreachable:
            client.submit(SLEEP0)
        assert "ConnectError" in str(unreachable.value) and unreachable.value.idempotency_key


@pytest.mark.parametrize("status,kind", [(401, Unauthorized), (403, Forbidden), (404, NotFound), (409, Conflict),
                                         (413, TooLarge), (422, Rejected)])
def test_client_errors_are_not_retried(status: int, kind: type) -> None:
    fake = _scripted((status, {"detail": f"said {status}", "errors": [{"msg": "why"}]}), (202, ACCEPTED))
    try:
        with Client(fake.url, "t", retry=QUICK) as client:
            with pytest.raises(kind) as raised:
                client.submit(SLEEP0)
        assert raised.value.status == status and raised.value.detail == f"said {status}"
        assert raised.value.errors == [{"msg": "why"}] and len(fake.requests) == 1
    finally:
        fake.stop()


def test_the_async_client_retries_alike() -> None:
    fake = _scripted(BUSY, (202, ACCEPTED))

    async def scenario() -> str | None:
        async with AsyncClient(fake.url, "t", retry=QUICK) as client:
            return (await client.submit(SLEEP0)).batch_id

    try:
        assert asyncio.run(scenario()) == "b1"
        assert len({r.headers["idempotency-key"] for r in fake.requests}) == 1 and len(fake.requests) == 2
    finally:
        fake.stop()


def test_the_backoff_is_jittered_and_bounded() -> None:
    policy = Retry(attempts=9, backoff=0.5, max_backoff=4)
    delays = [policy.delay(n) for n in range(8) for _ in range(50)]
    assert all(0 <= d <= 4 for d in delays) and len(set(delays)) > 20
    assert max(policy.delay(0) for _ in range(200)) <= 0.5


@pytest.mark.parametrize("host,url", [("0.0.0.0", "http://127.0.0.1:8123"), ("::1", "http://[::1]:8123"),
                                      ("rekku.internal", "http://rekku.internal:8123")])
def test_without_arguments_it_reaches_the_ingress_the_cli_would(tmp_path: Any, host: str, url: str) -> None:
    program = "from rekku.client import Client\nc = Client()\nprint(c.base_url, c._auth['Authorization'])"
    shown = subprocess.run(
        [sys.executable, "-c", program],
        env=child_env(REKKU_HOME=str(tmp_path), REKKU_HOST=host, REKKU_PORT="8123", REKKU_API_TOKEN="tok-1"),
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert shown == [url, "Bearer", "tok-1"]
