"""SQLite's write-ahead log is moved into the database file by a thread of each process, not by the
commit that fills it (rekku/db.py): that commit used to pay a checkpoint with an fsync, every ~50
actions, which was the p99 latency's excess over plain Celery (bench/README.md)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from rekku.db import AUTOCHECKPOINT_PAGES, make_engine


def _checkpointers() -> int:
    return sum(t.name == "rekku-sqlite-checkpoint" for t in threading.enumerate())


def test_commits_leave_the_checkpoint_to_a_thread_that_ends_with_its_engine(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    before = _checkpointers()
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        # commits checkpoint on their own only at the bound, not at SQLite's 1,000 pages
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == AUTOCHECKPOINT_PAGES > 1000
    for _ in range(20):  # ~300 KB of rows, all in the write-ahead log until a checkpoint
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "x" * 500}] * 30)
    assert _checkpointers() == before + 1

    # nobody commits now: the checkpointer alone moves the rows into the database file
    deadline = time.monotonic() + 10
    while path.stat().st_size < 250_000:
        assert time.monotonic() < deadline, f"not checkpointed: the database file has {path.stat().st_size} bytes"
        time.sleep(0.05)

    engine.dispose()
    del engine, conn
    gc.collect()
    deadline = time.monotonic() + 10
    while _checkpointers() > before:  # the thread holds the engine weakly and ends with it
        assert time.monotonic() < deadline, "the checkpointer outlived its engine"
        time.sleep(0.05)


def test_the_write_ahead_log_stays_bounded_while_commits_never_pause(tmp_path: Path) -> None:
    """A passive checkpoint only lets the next writer start the log anew if it ended between two
    commits; under commits that never pause, the commit at AUTOCHECKPOINT_PAGES does, so the log does
    not grow without bound (with no bound it reached 370 MB in 6,000 requests)."""
    path = tmp_path / "busy.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    bound = min(2 * AUTOCHECKPOINT_PAGES * 4096, 48 << 20)  # bytes, at SQLite's default page size
    written, largest = 0, 0
    while written < 64 << 20:  # 64 MB of rows: four times the default bound's worth of log
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "y" * 1000}] * 40)
        written += 40 * 1000
        wal = Path(f"{path}-wal")
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    assert largest < bound, f"the write-ahead log grew to {largest} bytes"
    engine.dispose()
