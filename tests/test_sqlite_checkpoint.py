"""SQLite's write-ahead log is moved into the database file by a thread of each process, not by the
commit that fills it (rekku/db.py): that commit used to pay a checkpoint with an fsync, every ~50
actions, which was the p99 latency's excess over plain Celery (bench/README.md)."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from rekku.db import AUTOCHECKPOINT_PAGES, make_engine


def _checkpointers() -> set[threading.Thread]:
    """The checkpointer threads alive now: a test compares sets, since another test's engine, dropped
    earlier in this process, may end its own checkpointer at any time."""
    return {t for t in threading.enumerate() if t.name == "rekku-sqlite-checkpoint"}


def _open_files(path: Path) -> list[str]:
    """The files of this process open on the database (the file itself, its log, its shared memory)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _fill(engine: sa.Engine) -> None:
    for _ in range(20):  # ~300 KB of rows, all in the write-ahead log until a checkpoint
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "x" * 500}] * 30)


def test_commits_leave_the_checkpoint_to_a_thread_that_stops_when_its_engine_is_disposed(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    before = _checkpointers()
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        # commits checkpoint on their own only at the bound, not at SQLite's 1,000 pages
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == AUTOCHECKPOINT_PAGES > 1000
    _fill(engine)
    (mine,) = _checkpointers() - before

    # nobody commits now: the checkpointer alone moves the rows into the database file
    _wait(lambda: path.stat().st_size >= 250_000,
          f"not checkpointed: the database file has {path.stat().st_size} bytes")

    # a disposed engine leaves no thread and no open file behind (a test's temporary database, or
    # a tool's, can go); it used to end only once the engine was garbage-collected, which an engine
    # in a reference cycle is not until a full collection (CI saw it outlive its engine by 10 s)
    engine.dispose()
    _wait(lambda: not mine.is_alive(), "the checkpointer outlived the dispose")
    assert _open_files(path) == []

    # used again, the engine checkpoints again
    _fill(engine)
    (again,) = _checkpointers() - before
    size = path.stat().st_size
    _wait(lambda: path.stat().st_size > size, "not checkpointed after the engine was used again")
    engine.dispose()
    _wait(lambda: not again.is_alive(), "the second checkpointer outlived the dispose")


def test_the_checkpointer_ends_with_an_engine_that_is_dropped_without_a_dispose(tmp_path: Path) -> None:
    before = _checkpointers()
    engine = make_engine(f"sqlite:///{tmp_path / 'dropped.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    (mine,) = _checkpointers() - before
    del engine, conn
    # the thread holds the engine weakly; gc.collect() each look, as an engine may sit in a cycle
    _wait(lambda: gc.collect() is not None and not mine.is_alive(), "the checkpointer outlived its engine")


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
