"""Selenium pool benchmark: browser reuse vs a fresh browser per action, same worker, same fake site.

    python -m bench.selenium [--actions 20] [--generate-delay 0.3]

Starts the fake text-to-speech site (tests/fakes/tts_site.py) on 127.0.0.1, an ingress and, one after
the other, a ``rekku worker --pool selenium --concurrency 1`` that reuses its browser
(``SELENIUM_MAX_ACTIONS=0``) and one that recycles it after every action (``SELENIUM_MAX_ACTIONS=1``,
so each action starts Chromium and logs in again). Each submits N ``speech_selenium_elevenlabs``
actions in one batch; the per-action time is (last ``finished_at`` − first ``started_at``) / N from
the action log. Prints the ratio reuse/fresh (target ≤ 0.3) and writes ``bench/results/selenium.json``.
Exit code 0 when the target is met, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import redis
import requests

from bench.stack import ROOT, free_port, wait_until
from rekku.supervisor import die_with_parent, signal_group

#: Redis db the selenium bench takes (the main bench uses 14).
BROKER_URL = "redis://127.0.0.1:6379/15"
#: Ratio reuse/fresh the pool must reach.
TARGET = 0.3
TRAINER = {"interface": "telegram_bot", "user_id": "42", "chat_id": "42"}


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)


def _stop(proc: subprocess.Popen) -> None:
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc, signal.SIGKILL)
    proc.wait(5)


def _ping(broker: str, node: str) -> bool:
    from celery import Celery

    app = Celery(broker=broker)
    try:
        return bool(app.control.ping([node], timeout=0.5))
    finally:
        app.close()


def measure(base: str, headers: dict, env: dict, home: Path, mode: str, max_actions: int, n: int) -> dict:
    node = f"bench-{mode}-{os.getpid()}"
    worker = _spawn([sys.executable, "-m", "rekku", "worker", "--pool", "selenium", "--concurrency", "1",
                     "--node", node], {**env, "SELENIUM_MAX_ACTIONS": str(max_actions)},
                    home / f"worker-{mode}.log")
    try:
        wait_until(lambda: _ping(env["REKKU_BROKER_URL"], f"selenium@{node}"), 90, f"selenium@{node}",
                   interval=0.3, alive=worker, log=home / f"worker-{mode}.log")
        actions = [{"type": "speech_selenium_elevenlabs",
                    "payload": {"message": f"Benchmark sentence number {i}.",
                                "destinations": [{"interface": "outbox", "chat_id": f"bench-{mode}"}]}}
                   for i in range(n)]
        resp = requests.post(base + "/v1/actions", json={"actions": actions, "context": TRAINER}, headers=headers,
                             timeout=30)
        resp.raise_for_status()
        batch = resp.json()["batch_id"]
        runs = wait_until(lambda: _finished(base, headers, batch), 60 + n * 15, f"the {mode} batch", interval=0.5,
                          alive=worker, log=home / f"worker-{mode}.log")
    finally:
        _stop(worker)
    failed = [r for r in runs if r["status"] != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} {mode} actions failed, e.g.: {failed[0]['error']}")
    start = min(datetime.fromisoformat(r["started_at"]) for r in runs)
    end = max(datetime.fromisoformat(r["finished_at"]) for r in runs)
    sessions = {r["result"]["browser"]["session"] for r in runs}
    return {"actions": n, "seconds": (end - start).total_seconds(),
            "per_action": (end - start).total_seconds() / n, "browsers": len(sessions)}


def _finished(base: str, headers: dict, batch: str) -> list[dict] | None:
    runs = requests.get(f"{base}/v1/batches/{batch}", headers=headers, timeout=30).json()["actions"]
    return runs if all(r["status"] in ("succeeded", "failed", "cancelled") for r in runs) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.selenium", description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=20, help="speech actions per mode (default 20)")
    parser.add_argument("--generate-delay", type=float, default=0.3, help="seconds the fake site takes to generate")
    parser.add_argument("--broker-url", default=BROKER_URL)
    args = parser.parse_args(argv)

    from tests.fakes.tts_site import FakeTTSSite

    site = FakeTTSSite().start()
    site.generate_delay = args.generate_delay
    home = Path(tempfile.mkdtemp(prefix="rekku-bench-selenium-"))
    lease = redis.Redis.from_url(args.broker_url.rsplit("/", 1)[0] + "/0")
    key = f"rekku-bench-lease:{args.broker_url.rsplit('/', 1)[1]}"
    if not lease.set(key, os.getpid(), nx=True, ex=3600):
        raise SystemExit(f"another bench run holds {args.broker_url}; pass --broker-url with another db")
    redis.Redis.from_url(args.broker_url).flushdb()
    token, port = uuid.uuid4().hex, free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REKKU_", "DB_", "TRAINER", "ELEVENLABS_"))}
    env.update(REKKU_HOME=str(home), REKKU_BROKER_URL=args.broker_url, REKKU_DATABASE_URL=f"sqlite:///{home}/r.db",
               REKKU_API_TOKEN=token, TRAINER_IDS="telegram_bot:42", ELEVENLABS_URL=site.url,
               ELEVENLABS_EMAIL=site.email, ELEVENLABS_PASSWORD=site.password, REKKU_LOG_LEVEL="WARNING",
               REKKU_ARTIFACT_DIR=str(home / "artifacts"), PYTHONUNBUFFERED="1")
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    ingress = _spawn([sys.executable, "-m", "rekku", "ingress", "--port", str(port)], env, home / "ingress.log")
    ok = False
    try:
        wait_until(lambda: _ready(base), 90, "the ingress", alive=ingress, log=home / "ingress.log")
        results = {"fresh": measure(base, headers, env, home, "fresh", 1, args.actions),
                   "reuse": measure(base, headers, env, home, "reuse", 0, args.actions)}
        ratio = results["reuse"]["per_action"] / results["fresh"]["per_action"]
        ok = ratio <= TARGET
        print(f"{'mode':<8}{'actions':>8}{'browsers':>10}{'total s':>10}{'per action s':>14}")
        for mode, r in results.items():
            print(f"{mode:<8}{r['actions']:>8}{r['browsers']:>10}{r['seconds']:>10.2f}{r['per_action']:>14.3f}")
        print(f"per-action time reuse/fresh = {ratio:.3f} (target ≤ {TARGET}) {'OK' if ok else 'MISSED'}")
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "selenium.json").write_text(json.dumps({
            "at": time.time(), "generate_delay": args.generate_delay, "results": results, "ratio": ratio,
            "target": TARGET, "met": ok}, indent=2))
    finally:
        _stop(ingress)
        site.stop()
        redis.Redis.from_url(args.broker_url).flushdb()
        lease.delete(key)
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"bench home kept (logs): {home}", file=sys.stderr)
    return 0 if ok else 1


def _ready(base: str) -> bool:
    try:
        return requests.get(base + "/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.exit(main())
