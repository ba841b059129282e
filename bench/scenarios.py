"""The three measurements, each taken for Rekku and for the two baselines (``bench.bare_app``: bare =
Rekku's Celery settings, plain = Celery's defaults) under the same conditions.

(a) accept: actions enqueued per second by the submitter (HTTP ingress, with 1, 5 or 100 actions per
    request, vs an ``apply_async`` loop), and the CPU each costs (ingress and client).
(b) drain: actions finished per second by one worker, from a pre-filled queue, and the worker's CPU.
(c) latency: time from the submitter's call to the handler's first statement, one at a time.

(a) and (b) share their messages: while (a) fills a queue its worker is told to stop consuming
(``cancel_consumer``), so (b) starts from a full queue on a worker that has long finished booting
and is switched on with ``add_consumer``; the clock starts just before that command.
"""

from __future__ import annotations

import http.client
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from bench.bare_app import BASELINES, Baseline
from bench.plugins.stamp import STAMP_KEY as OURS_STAMP_KEY
from bench.stack import POOL, Stack, tree_cpu
from rekku.db import make_engine
from rekku.models import FAILED, SUCCEEDED, ActionRun

#: Actions per POST /v1/actions in the warm-up and the main (a) measure; (a) is also taken at SMALL_BATCHES
#: (real replies carry 1 to 5 actions, and a batch of 100 spreads HTTP and parsing over 100 actions).
BATCH = 100
SMALL_BATCHES = (5, 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: with 200 samples p99 is the 2nd largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Ingress:
    """A keep-alive HTTP/1.1 connection to the ingress.

    ``http.client`` rather than ``requests``: its per-request cost is a fraction of a millisecond,
    so (a) and (c) measure the ingress, not the client library (bare's client is ``apply_async``)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post_actions(self, body: bytes) -> dict:
        """POST /v1/actions; the answer, or RuntimeError unless it is 202.

        Uvicorn closes a connection idle for 5 s (as between phases): a request that finds it closed
        is sent again once on a new connection (the server never saw it)."""
        for attempt in (1, 2):
            try:
                self.conn.request("POST", "/v1/actions", body=body, headers=self.headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()  # http.client reconnects on the next request
                if attempt == 2:
                    raise
        if resp.status != 202:
            raise RuntimeError(f"POST /v1/actions answered {resp.status}: {data[:500]!r}")
        return json.loads(data)


@dataclass
class Measured:
    """One timed phase: wall seconds and the CPU seconds it cost (the processes named by the phase),
    and for (b) the Redis commands the server ran meanwhile (``INFO commandstats``: the whole server,
    so everything else on it counts too; a count, unlike a time, does not move with the machine's load)."""

    seconds: float
    cpu: float
    redis_calls: dict[str, int] | None = None


def redis_calls(client: Any) -> dict[str, int]:
    """Calls per command so far on the Redis server (``cmdstat_multi`` → ``multi``)."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


def calls_since(client: Any, before: dict[str, int]) -> dict[str, int]:
    after = redis_calls(client)
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}


@dataclass
class Bench:
    """Drives one :class:`Stack`: an HTTP session to the ingress, Redis, and a read-only view of the log."""

    stack: Stack

    def __post_init__(self) -> None:
        self.http = Ingress(self.stack.port, self.stack.token)
        self.redis = self.stack.redis()
        assert self.stack.db is not None
        self.engine = make_engine(self.stack.db.url)

    def _pid(self, who: str) -> int:
        return self.stack.children[f"worker-{who}"].pid

    # ------------------------------------------------------------------ consumers on/off
    def consume(self, who: str, on: bool) -> None:
        """Switch a worker's queue consumer on or off and wait until the worker says it is done."""
        if who == "ours":
            node, queue, control = self.stack.ours_node, POOL, BASELINES["bare"].app.control
        else:
            base = BASELINES[who]
            node, queue, control = self.stack.baseline_node(who), base.queue, base.app.control
        command = control.add_consumer if on else control.cancel_consumer
        command(queue, destination=[node], reply=True, timeout=5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            replies = control.inspect(destination=[node], timeout=2).active_queues() or {}
            queues = {q["name"] for q in replies.get(node, [])}
            if (queue in queues) == on:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{node} did not {'start' if on else 'stop'} consuming {queue}")

    # ------------------------------------------------------------------ (a) accept
    def ours_accept(self, n: int, batch: int = BATCH) -> Measured:
        """POST ``n`` echo actions, ``batch`` per request; the ingress's CPU plus this client's."""
        body = json.dumps({"actions": [{"type": "echo", "payload": {}}] * batch}).encode()
        ingress = self.stack.children["ingress"].pid
        cpu, client = tree_cpu(ingress), time.process_time()
        start = time.perf_counter()
        for _ in range(n // batch):
            if len(self.http.post_actions(body)["accepted"]) != batch:
                raise RuntimeError("POST /v1/actions did not accept the whole batch")
        seconds = time.perf_counter() - start
        return Measured(seconds, tree_cpu(ingress) - cpu + time.process_time() - client)

    def baseline_accept(self, who: str, n: int) -> Measured:
        """``apply_async`` ``n`` no-op tasks of a baseline; the CPU is this process's (it publishes)."""
        base = BASELINES[who]
        self.redis.delete(base.count_key, base.done_key)
        client = time.process_time()
        start = time.perf_counter()
        for _ in range(n):
            base.noop.apply_async(kwargs={"target": n})
        return Measured(time.perf_counter() - start, time.process_time() - client)

    # ------------------------------------------------------------------ (b) drain
    def _count(self, status: str) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(ActionRun)
                               .where(ActionRun.status == status, ActionRun.type == "echo"))

    def ours_drain(self, n: int, already_done: int, timeout: float) -> Measured:
        """Let the Rekku worker consume; done when ``already_done + n`` echo rows are succeeded.

        The end is the latest ``finished_at`` in the log (not when our poll noticed)."""
        cpu, calls = tree_cpu(self._pid("ours")), redis_calls(self.redis)
        start = time.time()
        self.consume("ours", on=True)
        deadline = time.monotonic() + timeout
        while self._count(SUCCEEDED) < already_done + n:
            if self._count(FAILED):
                raise RuntimeError("echo actions failed; see the worker log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Rekku worker did not finish {n} actions in {timeout:g} s")
            self.stack.check_alive()
            time.sleep(0.05)
        with self.engine.connect() as conn:
            end = conn.scalar(sa.select(sa.func.max(ActionRun.finished_at)).where(ActionRun.type == "echo"))
        used, calls = tree_cpu(self._pid("ours")) - cpu, calls_since(self.redis, calls)
        self.consume("ours", on=False)
        return Measured(end.timestamp() - start, used, calls)

    def baseline_drain(self, who: str, n: int, timeout: float) -> Measured:
        """Let a baseline worker consume; the task that completes the n-th INCR records the end."""
        base = BASELINES[who]
        cpu, calls = tree_cpu(self._pid(who)), redis_calls(self.redis)
        start = time.time()
        self.consume(who, on=True)
        deadline = time.monotonic() + timeout
        while (done := self.redis.get(base.done_key)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {who} worker did not finish {n} tasks in {timeout:g} s")
            self.stack.check_alive()
            time.sleep(0.05)
        used, calls = tree_cpu(self._pid(who)) - cpu, calls_since(self.redis, calls)
        self.consume(who, on=False)
        return Measured(float(done) - start, used, calls)

    # ------------------------------------------------------------------ (c) latency
    def ours_latency(self) -> tuple[float, float]:
        """(sent, handler start): POST /v1/actions with one action, then wait for its handler's stamp."""
        body = b'{"actions": [{"type": "bench_stamp", "payload": {}}]}'
        sent = time.time()
        self.http.post_actions(body)
        return sent, self._stamp(OURS_STAMP_KEY)

    def baseline_latency(self, who: str) -> float:
        """Seconds from calling ``apply_async`` to the baseline task's first statement."""
        base: Baseline = BASELINES[who]
        sent = time.time()
        base.stamp.apply_async()
        return self._stamp(base.stamp_key) - sent

    def _stamp(self, key: str) -> float:
        got = self.redis.blpop([key], timeout=30)
        if got is None:
            self.stack.check_alive()
            raise RuntimeError(f"no handler start recorded in {key} within 30 s")
        return float(got[1])

    def latency_split(self, samples: list[tuple[float, float]]) -> dict[str, float]:
        """Median ms of each leg of ours' latency, from the log's timestamps of the last len(samples) stamps.

        ``created_at`` is taken by the ingress just before its log write; ``started_at`` when the worker
        begins the run (the claim that records it is deferred: written with the finish for quick runs,
        so nothing is committed on this leg). So: request → logged (HTTP, parse, validate), logged →
        started (log commit, publish, broker, Celery's dispatch to a pool process), started → handler
        (the hooks before the handler)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ActionRun.created_at, ActionRun.started_at)
                                .where(ActionRun.type == "bench_stamp").order_by(ActionRun.created_at.desc())
                                .limit(len(samples))).all()[::-1]
        legs: dict[str, list[float]] = {"request → logged": [], "logged → started": [], "started → handler": []}
        for (sent, stamp), (created, started) in zip(samples, rows):
            legs["request → logged"].append(created.timestamp() - sent)
            legs["logged → started"].append(started.timestamp() - created.timestamp())
            legs["started → handler"].append(stamp - started.timestamp())
        return {k: 1000 * percentile(v, 50) for k, v in legs.items() if v}

    def in_task_ms(self, last: int) -> float:
        """Median ms between start and finish of the last ``last`` echo actions (the log's own bookkeeping
        included, Celery's dispatch excluded)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ActionRun.started_at, ActionRun.finished_at)
                                .where(ActionRun.type == "echo").order_by(ActionRun.finished_at.desc())
                                .limit(last)).all()
        return 1000 * percentile([(f - s).total_seconds() for s, f in rows], 50)

    def wait_warmed_up(self, ours_total: int, timeout: float = 120) -> None:
        """Wait until the log has ``ours_total`` succeeded echo actions and every baseline's warm-up is done."""
        deadline = time.monotonic() + timeout
        while self._count(SUCCEEDED) < ours_total or any(self.redis.get(b.done_key) is None
                                                         for b in BASELINES.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("the warm-up actions did not finish")
            self.stack.check_alive()
            time.sleep(0.05)
