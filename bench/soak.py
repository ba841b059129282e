"""Soak: many no-op actions through the ingress and one worker; throughput over time and worker memory.

    python -m bench.soak                 # 100,000 echo actions (about 10 minutes on 2 cores)
    python -m bench.soak --actions 20000

A submitter thread posts batches of 100 while the worker drains, so the system runs in its steady
state. Every ``--window`` seconds the number of finished actions is read from the action log; the
worker's RSS is taken once the first 2 % are done and again at the end, for the main process and for
each pool process apart (summed, pages shared after fork count several times and dilute growth).
Then the same soak runs on a baseline's worker (``--baseline``, plain Celery by default), for
comparison. Target: no process of Rekku's worker grows by 10 % or more.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bench.scenarios import BATCH, Ingress
from bench.stack import DEFAULT_BROKER_URL, Stack, wait_until
from rekku.db import make_engine
from rekku.models import FAILED, SUCCEEDED, ActionRun

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
#: Most RSS growth accepted between the warm start and the end, in percent.
TARGET_GROWTH = 10.0


def rss_by_process(root: int) -> dict[int, int]:
    """Resident memory (KiB) of ``root`` and of each process in its process group, by pid, read from
    /proc. Reported apart: summed, pages shared after fork count several times and dilute growth."""
    pgid = os.getpgid(root)
    found: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[int(pid)] = int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return found


def finished(engine: sa.Engine) -> tuple[int, int]:
    runs = ActionRun.__table__
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(runs.c.status, sa.func.count()).where(
            runs.c.status.in_((SUCCEEDED, FAILED))).group_by(runs.c.status)).all())
    return rows.get(SUCCEEDED, 0), rows.get(FAILED, 0)


@dataclass
class Soaked:
    """One soak's figures: throughput windows and the worker's memory, main process and children apart."""

    who: str
    actions: int
    seconds: float
    failed: int
    windows: list[tuple[float, float, int]]  # (t, finished/s, main process RSS KiB)
    start: dict[int, int]
    end: dict[int, int]
    main_pid: int

    def growth(self, pid: int) -> float:
        return 100.0 * (self.end[pid] - self.start[pid]) / self.start[pid]

    @property
    def processes(self) -> list[tuple[str, int, int, float]]:
        """(role, start KiB, end KiB, growth %) of every process alive at both ends, the main one first;
        a pool process replaced meanwhile has no pair and is left out (counted in ``replaced``)."""
        both = sorted(set(self.start) & set(self.end), key=lambda p: (p != self.main_pid, p))
        return [("main" if p == self.main_pid else f"child {p}", self.start[p], self.end[p], self.growth(p))
                for p in both]

    @property
    def replaced(self) -> int:
        return len(set(self.start) ^ set(self.end))

    @property
    def worst_growth(self) -> float:
        return max((g for *_, g in self.processes), default=0.0)


def soak(who: str, actions: int, window: float, submit: Callable[[int], None],
         done: Callable[[], tuple[int, int]], worker_pid: int, stack: Stack) -> Soaked:
    """Submit ``actions`` from a thread (``submit(n)`` sends n) while one worker drains; sample every
    ``window`` seconds."""
    submitted = 0

    def submit_all() -> None:
        nonlocal submitted
        while submitted < actions:
            n = min(BATCH, actions - submitted)
            submit(n)
            submitted += n

    submitter = threading.Thread(target=submit_all, daemon=True)
    t0 = time.monotonic()
    submitter.start()
    wait_until(lambda: done()[0] >= max(1, actions // 50), 600, f"{who}: the warm-up actions")
    start = rss_by_process(worker_pid)
    windows: list[tuple[float, float, int]] = []
    last_done, last_t = done()[0], time.monotonic()
    while True:
        time.sleep(window)
        finished_now, failed = done()
        now = time.monotonic()
        windows.append((now - t0, (finished_now - last_done) / (now - last_t),
                        rss_by_process(worker_pid).get(worker_pid, 0)))
        last_done, last_t = finished_now, now
        stack.check_alive()
        if finished_now + failed >= actions:
            break
    return Soaked(who, actions, time.monotonic() - t0, failed, windows, start, rss_by_process(worker_pid),
                  worker_pid)


def show(console: Console, result: Soaked) -> None:
    table = Table(title=f"soak ({result.who}): {result.actions} actions, 1 worker", header_style="bold")
    for col in ("t (s)", "finished/s", "main RSS MiB"):
        table.add_column(col, justify="right")
    for t, rate, rss in result.windows:
        table.add_row(f"{t:.0f}", f"{rate:.0f}", f"{rss / 1024:.1f}")
    console.print(table)
    for role, start, end, growth in result.processes:
        console.print(f"  {role}: {start / 1024:.1f} → {end / 1024:.1f} MiB ({growth:+.1f} %)")
    if result.replaced:
        console.print(f"  {result.replaced} pool processes were replaced meanwhile (not compared)")


def run(args: argparse.Namespace) -> int:
    console = Console()
    stack = Stack(args.broker_url, args.database_url, args.concurrency)
    try:
        stack.start()
        from bench.bare_app import BASELINES

        engine = make_engine(stack.db.url)
        client = Ingress(stack.port, stack.token)
        body = {n: json.dumps({"actions": [{"type": "echo", "payload": {}}] * n}).encode() for n in (BATCH,)}

        def ours_submit(n: int) -> None:
            client.post_actions(body.get(n) or json.dumps({"actions": [{"type": "echo", "payload": {}}] * n}).encode())

        ours = soak("ours", args.actions, args.window, ours_submit, lambda: finished(engine),
                    stack.children["worker-ours"].pid, stack)
        show(console, ours)
        results = [ours]
        if args.baseline != "none":
            base = BASELINES[args.baseline]
            stack.redis().delete(base.count_key, base.done_key)

            def base_submit(n: int) -> None:
                for _ in range(n):
                    base.noop.apply_async(kwargs={"target": args.actions})

            def base_done() -> tuple[int, int]:
                return int(stack.redis().get(base.count_key) or 0), 0

            theirs = soak(args.baseline, args.actions, args.window, base_submit, base_done,
                          stack.children[f"worker-{args.baseline}"].pid, stack)
            show(console, theirs)
            results.append(theirs)
        ok = ours.worst_growth < TARGET_GROWTH and ours.failed == 0
        console.print(f"ours: {ours.seconds:.0f} s, {ours.actions / ours.seconds:.0f} actions/s overall, failed "
                      f"{ours.failed}; largest growth of one process {ours.worst_growth:+.1f} % (target < "
                      f"{TARGET_GROWTH:g} %): [{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/]")
        for other in results[1:]:
            console.print(f"{other.who}: {other.seconds:.0f} s, {other.actions / other.seconds:.0f} tasks/s overall; "
                          f"largest growth of one process {other.worst_growth:+.1f} %")
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps([{
            "who": r.who, "actions": r.actions, "seconds": r.seconds, "failed": r.failed, "windows": r.windows,
            "processes": [{"role": role, "rss_start_kib": a, "rss_end_kib": b, "growth_percent": g}
                          for role, a, b, g in r.processes],
            "replaced_processes": r.replaced, "worst_growth_percent": r.worst_growth} for r in results]
            + [{"pass": ok}], indent=2))
        return 0 if ok else 1
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--actions", type=int, default=100_000)
    p.add_argument("--window", type=float, default=10.0, help="seconds per throughput sample")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--baseline", choices=("plain", "bare", "none"), default="plain",
                   help="then the same soak on a baseline's worker (default %(default)s)")
    p.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    p.add_argument("--database-url", default=None, help="as for python -m bench (default: SQLite)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
