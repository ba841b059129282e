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
#: Who is measured: Rekku, and the two baselines of bench/bare_app.py.
WHO = ("ours", "bare", "plain")
#: The baselines (bench/bare_app.py, imported only once the stack has set the broker's URL).
BASELINES = WHO[1:]
#: The goals (ours/plain Celery): throughput ratios at least, latency ratios at most. Accept is judged at
#: 100 and at 5 actions per request; at 1 it is shown.
ACCEPT_TARGETS: dict[int, float | None] = {100: 2.0, 5: 1.0, 1: None}
DRAIN_TARGET = 1.0
LATENCY_TARGETS = {"p50": 1.3, "p99": 2.0}
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
    if args.rounds < 1 or args.samples < 1:
        p.error("--rounds and --samples must be at least 1")
    return args


def warm_up(b: Any) -> int:
    """Run 200 echo actions and 100 no-ops of each baseline (connections, pool children, event loops,
    caches), then stop every consumer so (a) fills the queues. Returns the echo actions run so far."""
    from bench.scenarios import BATCH

    b.ours_accept(2 * BATCH)
    for who in BASELINES:
        b.baseline_accept(who, BATCH)
    b.wait_warmed_up(2 * BATCH)
    for who in WHO:
        b.consume(who, on=False)
    return 2 * BATCH


def _order(r: int) -> tuple[str, ...]:
    """Who goes first in round ``r``: rotated, so a drifting load does not always favour the same one."""
    return WHO[r % len(WHO):] + WHO[:r % len(WHO)]


def small_batch_actions(n: int) -> int:
    """Actions (a) posts at each small batch size per round: a quarter of ``n``, a multiple of 5."""
    return max(5, n // 4 // 5 * 5)


def throughput(b: Any, args: argparse.Namespace, done: int, status: Status,
               profiled: Profiled) -> tuple[dict[str, list], dict[str, list]]:
    """(a) then (b) per round, in rotating order; returns per-round :class:`Measured` of each.

    (a) keys: ``ours@100``, ``ours@5``, ``ours@1``, ``bare``, ``plain``; (b) keys: ``ours``, ``bare``, ``plain``.
    Ours' queue holds the actions of all three batch sizes, so its drain counts them all."""
    from bench.scenarios import BATCH, SMALL_BATCHES

    n, m = args.actions, small_batch_actions(args.actions)
    timeout = max(120.0, (n + 2 * m) / 10)
    accept: dict[str, list] = {k: [] for k in ("ours@100", *(f"ours@{k}" for k in SMALL_BATCHES), *BASELINES)}
    drain: dict[str, list] = {k: [] for k in WHO}
    for r in range(args.rounds):
        order = _order(r)
        for who in order:
            status.update(f"round {r + 1}/{args.rounds}: (a) {who} enqueueing")
            if who != "ours":
                accept[who].append(b.baseline_accept(who, n))
                continue
            with profiled("a-ingress", "ingress", r == 0):
                accept[f"ours@{BATCH}"].append(b.ours_accept(n, BATCH))
            for size in SMALL_BATCHES:
                accept[f"ours@{size}"].append(b.ours_accept(m, size))
        for who in order:
            status.update(f"round {r + 1}/{args.rounds}: (b) {who} draining")
            if who == "ours":
                with profiled("b-worker", "worker", r == 0):
                    drain["ours"].append(b.ours_drain(n + 2 * m, done, timeout))
            else:
                drain[who].append(b.baseline_drain(who, n, timeout))
        done += n + 2 * m
    return accept, drain


def latency(b: Any, args: argparse.Namespace, profiled: Profiled) -> tuple[dict[str, dict[str, list[float]]], list]:
    """(c): one action at a time, the three rotating, after ``--warmup`` discarded samples each; taken
    with a pause of LATENCY_GAP after each sample ("paused") and with none ("back to back": Rekku's
    bookkeeping after a handler overlaps the next sample, as it would under steady traffic). Returns the
    ms samples per mode and who, and ours' (sent, handler start) times of both modes, in order."""
    for who in WHO:
        b.consume(who, on=True)

    def sample(who: str) -> tuple[float, tuple[float, float] | None]:
        if who == "ours":
            sent, started = b.ours_latency()
            return 1000 * (started - sent), (sent, started)
        return 1000 * b.baseline_latency(who), None

    for _ in range(args.warmup):
        for who in WHO:
            sample(who)
            time.sleep(LATENCY_GAP)
    samples: dict[str, dict[str, list[float]]] = {}
    ours_times: list[tuple[float, float]] = []
    with profiled("c-ingress", "ingress", True), profiled("c-worker", "worker", True):
        for mode, gap in (("paused", LATENCY_GAP), ("back to back", 0.0)):
            samples[mode] = {who: [] for who in WHO}
            for i in range(args.samples):
                for who in _order(i):
                    ms, times = sample(who)
                    samples[mode][who].append(ms)
                    if times:
                        ours_times.append(times)
                    if gap:
                        time.sleep(gap)
            time.sleep(0.5)  # the last action's bookkeeping, before the next mode or the log is read
    return samples, ours_times


def _per_action_ms(measured: list, actions: int) -> float:
    """Median CPU milliseconds per action over the rounds."""
    return statistics.median(1000 * m.cpu / actions for m in measured)


def measure(stack: Stack, args: argparse.Namespace, profiler: Profiler | None = None) -> dict[str, Any]:
    """Warm up, (a)+(b) in interleaved rounds, then (c); returns the figures for the report."""
    from bench.scenarios import BATCH, SMALL_BATCHES, Bench, percentile

    b = Bench(stack)
    pids = {"ingress": stack.children["ingress"].pid, "worker": stack.children["worker-ours"].pid}

    def profiled(name: str, process: str, enabled: bool) -> contextlib.AbstractContextManager:
        if profiler is None or not enabled:
            return contextlib.nullcontext()
        return profiler.record(name, pids[process], ROOTS[process])

    with console.status("warming up") as status:
        done = warm_up(b)
        accept, drain = throughput(b, args, done, status, profiled)
        status.update(f"(c) latency: {args.samples} samples each, paused and back to back")
        samples, ours_times = latency(b, args, profiled)

    n, m = args.actions, small_batch_actions(args.actions)
    sizes = {f"ours@{BATCH}": n, **{f"ours@{k}": m for k in SMALL_BATCHES}}
    med = statistics.median
    rate = {k: med(sizes.get(k, n) / x.seconds for x in v) for k, v in accept.items()}
    drained = {k: med((n + 2 * m if k == "ours" else n) / x.seconds for x in v) for k, v in drain.items()}
    rows = []
    for key, target in ((f"ours@{BATCH}", ACCEPT_TARGETS[BATCH]), *((f"ours@{k}", ACCEPT_TARGETS.get(k))
                                                                     for k in SMALL_BATCHES)):
        size = int(key.split("@")[1])
        rows.append(report.row(f"(a) enqueued/s, {size} per request vs apply_async", rate[key], rate["plain"],
                               rate["bare"], "/s", target, True))
    rows.append(report.row(f"(b) drained/s, 1 worker, prefork x{args.concurrency}", drained["ours"],
                           drained["plain"], drained["bare"], "/s", DRAIN_TARGET, True))
    p = {mode: {who: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for who, v in by_who.items()}
         for mode, by_who in samples.items()}
    for mode in samples:
        for q, target in (("p50", LATENCY_TARGETS["p50"]), ("p99", LATENCY_TARGETS["p99"])):
            rows.append(report.row(f"(c) send → handler start, {q}, {mode}", p[mode]["ours"][q],
                                   p[mode]["plain"][q], p[mode]["bare"][q], "ms", target, False))
    cpu_rows = [report.row(f"CPU per action, (a) {int(k.split('@')[1])} per request (ingress + client)",
                           _per_action_ms(accept[k], sizes[k]), _per_action_ms(accept["plain"], n),
                           _per_action_ms(accept["bare"], n), "ms", None, False) for k in sizes]
    cpu_rows.append(report.row("CPU per action, (b) worker (main + pool processes)",
                               _per_action_ms(drain["ours"], n + 2 * m), _per_action_ms(drain["plain"], n),
                               _per_action_ms(drain["bare"], n), "ms", None, False))
    diagnostics = {"ours_latency_legs_p50_ms": b.latency_split(ours_times),
                   "ours_echo_start_to_finish_p50_ms": b.in_task_ms(args.actions),
                   "drain_redis_calls_per_action": {
                       who: _calls_per_action(drain[who], n + 2 * m if who == "ours" else n) for who in drain}}
    per_round = {f"accept_ratio_vs_plain_per_round[{k}]": [(sizes[k] / o.seconds) / (n / q.seconds)
                                                           for o, q in zip(accept[k], accept["plain"])]
                 for k in sizes}
    per_round["drain_ratio_vs_plain_per_round"] = [((n + 2 * m) / o.seconds) / (n / q.seconds)
                                                   for o, q in zip(drain["ours"], drain["plain"])]
    return {"rows": rows + cpu_rows, "diagnostics": diagnostics,
            "accept": {k: [{"seconds": x.seconds, "cpu": x.cpu} for x in v] for k, v in accept.items()},
            "drain": {k: [{"seconds": x.seconds, "cpu": x.cpu, "redis_calls": x.redis_calls} for x in v]
                      for k, v in drain.items()},
            **per_round, "latency_ms": {mode: {who: {**p[mode][who], "samples": v} for who, v in by_who.items()}
                                        for mode, by_who in samples.items()}}


def _calls_per_action(rounds: list, actions: int) -> dict[str, float]:
    """Redis commands per drained action, summed over the rounds: all of them, and the round trips
    a worker waits on (MULTI/EXEC blocks, PUBLISH of task events, BRPOP)."""
    total: dict[str, int] = {}
    for measured in rounds:
        for command, calls in (measured.redis_calls or {}).items():
            total[command] = total.get(command, 0) + calls
    done = actions * max(1, len(rounds))
    return {"all": round(sum(total.values()) / done, 2),
            **{c: round(total.get(c, 0) / done, 2) for c in ("exec", "publish", "brpop")}}


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
        with console.status("starting the ingress, the Rekku worker and the two baseline Celery workers"):
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
