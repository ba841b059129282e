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
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from rekku.settings import get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}

#: Seconds between two checkpoints of an SQLite database's write-ahead log by a process's checkpointer
#: while commits come: short, so each copies little.
CHECKPOINT_SECONDS = 0.1
#: Seconds between two looks while nothing is written (an idle process does not poll fast).
IDLE_CHECKPOINT_SECONDS = 0.5
#: Pages of write-ahead log at which a commit still checkpoints on its own (SQLite's default is 1,000):
#: the backstop for commits that never pause, when the log is never found all copied by a writer
#: (which is when the next writer starts it anew) and would otherwise grow without bound. With the
#: checkpointer's copying done, that checkpoint has little left to copy.
AUTOCHECKPOINT_PAGES = 4000
#: The engines whose checkpointer runs in this process, each with the event that stops it (emptied in
#: a forked child, which starts its own).
_checkpointing: weakref.WeakKeyDictionary[Engine, threading.Event] = weakref.WeakKeyDictionary()


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")  # mostly done by _checkpoint_in_background
    cur.close()


def _checkpoint_in_background(engine: Engine) -> None:
    """Move the write-ahead log into the database file from a thread of this process, every
    :data:`CHECKPOINT_SECONDS` while commits come, instead of in the commit that fills 1,000 pages of it.

    SQLite's automatic checkpoint runs inside that commit, with an fsync: every ~50 actions one request
    or one finish took 5 ms longer, which was the whole of the p99 latency's excess over plain Celery
    (bench (c), periodic in the samples). A passive checkpoint waits for no reader or writer, and the
    driver releases the GIL while it runs. Commits still checkpoint at :data:`AUTOCHECKPOINT_PAGES`, as
    the bound: a passive checkpoint that never ends between two commits never lets the log start anew
    (without the bound it grew to 370 MB in 6,000 requests); by then this thread has copied nearly all.

    Started by the first connection an engine's pool makes in a process (so again in a forked child,
    whose threads did not survive the fork, and again after a dispose). It checkpoints through a
    connection of its own, never one of the pool's, so it neither holds a pool connection nor makes
    one that would start another checkpointer. It ends when the engine is disposed (at once, with its
    connection closed: a disposed engine leaves no file open) or garbage-collected. Every process that
    writes runs one, so the log is checkpointed while any of them lives; what one misses the next does."""
    with _lock:
        if engine in _checkpointing:
            return
        stop = _checkpointing[engine] = threading.Event()
    ref = weakref.ref(engine)
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    connect = engine.dialect.loaded_dbapi.connect

    def loop() -> None:
        pause, last, conn = IDLE_CHECKPOINT_SECONDS, None, None
        try:
            while not stop.wait(pause) and ref() is not None:
                try:
                    conn = conn or connect(*args, **kwargs)
                    _busy, pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    state: tuple[int, int] | None = (pages, copied)
                except Exception as exc:  # the next tick tries again; commits never wait for it
                    log.debug("SQLite checkpoint failed: %s", exc)
                    state = None
                    if conn is not None:
                        conn.close()
                        conn = None
                # while commits come (the log changed since the last look), look again soon
                pause = CHECKPOINT_SECONDS if state is None or state != last else IDLE_CHECKPOINT_SECONDS
                last = state
        finally:
            if conn is not None:
                conn.close()

    threading.Thread(target=loop, name="rekku-sqlite-checkpoint", daemon=True).start()


def _stop_checkpointer(engine: Engine) -> None:
    # no lock: this runs in a forked child too (dispose in _forget_parent_engines), where _lock may be
    # held by a thread that did not survive the fork; one dict pop is atomic anyway
    stop = _checkpointing.pop(engine, None)
    if stop is not None:
        stop.set()


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
        sa.event.listen(engine, "engine_disposed", _stop_checkpointer)
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
    _checkpointing.clear()  # the parent's checkpointer threads did not survive the fork


os.register_at_fork(after_in_child=_forget_parent_engines)
