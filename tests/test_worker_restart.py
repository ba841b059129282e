"""Issue 14: a worker killed with its whole process group (OOM killer, power loss) strands nothing.

* restarted under the SAME name (systemd, compose, Kubernetes), the new process recovers what its
  predecessor held (the action it ran and the ones it had prefetched) as it starts, in seconds, not
  after the visibility timeout nor the heartbeat TTL;
* never restarted, what it held is recovered once its heartbeat expires, by the next reconciler pass:
  within about two heartbeat periods;
* a message that kills its process every time (a poison message) fails after REKKU_MAX_ATTEMPTS lost
  runs, with an error that says why, instead of being redelivered forever.

Real processes, a real broker and database; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import time

import redis

from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    Stack,
    stop_process,
    wait_until,
)


def _status(stack: Stack, action_id: str) -> str:
    return stack.get(f"/v1/actions/{action_id}").json()["status"]


def _broker(stack: Stack) -> redis.Redis:
    return redis.Redis(REDIS_HOST, REDIS_PORT, db=stack.redis_db)


def _hold_three(stack: Stack) -> tuple[str, list[str]]:
    """One action running and two prefetched, all on the only worker (concurrency 1, prefetch 4)."""
    # its first run outlives the node however slow the machine is; the run after recovery is short
    sleeper = stack.submit([{"type": "tk_sleep", "payload": {"seconds": 1, "first_run_seconds": 3600}}]
                           )["accepted"][0]["id"]
    wait_until(lambda: stack.journal(sleeper), timeout=30, what="the action to start")
    wait_until(lambda: _status(stack, sleeper) == "running", timeout=10, interval=0.01, what="its claim")
    waiting = [a["id"] for a in stack.submit([{"type": "tk_sleep", "payload": {"seconds": 0.1}}] * 2)["accepted"]]
    broker = _broker(stack)
    wait_until(lambda: broker.llen("default") == 0 and broker.hlen("unacked") >= 3, timeout=10,
               what="the worker to prefetch the two others")
    return sleeper, waiting


def _kill_node(worker) -> float:
    os.killpg(worker.pid, signal.SIGKILL)  # the whole node: main process and pool child, no goodbye
    stop_process(worker)
    return time.monotonic()


def _assert_each_ran_once_more(stack: Stack, sleeper: str, waiting: list[str], timeout: float) -> None:
    run = stack.wait_action(sleeper, timeout=timeout)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == 2 and "#" not in run["worker"], run
    assert [line.split()[0] for line in stack.journal(sleeper)] == ["start", "start", "done"]
    for action_id in waiting:
        assert stack.wait_action(action_id, timeout=timeout)["status"] == "succeeded"
        assert [line.split()[0] for line in stack.journal(action_id)] == ["start", "done"]  # once
    from rekku.reconciler import held_by_broker

    # the dead process's unacknowledged copies are gone: Redis will not hand them out again in an hour.
    # Waited for: the live worker's own copy of the last action is removed a moment after its run is
    # logged (the acknowledgement follows the result to the main process, then rides with the next
    # delivery or a flush within 20 ms); a dead process's copy would stay for the visibility timeout.
    broker = _broker(stack)
    wait_until(lambda: not {sleeper, *waiting} & held_by_broker(broker, set()), timeout=10, interval=0.1,
               what="no copy of the three actions left in the broker")


def test_node_killed_and_restarted_under_the_same_name_recovers_what_it_held_at_once(make_stack) -> None:
    # A long heartbeat TTL: the old process's heartbeat outlives the whole test, so only the restart
    # itself can recover its actions (beat runs too, and must not run anything twice).
    stack = make_stack(REKKU_WORKER_HEARTBEAT_TTL="60", REKKU_RECONCILE_SECONDS="1")
    worker = stack.start_worker("default", concurrency=1, node="phoenix")
    stack.spawn("beat", log_name="beat")
    sleeper, waiting = _hold_three(stack)
    _kill_node(worker)
    restarted = time.monotonic()
    stack.start_worker("default", concurrency=1, node="phoenix")
    wait_until(lambda: len(stack.journal(sleeper)) >= 2, timeout=30, interval=0.2,
               what="the killed node's action to start again on the restarted one")
    assert time.monotonic() - restarted < 30
    _assert_each_ran_once_more(stack, sleeper, waiting, timeout=30)
    assert stack.get(f"/v1/actions/{sleeper}").json()["worker"] == "default@phoenix"


def test_node_killed_for_good_is_recovered_within_two_heartbeat_periods(make_stack) -> None:
    ttl, every = 5, 1
    stack = make_stack(REKKU_WORKER_HEARTBEAT_TTL=str(ttl), REKKU_RECONCILE_SECONDS=str(every))
    doomed = stack.start_worker("default", concurrency=1, node="doomed")
    stack.spawn("beat", log_name="beat")
    sleeper, waiting = _hold_three(stack)
    stack.start_worker("default", concurrency=1, node="survivor")  # a live node, another name
    killed = _kill_node(doomed)
    wait_until(lambda: len(stack.journal(sleeper)) >= 2, timeout=90, interval=0.2,
               what="the dead node's action to start again on the survivor")
    took = time.monotonic() - killed
    # its heartbeat expires within a TTL, the next pass (every REKKU_RECONCILE_SECONDS) recovers it
    assert took <= 2 * ttl, f"recovered {took:.1f} s after the node died (heartbeat TTL {ttl} s)"
    _assert_each_ran_once_more(stack, sleeper, waiting, timeout=30)
    assert stack.get(f"/v1/actions/{sleeper}").json()["worker"] == "default@survivor"


def test_a_poison_message_fails_after_max_attempts_instead_of_killing_workers_forever(make_stack) -> None:
    stack = make_stack(REKKU_MAX_ATTEMPTS="3", REKKU_WORKER_HEARTBEAT_TTL="5", REKKU_RECONCILE_SECONDS="1")
    worker = stack.start_worker("default", concurrency=1, node="taster")
    stack.spawn("beat", log_name="beat")
    poison = stack.submit([{"type": "tk_poison", "payload": {}}])["accepted"][0]["id"]
    run = wait_until(lambda: (r := stack.get(f"/v1/actions/{poison}").json())["status"] not in ("queued", "running")
                     and r, timeout=60, interval=0.2, what="the poison action to end")
    assert run["status"] == "failed", run
    assert run["error"] == ("its worker process died 3 times while running it (killed by the OS, out of memory, "
                            "or a crash); not retried: REKKU_MAX_ATTEMPTS=3"), run
    assert poison in [a["id"] for a in stack.get("/v1/dead-letters").json()["actions"]]
    # the node survived its pool processes and serves the next action (the only process, in order:
    # a further delivery of the poison message would have come first, and is refused as final)
    assert worker.poll() is None
    assert stack.run("tk_sleep", {"seconds": 0})["status"] == "succeeded"
    assert [line.split()[0] for line in stack.journal(poison)] == ["start"] * 3
    assert len({line.split()[1] for line in stack.journal(poison)}) == 3  # three processes died
