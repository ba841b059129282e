"""Orchestrate one bench run: start the stack, warm up, measure (a), (b), (c), report, tear down."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.status import Status

from bench import report
from bench.profile import ROOTS, Profiler, find_py_spy, hottest
from bench.stack import DEFAULT_BROKER_URL, Stack

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
#: Targets of the scenarios (ours/bare): throughput ratios at least, latency ratio at most.
ACCEPT_TARGET, DRAIN_TARGET, LATENCY_P50_TARGET = 0.8, 0.8, 1.5
#: Pause after each latency sample, so an action's bookkeeping after its handler does not overlap the next.
LATENCY_GAP = 0.03
#: Wide enough for the table even when stdout is a pipe (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 110)

#: ``profiled(name, process, enabled)`` → a context manager recording that phase (or doing nothing).
Profiled = Callable[[str, str, bool], contextlib.AbstractContextManager]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Rekku vs bare Celery, in one run.")
    p.add_argument("--actions", type=int, default=2000,
                   help="actions per round for (a) and (b), a multiple of 100 (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (a)+(b), interleaved (default %(default)s)")
    p.add_argument("--samples", type=int, default=200, help="latency samples each for (c) (default %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="latency samples discarded first (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=2, help="processes of each worker (default %(default)s)")
    p.add_argument("--broker-url", default=DEFAULT_BROKER_URL,
                   help="Redis db the bench owns and FLUSHes before and after (default %(default)s)")
    p.add_argument("--database-url", default=None,
                   help="action log database: default SQLite in the bench home; 'mariadb' creates and drops a "
                        "fresh database on 127.0.0.1:3306; a mysql+mysqldb:// URL naming a missing database "
                        "creates and drops it")
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON results (default bench/results/latest.json)")
    p.add_argument("--profile", action="store_true",
                   help="record Rekku's ingress and worker with py-spy (first round and (c)); perturbs the ratios")
    p.add_argument("--py-spy", default=None, help="py-spy executable (default: found on PATH)")
    p.add_argument("--keep-home", action="store_true", help="keep the temp REKKU_HOME (logs, SQLite) afterwards")
    args = p.parse_args(argv)
    if args.actions <= 0 or args.actions % 100:
        p.error("--actions must be a positive multiple of 100 (the HTTP side posts batches of 100)")
    return args


def warm_up(b: Any) -> int:
    """Run 200 echo actions and 100 bare no-ops (connections, pool children, event loops, caches),
    then stop both consumers so (a) fills the queues. Returns the echo actions run so far."""
    from bench.scenarios import BATCH

    b.ours_accept(2 * BATCH)
    b.bare_accept(BATCH)
    b.wait_warmed_up(2 * BATCH)
    b.consume(ours=True, on=False)
    b.consume(ours=False, on=False)
    return 2 * BATCH


def throughput(b: Any, args: argparse.Namespace, done: int, status: Status,
               profiled: Profiled) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(a) then (b) per round, ours and bare in alternating order; returns per-round rates of each."""
    n, timeout = args.actions, max(120.0, args.actions / 10)
    accept: dict[str, list[float]] = {"ours": [], "bare": []}
    drain: dict[str, list[float]] = {"ours": [], "bare": []}
    for r in range(args.rounds):
        order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
        for who in order:
            status.update(f"round {r + 1}/{args.rounds}: (a) {who} enqueueing {n} actions")
            with profiled("a-ingress", "ingress", r == 0 and who == "ours"):
                seconds = b.ours_accept(n) if who == "ours" else b.bare_accept(n)
            accept[who].append(n / seconds)
        for who in order:
            status.update(f"round {r + 1}/{args.rounds}: (b) {who} draining {n} actions")
            with profiled("b-worker", "worker", r == 0 and who == "ours"):
                seconds = b.ours_drain(n, done, timeout) if who == "ours" else b.bare_drain(n, timeout)
            drain[who].append(n / seconds)
        done += n
    return accept, drain


def latency(b: Any, args: argparse.Namespace, profiled: Profiled) -> tuple[dict[str, list[float]], list]:
    """(c): one action at a time, ours and bare alternating, after ``--warmup`` discarded samples each;
    returns the ms samples and ours' (sent, handler start) times."""
    b.consume(ours=True, on=True)
    b.consume(ours=False, on=True)
    for _ in range(args.warmup):
        b.ours_latency()
        time.sleep(LATENCY_GAP)
        b.bare_latency()
        time.sleep(LATENCY_GAP)
    samples: dict[str, list[float]] = {"ours": [], "bare": []}
    ours_times: list[tuple[float, float]] = []
    with profiled("c-ingress", "ingress", True), profiled("c-worker", "worker", True):
        for i in range(args.samples):
            for who in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
                if who == "ours":
                    sent, started = b.ours_latency()
                    ours_times.append((sent, started))
                    samples["ours"].append(1000 * (started - sent))
                else:
                    samples["bare"].append(1000 * b.bare_latency())
                time.sleep(LATENCY_GAP)
    time.sleep(0.5)  # the last action's bookkeeping, before the log is read
    return samples, ours_times


def measure(stack: Stack, args: argparse.Namespace, profiler: Profiler | None = None) -> dict[str, Any]:
    """Warm up, (a)+(b) in interleaved rounds, then (c); returns the figures for the report."""
    from bench.scenarios import BATCH, Bench, percentile

    b = Bench(stack)
    pids = {"ingress": stack.children["ingress"].pid, "worker": stack.children["worker-ours"].pid}

    def profiled(name: str, process: str, enabled: bool) -> contextlib.AbstractContextManager:
        if profiler is None or not enabled:
            return contextlib.nullcontext()
        return profiler.record(name, pids[process], ROOTS[process])

    with console.status("warming up") as status:
        done = warm_up(b)
        accept, drain = throughput(b, args, done, status, profiled)
        status.update(f"(c) latency: {args.samples} samples each")
        samples, ours_times = latency(b, args, profiled)

    med = statistics.median
    p = {who: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for who, v in samples.items()}
    rows = [
        report.row(f"(a) enqueued/s: HTTP, batches of {BATCH} vs apply_async", med(accept["ours"]),
                   med(accept["bare"]), "/s", ACCEPT_TARGET, True),
        report.row(f"(b) drained/s: 1 worker, prefork x{args.concurrency}", med(drain["ours"]),
                   med(drain["bare"]), "/s", DRAIN_TARGET, True),
        report.row("(c) send → handler start, p50", p["ours"]["p50"], p["bare"]["p50"], "ms",
                   LATENCY_P50_TARGET, False),
        report.row("(c) send → handler start, p99", p["ours"]["p99"], p["bare"]["p99"], "ms", None, False),
    ]
    diagnostics = {"ours_latency_legs_p50_ms": b.latency_split(ours_times),
                   "ours_echo_claim_to_finish_p50_ms": b.in_task_ms(args.actions)}
    paired = {f"{k}_ratio_per_round": [o / b_ for o, b_ in zip(v["ours"], v["bare"])]
              for k, v in (("accept", accept), ("drain", drain))}
    return {"rows": rows, "diagnostics": diagnostics, "accept_per_s": accept, "drain_per_s": drain, **paired,
            "latency_ms": {who: {**p[who], "samples": v} for who, v in samples.items()}}


def show_profiles(profiler: Profiler) -> None:
    for name, (path, root) in profiler.recordings.items():
        inclusive, leaves = hottest(path, root)
        console.print(f"[bold]{name}[/bold] ({path}): share of the wall time under {root}")
        console.print("  Rekku functions, inclusive:")
        for func, share in inclusive[1:]:
            console.print(f"    {share:5.1f}%  {func}")
        console.print("  innermost frames, self:")
        for func, share in leaves:
            console.print(f"    {share:5.1f}%  {func}")


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Exit 0 when every target is met, 1 when one is missed, 130 when interrupted."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a `kill` tears down like Ctrl-C
    profiler = Profiler(find_py_spy(args.py_spy), args.output.parent / "profile") if args.profile else None
    stack = Stack(args.broker_url, args.database_url, args.concurrency, keep_home=args.keep_home)
    loadavg_before, started = os.getloadavg(), time.monotonic()
    try:
        with console.status("starting the ingress, the Rekku worker and the bare Celery worker"):
            stack.start()
        figures = measure(stack, args, profiler)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping everything[/yellow]")
        sys.exit(130)
    except BaseException:
        stack.failed = True  # keep the logs
        raise
    finally:
        with console.status("stopping"):
            stack.stop()
    import celery

    results = {
        "config": {"actions": args.actions, "rounds": args.rounds, "samples": args.samples, "warmup": args.warmup,
                   "concurrency": args.concurrency, "broker": args.broker_url,
                   "database": stack.db.url.split("://")[0] if stack.db else "?"},
        "environment": {"python": platform.python_version(), "celery": celery.__version__,
                        "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in loadavg_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                        "seconds": round(time.monotonic() - started, 1),
                        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        **figures,
    }
    report.write_json(results, args.output)
    report.show(results, args.output, console)
    if profiler:
        show_profiles(profiler)
    if any(r["pass"] is False for r in results["rows"]):
        sys.exit(1)
