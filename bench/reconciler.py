"""``python -m bench.reconciler``: one reconciler pass over a backlog of a million queued actions.

The reconciler must tell an action whose message was lost from one whose message waits in a long
queue. It used to read the whole queue for that (``LRANGE`` and a JSON parse per message) whenever
queued actions were older than the grace; it now asks the held counts (rekku.held) about the due
actions only. This puts ``--messages`` messages in the ``default`` queue (realistic Celery messages:
one published through Rekku's dispatch, copied with other ids), counted as dispatch counts them, and
as many ``queued`` rows in the action log, all older than the grace, so every pass has work to judge.
Then it times full passes (``rekku.reconciler.reconcile``) and checks that they moved nothing out of
Redis and re-enqueued nothing; beside it, the old way's cost: reading the queue whole.

Target: a pass under 1 s with 1,000,000 queued messages, nothing moved. Figures in
``bench/results/reconciler.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import redis
import sqlalchemy as sa

from bench.stack import DEFAULT_BROKER_URL, Database, release_lease, take_lease

RESULTS = Path(__file__).resolve().parent / "results" / "reconciler.json"
TARGET_SECONDS = 1.0
#: Messages (and rows) written per round trip / transaction while filling.
CHUNK = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.reconciler", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="queued actions (default %(default)s)")
    p.add_argument("--passes", type=int, default=5, help="reconciler passes timed (default %(default)s)")
    p.add_argument("--broker-url", default=DEFAULT_BROKER_URL, help="Redis db the bench owns and FLUSHes")
    p.add_argument("--database-url", default="mariadb",
                   help="'mariadb' (default: a fresh database on 127.0.0.1:3306, dropped afterwards), "
                        "'sqlite' (in a temp dir) or a URL")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def fill(client: redis.Redis, url: str, n: int) -> None:
    """``n`` queued actions: messages in ``default`` with their held counts, and their action log rows."""
    from rekku import dispatch, held
    from rekku.action_log import NewRun
    from rekku.models import QUEUED, ActionRun, utcnow

    template_id = str(uuid.uuid4())
    assert dispatch.enqueue([NewRun(template_id, 0, "echo", "default", {}, {"chat_id": "bench"})], "bench") == []
    template = client.rpop("default").decode()
    client.delete(held.key("default"))
    engine = sa.create_engine(url)
    table = ActionRun.__table__
    old = utcnow() - timedelta(hours=1)
    batch = str(uuid.uuid4())
    for start in range(0, n, CHUNK):
        ids = [str(uuid.uuid4()) for _ in range(min(CHUNK, n - start))]
        pipe = client.pipeline(transaction=False)
        held.count_up(pipe, "default", ids)
        for action_id in ids:
            pipe.lpush("default", template.replace(template_id, action_id))
        pipe.execute()
        with engine.begin() as conn:
            conn.execute(sa.insert(table), [
                {"id": i, "batch_id": batch, "position": start + k, "type": "echo", "queue": "default",
                 "status": QUEUED, "payload": {}, "context": {"chat_id": "bench"}, "attempts": 0,
                 "cancel_requested": False, "created_at": old, "updated_at": old} for k, i in enumerate(ids)])
        print(f"\r  {start + len(ids):,}/{n:,} queued", end="", flush=True)
    print()
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="rekku-bench-reconciler-"))
    client = redis.Redis.from_url(args.broker_url)
    take_lease(args.broker_url)
    client.flushdb()
    db = Database.prepare(None if args.database_url == "sqlite" else args.database_url, home)
    os.environ.update(REKKU_HOME=str(home), REKKU_BROKER_URL=args.broker_url, REKKU_DATABASE_URL=db.url,
                      REKKU_API_TOKEN=uuid.uuid4().hex)
    try:
        from rekku.migrate import upgrade
        from rekku.reconciler import queued_ids, reconcile

        upgrade(db.url)
        started = time.monotonic()
        print(f"queueing {args.messages:,} actions ({db.url.split(':', 1)[0]}) …", flush=True)
        fill(client, db.url, args.messages)
        filled_in = time.monotonic() - started
        length = client.llen("default")
        memory = client.info("memory")["used_memory"]
        passes = []
        for _ in range(args.passes):
            t = time.perf_counter()
            outcome = reconcile()
            passes.append(time.perf_counter() - t)
            if any(outcome.values()):
                raise SystemExit(f"a pass re-enqueued actions it should have found held: {outcome}")
        moved = length - client.llen("default")
        t = time.perf_counter()
        whole = len(queued_ids(client, {"default"}))
        scan = time.perf_counter() - t
        result = {"messages": args.messages, "database": db.url.split(":", 1)[0], "fill_seconds": filled_in,
                  "redis_used_memory_mib": memory / 2**20, "pass_seconds": passes,
                  "pass_median_seconds": statistics.median(passes), "pass_max_seconds": max(passes),
                  "messages_moved": moved, "old_way_read_whole_queue_seconds": scan, "old_way_ids": whole,
                  "cpus": os.cpu_count(), "load": os.getloadavg()}
        ok = result["pass_max_seconds"] < TARGET_SECONDS and moved == 0
        result["pass"] = ok
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        print(f"{args.messages:,} queued ({memory / 2**20:,.0f} MiB in Redis): reconciler pass median "
              f"{result['pass_median_seconds']:.3f} s, max {result['pass_max_seconds']:.3f} s over {args.passes}; "
              f"{moved} messages moved; reading the queue whole (the old way) took {scan:.1f} s "
              f"[{'PASS' if ok else 'MISS'}: under {TARGET_SECONDS:g} s, nothing moved]")
        print(f"results: {args.output}")
        return 0 if ok else 1
    finally:
        client.flushdb()
        release_lease(args.broker_url)
        db.drop()


if __name__ == "__main__":
    sys.exit(main())
