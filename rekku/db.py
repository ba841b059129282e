"""Engines and sessions: one engine per database URL per process, re-made after a fork.

SQLite gets WAL and a busy timeout so the ingress and several worker processes can share it;
MariaDB gets ``pool_pre_ping`` so a dropped connection is replaced instead of failing an action.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from rekku.settings import get_settings

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """A new engine for ``url`` with the settings this project relies on."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_pre_ping=False)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
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
