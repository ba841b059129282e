"""Nothing lost: a broker that forgets everything, a worker node that dies mid-action."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import TRAINER
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    Stack,
    claim_redis_db,
    create_mariadb,
    drop_mariadb,
    release_redis_db,
    stop_process,
    twice,
    wait_until,
)

FAST_RECONCILER = {"REKKU_RECONCILE_SECONDS": "1", "REKKU_RECONCILE_GRACE": "1", "REKKU_WORKER_HEARTBEAT_TTL": "3",
                   "TRAINER_IDS": "telegram_bot:42"}


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """MariaDB and an ingress, no workers yet; the reconciler runs every second."""
    db_number = claim_redis_db()
    db_name, url = create_mariadb()
    stack = Stack("reliability", tmp_path, url, db_number, extra_env=FAST_RECONCILER)
    engine = sa.create_engine(url)
    from tests.plugins.counter import TABLE

    try:
        stack.start_ingress()
        TABLE.create(engine)
        yield stack
    finally:
        engine.dispose()
        stack.stop()
        release_redis_db(db_number)
        drop_mariadb(db_name)


def _invocations(stack: Stack) -> list[str]:
    engine = sa.create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text("SELECT action_id FROM tk_invocations"))]
    finally:
        engine.dispose()


def _statuses(stack: Stack, batch_ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch_id in batch_ids:
        for action in stack.get(f"/v1/batches/{batch_id}").json()["actions"]:
            counts[action["status"]] = counts.get(action["status"], 0) + 1
    return counts


def test_broker_flushed_before_workers_start_loses_nothing(fresh_stack: Stack) -> None:
    stack = fresh_stack
    batches = [stack.submit([{"type": "tk_count", "payload": {}}] * 100)["batch_id"] for _ in range(10)]
    broker = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    assert broker.llen("default") == 1000
    broker.flushdb()  # what a Redis restart without persistence does
    stack.start_worker("default", concurrency=2, node="after-flush")
    stack.spawn("beat", log_name="beat")
    wait_until(lambda: _statuses(stack, batches).get("succeeded") == 1000, timeout=120, interval=1,
               what="all 1000 actions to succeed after the broker lost them")
    invoked = _invocations(stack)
    assert len(invoked) == 1000 and len(set(invoked)) == 1000  # each handler ran exactly once


def test_worker_node_killed_mid_action_is_rerun_on_another_node(fresh_stack: Stack) -> None:
    stack = fresh_stack
    doomed = stack.start_worker("default", concurrency=1, node="doomed")
    stack.spawn("beat", log_name="beat")
    action_id = stack.submit([{"type": "tk_sleep", "payload": {"seconds": 3}}])["accepted"][0]["id"]
    wait_until(lambda: stack.journal(action_id), timeout=30, what="the action to start on the doomed node")
    wait_until(lambda: stack.get(f"/v1/actions/{action_id}").json()["status"] == "running", timeout=10,
               interval=0.01, what="its claim (the reconciler re-enqueues running actions of dead nodes)")
    os.killpg(doomed.pid, signal.SIGKILL)  # the whole node: main process and pool child
    stop_process(doomed)
    stack.start_worker("default", concurrency=1, node="survivor")
    run = stack.wait_action(action_id, timeout=60)
    assert run["status"] == "succeeded", run
    assert run["worker"] == "default@survivor" and run["attempts"] == 2
    assert [line.split()[0] for line in stack.journal(action_id)] == ["start", "start", "done"]
    # Redis must not hand the dead node's copy out again after the visibility timeout (other entries
    # may be periodic tasks the survivor holds right now).
    from rekku.reconciler import held_by_broker

    assert action_id not in held_by_broker(redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db), set())


def test_a_command_stranded_in_a_dead_terminal_nodes_queue_moves_to_a_live_node(fresh_stack: Stack) -> None:
    """A persistent session's command is routed to its node's own queue; if that node was killed just
    before, nobody else consumes that queue. The reconciler routes it again, to a live node, which
    answers that the session was lost (and the command not run) instead of it waiting forever."""
    stack = fresh_stack
    stack.start_worker("default", concurrency=1, node="reconciling")
    stack.spawn("beat", log_name="beat")
    # the session registry keeps a killed node for TERMINAL_NODE_TTL; its worker heartbeat (3 s) ends first
    doomed = stack.start_worker("terminal", concurrency=2, node="doomed", TERMINAL_NODE_TTL="10")

    def in_session(command: str) -> str:
        payload = {"command": command, "persistent_session": True, "session": "work"}
        return stack.submit([{"type": "terminal", "payload": payload}], TRAINER)["accepted"][0]["id"]

    first = stack.wait_action(in_session("cd /tmp"))
    assert first["status"] == "succeeded" and first["queue"] == "terminal.doomed", first
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(10)
    stranded = in_session("pwd")
    assert stack.get(f"/v1/actions/{stranded}").json()["queue"] == "terminal.doomed"
    stack.start_worker("terminal", concurrency=2, node="survivor", TERMINAL_NODE_TTL="10")

    run = wait_until(lambda: (r := stack.get(f"/v1/actions/{stranded}").json())["status"] not in ("queued", "running")
                     and r, timeout=60, interval=0.5, what="the stranded command to finish")
    assert run["status"] == "succeeded" and run["queue"] == "terminal.survivor", run
    assert run["result"]["session_lost"] is True and run["result"]["ran"] is False, run
    assert "its node 'doomed' is gone" in run["result"]["notice"]
    broker = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    assert broker.llen("terminal.doomed") == 0
    assert broker.hget("rekku:metrics:reconciler", "rerouted_from_dead_nodes") == b"1"


def test_a_stopping_worker_sends_the_run_metrics_it_still_holds(fresh_stack: Stack) -> None:
    """Pool processes count runs in memory and send them every REKKU_METRICS_FLUSH_SECONDS; a worker
    told to stop sends what it holds before its processes exit."""
    stack = fresh_stack
    worker = stack.start_worker("default", concurrency=2, node="counting", REKKU_METRICS_FLUSH_SECONDS="3600")
    for action in stack.submit([{"type": "tk_count", "payload": {}}] * 5)["accepted"]:
        assert stack.wait_action(action["id"])["status"] == "succeeded"
    broker = redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)
    assert broker.hget("rekku:metrics:runs", "tk_count|succeeded") is None  # still in the pool processes
    stop_process(worker)
    assert broker.hget("rekku:metrics:runs", "tk_count|succeeded") == b"5"
    assert int(broker.hget("rekku:metrics:duration_bucket", "tk_count|+Inf")) == 5


def test_worker_sigterm_finishes_what_runs_and_requeues_what_it_holds(fresh_stack: Stack) -> None:
    stack = fresh_stack
    worker = stack.start_worker("default", concurrency=1, node="leaving")
    sleeper = stack.submit([{"type": "tk_sleep", "payload": {"seconds": 2}}])["accepted"][0]["id"]
    wait_until(lambda: stack.journal(sleeper), timeout=30, what="the sleep to start")
    held = [a["id"] for a in stack.submit([{"type": "tk_count", "payload": {}}] * 3)["accepted"]]
    os.kill(worker.pid, signal.SIGTERM)  # Celery's warm shutdown, as `docker stop` or systemd sends
    assert worker.wait(30) == 0
    assert stack.get(f"/v1/actions/{sleeper}").json()["status"] == "succeeded"
    stack.start_worker("default", concurrency=1, node="next")
    for action_id in held:
        assert stack.wait_action(action_id)["status"] == "succeeded"
    assert sorted(_invocations(stack)) == sorted(held)  # each once, none lost


def _kill_connections(database: str) -> int:
    import MySQLdb

    from tests.support import MARIADB

    admin = MySQLdb.connect(**MARIADB)
    cur = admin.cursor()
    cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()", (database,))
    killed = 0
    for (conn_id,) in cur.fetchall():
        try:
            cur.execute(f"KILL {int(conn_id)}")
            killed += 1
        except MySQLdb.OperationalError:
            pass  # it ended on its own meanwhile
    admin.close()
    return killed


def _ended(stack: Stack, batch_ids: list[str]) -> int:
    """How many of these batches' actions have ended (succeeded or failed)."""
    counts = _statuses(stack, batch_ids)
    return counts.get("succeeded", 0) + counts.get("failed", 0)


def _more_ended_than(stack: Stack, batch_ids: list[str], seen: int, total: int) -> int:
    """How many actions have ended, once that is more than ``seen`` (or all ``total`` have): positive
    evidence that the workers are at work (again) since the last blow."""
    return wait_until(lambda: n if (n := _ended(stack, batch_ids)) > seen or n == total else 0, timeout=120,
                      interval=0.2, what=f"more than {seen} of {total} actions to end")


def test_database_connections_killed_mid_run_leave_no_action_stuck(fresh_stack: Stack) -> None:
    stack = fresh_stack
    database = stack.database_url.rsplit("/", 1)[1].split("?")[0]
    stack.start_worker("default", concurrency=2, node="hiccup")
    stack.spawn("beat", log_name="beat")
    batches = [stack.submit([{"type": "tk_count", "payload": {}}] * 100)["batch_id"] for _ in range(3)]
    mid_run, ended = 0, 0
    for _ in range(5):  # the server drops every connection of the workers, the ingress and beat
        ended = _more_ended_than(stack, batches, ended, 300)  # the workers are (back) at work since the last blow
        if ended == 300:
            break
        killed = _kill_connections(database)
        mid_run += bool(killed) and _ended(stack, batches) < 300  # some action had not ended when it landed
    assert mid_run > 0, "no connection was dropped while actions were still to run"
    wait_until(lambda: _statuses(stack, batches).get("succeeded") == 300, timeout=120, interval=1,
               what="all 300 actions to succeed after the database dropped its connections")


def test_pool_processes_killed_during_1000_mixed_actions_every_action_ends_final(fresh_stack: Stack) -> None:
    import random

    stack = fresh_stack
    worker = stack.start_worker("default", concurrency=2, node="battered")
    stack.spawn("beat", log_name="beat")
    kinds = [{"type": "tk_count", "payload": {}}, {"type": "echo", "payload": {}},
             {"type": "tk_fail", "payload": {}}, {"type": "tk_sleep", "payload": {"seconds": 0.05}}]
    rng = random.Random(7)
    batches = [stack.submit([rng.choice(kinds) for _ in range(100)])["batch_id"] for _ in range(10)]
    mid_run, ended = 0, 0
    for _ in range(6):
        ended = _more_ended_than(stack, batches, ended, 1000)  # the pool is (back) at work since the last kill
        if ended == 1000:
            break
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        if children:
            os.kill(int(rng.choice(children)), signal.SIGKILL)
            mid_run += _ended(stack, batches) < 1000  # some action had not ended when it landed
    assert mid_run > 0, "no pool process was killed while actions were still to run"
    wait_until(lambda: sum(_statuses(stack, batches).get(s, 0) for s in ("succeeded", "failed")) == 1000,
               timeout=180, interval=1, what="every action to end succeeded or failed")
    counts = _statuses(stack, batches)
    runs = [a for b in batches for a in stack.get(f"/v1/batches/{b}").json()["actions"]]
    assert all(a["status"] == "failed" for a in runs if a["type"] == "tk_fail"), counts
    assert all(a["status"] == "succeeded" for a in runs if a["type"] != "tk_fail"), counts
    invoked = _invocations(stack)
    assert {a["id"] for a in runs if a["type"] == "tk_count"} == set(invoked)
    # A finished action is never run again: deliver every counting action once more.
    from celery import Celery

    before = len(invoked)
    counting = [a["id"] for a in runs if a["type"] == "tk_count"]
    app = Celery(broker=stack.broker_url)
    for action_id in counting:
        app.send_task("rekku.action.tk_count", kwargs={"action_id": action_id, "payload": {}, "context": {}},
                      task_id=action_id, queue="default")
    app.close()
    # every one of those deliveries taken by the worker and acknowledged (after its run) before counting
    wait_until(twice(lambda: stack.consumed(*counting)), timeout=120, interval=0.5,
               what=f"the {len(counting)} deliveries to be consumed")
    assert len(_invocations(stack)) == before
