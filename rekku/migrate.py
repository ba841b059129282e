"""Run Alembic migrations programmatically (``rekku migrate`` and start-up), and report their state.

The action log is revision ``0001`` and its own later revisions (``0002``, …) in
``rekku/migrations/versions/``. Each plugin package keeps its tables' revisions in its own
``migrations/`` folder (``plugins/<name>/migrations/``), a branch of its own on top of ``0001``
(``down_revision = "0001"``, ``branch_labels = ("<plugin>",)``), so plugins add tables without ordering
their migrations against each other; ``upgrade`` goes to every head. Alembic reads all those folders
(``version_locations``, from rekku.registry.migration_dirs), enabled plugins or not. Moving a revision
file between folders changes nothing in a database: revisions are known by id.

Every process that starts may migrate (``rekku migrate``, the compose/Kubernetes migrate job, each ingress
and receiver), so two of them often start at the same moment. Two upgrades at once would both see the
database behind and both run the same revisions: one fails on a table the other just created, or both
record the same revision. :func:`upgrade` therefore holds a migration lock for its whole run — MariaDB's
named lock ``GET_LOCK('rekku-migrate:<database>')`` on the very connection Alembic migrates with (released when that
session ends, even if the process dies), and on SQLite an exclusive ``flock`` on a file next to the
database (released when the process's descriptor closes). The second process waits, then finds the
schema at head and does nothing."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from rekku.db import get_engine
from rekku.registry import migration_dirs
from rekku.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: MariaDB's named lock is ``rekku-migrate:<database>``: GET_LOCK names are server-wide, and the databases
#: of other deployments (or of other test runs) on the same server have nothing to wait for.
LOCK_NAME = "rekku-migrate"
#: Seconds a process waits for another's migrations before giving up (MariaDB; a lock file waits as
#: long as its holder lives). Long: a revision that rewrites a big table may take minutes.
LOCK_TIMEOUT = 900
#: The SQLite lock file's name: the database's own name plus this.
LOCK_SUFFIX = ".migrate-lock"

log = logging.getLogger(__name__)


class MigrationLockTimeout(RuntimeError):
    """Another process held the migration lock for longer than :data:`LOCK_TIMEOUT`."""


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    locations = [MIGRATIONS_DIR / "versions", *migration_dirs(get_settings())]
    cfg.set_main_option("path_separator", "os")  # paths may hold spaces, never os.pathsep
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations).replace("%", "%%"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def lock_file(url: str) -> Path | None:
    """The lock file of the database at ``url``: for SQLite, next to the database file, so every process
    that opens that file finds the same lock; None for MariaDB, which locks on the server. Anything else
    (an in-memory SQLite, another server) locks a file in REKKU_HOME: the processes of this machine."""
    parsed = make_url(url)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return get_settings().home_dir / f"database{LOCK_SUFFIX}"
    return Path(database).expanduser().resolve().with_name(Path(database).name + LOCK_SUFFIX)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the migration lock %s (another process is migrating)", path)
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the holder, or by the kernel when it dies
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def server_lock_name(url: str) -> str:
    """The GET_LOCK name guarding the migrations of the MariaDB database at ``url`` (64 characters at most,
    MySQL's limit on a lock name)."""
    return f"{LOCK_NAME}:{make_url(url).database or ''}"[:64]


@contextmanager
def _server_lock(connection: Connection, name: str) -> Iterator[None]:
    """MariaDB's named lock on ``connection``'s session: GET_LOCK waits up to LOCK_TIMEOUT for another
    session's, and the server releases it when the session ends, whatever happened to the process."""
    got = connection.execute(text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": LOCK_TIMEOUT}).scalar()
    connection.commit()
    if got != 1:
        raise MigrationLockTimeout(f"another process held the migration lock {name!r} for more than {LOCK_TIMEOUT} s "
                                   f"(SELECT IS_USED_LOCK('{name}') names its connection)")
    try:
        yield
    finally:
        connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        connection.commit()


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (idempotent), under the migration lock."""
    engine = get_engine(url)
    path = lock_file(url)
    with engine.connect() as connection:
        with _file_lock(path) if path is not None else _server_lock(connection, server_lock_name(url)):
            with connection.begin():
                cfg = _config(url)
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, "heads")


def state(url: str) -> tuple[str, str]:
    """``(current revisions, head revisions)`` of the database at ``url``, each as a sorted, comma-joined string."""
    heads = ScriptDirectory.from_config(_config(url)).get_heads()
    with get_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    return ",".join(sorted(current)) or "none", ",".join(sorted(heads))
