"""Two processes never migrate one database at the same time (rekku.migrate's migration lock).

Every ingress, receiver and migrate job migrates at start, and compose or Kubernetes start several at
once. Each test runs real ``rekku migrate`` processes (a clean environment: tests/support.child_env)
against a fresh SQLite file and a fresh MariaDB database. Racing processes alone may or may not collide
on a given machine, so the lock is also observed directly: while this test holds it, a started
migration is seen waiting for it (MariaDB's process list, the kernel's /proc/locks) and has created
nothing; released, it finishes at head.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from rekku.db import get_engine
from rekku.migrate import lock_file, server_lock_name, state
from tests.support import MARIADB, child_env, create_mariadb, drop_mariadb, wait_until

#: Processes started at once in the race test.
RACERS = 4


@pytest.fixture(params=["sqlite", "mariadb"])
def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database nothing has migrated yet."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'rekku.db'}"
        (tmp_path / "db").mkdir()
        yield url
        get_engine(url).dispose()
        return
    name, url = create_mariadb()
    try:
        yield url
    finally:
        get_engine(url).dispose()
        drop_mariadb(name)


def start_migrate(url: str, home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "rekku", "migrate"], cwd=str(home), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(REKKU_DATABASE_URL=url, REKKU_HOME=str(home / ".rekku")))


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def version_rows(url: str) -> list[str]:
    """alembic_version's rows, or [] while the table does not exist."""
    engine = get_engine(url)
    if not sa.inspect(engine).has_table("alembic_version"):
        return []
    with engine.connect() as conn:
        return sorted(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())


def assert_at_head_once(url: str) -> None:
    current, head = state(url)
    assert current == head, f"database at {current}, head {head}"
    rows = version_rows(url)
    assert rows == sorted(head.split(",")), f"each head recorded once, got {rows}"
    assert sa.inspect(get_engine(url)).has_table("action_runs")


def test_migrations_started_together_all_succeed_and_reach_head_once(fresh_database: str, tmp_path: Path) -> None:
    procs = [start_migrate(fresh_database, tmp_path) for _ in range(RACERS)]
    results = [finish(proc) for proc in procs]
    failed = [out for code, out in results if code != 0]
    assert not failed, "a concurrent `rekku migrate` failed:\n" + "\n----\n".join(failed)
    assert_at_head_once(fresh_database)
    path = lock_file(fresh_database)
    if path is not None:  # SQLite: the lock file lives next to the database, private
        assert path.parent == Path(sa.engine.make_url(fresh_database).database).parent
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _waiting_on_user_lock(database: str) -> bool:
    """Some other session of ``database`` waits in GET_LOCK (MariaDB shows it as 'User lock')."""
    import MySQLdb

    conn = MySQLdb.connect(**MARIADB)
    try:
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s AND ID != CONNECTION_ID() "
                    "AND INFO LIKE %s", (database, "%GET_LOCK%"))
        return cur.fetchone()[0] > 0
    finally:
        conn.close()


def test_a_migration_waits_while_another_session_holds_the_mariadb_lock(tmp_path: Path) -> None:
    import MySQLdb

    name, url = create_mariadb()
    holder = MySQLdb.connect(**MARIADB, database=name)
    proc = None
    try:
        cur = holder.cursor()
        cur.execute("SELECT GET_LOCK(%s, 0)", (server_lock_name(url),))
        assert cur.fetchone()[0] == 1
        proc = start_migrate(url, tmp_path)
        wait_until(lambda: _waiting_on_user_lock(name) or proc.poll() is not None, timeout=120,
                   what="`rekku migrate` to wait for the migration lock")
        assert proc.poll() is None, f"migrated while another session held the lock:\n{finish(proc)[1]}"
        assert version_rows(url) == [], "schema changes were made under another session's lock"
        cur.execute("SELECT RELEASE_LOCK(%s)", (server_lock_name(url),))
        code, out = finish(proc)
        assert code == 0, out
        assert_at_head_once(url)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        holder.close()
        get_engine(url).dispose()
        drop_mariadb(name)


def _blocked_on_flock(pid: int) -> bool:
    """The kernel lists ``pid`` as waiting for a flock (a ``->`` line of /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid):
            return True
    return False


def test_a_migration_waits_while_another_process_holds_the_sqlite_lock_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rekku.db'}"
    path = lock_file(url)
    assert path == tmp_path / "rekku.db.migrate-lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    proc = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = start_migrate(url, tmp_path)
        wait_until(lambda: _blocked_on_flock(proc.pid) or proc.poll() is not None, timeout=120,
                   what="`rekku migrate` to wait for the migration lock file")
        assert proc.poll() is None, f"migrated while another process held the lock:\n{finish(proc)[1]}"
        assert version_rows(url) == [], "schema changes were made under another process's lock"
        fcntl.flock(fd, fcntl.LOCK_UN)
        code, out = finish(proc)
        assert code == 0, out
        assert_at_head_once(url)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
        get_engine(url).dispose()
