"""Engines and sessions: one engine per database URL per process, re-made after a fork.

SQLite gets WAL and a busy timeout so the ingress and several worker processes can share it, and its
write-ahead log is checkpointed by a thread of each process instead of by whichever commit fills it
(:func:`_checkpoint_in_background`); MariaDB gets ``pool_pre_ping`` so a dropped connection is replaced
instead of failing an action.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from rekku.settings import get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}

#: Seconds between two checkpoints of an SQLite database's write-ahead log by a process's checkpointer.
CHECKPOINT_SECONDS = 0.5
#: The engines whose checkpointer runs, and in which process (a forked child starts its own).
_checkpointing: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does it (_checkpoint_in_background)
    cur.close()


def _checkpoint_in_background(engine: Engine) -> None:
    """Move the write-ahead log into the database file from a thread of this process, every
    :data:`CHECKPOINT_SECONDS`, instead of in the commit that happens to fill 1,000 pages of it.

    SQLite's automatic checkpoint runs inside that commit, with an fsync: every ~50 actions one request
    or one finish took 5 ms longer, which was the whole of the p99 latency's excess over plain Celery
    (bench (c), periodic in the samples; gone with the checkpoint moved off the commit). A passive
    checkpoint waits for no reader or writer, and the driver releases the GIL while it runs.

    Started by the first connection an engine makes in a process (so again in a forked child, whose
    threads did not survive the fork); ends when the engine is gone. Every process that writes runs
    one, so the log is checkpointed while any of them lives; what one misses the next one does."""
    pid = os.getpid()
    with _lock:
        if _checkpointing.get(engine) == pid:
            return
        _checkpointing[engine] = pid
    ref = weakref.ref(engine)

    def loop() -> None:
        while (current := ref()) is not None:
            del current  # between ticks only the weak reference: the engine may go
            time.sleep(CHECKPOINT_SECONDS)
            _checkpoint(ref)

    threading.Thread(target=loop, name="rekku-sqlite-checkpoint", daemon=True).start()


def _checkpoint(ref: weakref.ref) -> None:
    engine = ref()
    if engine is None:
        return
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    except Exception as exc:  # the next tick tries again; commits never wait for it
        log.debug("SQLite checkpoint failed: %s", exc)


def make_engine(url: str) -> Engine:
    """A new engine for ``url`` with the settings this project relies on."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_pre_ping=False)
        ref = weakref.ref(engine)

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            _sqlite_pragmas(dbapi_conn)
            if (current := ref()) is not None:
                _checkpoint_in_background(current)

        sa.event.listen(engine, "connect", on_connect)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_recycle=3600, pool_size=5, max_overflow=10)


def get_engine(url: str | None = None) -> Engine:
    """The process's engine for ``url`` (default: the configured database)."""
    if url is None:
        url = get_settings().resolved_database_url()
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url)
        return engine


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def _forget_parent_engines() -> None:
    # A forked child must not reuse the parent's pooled connections.
    for engine in list(_engines.values()):
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_parent_engines)
