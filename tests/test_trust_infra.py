"""Issue 13: who else on the machine (or in Flower, or in the logs) can reach what Rekku holds.

Black-box, real processes: `rekku up` on its embedded defaults, tried from another local user
(``nobody``); and a stack at DEBUG with the chat fakes and a terminal worker under TERMINAL_ALLOW.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import requests
import sqlalchemy as sa
from celery import Celery

from rekku.action_log import ActionLog, NewRun
from tests.conftest import TELEGRAM_TOKEN, TRAINER, running_stack
from tests.support import ROOT, Stack, child_env, free_port, wait_until


# ----------------------------------------------------------------------------- `rekku up`, seen by other users
@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`rekku up` on embedded Redis and SQLite, in a REKKU_HOME that already existed open to everyone
    (0755, as `mkdir` under umask 022 leaves it), after it has run an action."""
    base = tmp_path_factory.mktemp("up")
    home = base / "home"
    home.mkdir()
    home.chmod(0o755)
    port, flower_port = free_port(), free_port()
    env = child_env(REKKU_HOME=str(home), REKKU_PORT=str(port), FLOWER_PORT=str(flower_port), PYTHONUNBUFFERED="1",
                    REKKU_PLUGIN_PATH=str(ROOT / "tests" / "plugins"))
    printed = base / "up.log"
    with open(printed, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rekku", "up"], env=env, cwd=str(ROOT), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, printed.read_text()
            try:
                return requests.get(api + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=90, what="rekku up to be ready")
        headers = {"Authorization": f"Bearer {(home / 'api_token').read_text().strip()}"}
        resp = requests.post(api + "/v1/actions", headers=headers, timeout=10,
                             json={"actions": [{"type": "echo", "payload": {"text": "private"}}]})
        assert resp.status_code == 202, resp.text
        action_id = resp.json()["accepted"][0]["id"]
        run = requests.get(f"{api}/v1/actions/{action_id}", params={"wait": 60}, headers=headers, timeout=70).json()
        assert run["status"] == "succeeded", run
        flower = f"http://127.0.0.1:{flower_port}"
        flower_auth = tuple((home / "flower_auth").read_text().strip().split(":", 1))
        wait_until(lambda: _status(flower + "/", auth=flower_auth) == 200, timeout=60, what="flower")
        yield {"home": home, "env": env, "api": api, "headers": headers, "action_id": action_id,
               "flower": flower, "flower_auth": flower_auth, "printed": printed, "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)


def _status(url: str, **kwargs: object) -> int | None:
    try:
        return requests.get(url, timeout=5, **kwargs).status_code
    except requests.ConnectionError:
        return None


def _as_nobody(script: str, *args: str) -> subprocess.CompletedProcess:
    """``bash -c script`` as the local user nobody (not root, not Rekku's user)."""
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(["bash", "-c", script, "as-nobody", *args], user=nobody.pw_uid, group=nobody.pw_gid,
                          extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=30)


#: Talks to a Redis server in its inline protocol through bash's /dev/tcp (no client library needed).
#: (It pushes to a list nobody consumes: before the fix, junk pushed on a worker's queue stopped `rekku up`.)
_REDIS_SESSION = r"""
exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 7
printf 'PING\r\nLPUSH rekku-intruder x\r\nKEYS *\r\nLRANGE default 0 -1\r\nQUIT\r\n' >&3
timeout 10 cat <&3
"""


def _embedded_url(home: Path) -> str:
    return (home / "embedded-redis.url").read_text().strip()


def test_another_local_user_cannot_use_the_embedded_redis_and_rekku_commands_still_can(up: dict) -> None:
    url = _embedded_url(up["home"])
    session = _as_nobody(_REDIS_SESSION, str(urlsplit(url).port))
    replies = [line for line in session.stdout.splitlines() if line.strip()]
    # PING, LPUSH, KEYS, LRANGE all refused; only QUIT answers +OK
    assert replies[:4] == ["-NOAUTH Authentication required."] * 4, session
    assert replies[4:] == ["+OK"], session
    # nobody cannot read the URL (and its password) either
    reader = _as_nobody('cat "$1"', str(up["home"] / "embedded-redis.url"))
    assert reader.returncode != 0 and "redis://" not in reader.stdout
    # while every part `rekku up` started uses it (the fixture ran an action), and so do the CLI's commands
    env = {**up["env"], "COLUMNS": "250"}
    doctor = subprocess.run([sys.executable, "-m", "rekku", "doctor"], env=env, cwd=str(ROOT), capture_output=True,
                            text=True, timeout=120)
    broker = [line for line in doctor.stdout.splitlines() if "broker" in line]
    assert broker and "ok" in broker[0] and "FAIL" not in broker[0], doctor.stdout + doctor.stderr
    assert urlsplit(url).password not in doctor.stdout + doctor.stderr
    status = subprocess.run([sys.executable, "-m", "rekku", "status", up["action_id"]], env=env, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded", status.stderr


def test_the_broker_password_is_in_no_log_command_line_environment_or_flower_page(up: dict) -> None:
    url = _embedded_url(up["home"])
    password = urlsplit(url).password
    assert password and len(password) >= 32
    home = up["home"]
    logs = sorted(home.glob("logs/*.log")) + sorted(home.glob("redis/*.log"))
    assert len(logs) >= 8, logs  # ingress, 4 workers, beat, flower, redis
    # no file but the recorded URL holds it: not a log, not the AOF, not the database; nor the printout
    for path in [up["printed"], *(p for p in home.rglob("*") if p.is_file() and p.name != "embedded-redis.url")]:
        assert password.encode() not in path.read_bytes(), path
    assert "(embedded)" in up["printed"].read_text()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert "redis-server" in ps and password not in ps and "requirepass" not in ps
    for pid in filter(str.isdigit, os.listdir("/proc")):  # handed to no child through its environment either
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        assert password.encode() not in environ, pid
    auth = up["flower_auth"]
    workers = requests.get(up["flower"] + "/api/workers", auth=auth, timeout=30).json()
    pages = ["/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks", "/metrics"]
    pages += [f"/worker/{name}" for name in workers]
    for page in pages:
        resp = requests.get(up["flower"] + page, auth=auth, timeout=30)
        assert resp.status_code == 200 and password not in resp.text, page


def test_rekku_home_and_everything_in_it_is_private(up: dict) -> None:
    home = up["home"]
    assert (home / "rekku.db").exists() and any((home / "redis").rglob("*.aof*")) and any(home.glob("logs/*.log"))
    open_to_others = []
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            open_to_others.append(f"{path.relative_to(home.parent)} {mode:o}")
    assert open_to_others == []
    assert _as_nobody('ls "$1"', str(home)).returncode != 0


def test_flower_metrics_and_healthcheck_need_the_credentials(up: dict) -> None:
    for page in ("/metrics", "/healthcheck"):
        assert _status(up["flower"] + page) == 401, page
        assert _status(up["flower"] + page, auth=("rekku", "wrong")) == 401, page
        assert _status(up["flower"] + page, auth=up["flower_auth"]) == 200, page
    assert "flower_events_total" in requests.get(up["flower"] + "/metrics", auth=up["flower_auth"], timeout=10).text


# ----------------------------------------------------------------------------- a stack at DEBUG
#: A Discord channel the trust stack reaches through DISCORD_WEBHOOK_URLS.
TRUST_CHANNEL = "4001"
#: What TERMINAL_ALLOW lets the trust stack's terminal commands run.
ALLOWED = "ls,cat,printf,echo"


@pytest.fixture(scope="module")
def trust_stack(tmp_path_factory: pytest.TempPathFactory, fakes: dict) -> Iterator[Stack]:
    """SQLite, an ingress, a default, an io and a terminal worker, logging at DEBUG, with Telegram and
    Discord against the fakes and TERMINAL_ALLOW set."""
    home = tmp_path_factory.mktemp("trust")
    env = {"TRAINER_IDS": "telegram_bot:42", "REKKU_LOG_LEVEL": "DEBUG", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
           "TELEGRAM_API_URL": fakes["telegram"].url, "DISCORD_WEBHOOK_URL": fakes["discord"].webhook_url,
           "DISCORD_WEBHOOK_URLS": f"{TRUST_CHANNEL}={fakes['discord'].add_webhook(TRUST_CHANNEL)}",
           "REKKU_INTERFACE_TIMEOUT": "5", "TERMINAL_ALLOW": ALLOWED}
    with running_stack("trust", home, "sqlite", env, [("default", 1, "trust-main"), ("io", 2, "trust-io"),
                                                      ("terminal", 2, "trust-term")]) as stack:
        yield stack


def test_debug_logs_carry_no_bot_token_nor_webhook_secret(trust_stack: Stack, fakes: dict) -> None:
    fakes["telegram"].reset()
    fakes["discord"].reset()
    chat = str(-200_000_000 - uuid.uuid4().int % 1_000_000)
    telegram = trust_stack.run("message_telegram_bot", {"text": "debug hello", "target": chat},
                               {"interface": "telegram_bot", "chat_id": chat})
    assert telegram["status"] == "succeeded", telegram
    assert fakes["telegram"].sends(chat), "the message did not reach the fake Bot API"
    for channel in ("chan", TRUST_CHANNEL):  # DISCORD_WEBHOOK_URL's channel, and one of DISCORD_WEBHOOK_URLS
        discord = trust_stack.run("message_discord_bot", {"text": "debug hello", "target": channel}, timeout=40)
        assert discord["status"] == "succeeded", discord
    webhook_paths = [path for path, channel in fakes["discord"].webhooks.items() if channel in ("chan", TRUST_CHANNEL)]
    assert len(webhook_paths) >= 2
    logs = sorted((trust_stack.home / "logs").glob("*.log"))
    io_log = next(p for p in logs if "worker-io" in p.name).read_text(errors="replace")
    assert io_log.count('"POST ') >= 3 and "sendMessage" in io_log  # urllib3 did log the request lines
    webhook_secrets = [part for path in webhook_paths for part in (path, path.rsplit("/", 1)[1])]
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in (TELEGRAM_TOKEN, *webhook_secrets, trust_stack.token):
            assert secret not in text, f"{secret!r} in {path.name}"


class TaskEvents:
    """Every Celery task event on ``broker_url`` while in the ``with`` block (what Flower would see)."""

    def __init__(self, broker_url: str) -> None:
        self.events: list[dict] = []
        self.app = Celery(broker=broker_url)
        self.conn = self.app.connection()
        self.receiver = self.app.events.Receiver(self.conn, handlers={"*": self.events.append})
        self.thread = threading.Thread(target=self.receiver.capture, daemon=True,
                                       kwargs={"limit": None, "timeout": None, "wakeup": False})

    def __enter__(self) -> TaskEvents:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(15)
        self.conn.release()
        self.app.close()

    def of(self, task_id: str, kind: str | None = None) -> list[dict]:
        return [e for e in list(self.events) if e.get("uuid") == task_id and kind in (None, e["type"])]


def _redis_values(client: redis.Redis) -> str:
    """Every value in the stack's Redis db (queues, results, progress), as one string."""
    shown = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        value = {b"string": lambda: client.get(key), b"list": lambda: client.lrange(key, 0, -1),
                 b"hash": lambda: client.hgetall(key), b"set": lambda: client.smembers(key),
                 b"zset": lambda: client.zrange(key, 0, -1)}.get(kind, lambda: b"")()
        shown.append(f"{key!r}: {value!r}")
    return "\n".join(shown)


def test_terminal_output_stays_out_of_celery_events_results_and_logs(trust_stack: Stack) -> None:
    with TaskEvents(trust_stack.broker_url) as seen:
        def events_flow() -> bool:  # the receiver listens only once its queue is bound: probe until it sees one
            probe = trust_stack.run("echo", {"text": "probe"})["id"]
            return wait_until(lambda: seen.of(probe, "task-succeeded"), timeout=3, what="the probe's event")

        wait_until(lambda: _quietly(events_flow), timeout=60, interval=0.2, what="task events to flow")
        left, right = secrets.token_hex(6), secrets.token_hex(6)
        marker = f"out-{left}-{right}"  # what the command prints; the command itself never spells it
        run = trust_stack.run("terminal", {"command": f"printf 'out-%s-%s\\n' {left} {right}"}, TRAINER)
        assert run["status"] == "succeeded" and run["result"]["stdout"] == marker + "\n", run
        assert marker in trust_stack.get(f"/v1/actions/{run['id']}").text  # the action log has it
        wait_until(lambda: seen.of(run["id"], "task-succeeded"), timeout=30, what="the terminal task's event")
    assert {"task-received", "task-started", "task-succeeded"} <= {e["type"] for e in seen.of(run["id"])}
    assert marker not in json.dumps(seen.events, default=str)
    assert marker not in _redis_values(redis.Redis.from_url(trust_stack.broker_url))
    for path in (trust_stack.home / "logs").glob("*.log"):
        assert marker not in path.read_text(errors="replace"), path.name


def _quietly(check: object) -> bool:
    try:
        return bool(check())  # type: ignore[operator]
    except AssertionError:
        return False


def _send_past_the_ingress(stack: Stack, payload: dict) -> dict:
    """Log and enqueue a terminal action as the ingress would, without its validation."""
    action_id, batch_id = str(uuid.uuid4()), str(uuid.uuid4())
    ActionLog(sa.create_engine(stack.database_url)).record_batch(
        batch_id, None, [NewRun(action_id, 0, "terminal", "terminal", payload, TRAINER)], {})
    app = Celery(broker=stack.broker_url)
    try:
        app.send_task("rekku.action.terminal", kwargs={"action_id": action_id, "payload": payload,
                                                       "context": {**TRAINER, "batch_id": batch_id}},
                      task_id=action_id, queue="terminal")
    finally:
        app.close()
    return stack.wait_action(action_id)


def test_terminal_allow_refuses_shell_syntax_that_runs_other_programs(trust_stack: Stack, tmp_path: Path) -> None:
    target = tmp_path / "cron-x"
    bypasses = ["ls <(id)", 'cat <<<"$(id)"', f"ls > {target}"]
    answer = trust_stack.post("/v1/actions", {"actions": [{"type": "terminal", "payload": {"command": c}}
                                                          for c in bypasses], "context": TRAINER})
    assert answer.status_code == 422, answer.text
    rejected = answer.json()["rejected"]
    assert [r["index"] for r in rejected] == [0, 1, 2] and not answer.json()["accepted"]
    for r in rejected:
        assert "shell syntax that TERMINAL_ALLOW does not permit" in r["errors"][0], r
    # the terminal worker checks again: past the ingress, the redirection is refused and nothing is written
    run = _send_past_the_ingress(trust_stack, {"command": f"ls > {target}"})
    assert run["status"] == "failed" and "TERMINAL_ALLOW" in run["error"], run
    assert not target.exists()
    # a plain allowed command (and a pipeline of allowed ones) still runs
    plain = trust_stack.run("terminal", {"command": f"ls -d '{ROOT}' | cat"}, TRAINER)
    assert plain["status"] == "succeeded" and plain["result"]["stdout"] == f"{ROOT}\n", plain
    denied = trust_stack.submit([{"type": "terminal", "payload": {"command": "ls; id"}}], TRAINER)
    assert "not allowed on this system (id)" in denied["rejected"][0]["errors"][0]
