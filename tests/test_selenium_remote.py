"""``SELENIUM_REMOTE_URL`` against a real W3C WebDriver server: chromedriver listening on a port (the
protocol a Selenium Grid speaks), shared by two selenium workers (two nodes, one browser process each).

The server's own log counts and names the sessions it created (``[<session id>] RESPONSE InitSession``),
so reuse and replacement are read from the server, not from the workers' word. Downloads: chromedriver
has no managed downloads (``se:downloadsEnabled``), so the workers read the .mp3 from their own
download directory, which the server's browser can write only because it runs on the same machine;
a server whose browser cannot see that directory is refused at session start (last test).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from rekku_plugins.selenium_elevenlabs.browser import BrowserHolder
from rekku_plugins.selenium_elevenlabs.settings import SeleniumElevenLabsSettings

from rekku.errors import PluginError, TransientError
from tests.conftest import _home, running_stack
from tests.fakes.tts_site import MP3
from tests.support import Stack, child_env, free_port, stop_process, wait_until

TRAINER_CTX = {"interface": "telegram_bot", "user_id": "42", "chat_id": "42"}
SPEECH = "speech_selenium_elevenlabs"
NODES = ("remote-a", "remote-b")
#: Generous: a remote session starts in a few seconds on a busy 2-core machine.
TIME_LIMIT = 40
CREATED = re.compile(r"\[([0-9a-f]{32})\] RESPONSE InitSession \{")
REPLACED = "the browser stopped answering; starting a new one"


class WebDriverServer:
    """``/usr/bin/chromedriver --port=N`` in a process group of its own, logging every command."""

    def __init__(self, directory: Path, user: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory, self.user = directory, user
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> WebDriverServer:
        self.starts += 1
        log = self.directory / f"chromedriver-{self.port}-{self.starts}.log"
        self.proc = subprocess.Popen(
            ["/usr/bin/chromedriver", f"--port={self.port}", f"--log-path={log}", "--log-level=INFO"],
            env=child_env(HOME=str(self.directory)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, user=self.user)
        wait_until(self.ready, timeout=30, what="chromedriver listening")
        return self

    def ready(self) -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(self.url + "/status", timeout=2).json()["value"]["ready"] is True
        return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # chromedriver and every Chromium it started
            self.proc = None

    def sessions_created(self) -> list[str]:
        """Ids of every session the server created, oldest first, across its restarts."""
        logs = sorted(self.directory.glob(f"chromedriver-{self.port}-*.log"), key=lambda p: p.stat().st_mtime)
        return [m.group(1) for path in logs for m in CREATED.finditer(path.read_text(errors="replace"))]

    def delete_session(self, session_id: str) -> None:
        """End a session from outside, as a Grid's session timeout or an operator would."""
        resp = requests.delete(f"{self.url}/session/{session_id}", timeout=30)
        assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def webdriver_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriverServer]:
    server = WebDriverServer(tmp_path_factory.mktemp("webdriver")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_stack(tmp_home: Path, tts_site: object, webdriver_server: WebDriverServer) -> Iterator[Stack]:
    """SQLite, an ingress, a default and an io worker, and two selenium workers on two nodes whose
    browsers are sessions on ``webdriver_server``."""
    env = {"TRAINER_IDS": "telegram_bot:42", "SELENIUM_REMOTE_URL": webdriver_server.url,
           "ELEVENLABS_URL": tts_site.url, "ELEVENLABS_EMAIL": tts_site.email, "ELEVENLABS_PASSWORD": tts_site.password,
           "ELEVENLABS_GENERATE_TIMEOUT": "10", "ELEVENLABS_DOWNLOAD_TIMEOUT": "10",
           "ELEVENLABS_TIME_LIMIT": str(TIME_LIMIT), "REKKU_SELENIUM_HEADLESS": "1",
           "REKKU_ARTIFACT_MAX_BYTES": "100000", "REKKU_ARTIFACT_DIR": str(tmp_home / "remote-artifacts")}
    workers = [("default", 1, "remote-main"), ("io", 2, "remote-io")] + [("selenium", 1, n) for n in NODES]
    with running_stack("remote", _home(tmp_home, "remote"), "sqlite", env, workers) as stack:
        yield stack


def speak(stack: Stack, message: str) -> tuple[dict, str]:
    chat = f"remote-{uuid.uuid4().hex[:8]}"
    payload = {"message": message, "destinations": [{"interface": "outbox", "chat_id": chat}]}
    return stack.run(SPEECH, payload, TRAINER_CTX, timeout=TIME_LIMIT * 3), chat


def speak_until_both_workers_served(stack: Stack, label: str) -> list[tuple[dict, str]]:
    """Speech actions, four at a time, until each selenium worker has run at least one."""
    runs: list[tuple[dict, str]] = []

    def served() -> bool:
        with ThreadPoolExecutor(4) as pool:
            runs.extend(pool.map(lambda i: speak(stack, f"{label} {len(runs)}-{i}"), range(4)))
        assert all(run["status"] == "succeeded" for run, _ in runs), [(r["status"], r["error"]) for r, _ in runs]
        return {run["worker"] for run, _ in runs} == {f"selenium@{n}" for n in NODES}

    wait_until(served, timeout=600, interval=0, what="both selenium workers serving speech actions")
    return runs


def sessions_by_worker(runs: list[tuple[dict, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for run, _ in runs:
        out.setdefault(run["worker"], set()).add(run["result"]["browser"]["session"])
    return out


def worker_log(stack: Stack, node: str) -> str:
    return (stack.home / "logs" / f"worker-selenium-{node}.log").read_text(errors="replace")


def test_both_workers_speak_through_the_server_with_one_reused_session_each(
        remote_stack: Stack, webdriver_server: WebDriverServer, tts_site: object) -> None:
    before, spoken = webdriver_server.sessions_created(), len(tts_site.generated)
    runs = speak_until_both_workers_served(remote_stack, "shared server")
    assert len(tts_site.generated) - spoken == len(runs)
    created = webdriver_server.sessions_created()[len(before):]
    by_worker = sessions_by_worker(runs)
    assert all(len(ids) == 1 for ids in by_worker.values()), by_worker  # one session per worker process,
    assert sorted(created) == sorted(s for ids in by_worker.values() for s in ids), (created, by_worker)  # made there
    for node in NODES:
        assert "browser started (remote)" in worker_log(remote_stack, node)
    for run, chat in runs:  # every audio was made in the remote browser, kept and delivered to the outbox
        result = run["result"]
        audio = remote_stack.get(f"/v1/artifacts/{result['audio']}")
        assert audio.status_code == 200 and audio.content == MP3 and result["bytes"] == len(MP3)
        delivery = remote_stack.wait_action(result["deliveries"][0]["action_id"])
        assert delivery["status"] == "succeeded", delivery
        outbox = remote_stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]
        assert [m["audio_url"] for m in outbox] == [f"/v1/artifacts/{result['audio']}"]


def test_a_session_ended_on_the_server_is_replaced_before_the_next_action(
        remote_stack: Stack, webdriver_server: WebDriverServer) -> None:
    old = sessions_by_worker(speak_until_both_workers_served(remote_stack, "before the end"))
    for ids in old.values():
        for session_id in ids:
            webdriver_server.delete_session(session_id)
    before = webdriver_server.sessions_created()
    new = sessions_by_worker(speak_until_both_workers_served(remote_stack, "after the end"))
    assert set(new) == set(old) and all(len(ids) == 1 for ids in new.values()), new
    assert all(not (new[w] & old[w]) for w in new), (old, new)
    assert len(webdriver_server.sessions_created()) == len(before) + 2
    for node in NODES:
        assert REPLACED in worker_log(remote_stack, node)


def test_a_server_that_is_down_fails_the_action_clearly_and_it_works_once_the_server_is_back(
        remote_stack: Stack, webdriver_server: WebDriverServer) -> None:
    speak_until_both_workers_served(remote_stack, "before the outage")
    webdriver_server.stop()
    try:
        failed, _ = speak(remote_stack, "while the server is down")
    finally:
        webdriver_server.start()
    error = failed["error"] or ""
    assert failed["status"] == "failed", failed
    assert f"the WebDriver server at {webdriver_server.url} is unreachable" in error, error
    assert "gave up after 2 attempts" in error and "time limit" not in error, error  # retried once, never hung
    runs = speak_until_both_workers_served(remote_stack, "after the outage")
    assert {run["result"]["browser"]["session"] for run, _ in runs} <= set(webdriver_server.sessions_created())


# ----------------------------------------------------------------------------- one browser, no stack
def _holder(url: str) -> BrowserHolder:
    return BrowserHolder(SeleniumElevenLabsSettings(_env_file=None, remote_url=url, time_limit=TIME_LIMIT))


def test_credentials_in_the_url_never_reach_the_error() -> None:
    port = free_port()  # nothing listens there
    holder = _holder(f"http://rekku:hunter2@127.0.0.1:{port}/wd/hub")
    with pytest.raises(TransientError) as caught:
        holder.acquire()
    assert f"the WebDriver server at http://127.0.0.1:{port}/wd/hub is unreachable" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "rekku@" not in str(caught.value)


def test_credentials_go_as_basic_auth_and_a_refused_session_says_why() -> None:
    """A server that answers every request with a W3C error (a Grid out of slots): a PluginError quoting
    it; the URL's credentials reached the server only as an Authorization header."""
    seen: list[tuple[str, str | None]] = []

    class Refusing(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.path, self.headers.get("Authorization")))
            body = json.dumps({"value": {"error": "session not created", "message": "no free slot for chrome",
                                         "stacktrace": ""}}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with pytest.raises(PluginError) as caught:
            _holder(f"http://rekku:hunter%3F2@127.0.0.1:{port}").acquire()
    finally:
        server.shutdown()
        server.server_close()
    message = str(caught.value)
    assert not isinstance(caught.value, TransientError)
    assert f"the WebDriver server at http://127.0.0.1:{port} did not start a browser" in message, message
    assert "no free slot for chrome" in message and "hunter" not in message, message
    assert seen == [("/session", "Basic " + base64.b64encode(b"rekku:hunter?2").decode())], seen


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the server as another user, which needs root")
def test_a_server_whose_browser_cannot_see_the_download_directory_is_refused() -> None:
    """chromedriver as ``nobody``: same machine, but the worker's private download directory is out of
    its browser's reach, as on another machine. Refused at session start, not after spending credits."""
    directory = Path(tempfile.mkdtemp(prefix="rekku-webdriver-"))  # pytest's own tmp is private to root
    directory.chmod(0o777)
    server = WebDriverServer(directory, user="nobody").start()
    holder = _holder(server.url)
    try:
        with pytest.raises(PluginError) as caught:
            holder.acquire()
        assert "offers no managed downloads (se:downloadsEnabled)" in str(caught.value)
        assert "cannot read this worker's download directory" in str(caught.value)
        created = server.sessions_created()
        assert len(created) == 1  # the session was made, probed, and closed again
        wait_until(lambda: f"[{created[0]}] RESPONSE Quit" in "".join(
            p.read_text(errors="replace") for p in directory.glob("chromedriver-*.log")), what="the probe's quit")
    finally:
        holder.discard()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
