"""``python -m bench.events``: 100,000 pending events, 10,000 of them due at the same moment.

Measures, through the outbox interface: how long after the due time all the due reminders are
delivered, the lateness p50/p99 of each (when a poller following the outbox in commit order could first
see it − due time; the rows' own ``created_at`` − due time is shown beside it), and duplicates
(reminders stored twice for one occurrence, or occurrences recorded twice: must be 0), and the CPU
each process (and the local MariaDB) spent on the burst. Targets: all delivered within 10 s of the due
time (``--within``; the 10x run's goal is 20 s), p99 lateness ≤ tick + 1 s, 0 duplicates.

The events are written straight into ``scheduled_events`` (creating 100,000 through the ingress
would measure the ingress, not the scheduler); one default worker runs the dispatcher, ``--io-workers``
io workers (threads) the deliveries, one beat ticks every ``--tick`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import redis
import sqlalchemy as sa

from bench.stack import DEFAULT_BROKER_URL, ROOT, Database, release_lease, take_lease, wait_until
from rekku.supervisor import die_with_parent

RESULTS = Path(__file__).resolve().parent / "results" / "events.json"
#: Targets: every due reminder delivered within this many seconds of the due time; p99 within tick + this.
DELIVERED_WITHIN, P99_SLACK = 10.0, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=100_000, help="pending events (default %(default)s)")
    p.add_argument("--due", type=int, default=10_000, help="of which due at the same moment (default %(default)s)")
    p.add_argument("--tick", type=float, default=5.0,
                   help="EVENT_TICK_SECONDS (default %(default)s, the product's default; --tick 1 is the stricter run)")
    p.add_argument("--lead", type=float, default=25.0,
                   help="seconds from inserting the events to their due time (workers start meanwhile)")
    p.add_argument("--io-workers", type=int, default=4, help="io worker processes (default %(default)s)")
    p.add_argument("--io-concurrency", type=int, default=2, help="threads of each io worker (default %(default)s)")
    p.add_argument("--within", type=float, default=DELIVERED_WITHIN,
                   help="target: every due reminder visible within this many seconds (default %(default)s; "
                        "the 10x run's goal is 20)")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds after the due time to wait for the reminders (default %(default)s)")
    p.add_argument("--broker-url", default=DEFAULT_BROKER_URL, help="Redis db the bench owns and FLUSHes")
    p.add_argument("--database-url", default="mariadb",
                   help="'mariadb' (default: a fresh database on 127.0.0.1:3306, dropped afterwards), "
                        "'sqlite' (in the bench home) or a URL")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--keep-home", action="store_true")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def insert_events(url: str, total: int, due: int, due_at: datetime) -> None:
    from rekku_plugins.event.engine import events, new_event

    from rekku.schedule import Rule

    engine = sa.create_engine(url)
    now = datetime.now(timezone.utc)
    zone = ZoneInfo("Europe/Rome")
    rows = []
    for i in range(total):
        at = due_at if i < due else due_at + timedelta(days=1 + i % 365, seconds=i)
        rule = Rule(tz="Europe/Rome", start=at.astimezone(zone).replace(tzinfo=None).isoformat(), repeat="none")
        rows.append(new_event(rule, at, f"bench event {i}", "outbox", f"bench-{i % 100}", now=now))
        if len(rows) == 5000:
            with engine.begin() as conn:
                conn.execute(sa.insert(events), rows)
            rows = []
    if rows:
        with engine.begin() as conn:
            conn.execute(sa.insert(events), rows)
    engine.dispose()


#: Seconds between a poller's reads of the outbox (its own delay in seeing a reminder, at most this).
POLL_INTERVAL = 0.02


class OutboxPoller(threading.Thread):
    """Follows the outbox as a client of ``GET /v1/outbox?after=`` does (ids in commit order, read in
    id order from the last one seen) and records when each message first became visible.

    The reminders' own ``created_at`` is stamped before their chunk's transaction and before the outbox
    order lock, so time spent waiting behind other writers is left out of it; the time a poller can see
    a message is what a user of the outbox gets."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="outbox-poller")
        self.engine = sa.create_engine(url)
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from rekku.interfaces.models import OutboxMessage

        table = OutboxMessage.__table__
        after = 0
        while not self.stop.is_set():
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(table.c.id, table.c.action_id).where(table.c.id > after)
                                    .order_by(table.c.id).limit(5000)).all()
            now = time.time()
            for row in rows:
                self.seen.setdefault(row.action_id, now)
            if rows:
                after = rows[-1].id
            else:
                self.stop.wait(POLL_INTERVAL)
        self.engine.dispose()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mariadb_pid(url: str) -> int | None:
    """The local MariaDB server's pid, when the database is on this machine (its CPU is then read too;
    it is shared, so anything else using it at the time is counted as well)."""
    if not url.startswith("mysql") or ("127.0.0.1" not in url and "localhost" not in url):
        return None
    found = subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


class CpuMeter:
    """CPU spent by each of the bench's children and by MariaDB between :meth:`start` and :meth:`stop`
    (the burst: from the due time until the last reminder is delivered)."""

    def __init__(self, children: dict[str, subprocess.Popen], database_pid: int | None) -> None:
        self.pids = {name: proc.pid for name, proc in children.items()}
        if database_pid:
            self.pids["mariadb"] = database_pid
        self.before: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.spent = {name: round(cpu_seconds(pid) - self.before[name], 2) for name, pid in self.pids.items()}


def measure(url: str, due: int, due_at: datetime, timeout: float, poller: OutboxPoller,
            meter: CpuMeter | None = None) -> dict:
    from rekku_plugins.event.engine import DELIVERED, deliveries, events, message_id

    from rekku.interfaces.models import OutboxMessage

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        due_ids = conn.scalars(sa.select(events.c.id).where(events.c.next_run == due_at)).all()
    reminder_ids = {message_id(event_id, due_at, "reminder") for event_id in due_ids}
    deadline = time.monotonic() + timeout
    table = OutboxMessage.__table__
    done = 0
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            done = conn.scalar(sa.select(sa.func.count()).select_from(deliveries)
                               .where(deliveries.c.status == DELIVERED))
        if done >= due:
            break
        time.sleep(0.2)
    if meter is not None:
        meter.stop()
    time.sleep(2)  # a few more ticks: anything delivered twice shows up
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table.c.action_id, table.c.created_at)
                            .where(table.c.text.like("⏰ Reminder:%"))).all()
        recorded = conn.scalar(sa.select(sa.func.count()).select_from(deliveries))
        claimed = conn.execute(sa.select(sa.func.min(deliveries.c.created_at), sa.func.max(deliveries.c.created_at))
                               .where(deliveries.c.occurrence == due_at)).one()
        occurrences = conn.scalar(sa.select(sa.func.count(sa.distinct(deliveries.c.event_id))))
    engine.dispose()
    poller.stop.set()
    poller.join(10)
    ours = [r for r in rows if r.action_id in reminder_ids]
    stamped = [(r.created_at.replace(tzinfo=timezone.utc) - due_at).total_seconds() for r in ours]
    late = [poller.seen[r.action_id] - due_at.timestamp() for r in ours if r.action_id in poller.seen]
    duplicates = (len(ours) - len({r.action_id for r in ours})) + (recorded - occurrences)
    return {"due": due, "delivered": len({r.action_id for r in ours}), "stray": len(rows) - len(ours),
            "duplicates": duplicates, "all_delivered_after_s": max(late) if late else None,
            # lateness = when a poller following the outbox could see it (commit order) - due time
            "lateness_p50_s": percentile(late, 50) if late else None,
            "lateness_p99_s": percentile(late, 99) if late else None,
            "lateness_min_s": min(late) if late else None,
            "unseen_by_poller": len(ours) - len(late),
            # the outbox rows' own created_at - due time (stamped before the commit and the order lock)
            "stamped_lateness_p50_s": percentile(stamped, 50) if stamped else None,
            "stamped_lateness_p99_s": percentile(stamped, 99) if stamped else None,
            # when the dispatchers that claimed them started, relative to the due time (negative: ahead of it)
            "claimed_from_s": _relative(claimed[0], due_at), "claimed_until_s": _relative(claimed[1], due_at),
            # reminders delivered in each second after the due time: a flat rate is throughput-bound, a
            # late first bucket is start-up (tick, claim) bound
            "delivered_per_second": _histogram(late)}


def _relative(at: datetime | None, due_at: datetime) -> float | None:
    return None if at is None else round((at.replace(tzinfo=timezone.utc) - due_at).total_seconds(), 3)


def _histogram(late: list[float]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in sorted(late):
        key = f"{int(value)}-{int(value) + 1}s"
        counts[key] = counts.get(key, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="rekku-bench-events-"))
    (home / "logs").mkdir()
    broker = redis.Redis.from_url(args.broker_url)
    take_lease(args.broker_url)
    broker.flushdb()
    db = Database.prepare(None if args.database_url == "sqlite" else args.database_url, home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REKKU_", "DB_", "TRAINER", "FLOWER"))}
    env.update(REKKU_HOME=str(home), REKKU_BROKER_URL=args.broker_url, REKKU_DATABASE_URL=db.url,
               REKKU_API_TOKEN=uuid.uuid4().hex, REKKU_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1",
               EVENT_TICK_SECONDS=str(args.tick), TZ="Europe/Rome")
    os.environ.update({k: v for k, v in env.items() if k.startswith("REKKU_") or k == "EVENT_TICK_SECONDS"})
    children: list[subprocess.Popen] = []
    named: dict[str, subprocess.Popen] = {}

    def spawn(name: str, *argv: str) -> subprocess.Popen:
        with open(home / "logs" / f"{name}.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "rekku", *argv], env=env, cwd=str(ROOT),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_parent)
        children.append(proc)
        named[name] = proc
        return proc

    failed = True
    try:
        subprocess.run([sys.executable, "-m", "rekku", "migrate"], env=env, cwd=str(ROOT), check=True,
                       stdout=subprocess.DEVNULL)
        started = time.monotonic()
        due_at = (datetime.now(timezone.utc) + timedelta(seconds=args.lead)).replace(microsecond=0)
        print(f"inserting {args.events:,} events ({args.due:,} due at {due_at.isoformat()}) …", flush=True)
        insert_events(db.url, args.events, args.due, due_at)
        print(f"inserted in {time.monotonic() - started:.1f} s; starting workers and beat", flush=True)
        spawn("worker-default", "worker", "--pool", "default", "--concurrency", "2", "--node", f"bev{os.getpid()}")
        for n in range(args.io_workers):
            spawn(f"worker-io{n}", "worker", "--pool", "io", "--concurrency", str(args.io_concurrency),
                  "--node", f"bev{os.getpid()}-{n}")
        spawn("beat", "beat")
        left = (due_at - datetime.now(timezone.utc)).total_seconds()
        if left < 3:
            raise SystemExit(f"the events were due before the workers started ({left:.1f} s left); raise --lead")
        poller = OutboxPoller(db.url)
        poller.start()
        meter = CpuMeter(named, mariadb_pid(db.url))
        load_before = os.getloadavg()
        wait_until(lambda: datetime.now(timezone.utc) >= due_at, left + 1, "the due time", interval=0.05)
        meter.start()
        result = measure(db.url, args.due, due_at, timeout=args.wait, poller=poller, meter=meter)
        io = sum(v for k, v in meter.spent.items() if k.startswith("worker-io"))
        result.update(events=args.events, tick_s=args.tick, database=db.url.split(":", 1)[0],
                      io_workers=args.io_workers, io_concurrency=args.io_concurrency,
                      cpus=os.cpu_count(), load_before=load_before, load_after=os.getloadavg(),
                      # CPU seconds from the due time until the last reminder was recorded delivered
                      cpu_s=meter.spent,
                      io_cpu_ms_per_occurrence=round(1000 * io / args.due, 3),
                      mariadb_cpu_ms_per_occurrence=round(1000 * meter.spent["mariadb"] / args.due, 3)
                      if "mariadb" in meter.spent else None)
        checks = {"all delivered": result["delivered"] == args.due,
                  f"within {args.within:g} s": (result["all_delivered_after_s"] or 1e9) <= args.within,
                  f"p99 ≤ tick + {P99_SLACK:g} s": (result["lateness_p99_s"] or 1e9) <= args.tick + P99_SLACK,
                  "no duplicates": result["duplicates"] == 0}
        result["checks"] = checks
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str))
        print(f"delivered {result['delivered']:,}/{args.due:,} (of {args.events:,} pending) · all within "
              f"{result['all_delivered_after_s']:.2f} s of due · lateness p50 {result['lateness_p50_s']:.2f} s, "
              f"p99 {result['lateness_p99_s']:.2f} s (tick {args.tick:g} s) · duplicates {result['duplicates']}")
        print(f"  lateness as the poller saw it (commit order, polled every {POLL_INTERVAL * 1000:g} ms); by the "
              f"rows' created_at: p50 {result['stamped_lateness_p50_s']:.2f} s, "
              f"p99 {result['stamped_lateness_p99_s']:.2f} s")
        print(f"  claimed by dispatchers started {result['claimed_from_s']} s to {result['claimed_until_s']} s "
              "after the due time (negative: ahead of it)")
        print("  per second after due: " + ", ".join(f"{k} {v:,}" for k, v in result["delivered_per_second"].items()))
        print(f"  CPU from the due time to the last delivery: io workers {io:.1f} s "
              f"({result['io_cpu_ms_per_occurrence']} ms per occurrence), MariaDB "
              + (f"{meter.spent['mariadb']:.1f} s ({result['mariadb_cpu_ms_per_occurrence']} ms)"
                 if "mariadb" in meter.spent else "not measured")
              + f", dispatcher {meter.spent.get('worker-default', 0):.1f} s; load average "
              f"{load_before[0]:.1f} before, {result['load_after'][0]:.1f} after")
        for name, ok in checks.items():
            print(f"  {'PASS' if ok else 'MISS'}  {name}")
        print(f"results: {args.output}")
        failed = not all(checks.values())
        return 1 if failed else 0
    finally:
        for proc in children:
            try:
                os.killpg(proc.pid, 15)
            except ProcessLookupError:
                pass
        for proc in children:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        broker.flushdb()
        release_lease(args.broker_url)
        db.drop()
        if args.keep_home or failed:
            print(f"bench home kept: {home}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
