"""Issue 14, a user's first day: real processes (ingress, workers, Redis, SQLite), black-box.

1. a plain ``Celery(broker=..., backend=...)`` app's ``send_task("rekku.ingest", ...)`` is answered;
2. ``{"actions": []}`` (the prompt's way to stay silent) is nothing to do, not a correction;
3. an ``event`` with no target from a request with no chat is refused at the ingress;
4. commands of one persistent terminal session in one batch run in the order given;
5. a SIGKILLed selenium worker leaves no Chromium or chromedriver behind;
6. the seed's example is opt-in, and a plugin clash is one clear line, never a traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import TRAINER, running_stack
from tests.support import REDIS_HOST, REDIS_PORT, ROOT, Stack, child_env, wait_until

SQLITE = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
EXAMPLES = "plugins/examples"


# ----------------------------------------------------------------------------- 1. plain Celery client
@SQLITE
def test_a_plain_celery_app_gets_the_ingest_answer_and_the_action_runs(stack: Stack) -> None:
    """Exactly as the README shows: an app that knows nothing of Rekku's routes (Celery's default
    queue 'celery'), with the result backend on the same Redis."""
    app = Celery(broker=stack.broker_url, backend=stack.broker_url)
    marker = f"plain-{uuid.uuid4().hex[:8]}"
    try:
        body = {"actions": [{"type": "echo", "payload": {"text": marker}}]}
        result = app.send_task("rekku.ingest", kwargs={"body": body, "context": {"chat_id": "plain"}})
        answer = result.get(timeout=20)
    finally:
        app.close()
    assert answer["accepted"] and answer["rejected"] == [], answer
    run = stack.wait_action(answer["accepted"][0]["id"])
    assert run["status"] == "succeeded" and run["result"] == {"text": marker}, run


# ----------------------------------------------------------------------------- 2. {"actions": []}
@SQLITE
def test_empty_actions_are_nothing_to_do_not_a_correction(stack: Stack) -> None:
    ctx = {"interface": "webhook", "chat_id": f"silent-{uuid.uuid4().hex[:8]}"}
    bad = stack.post("/v1/actions", {"actions": [{"type": "nope", "payload": {}}], "context": ctx})
    assert bad.status_code == 422 and "Attempt 1 of" in bad.json()["correction"]["system_message"]["error_retry_policy"]
    nothing = {"batch_id": None, "accepted": [], "rejected": [], "correction": None}
    # the reply {"actions": []} as the request itself, as JSON, as raw text, and a bare [] as raw text
    for body in ({"actions": []}, {"actions": {"actions": []}}, {"text": '{"actions": []}'}, {"text": "[]"},
                 {"text": 'Nothing to add.\n```json\n{"actions": []}\n```'}):
        resp = stack.post("/v1/actions", {**body, "context": ctx})
        assert resp.status_code == 202, (body, resp.text)
        assert resp.json() == nothing, (body, resp.text)
    app = Celery(broker=stack.broker_url, backend=stack.broker_url)
    try:
        for reply in ({"actions": []}, [], "[]"):
            answer = app.send_task("rekku.ingest", kwargs={"body": reply, "context": ctx},
                                   queue="default").get(timeout=20)
            assert answer == nothing, (reply, answer)
    finally:
        app.close()
    # the chat's correction budget was not spent by the silent replies (reset or untouched)
    again = stack.post("/v1/actions", {"actions": [{"type": "nope", "payload": {}}], "context": ctx})
    policy = again.json()["correction"]["system_message"]["error_retry_policy"]
    assert re.search(r"Attempt [12] of", policy), policy


# ----------------------------------------------------------------------------- 3. event without target
@SQLITE
def test_an_event_without_target_from_no_chat_is_refused_at_the_ingress(stack: Stack) -> None:
    payload = {"description": "tea", "date": "2099-01-01", "time": "09:00"}
    answer = stack.post("/v1/actions", {"actions": [{"type": "event", "payload": payload}],
                                        "context": {"interface": "webhook", "user_id": "5"}})
    assert answer.status_code == 422, answer.text
    errors = answer.json()["rejected"][0]["errors"]
    assert any("no 'target'" in e and "no chat" in e for e in errors), errors
    # with a chat, or a target, the same event is accepted
    with_chat = {"interface": "webhook", "chat_id": "7"}
    for body in ({"actions": [{"type": "event", "payload": payload}], "context": with_chat},
                 {"actions": [{"type": "event", "payload": {**payload, "target": {"interface": "outbox",
                                                                               "chat_id": "7"}}}], "context": {}}):
        resp = stack.post("/v1/actions", body)
        assert resp.status_code == 202, resp.text


# ----------------------------------------------------------------------------- 4. terminal order
@pytest.fixture(scope="module")
def terminal_node(stack: Stack) -> Iterator[object]:
    proc = stack.start_worker("terminal", concurrency=4, node=f"fd-term-{uuid.uuid4().hex[:4]}",
                              TERMINAL_NODE_TTL="3")
    yield proc
    from tests.support import stop_process

    stop_process(proc)


@SQLITE
def test_commands_of_one_session_in_one_batch_run_in_order(stack: Stack, terminal_node: object,
                                                           tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for round_ in range(8):
        session = f"fd-order-{uuid.uuid4().hex[:8]}"
        where = tmp_path / f"round{round_}"
        where.mkdir()

        def command(text: str) -> dict:
            return {"type": "terminal", "payload": {"command": text, "persistent_session": True, "session": session}}

        first = stack.run("terminal", {"command": f"cd {base}", "persistent_session": True, "session": session},
                          TRAINER)
        assert first["status"] == "succeeded", first
        answer = stack.submit([command(f"cd {where}"), command("pwd"), command("echo a >> f"),
                               command("echo b >> f"), command("cat f")], TRAINER)
        assert len(answer["accepted"]) == 5, answer
        runs = [stack.wait_action(a["id"], timeout=60) for a in answer["accepted"]]
        assert all(r["status"] == "succeeded" for r in runs), runs
        outputs = [r["result"]["stdout"] for r in runs]
        assert outputs == ["", f"{where}\n", "", "", "a\nb\n"], (round_, outputs)


# ----------------------------------------------------------------------------- 5. browser orphans
def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, cmdline) of every live (non-zombie) process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            found[int(entry.name)] = (int(fields[1]), fields[0], cmdline)
    return found


def _descendants(root: int, procs: dict[int, tuple[int, str, str]]) -> set[int]:
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, (pp, _, _) in procs.items() if pp == pid]
        out.update(kids)
        todo += kids
    return out


@pytest.fixture
def browser_stack(tmp_home: Path, tts_site: object) -> Iterator[Stack]:
    home = tmp_home / f"fd-browser-{uuid.uuid4().hex[:4]}"
    home.mkdir()
    env = {"TRAINER_IDS": "telegram_bot:42", "ELEVENLABS_URL": tts_site.url, "ELEVENLABS_EMAIL": tts_site.email,
           "ELEVENLABS_PASSWORD": tts_site.password, "ELEVENLABS_GENERATE_TIMEOUT": "2",
           "ELEVENLABS_DOWNLOAD_TIMEOUT": "2", "REKKU_ARTIFACT_DIR": str(home / "artifacts"),
           "REKKU_SELENIUM_HEADLESS": "1"}
    with running_stack("fdbrowser", home, "sqlite", env, [("default", 1, "fdb-main")]) as running:
        yield running


def test_a_sigkilled_selenium_worker_leaves_no_browser_behind(browser_stack: Stack) -> None:
    stack = browser_stack
    worker = stack.start_worker("selenium", concurrency=1, node=f"fdb-sel-{uuid.uuid4().hex[:4]}")
    ctx = {**TRAINER, "chat_id": "fd-browser"}
    answer = stack.submit([{"type": "speech_selenium_elevenlabs",
                            "payload": {"message": "hello",
                                        "destinations": [{"interface": "outbox", "chat_id": "x"}]}}],
                          ctx)
    assert answer["accepted"], answer
    stack.wait_action(answer["accepted"][0]["id"], timeout=90)  # however it ended, a browser was started

    def browsers() -> set[int]:
        procs = _processes()
        return {p for p in _descendants(worker.pid, procs) if "rekku-browser-" in procs[p][2]}

    started = wait_until(browsers, timeout=30, what="the worker's Chromium")
    profile = re.search(r"rekku-browser-[^/ ]+", _processes()[min(started)][2]).group(0)
    # SIGKILL the worker's own processes (the main one and its pool child), as an OOM killer would
    procs = _processes()
    workers = {worker.pid} | {p for p in _descendants(worker.pid, procs)
                              if "rekku" in procs[p][2] and "rekku-browser-" not in procs[p][2]
                              and "chrom" not in procs[p][2]}
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    worker.wait(10)

    def leftovers() -> list[str]:
        return [f"{pid} {cmd[:120]}" for pid, (_, _, cmd) in _processes().items()
                if profile in cmd or (pid in started)]

    try:
        wait_until(lambda: not leftovers(), timeout=10, what="no Chromium/chromedriver of the killed worker")
    finally:
        for pid in started:  # never leave them to the rest of the run
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- 6. plugins
def _rekku(*args: str, home: Path, plugin_path: str | None) -> subprocess.CompletedProcess:
    env = child_env(REKKU_HOME=str(home), REKKU_BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/15",
                    REKKU_DATABASE_URL=f"sqlite:///{home / 'rekku.db'}", COLUMNS="400")
    if plugin_path is not None:
        env["REKKU_PLUGIN_PATH"] = plugin_path
    return subprocess.run([sys.executable, "-m", "rekku", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120)


def test_the_seed_example_is_loaded_only_when_asked_for(tmp_path: Path) -> None:
    default = _rekku("actions", home=tmp_path, plugin_path=None)
    assert default.returncode == 0, default.stderr
    assert "echo" in default.stdout and "my_action" not in default.stdout
    asked = _rekku("actions", home=tmp_path, plugin_path=EXAMPLES)
    assert asked.returncode == 0, asked.stderr
    assert "my_action" in asked.stdout


def _user_copy(directory: Path) -> Path:
    """A user's copy of the example in their own plugin folder, told apart by its description."""
    directory.mkdir()
    text = (ROOT / EXAMPLES / "seed_example.py").read_text()
    copy = directory / "seed_example.py"
    copy.write_text(text.replace("Execute my custom action with a value.", "The user's own copy."))
    return copy


def test_a_plugin_clash_is_one_clear_line_and_the_users_copy_wins(tmp_home: Path, tmp_path: Path) -> None:
    copy = _user_copy(tmp_path / "mine")
    path = os.pathsep.join([str(copy.parent), EXAMPLES])
    doctor = _rekku("doctor", home=tmp_path, plugin_path=path)
    out = doctor.stdout + doctor.stderr
    assert "Traceback" not in out, out
    assert "myplugin" in out and "already registered" in out, out

    home = tmp_home / f"fd-clash-{uuid.uuid4().hex[:4]}"
    home.mkdir()
    with running_stack("fdclash", home, "sqlite", {"REKKU_PLUGIN_PATH": path},
                       []) as stack:
        caps = stack.get("/v1/capabilities").json()
        clashes = [e for e in caps["errors"] if "myplugin" in e]
        assert len(clashes) == 1, caps["errors"]
        assert "already registered" in clashes[0] and "seed_example.py" in clashes[0], caps["errors"]
        assert caps["actions"]["my_action"]["instructions"]["description"] == "The user's own copy."
        log = (home / "logs" / "ingress.log").read_text()
        assert "Traceback" not in log, log
        assert len([line for line in log.splitlines() if "already registered" in line]) == 1, log


# ----------------------------------------------------------------------------- 1b. without the signing extra
#: Makes ``import cryptography`` fail in the process that loads it, as in a base install (``make run``
#: installs Rekku without the optional 'signing' extra, the only one that brings cryptography).
NO_CRYPTOGRAPHY = '''
import importlib.abc, sys

class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cryptography" or name.startswith("cryptography."):
            raise ModuleNotFoundError(f"No module named {name!r} (a base install)", name=name)
        return None

sys.meta_path.insert(0, _Absent())
'''


def test_a_plain_celery_client_is_answered_by_a_worker_without_the_signing_extra(tmp_path: Path) -> None:
    """``rekku.ingest`` used to import rekku.signing (and so cryptography) on every call, signing on or
    off: in a base install the README's plain Celery client got an ImportError back."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_CRYPTOGRAPHY)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PYTHONPATH": str(site)}
    with running_stack("nocrypto", home, "sqlite", env, []) as stack:
        stack.start_worker("default", concurrency=1, node="nocrypto", **env)
        app = Celery(broker=stack.broker_url, backend=stack.broker_url)
        try:
            body = {"actions": [{"type": "echo", "payload": {"text": "no-crypto"}}]}
            answer = app.send_task("rekku.ingest", kwargs={"body": body}).get(timeout=30)
        finally:
            app.close()
        assert answer["accepted"], answer
        assert stack.wait_action(answer["accepted"][0]["id"])["status"] == "succeeded"
