"""`rekku up` on embedded defaults (bundled Redis, SQLite) serves a request and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests
import sqlalchemy as sa

from tests.support import ROOT, child_env, free_port, on_its_way_out, processes_mentioning, wait_until


def test_rekku_up_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port, flower_port = free_port(), free_port()
    env = child_env(REKKU_HOME=str(home), REKKU_PORT=str(port), FLOWER_PORT=str(flower_port), PYTHONUNBUFFERED="1",
                    REKKU_PLUGIN_PATH=str(ROOT / "tests" / "plugins"))
    out = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rekku", "up"], env=env, cwd=str(ROOT), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return requests.get(base + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                assert proc.poll() is None, (tmp_path / "up.log").read_text()
                return False

        wait_until(ready, timeout=90, what="rekku up to be ready")
        printed = (tmp_path / "up.log").read_text()
        token = (home / "api_token").read_text().strip()
        assert token in printed and f"http://127.0.0.1:{port}" in printed  # URLs and token are shown
        assert "(embedded)" in printed and "sqlite" in printed
        assert f"http://127.0.0.1:{port}/ui" in printed and requests.get(base + "/ui", timeout=5).status_code == 200
        headers = {"Authorization": f"Bearer {token}"}
        resp = requests.post(base + "/v1/actions", headers=headers, timeout=10,
                             json={"actions": [{"type": "echo", "payload": {"text": "up"}}]})
        assert resp.status_code == 202, resp.text
        action_id = resp.json()["accepted"][0]["id"]
        run = requests.get(f"{base}/v1/actions/{action_id}", params={"wait": 60}, headers=headers, timeout=70).json()
        assert run["status"] == "succeeded" and run["result"] == {"text": "up"}

        flower = f"http://127.0.0.1:{flower_port}/"
        wait_until(lambda: _status(flower) is not None, timeout=30, what="flower")
        assert _status(flower) == 401  # Flower is never open
        user, password = (home / "flower_auth").read_text().strip().split(":", 1)
        assert requests.get(flower, auth=(user, password), timeout=5).status_code == 200

        # Ctrl-C while an action runs: it finishes instead of being left 'running'.
        resp = requests.post(base + "/v1/actions", headers=headers, timeout=10,
                             json={"actions": [{"type": "tk_sleep", "payload": {"seconds": 2}}]})
        sleeper = resp.json()["accepted"][0]["id"]
        wait_until(lambda: (home / "testkit" / f"{sleeper}.log").exists(), timeout=30, what="the sleep to start")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(60)
    assert code == 0, (tmp_path / "up.log").read_text()
    # rekku up returns only once it has stopped everything it started: what /proc still shows of it
    # now must be on its way out (SIGKILLed), never still running or merely asked to stop
    left = processes_mentioning(home)
    assert all(on_its_way_out(pid) for pid in left), left
    wait_until(lambda: not processes_mentioning(home), what=f"the killed processes to be gone: {left}")
    assert not (home / "embedded-redis.url").exists()
    engine = sa.create_engine(f"sqlite:///{home / 'rekku.db'}")
    with engine.connect() as conn:
        states = dict(conn.execute(sa.text("SELECT status, COUNT(*) FROM action_runs GROUP BY status")).all())
    engine.dispose()
    assert states == {"succeeded": 2}, states


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=3).status_code
    except requests.ConnectionError:
        return None
