"""Soak: many no-op actions through the ingress and one worker; throughput over time and worker memory.

    python -m bench.soak                 # 100,000 echo actions (about 10 minutes on 2 cores)
    python -m bench.soak --actions 20000

A submitter thread posts batches of 100 while the worker drains, so the system runs in its steady
state. Every ``--window`` seconds the number of finished actions is read from the action log; the
worker's RSS (main process plus its pool processes) is taken once the first 2 % are done and again
at the end. Target: RSS growth under 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
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


def group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in a process group, in KiB (read from /proc)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total


def finished(engine: sa.Engine) -> tuple[int, int]:
    runs = ActionRun.__table__
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.select(runs.c.status, sa.func.count()).where(
            runs.c.status.in_((SUCCEEDED, FAILED))).group_by(runs.c.status)).all())
    return rows.get(SUCCEEDED, 0), rows.get(FAILED, 0)


def run(args: argparse.Namespace) -> int:
    console = Console()
    stack = Stack(args.broker_url, args.database_url, args.concurrency)
    try:
        stack.start()
        engine = make_engine(stack.db.url)
        worker_pgid = os.getpgid(stack.children["worker-ours"].pid)
        submitted = 0

        def submit_all() -> None:
            nonlocal submitted
            client = Ingress(stack.port, stack.token)
            while submitted < args.actions:
                n = min(BATCH, args.actions - submitted)
                client.post_actions(json.dumps({"actions": [{"type": "echo", "payload": {}}] * n}).encode())
                submitted += n

        submitter = threading.Thread(target=submit_all, daemon=True)
        t0 = time.monotonic()
        submitter.start()
        wait_until(lambda: finished(engine)[0] >= max(1, args.actions // 50), 600, "the warm-up actions")
        rss_start = group_rss_kib(worker_pgid)
        windows: list[tuple[float, float, int]] = []  # (t, finished/s, worker RSS KiB): a plateau or a slope
        last_done, last_t = finished(engine)[0], time.monotonic()
        while True:
            time.sleep(args.window)
            done, failed = finished(engine)
            now = time.monotonic()
            windows.append((now - t0, (done - last_done) / (now - last_t), group_rss_kib(worker_pgid)))
            last_done, last_t = done, now
            stack.check_alive()
            if done + failed >= args.actions:
                break
        rss_end = group_rss_kib(worker_pgid)
        elapsed = time.monotonic() - t0
        growth = 100.0 * (rss_end - rss_start) / rss_start
        table = Table(title=f"soak: {args.actions} echo actions, 1 worker x{args.concurrency}", header_style="bold")
        table.add_column("t (s)", justify="right")
        table.add_column("finished/s", justify="right")
        table.add_column("worker RSS MiB", justify="right")
        for t, rate, rss in windows:
            table.add_row(f"{t:.0f}", f"{rate:.0f}", f"{rss / 1024:.1f}")
        console.print(table)
        ok = growth < TARGET_GROWTH and failed == 0
        console.print(f"total {elapsed:.0f} s, {args.actions / elapsed:.0f} actions/s overall, failed {failed}; "
                      f"worker RSS {rss_start / 1024:.1f} MiB → {rss_end / 1024:.1f} MiB ({growth:+.1f} %, "
                      f"target < {TARGET_GROWTH:g} %): [{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/]")
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"actions": args.actions, "seconds": elapsed, "failed": failed,
                                       "windows": windows, "rss_start_kib": rss_start, "rss_end_kib": rss_end,
                                       "rss_growth_percent": growth, "pass": ok}, indent=2))
        return 0 if ok else 1
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--actions", type=int, default=100_000)
    p.add_argument("--window", type=float, default=10.0, help="seconds per throughput sample")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--broker-url", default=DEFAULT_BROKER_URL)
    p.add_argument("--database-url", default=None, help="as for python -m bench (default: SQLite)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
