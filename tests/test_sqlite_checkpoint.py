"""SQLite's write-ahead log is moved into the database file by a thread of each process, not by the
commit that fills it (rekku/db.py): that commit used to pay a checkpoint with an fsync, every ~50
actions, which was the p99 latency's excess over plain Celery (bench/README.md)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from rekku import db
from rekku.db import make_engine

CHECKPOINT_SECONDS = getattr(db, "CHECKPOINT_SECONDS", 0.5)


def _checkpointers() -> int:
    return sum(t.name == "rekku-sqlite-checkpoint" for t in threading.enumerate())


def test_commits_leave_the_checkpoint_to_a_thread_that_ends_with_its_engine(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    before = _checkpointers()
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        # no commit through this engine checkpoints on its own
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    for _ in range(20):  # ~300 KB of rows, all in the write-ahead log until a checkpoint
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "x" * 500}] * 30)
    assert _checkpointers() == before + 1

    # nobody commits now: the checkpointer alone moves the rows into the database file
    deadline = time.monotonic() + 20 * CHECKPOINT_SECONDS
    while path.stat().st_size < 250_000:
        assert time.monotonic() < deadline, f"not checkpointed: the database file has {path.stat().st_size} bytes"
        time.sleep(0.05)

    engine.dispose()
    del engine, conn
    gc.collect()
    deadline = time.monotonic() + 10 * CHECKPOINT_SECONDS
    while _checkpointers() > before:  # the thread holds the engine weakly and ends with it
        assert time.monotonic() < deadline, "the checkpointer outlived its engine"
        time.sleep(0.05)
