"""How long the pruner (rekku/retention.py) takes for 200,000 old rows, on SQLite and on MariaDB.

    python -m bench.retention [--db sqlite|mariadb|both] [--batch N]

Each database is new (MariaDB at 127.0.0.1:3306 as root, as the test suite uses it; SQLite in a
temporary directory), filled by the server itself (INSERT ... SELECT over a generated sequence) with the
rows of tests/test_retention.py's load test (60,000 finished actions four to a batch, their 15,000
batches, 70,000 outbox messages, 55,000 feed items), then pruned once; the pass's report is printed:
its seconds, batches, and the longest single batch transaction. Nothing else runs beside it, unlike the
load test, where actions flow during the prune.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

LOAD = {"actions": 60_000, "batches": 15_000, "outbox": 70_000, "feed": 55_000}


def _fill(engine, old) -> None:  # noqa: ANN001 - a bench script
    sqlite = engine.dialect.name == "sqlite"

    def seq(n: int) -> str:
        if sqlite:
            return (f"(WITH RECURSIVE s(seq) AS (SELECT 1 UNION ALL SELECT seq + 1 FROM s WHERE seq < {n}) "
                    "SELECT seq FROM s)")
        return f"seq_1_to_{n}"

    uuid_sql = "lower(hex(randomblob(16)))" if sqlite else "UUID()"
    concat = (lambda *parts: " || ".join(f"({p})" for p in parts)) if sqlite else \
        (lambda *parts: f"CONCAT({', '.join(parts)})")
    div = "/" if sqlite else "DIV"
    mod = "%" if sqlite else "MOD"
    with engine.begin() as connection:
        sql = connection.exec_driver_sql
        mark = "?" if sqlite else "%s"
        sql("INSERT INTO action_runs (id, batch_id, position, type, queue, status, payload, attempts, lost_runs, "
            f"cancel_requested, created_at, updated_at) SELECT {uuid_sql}, "
            f"{concat(repr('load-'), f'(seq - 1) {div} 4')}, "
            f"(seq - 1) {mod} 4, 'tk_sync', 'default', 'succeeded', '{{}}', 1, 0, 0, {mark}, {mark} "
            f"FROM {seq(LOAD['actions'])} AS q", (old, old))
        sql(f"INSERT INTO action_batches (id, created_at) SELECT {concat(repr('load-'), 'seq - 1')}, {mark} "
            f"FROM {seq(LOAD['batches'])} AS q", (old,))
        sql("INSERT INTO outbox_messages (chat_id, thread_id, text, created_at) SELECT 'load', '', 'old', "
            f"{mark} FROM {seq(LOAD['outbox'])} AS q", (old,))
        sql("INSERT INTO feed_items (type, interface, chat_id, thread_id, data, created_at) SELECT 'message', "
            f"'outbox', 'c', '', '{{}}', {mark} FROM {seq(LOAD['feed'])} AS q", (old,))


def measure(kind: str, batch: int) -> dict:
    os.environ["REKKU_PRUNE_BATCH"] = str(batch)
    from rekku import retention
    from rekku.db import get_engine
    from rekku.migrate import upgrade
    from rekku.models import utcnow
    from rekku.settings import get_settings
    from tests.support import create_mariadb, drop_mariadb

    with tempfile.TemporaryDirectory(prefix="rekku-bench-retention-") as home:
        os.environ["REKKU_HOME"] = home
        name = None
        if kind == "mariadb":
            name, url = create_mariadb()
        else:
            url = f"sqlite:///{Path(home) / 'rekku.db'}"
        os.environ["REKKU_DATABASE_URL"] = url
        get_settings.cache_clear()
        try:
            upgrade(url)
            engine = get_engine(url)
            started = time.monotonic()
            _fill(engine, (utcnow() - timedelta(days=40)).replace(tzinfo=None))
            filled = time.monotonic() - started
            report = retention.prune(get_settings(), engine=engine)
        finally:
            get_engine(url).dispose()
            if name:
                drop_mariadb(name)
    out = report.as_dict()
    return {"db": kind, "rows": sum(LOAD.values()), "filled_seconds": round(filled, 1), "batch_size": batch,
            "pruned": report.total, "seconds": out["seconds"], "batches": out["batches"],
            "longest_batch_seconds": out["longest_batch_seconds"],
            "by_kind": {k["kind"]: {"count": k["count"], "longest_batch_seconds": k["longest_batch_seconds"]}
                        for k in out["kinds"] if k["count"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=["sqlite", "mariadb", "both"], default="both")
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    for kind in (["sqlite", "mariadb"] if args.db == "both" else [args.db]):
        print(json.dumps(measure(kind, args.batch)))


if __name__ == "__main__":
    main()
