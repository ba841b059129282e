"""/metrics with an ingress of several processes (``rekku ingress --workers 2``), and the gauges operators
alert on, against a real stack (Redis, SQLite, Celery workers): rekku/metrics.py, rekku/metrics_gauges.py."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import Stack, claim_redis_db, release_redis_db, stop_process, wait_until

#: Scrapes compared: each is a new connection, so the kernel hands them to either process.
SCRAPES = 12


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a scrape (labels in any order), None when it is not there."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


@pytest.fixture(scope="module")
def two_process_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An ingress of two uvicorn processes, on its own Redis db and SQLite file; no worker yet. Its
    REKKU_RECONCILE_GRACE is 1 s so an action waiting longer counts as stuck at once."""
    home = tmp_path_factory.mktemp("metrics-mp")
    stack = Stack("metrics-mp", home, f"sqlite:///{home / 'rekku.db'}", claim_redis_db(),
                  extra_env={"REKKU_RECONCILE_GRACE": "1"})
    try:
        stack.spawn("ingress", "--port", str(stack.port), "--workers", "2", log_name="ingress")
        wait_until(stack._ready, timeout=60, what="the two-process ingress")
        yield stack
    finally:
        stack.stop()
        release_redis_db(stack.redis_db)


def scrape(stack: Stack) -> str:
    resp = requests.get(stack.base_url + "/metrics", headers=stack.headers, timeout=30)  # a new connection each
    assert resp.status_code == 200, resp.text
    return resp.text


def test_counters_are_the_same_on_every_scrape_of_a_multiprocess_ingress(two_process_stack: Stack) -> None:
    stack = two_process_stack
    kind = f"mp_{uuid.uuid4().hex[:6]}"
    before = sample(scrape(stack), "rekku_actions_accepted_total", type="echo") or 0.0
    requests_sent = 40
    for _ in range(requests_sent):  # a new connection each: both processes take some
        resp = requests.post(stack.base_url + "/v1/actions", headers=stack.headers, timeout=30,
                             json={"actions": [{"type": "echo", "payload": {}}, {"type": kind, "payload": {}}]})
        assert resp.status_code == 202, resp.text
    seen = []
    for _ in range(SCRAPES):
        text = scrape(stack)
        seen.append((sample(text, "rekku_actions_accepted_total", type="echo"),
                     sample(text, "rekku_actions_rejected_total", type="(unknown)")))
    assert all(accepted == before + requests_sent for accepted, _ in seen), seen
    assert all(rejected is not None and rejected >= requests_sent for _, rejected in seen), seen
    assert len(set(seen)) == 1, seen  # nothing else happened: every scrape says the same
    metrics_dir = stack.home / "metrics" / f"ingress-{stack.port}"
    assert metrics_dir.stat().st_mode & 0o777 == 0o700
    assert len(list(metrics_dir.glob("counter_*.db"))) == 2  # one file of counters per process


def test_the_metrics_directory_is_emptied_when_the_ingress_starts(tmp_path: Path) -> None:
    """Counts of an earlier run are not added to this run's (the directory is made anew, private)."""
    from rekku.metrics import MULTIPROC_VARIABLE, use_multiprocess_dir
    from rekku.settings import Settings

    settings = Settings(home=tmp_path / "home")
    stale = tmp_path / "home" / "metrics" / "ingress-9999"
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"old")
    saved = os.environ.get(MULTIPROC_VARIABLE)
    try:
        path = use_multiprocess_dir(settings, 9999)
        assert os.environ[MULTIPROC_VARIABLE] == str(path) == str(stale.resolve())
    finally:
        if saved is None:
            os.environ.pop(MULTIPROC_VARIABLE, None)
        else:
            os.environ[MULTIPROC_VARIABLE] = saved
    assert list(path.iterdir()) == [] and path.stat().st_mode & 0o777 == 0o700
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_a_queued_action_without_a_worker_ages_counts_as_stuck_and_a_worker_takes_it(two_process_stack: Stack) -> None:
    stack = two_process_stack
    text = scrape(stack)
    assert sample(text, "rekku_workers_up", pool="io") == 0  # every pool has a sample, 0 without a worker
    answer = stack.submit([{"type": "tk_io", "payload": {}}])
    action_id = answer["accepted"][0]["id"]
    first = wait_until(lambda: (age := sample(scrape(stack), "rekku_oldest_queued_action_seconds", pool="io"))
                       and age > 1 and age, timeout=30, what="the io action to be waiting for over a second")
    text = wait_until(lambda: (t := scrape(stack)) and
                      (sample(t, "rekku_oldest_queued_action_seconds", pool="io") or 0) > first + 0.5 and t,
                      timeout=30, what="the queued io action to age")
    stuck = sample(text, "rekku_stuck_actions", status="queued")
    assert stuck is not None and stuck >= 1  # untouched for longer than the grace
    worker = stack.start_worker("io", concurrency=1, node=f"mp-io-{uuid.uuid4().hex[:4]}")
    try:
        assert stack.wait_action(action_id)["status"] == "succeeded"
        text = wait_until(lambda: (t := scrape(stack)) and sample(t, "rekku_workers_up", pool="io") == 1 and t,
                          what="the io worker's heartbeat to count")
        assert sample(text, "rekku_oldest_queued_action_seconds", pool="io") == 0
        assert sample(text, "rekku_stuck_actions", status="queued") == stuck - 1
    finally:
        stop_process(worker)
    wait_until(lambda: sample(scrape(stack), "rekku_workers_up", pool="io") == 0, timeout=60,
               what="the stopped worker to stop counting")


def test_a_failed_action_is_a_dead_letter(two_process_stack: Stack) -> None:
    stack = two_process_stack
    worker = stack.start_worker("default", concurrency=1, node=f"mp-default-{uuid.uuid4().hex[:4]}")
    try:
        before = sample(scrape(stack), "rekku_dead_letters")
        assert before is not None
        assert stack.run("tk_fail", {"message": "for the dead letters"})["status"] == "failed"
        assert stack.run("echo", {})["status"] == "succeeded"  # a success is not one
        assert sample(scrape(stack), "rekku_dead_letters") == before + 1
    finally:
        stop_process(worker)


def test_a_terminal_node_makes_its_own_queue_up(two_process_stack: Stack) -> None:
    stack = two_process_stack
    node = f"mp-term-{uuid.uuid4().hex[:4]}"
    assert sample(scrape(stack), "rekku_workers_up", pool=f"terminal.{node}") is None
    worker = stack.start_worker("terminal", concurrency=1, node=node)
    try:
        text = wait_until(lambda: (t := scrape(stack)) and sample(t, "rekku_workers_up", pool=f"terminal.{node}") == 1
                          and t, what="the terminal node's own queue to count as up")
        assert (sample(text, "rekku_workers_up", pool="terminal") or 0) >= 1
    finally:
        stop_process(worker)
