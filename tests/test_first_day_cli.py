"""A newcomer's first day (issue 14): only Rekku's documented variables configure it, and the CLI says
what it found — its version, which broker it checked, what is optional and what is broken — without
tracebacks or ``None``.

Every command runs as a real ``python -m rekku`` process with an environment built from scratch:
PATH, HOME pointing at an empty directory, the tree under test on PYTHONPATH (so it runs from any
directory), and generic variables that belong to the shell or a platform, not to Rekku.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import requests

from rekku.settings import Settings
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    TEST_PLUGINS,
    Stack,
    claim_redis_db,
    free_port,
    processes_mentioning,
    release_redis_db,
    settings_classes,
    wait_until,
)

#: Names a shell, a PaaS or another program sets for itself. Each is also a Settings *field* name;
#: none is a documented Rekku variable (those are REKKU_PORT, REKKU_DATABASE_URL, …).
GENERIC = {
    "HOST": "127.0.0.2",
    "API_TOKEN": "someone-elses-token",
    "LOG_LEVEL": "DEBUG",
    "WEBHOOK_URL": "http://127.0.0.1:9/hook",
    "BROKER_URL": "redis://127.0.0.1:9/0",
}


def clean_env(home: Path, junk: Path | None = None, **more: str) -> dict[str, str]:
    """PATH, an empty HOME, the tree under test; with ``junk`` (a directory nothing may touch), the
    generic variables too, pointing there."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(home), "PYTHONPATH": str(ROOT),
           "PYTHONUNBUFFERED": "1", "COLUMNS": "400", "LANG": "C.UTF-8"}
    if junk is not None:
        env.update(GENERIC, PORT=str(free_port()), DATABASE_URL=f"sqlite:///{junk / 'hijacked.db'}")
    env.update(more)
    return env


def rekku(*args: str, cwd: Path, env: dict[str, str], stdin: str | None = None,
          timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rekku", *args], cwd=str(cwd), env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def everything_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def day(tmp_path: Path) -> dict[str, Path]:
    """An empty HOME, an empty working directory, and a directory the generic variables point at."""
    dirs = {name: tmp_path / name for name in ("home", "work", "junk")}
    for path in dirs.values():
        path.mkdir()
    return dirs


def _row(out: str, needle: str) -> str:
    return next((line for line in out.splitlines() if needle in line), "")


# ----------------------------------------------------------------------------- 1. only documented names
def test_generic_variables_do_not_configure_rekku_state_goes_to_cwd_rekku(day: dict[str, Path]) -> None:
    """HOME, DATABASE_URL, PORT … in the environment: `rekku migrate` and `rekku doctor` still use
    ./.rekku under the working directory, and write nothing to HOME or where DATABASE_URL points."""
    env = clean_env(day["home"], day["junk"])
    migrated = rekku("migrate", cwd=day["work"], env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    done = rekku("doctor", cwd=day["work"], env=env)
    assert f"sqlite:///{day['work'] / '.rekku' / 'rekku.db'}" in done.stdout, done.stdout + done.stderr
    assert (day["work"] / ".rekku" / "rekku.db").is_file()
    assert everything_under(day["home"]) == [], "HOME must stay empty"
    assert everything_under(day["junk"]) == [], "DATABASE_URL is not Rekku's variable"
    assert "127.0.0.1:9" not in done.stdout  # BROKER_URL is not REKKU_BROKER_URL


def test_generic_variables_in_dot_env_are_ignored_documented_ones_are_read(day: dict[str, Path]) -> None:
    """`.env` in the working directory: the same rule, and its documented names still count."""
    (day["work"] / ".env").write_text(
        f"HOME={day['junk']}\nDATABASE_URL=sqlite:///{day['junk'] / 'hijacked.db'}\nPLUGIN_PATH=/nonexistent\n"
        f"LOG_FORMAT=not-a-format\nSIGNING_KEY=/nonexistent/key.pem\nREKKU_PLUGIN_PATH={TEST_PLUGINS}\n")
    env = clean_env(day["home"])
    listed = rekku("actions", cwd=day["work"], env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "tk_io" in listed.stdout  # REKKU_PLUGIN_PATH from .env was read
    migrated = rekku("migrate", cwd=day["work"], env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert (day["work"] / ".rekku" / "rekku.db").is_file()
    assert everything_under(day["home"]) == [] and everything_under(day["junk"]) == []


def test_field_names_with_invalid_values_in_the_environment_break_nothing(day: dict[str, Path]) -> None:
    """A field name set to a value Rekku would refuse (LOG_FORMAT, SIGNING_KEY…) is not Rekku's: ignored."""
    env = clean_env(day["home"], LOG_FORMAT="not-a-format", SIGNING_KEY="/nonexistent/key.pem",
                    PLUGIN_PATH="/nonexistent", WORKER_CONCURRENCY="many", TERMINAL_RUN_AS="nobody-here",
                    REKKU_PLUGIN_PATH=str(TEST_PLUGINS))
    done = rekku("actions", cwd=day["work"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration" not in done.stderr and "tk_io" in done.stdout
    assert everything_under(day["home"]) == []


def test_a_plugins_invalid_variable_is_named_and_skips_that_plugin_alone(day: dict[str, Path]) -> None:
    """TERMINAL_MAX_TIMEOUT is the terminal plugin's (its settings_class): a wrong value is one line
    naming it, the terminal actions are gone, and every other plugin's are there."""
    done = rekku("actions", cwd=day["work"], env=clean_env(day["home"], TERMINAL_MAX_TIMEOUT="-1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configuration: TERMINAL_MAX_TIMEOUT: Input should be greater than 0" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert "terminal_list_sessions" not in done.stdout
    assert "create_personal_diary_entry" in done.stdout and "list_events" in done.stdout


def test_ingress_listens_on_rekku_port_with_the_token_in_cwd_rekku(day: dict[str, Path]) -> None:
    """`rekku ingress` with PORT, HOST and API_TOKEN set for someone else: it binds 127.0.0.1:REKKU_PORT,
    its token is the one generated into ./.rekku/api_token, and HOME stays empty."""
    db = claim_redis_db()
    port = free_port()
    env = clean_env(day["home"], day["junk"], REKKU_PORT=str(port),
                    REKKU_BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}")
    log = day["work"].parent / "ingress.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rekku", "ingress"], cwd=str(day["work"]), env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(base + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=60, what="the ingress on 127.0.0.1:REKKU_PORT")
        token = (day["work"] / ".rekku" / "api_token").read_text().strip()
        assert token != GENERIC["API_TOKEN"]
        caps = requests.get(base + "/v1/capabilities", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert caps.status_code == 200, caps.text
        other = requests.get(base + "/v1/capabilities", timeout=10,
                             headers={"Authorization": f"Bearer {GENERIC['API_TOKEN']}"})
        assert other.status_code == 401
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{env['PORT']}/healthz", timeout=2)
        assert everything_under(day["home"]) == [] and everything_under(day["junk"]) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        release_redis_db(db)


def test_celery_s_own_variables_do_not_redirect_rekku(day: dict[str, Path]) -> None:
    """Found by the suite's junk environment (tests/support.py SHELL_JUNK): Celery takes CELERY_BROKER_URL
    and CELERY_RESULT_BACKEND from the environment before its configuration, so a shell that set them
    (for another Celery app) moved Rekku's ingress and workers to that broker. Rekku's Celery app uses
    REKKU_BROKER_URL for broker and result backend whatever Celery's own variables say, and says so."""
    ours = "redis://127.0.0.1:6379/13"
    env = clean_env(day["home"], REKKU_BROKER_URL=ours, CELERY_BROKER_URL="redis://127.0.0.1:9/0",
                    CELERY_RESULT_BACKEND="redis://127.0.0.1:9/0", CELERY_BROKER_WRITE_URL="redis://127.0.0.1:9/0")
    done = subprocess.run([sys.executable, "-c", "from rekku.celery_app import app; "
                           "print(app.conf.broker_url); print(app.conf.result_backend)"],
                          cwd=str(day["work"]), env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [ours, ours]
    assert "CELERY_BROKER_URL is set in the environment and ignored" in done.stderr


@pytest.mark.slow
def test_rekku_up_with_an_empty_home_writes_only_under_cwd_rekku(day: dict[str, Path]) -> None:
    """What `make run` does on a fresh clone: with HOME an empty directory (and generic variables set),
    `rekku up` serves a request and stops on Ctrl-C, and everything it wrote is under ./.rekku."""
    port, flower_port = free_port(), free_port()
    env = clean_env(day["home"], day["junk"], REKKU_PORT=str(port), FLOWER_PORT=str(flower_port))
    log = day["work"].parent / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rekku", "up"], cwd=str(day["work"]), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(base + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=90, what="rekku up to be ready")
        state = day["work"] / ".rekku"
        token = (state / "api_token").read_text().strip()
        assert token in log.read_text()
        headers = {"Authorization": f"Bearer {token}"}
        resp = requests.post(base + "/v1/actions", headers=headers, timeout=10,
                             json={"actions": [{"type": "echo", "payload": {"text": "first day"}}]})
        assert resp.status_code == 202, resp.text
        action = resp.json()["accepted"][0]["id"]
        run = requests.get(f"{base}/v1/actions/{action}", params={"wait": 60}, headers=headers, timeout=70).json()
        assert run["status"] == "succeeded", run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        code = proc.wait(60)
    assert code == 0, log.read_text()
    # nothing of rekku up is left that could still write (every process it started had HOME there)
    wait_until(lambda: not processes_mentioning(day["home"]), what="every process rekku up started to exit")
    assert everything_under(day["home"]) == [], "HOME must stay empty"
    assert everything_under(day["junk"]) == []
    assert [p.name for p in day["work"].iterdir()] == [".rekku"], "only ./.rekku is written"
    written = everything_under(day["work"] / ".rekku")
    assert {"api_token", "flower_auth", "rekku.db"} <= set(written), written


def test_settings_fields_all_have_a_documented_name_and_code_may_still_use_field_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(settings_classes()) > 1  # the core's, and the bundled plugins' own
    missing = [f"{cls.__name__}.{name}" for cls in settings_classes()
               for name, field in cls.model_fields.items() if field.validation_alias is None]
    assert not missing, f"settings fields without a documented variable (validation_alias): {missing}"
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("REKKU_PORT", raising=False)
    monkeypatch.delenv("REKKU_HOME", raising=False)
    assert Settings(_env_file=None).port == 8000 and Settings(_env_file=None).home == Path(".rekku")
    by_name = Settings(_env_file=None, home=tmp_path, port=8123, api_token="t")
    assert (by_name.home, by_name.port, by_name.api_token) == (tmp_path, 8123, "t")
    by_variable = Settings(_env_file=None, REKKU_HOME=str(tmp_path), REKKU_PORT="8124")
    assert (by_variable.home, by_variable.port) == (tmp_path, 8124)


# ----------------------------------------------------------------------------- 2. the CLI
def test_version_prints_the_installed_distribution_version(day: dict[str, Path]) -> None:
    done = rekku("--version", cwd=day["work"], env=clean_env(day["home"]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rekku {version('rekku-on-celery')}"
    assert everything_under(day["work"]) == [] and everything_under(day["home"]) == []


def test_doctor_without_a_broker_says_so_and_which_url_it_checked(day: dict[str, Path]) -> None:
    """No REKKU_BROKER_URL and no embedded Redis: doctor does not pass off local Redis as configured."""
    done = rekku("doctor", cwd=day["work"], env=clean_env(day["home"]))
    row = _row(done.stdout, "broker")
    assert "no broker configured and no embedded Redis running (rekku up)" in row, done.stdout + done.stderr
    assert "checked redis://127.0.0.1:6379/0" in row
    assert " ok " not in row


def test_doctor_names_the_broker_it_checked_without_its_password_and_fails_with_exit_1(
        day: dict[str, Path]) -> None:
    env = clean_env(day["home"], REKKU_BROKER_URL="redis://rekku:hunter2secret@127.0.0.1:1/3")
    done = rekku("doctor", cwd=day["work"], env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    row = _row(done.stdout, "broker")
    assert "FAIL" in row and "redis://rekku:***@127.0.0.1:1/3" in row and "REKKU_BROKER_URL" in row, done.stdout
    assert "hunter2secret" not in done.stdout + done.stderr


def test_doctor_reports_missing_optional_configuration_as_info_and_exits_0(day: dict[str, Path]) -> None:
    """A working setup without Telegram: the Telegram actions are 'not configured' (info), not a failure."""
    db = claim_redis_db()
    try:
        env = clean_env(day["home"], REKKU_BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}")
        assert rekku("migrate", cwd=day["work"], env=env).returncode == 0
        done = rekku("doctor", cwd=day["work"], env=env)
    finally:
        release_redis_db(db)
    assert done.returncode == 0, done.stdout + done.stderr
    row = _row(done.stdout, "TELEGRAM_BOT_TOKEN")
    assert "info" in row and "warn" not in row and "FAIL" not in row, done.stdout
    assert "FAIL" not in done.stdout
    assert "ok" in _row(done.stdout, "broker") and f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}" in done.stdout


def test_status_stuck_on_an_unmigrated_database_says_to_run_migrate(day: dict[str, Path]) -> None:
    done = rekku("status", "--stuck", cwd=day["work"], env=clean_env(day["home"]))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "rekku migrate" in done.stderr, done.stderr


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_submit_refused_with_403_prints_the_reason_not_none(stack: Stack, day: dict[str, Path]) -> None:
    """The test gatekeeper plugin blocks 'blocked-user': the ingress answers 403 with the reason in
    rejected[0].errors, and that is what `rekku submit` prints."""
    env = stack.env(REKKU_PORT=str(stack.port), REKKU_HOST="127.0.0.1", COLUMNS="200")
    reply = json.dumps([{"type": "echo", "payload": {"text": "hi"}}])
    done = subprocess.run([sys.executable, "-m", "rekku", "submit", "-", "--context",
                           '{"user_id": "blocked-user", "chat_id": "c1"}'], input=reply, capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "403" in done.stderr and "User blocked-user is blocked" in done.stderr, done.stderr
    assert "None" not in done.stderr
