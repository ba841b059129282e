"""Adversarial tests of worker incarnations, dead-node recovery and poison messages (issue 14).

Black box, as an operator would hurt it: two live workers sharing a node name, a cancel while a node
is dead, a flushed broker, pool processes killed repeatedly, two reconciler passes at once. Real
processes, a real broker and database; nothing is mocked. Each test
waits for positive evidence (an outcome, a journal line) rather than sleeping and asserting that
nothing happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    Stack,
    stop_process,
    wait_until,
)


# ----------------------------------------------------------------------------- helpers
def _broker(stack: Stack) -> redis.Redis:
    return redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)


def _action(stack: Stack, action_id: str) -> dict:
    return stack.get(f"/v1/actions/{action_id}").json()


def _status(stack: Stack, action_id: str) -> str:
    return _action(stack, action_id)["status"]


def _events(stack: Stack, action_id: str) -> list[str]:
    return [line.split()[0] for line in stack.journal(action_id)]


def _submit_one(stack: Stack, action_type: str, payload: dict) -> str:
    return stack.submit([{"type": action_type, "payload": payload}])["accepted"][0]["id"]


def _wait_final(stack: Stack, action_id: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (r := _action(stack, action_id))["status"] not in ("queued", "running") and r,
                      timeout=timeout, interval=0.2, what=f"action {action_id} to finish")


def _hold(stack: Stack, running: int = 1, waiting: int = 2, first_run: float = 3600,
          waiting_seconds: float = 0.1, rerun_seconds: float = 1) -> tuple[list[str], list[str]]:
    """``running`` actions running (their first run outlives the node) and ``waiting`` prefetched, all
    on the only worker node (concurrency ``running``; prefetch 4 per process)."""
    sleepers = [_submit_one(stack, "tk_sleep", {"seconds": rerun_seconds, "first_run_seconds": first_run})
                for _ in range(running)]
    for sleeper in sleepers:
        wait_until(lambda s=sleeper: stack.journal(s), timeout=30, what="the action to start")
        wait_until(lambda s=sleeper: _status(stack, s) == "running", timeout=10, interval=0.01, what="its claim")
    others = [_submit_one(stack, "tk_sleep", {"seconds": waiting_seconds}) for _ in range(waiting)]
    broker = _broker(stack)
    wait_until(lambda: broker.llen("default") == 0 and broker.hlen("unacked") >= running + waiting, timeout=10,
               what="the worker to prefetch the others")
    return sleepers, others


def _kill_node(worker: subprocess.Popen) -> None:
    os.killpg(worker.pid, signal.SIGKILL)  # the whole node: main process and pool children, no goodbye
    stop_process(worker)


def _held(stack: Stack) -> set[str]:
    from rekku.reconciler import held_by_broker

    return held_by_broker(_broker(stack), {"default", "celery"})


def _copies_in_queue(stack: Stack, queue: str = "default") -> dict[str, int]:
    """Task id → how many messages of it wait in ``queue`` (all priorities)."""
    from rekku.reconciler import PRIORITY_STEPS, _message

    counts: dict[str, int] = {}
    broker = _broker(stack)
    for step in PRIORITY_STEPS:
        for raw in broker.lrange(queue + step, 0, -1):
            task_id = ((_message(raw) or {}).get("headers") or {}).get("id")
            counts[task_id] = counts.get(task_id, 0) + 1
    return counts


def _logs(stack: Stack) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((stack.home / "logs").glob("*.log")))


def _worker_log(stack: Stack, node: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (stack.home / "logs").glob(f"worker-*-{node}.log"))


def _age_reconciler(stack: Stack) -> None:
    """The reconciler has watched this Redis for a while (so a missing heartbeat means a dead worker)."""
    from rekku.reconciler import SINCE_KEY

    _broker(stack).set(SINCE_KEY, 0)


# ----------------------------------------------------------------------------- two live workers, one name
def test_two_live_workers_sharing_a_node_name_run_nothing_twice(make_stack) -> None:
    """A misconfiguration (two hosts with the same --node): the second start must not take the first's
    running or prefetched actions, however short the heartbeat TTL; each action runs once."""
    stack = make_stack(REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    first = stack.start_worker("default", concurrency=1, node="twin")
    stack.spawn("beat", log_name="beat")
    sleeper = _submit_one(stack, "tk_sleep", {"seconds": 20})
    wait_until(lambda: stack.journal(sleeper), timeout=30, what="the action to start")
    wait_until(lambda: _status(stack, sleeper) == "running", timeout=10, interval=0.01, what="its claim")
    waiting = [_submit_one(stack, "tk_sleep", {"seconds": 0.1}) for _ in range(2)]
    broker = _broker(stack)
    wait_until(lambda: broker.llen("default") == 0 and broker.hlen("unacked") >= 3, timeout=10,
               what="the first worker to prefetch the others")

    stack.start_worker("default", concurrency=1, node="twin")  # recovery runs before it is ready
    assert _status(stack, sleeper) == "running", "the long action ended before the twin started: inconclusive"
    assert first.poll() is None
    run = stack.wait_action(sleeper, timeout=60)
    assert run["status"] == "succeeded" and run["attempts"] == 1, run
    assert _events(stack, sleeper) == ["start", "done"], stack.journal(sleeper)
    for action_id in waiting:
        assert stack.wait_action(action_id, timeout=30)["status"] == "succeeded"
        assert _events(stack, action_id) == ["start", "done"], stack.journal(action_id)
    assert "uses this node's name" in _worker_log(stack, "twin")


# ----------------------------------------------------------------------------- cancel while the node is dead
@pytest.mark.parametrize("comeback", ["never_returns"])
def test_cancel_while_its_node_is_dead_ends_cancelled_and_never_runs_again(make_stack, comeback: str) -> None:
    stack = make_stack(REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    node = stack.start_worker("default", concurrency=1, node="lazarus")
    stack.spawn("beat", log_name="beat")
    [sleeper], waiting = _hold(stack, running=1, waiting=2)
    _kill_node(node)

    answer = stack.post(f"/v1/actions/{sleeper}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "running", answer.text  # asked to stop
    answer = stack.post(f"/v1/actions/{waiting[0]}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text

    stack.start_worker("default", concurrency=1, node="lazarus" if comeback == "restarted" else "survivor")
    run = _wait_final(stack, sleeper, timeout=60)
    assert run["status"] == "cancelled", run
    # the node's only process serves in order: the recovered third action ran after any copy of the others
    assert stack.wait_action(waiting[1], timeout=60)["status"] == "succeeded"
    trailing = stack.run("tk_sleep", {"seconds": 0}, timeout=60)
    assert trailing["status"] == "succeeded"
    assert _events(stack, sleeper) == ["start"], stack.journal(sleeper)
    assert _events(stack, waiting[0]) == [] and _status(stack, waiting[0]) == "cancelled"
    assert _events(stack, waiting[1]) == ["start", "done"]
    assert not {sleeper, *waiting} & _held(stack)


# ----------------------------------------------------------------------------- two reconciler passes at once
RECONCILE_AT = """
import json, sys, time
import rekku.celery_app  # noqa: F401 - imported before the moment, as in a worker
import rekku.dispatch, rekku.ingest, rekku.registry  # noqa: F401
from rekku.db import get_engine
from rekku.reconciler import reconcile
with get_engine().connect():  # a pooled connection, as a worker process that ran a task before has
    pass
at = float(sys.argv[1])
time.sleep(max(0.0, at - time.time()))
print(json.dumps(reconcile()))
"""
#: Reconciler passes started at the same moment (two beats ticking together, or passes overlapping).
PASSES = 2


def test_two_reconciler_passes_at_once_enqueue_a_dead_nodes_actions_once(make_stack) -> None:
    """Two beats (an HA pair, or a beat started twice) tick at the same moment, or one pass outlasts
    REKKU_RECONCILE_SECONDS on a worker with two processes: passes recover the same dead node at once.
    Each of its actions must be re-enqueued once: a second copy of a running action runs it a second
    time, at the same time (the claim accepts a 'running' action).

    To make the moment certain rather than likely, the database is slow for a second as the passes
    start: another session (a backup, an operator's query) holds the action's row lock."""
    import MySQLdb

    from tests.support import MARIADB

    stack = make_stack(REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    broker = _broker(stack)
    doomed = stack.start_worker("default", concurrency=1, node="doomed")
    [sleeper], [waiting] = _hold(stack, running=1, waiting=1, rerun_seconds=3)
    _kill_node(doomed)
    wait_until(lambda: not broker.keys("rekku:worker:default@doomed*"), timeout=10, what="its heartbeat to expire")
    _age_reconciler(stack)

    db_name = stack.database_url.rpartition("/")[2].partition("?")[0]
    locker = MySQLdb.connect(**MARIADB, db=db_name)
    watcher = MySQLdb.connect(**MARIADB, autocommit=True)
    try:
        locker.cursor().execute("SELECT id FROM action_runs WHERE id = %s FOR UPDATE", (sleeper,))
        at = time.time() + 4  # every process has imported everything by then
        passes = [subprocess.Popen([sys.executable, "-c", RECONCILE_AT, str(at)], env=stack.env(), cwd=str(ROOT),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(PASSES)]

        def blocked() -> int:
            cursor = watcher.cursor()
            cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s AND INFO LIKE %s",
                           (db_name, "UPDATE action_runs SET status%"))
            return cursor.fetchone()[0]

        wait_until(lambda: blocked() == PASSES or any(p.poll() is not None for p in passes), timeout=60,
                   interval=0.05, what="every pass to reach the row")
    finally:
        locker.rollback()
        locker.close()
        watcher.close()
    outcomes = []
    for proc in passes:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    in_queue = _copies_in_queue(stack)
    copies = {i: in_queue.get(i, 0) for i in (sleeper, waiting)}

    stack.start_worker("default", concurrency=2, node="survivor")  # what the copies do
    for action_id in (sleeper, waiting):
        assert stack.wait_action(action_id, timeout=60)["status"] == "succeeded"
    for action_id in [_submit_one(stack, "tk_sleep", {"seconds": 0.5}) for _ in range(2)]:
        assert stack.wait_action(action_id, timeout=30)["status"] == "succeeded"
    wait_until(lambda: _events(stack, sleeper).count("done") == _events(stack, sleeper).count("start") - 1,
               timeout=30, what="every run of it to end")
    assert copies == {sleeper: 1, waiting: 1}, (copies, outcomes)
    assert _events(stack, sleeper) == ["start", "start", "done"], stack.journal(sleeper)


# ----------------------------------------------------------------------------- a broker that forgets
def _restart_redis_db(stack: Stack, how: str = "restart") -> None:
    """``restart``: what a Redis restart without persistence does to this stack: every key gone and
    every client connection dropped (only this test's db: the server is shared). ``flushdb``: an
    operator's ``redis-cli FLUSHDB``: every key gone, connections kept."""
    from tests.support import _own_ports

    broker = _broker(stack)
    broker.flushdb()
    if how == "flushdb":
        return
    mine = _own_ports()  # the test's own connections are not the stack's
    for client in broker.client_list():
        if (str(client.get("db")) == str(stack.redis_db) and int(client["id"]) != broker.client_id()
                and client.get("addr", "").rpartition(":")[2] not in mine):
            try:
                broker.client_kill_filter(_id=client["id"])
            except redis.ResponseError:
                pass


#: Known and not fixed yet. Not strict: the double run needs the reconciler's grace to pass while the
#: holder still runs its copy, which a loaded machine sometimes does not give it (seen once in a full
#: run on a machine with four other suites), and a strict mark then failed the run. The cure is a
#: dispatch generation per action, carried in its message, so that the claim refuses an out-of-date
#: copy (a fence); the same fence would stop a paused, not dead, predecessor's run; the mark goes
#: with the fix.
FLUSH_WHILE_HELD = pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    "a FLUSHDB under a live worker empties kombu's unacknowledged set; after the grace the reconciler "
    "re-enqueues the actions the worker still holds in memory, and the claim accepts a running action"))


@pytest.mark.parametrize("how", [pytest.param("flushdb", marks=FLUSH_WHILE_HELD)])
def test_broker_restarted_while_a_live_worker_holds_prefetched_actions_runs_each_once(make_stack, how: str) -> None:
    """Redis restarts while a live worker runs a long action and holds two prefetched ones; a second node
    is idle. Each action runs exactly once."""
    stack = make_stack(REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1", REKKU_RECONCILE_GRACE="2")
    stack.start_worker("default", concurrency=1, node="holder")
    stack.spawn("beat", log_name="beat")
    [sleeper], waiting = _hold(stack, running=1, waiting=2, first_run=6, waiting_seconds=4)
    stack.start_worker("default", concurrency=1, node="other")
    _restart_redis_db(stack, how)
    for action_id in [sleeper, *waiting]:
        assert stack.wait_action(action_id, timeout=90)["status"] == "succeeded"
    trailing = [_submit_one(stack, "tk_sleep", {"seconds": 0}) for _ in range(2)]
    for action_id in trailing:
        assert stack.wait_action(action_id, timeout=60)["status"] == "succeeded"
    assert _events(stack, sleeper) == ["start", "done"], stack.journal(sleeper)
    for action_id in waiting:
        assert _events(stack, action_id) == ["start", "done"], stack.journal(action_id)


# ----------------------------------------------------------------------------- pool processes killed
def _kill_child_of(stack: Stack, action_id: str, nth: int) -> int:
    """SIGKILL the pool process running the ``nth`` start (1-based) of ``action_id``; returns its pid."""
    line = wait_until(lambda: (lines := stack.journal(action_id)) and len(lines) >= nth and lines[nth - 1],
                      timeout=60, interval=0.05, what=f"start {nth} of {action_id}")
    event, pid = line.split()
    assert event == "start", stack.journal(action_id)
    os.kill(int(pid), signal.SIGKILL)
    return int(pid)


def test_pool_process_killed_below_max_attempts_then_succeeding_is_not_poison(make_stack) -> None:
    stack = make_stack(REKKU_MAX_ATTEMPTS="3", REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    node = stack.start_worker("default", concurrency=1, node="oomy")
    stack.spawn("beat", log_name="beat")
    action_id = _submit_one(stack, "tk_sleep", {"seconds": 3})
    pids = {_kill_child_of(stack, action_id, 1), _kill_child_of(stack, action_id, 2)}  # lost twice (limit 3)
    run = _wait_final(stack, action_id, timeout=60)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == 3, run
    assert _events(stack, action_id) == ["start", "start", "start", "done"], stack.journal(action_id)
    assert len(pids) == 2 and node.poll() is None


def test_plugin_retries_are_not_counted_as_lost_runs(make_stack) -> None:
    """A flaky action retried by its plugin (TransientError) more often than REKKU_MAX_ATTEMPTS: its
    retries are not lost runs, so it still succeeds on the attempt it asked for."""
    stack = make_stack(REKKU_MAX_ATTEMPTS="2", REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    stack.start_worker("default", concurrency=1, node="flake")
    action_id = _submit_one(stack, "tk_flaky", {"succeed_on": 4})
    run = _wait_final(stack, action_id, timeout=60)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == 4, run


def test_manual_retry_of_a_poison_failed_action_counts_its_lost_runs_afresh(make_stack) -> None:
    stack = make_stack(REKKU_MAX_ATTEMPTS="2", REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    stack.start_worker("default", concurrency=1, node="taster")
    poison = _submit_one(stack, "tk_poison", {})
    run = _wait_final(stack, poison, timeout=60)
    assert run["status"] == "failed" and "died 2 times" in run["error"], run
    assert _events(stack, poison) == ["start", "start"]

    answer = stack.post(f"/v1/actions/{poison}/retry")
    assert answer.status_code == 200, answer.text
    wait_until(lambda: len(stack.journal(poison)) >= 3, timeout=60, interval=0.1,
               what="the retried poison action to run again")
    run = wait_until(lambda: (r := _action(stack, poison))["status"] == "failed" and r, timeout=60, interval=0.2,
                     what="the retried poison action to fail again")
    assert "died 2 times" in run["error"], run
    assert stack.run("tk_sleep", {"seconds": 0}, timeout=30)["status"] == "succeeded"
    assert _events(stack, poison) == ["start"] * 4, stack.journal(poison)


@pytest.mark.parametrize("comeback", ["restarted"])
def test_one_lost_run_then_a_node_death_while_it_waits_is_not_counted_twice(make_stack, comeback: str) -> None:
    """An action's pool process is killed once (one lost run: below REKKU_MAX_ATTEMPTS=2); its message
    goes back to the queue behind other work, and the node dies before it runs again (it was waiting,
    not running). Only one of its runs was lost: it must run again and succeed, not fail as poison."""
    stack = make_stack(REKKU_MAX_ATTEMPTS="2", REKKU_WORKER_HEARTBEAT_TTL="3", REKKU_RECONCILE_SECONDS="1")
    node = stack.start_worker("default", concurrency=1, node="unlucky")
    victim = _submit_one(stack, "tk_sleep", {"seconds": 0.5, "first_run_seconds": 3600})
    wait_until(lambda: stack.journal(victim), timeout=30, what="the victim to start")
    wait_until(lambda: _status(stack, victim) == "running", timeout=10, interval=0.01, what="its claim")
    blocker = _submit_one(stack, "tk_sleep", {"seconds": 0.5, "first_run_seconds": 3600})
    broker = _broker(stack)
    wait_until(lambda: broker.llen("default") == 0 and broker.hlen("unacked") >= 2, timeout=10,
               what="the node to prefetch the blocker")
    _kill_child_of(stack, victim, 1)  # one lost run; its message goes back behind the blocker
    wait_until(lambda: stack.journal(blocker), timeout=30, what="the blocker to start in the new pool process")
    wait_until(lambda: broker.llen("default") == 0 and victim in _held(stack), timeout=10,
               what="the node to hold the victim again (prefetched)")
    assert len(stack.journal(victim)) == 1  # waiting, not running
    _kill_node(node)
    if comeback == "never_returns":  # (beat's ticks would have filled the node's prefetch before)
        stack.spawn("beat", log_name="beat")
    stack.start_worker("default", concurrency=1, node="unlucky" if comeback == "restarted" else "survivor")
    run = _wait_final(stack, victim, timeout=60)
    assert run["status"] == "succeeded", (run["status"], run["error"])
    assert _events(stack, victim) == ["start", "start", "done"], stack.journal(victim)
    assert stack.wait_action(blocker, timeout=60)["status"] == "succeeded"


def test_a_node_name_that_would_read_as_an_incarnation_is_refused(tmp_path: Path) -> None:
    """'#' separates a node from its incarnation in the action log ('default@a#b' would be taken for an
    incarnation of 'default@a', and recovered as a dead start of it): refused before anything runs."""
    from tests.test_first_day_cli import clean_env, rekku

    for name in ("a#b", "pool@node", ""):
        done = rekku("worker", "--pool", "default", "--node", name, cwd=tmp_path, env=clean_env(tmp_path))
        assert done.returncode == 2 and "a node name must be non-empty, without '#', '@'" in done.stderr, done
