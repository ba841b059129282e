"""The processes and services one bench run owns: temp REKKU_HOME, Redis db, database, children.

Everything is created here and torn down in :meth:`Stack.stop`, which is safe to call twice and
runs on error and Ctrl-C: every child is its own process group (Celery's pool children go with
it) and dies with the bench even if the bench is SIGKILLed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import requests

from rekku.supervisor import die_with_parent, signal_group

ROOT = Path(__file__).resolve().parent.parent
BENCH_PLUGINS = Path(__file__).resolve().parent / "plugins"
#: Redis db the bench takes by default (tests use 1-13; 14 and 15 are left to benchmarks and people).
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/14"
MARIADB_SERVER = "mysql+mysqldb://root@127.0.0.1:3306"
#: The pool both workers mimic; concurrency is the bench's ``--concurrency``.
POOL = "default"


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its living descendants (a prefork
    worker's pool processes, uvicorn's workers), read from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
               alive: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    """Poll ``predicate`` until truthy; fail early (pointing at the log) if ``alive`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {alive.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}" + (f"; see {log}" if log else ""))
        time.sleep(interval)


def lease_key(broker_url: str) -> tuple[redis.Redis, str]:
    """A key in db 0 of the broker's server marking the bench db as taken (as tests/support.py does)."""
    db = redis.Redis.from_url(broker_url).connection_pool.connection_kwargs.get("db", 0)
    server = redis.Redis.from_url(urlunsplit(urlsplit(broker_url)._replace(path="/0", query="")))
    return server, f"rekku-bench-lease:{db}"


def take_lease(broker_url: str) -> None:
    """Refuse to FLUSHDB a db another bench run is using at the same time (every bench run leases its db)."""
    server, key = lease_key(broker_url)
    if not server.set(key, os.getpid(), nx=True, ex=3600):
        raise SystemExit(f"another bench run (pid {server.get(key).decode()}) holds {broker_url}; "
                         "wait for it or pass --broker-url with another db number")


def release_lease(broker_url: str) -> None:
    server, key = lease_key(broker_url)
    server.delete(key)


@dataclass
class Database:
    """The action log's database: SQLite in the bench home, or a MariaDB database we may create and drop."""

    url: str
    created: str | None = None  # the MariaDB database this run created (dropped at the end)

    @classmethod
    def prepare(cls, option: str | None, home: Path) -> Database:
        """``None`` → SQLite; ``mariadb`` → a fresh database on 127.0.0.1:3306; else the URL given."""
        if not option:
            return cls(f"sqlite:///{home / 'rekku.db'}")
        if option == "mariadb":
            option = f"{MARIADB_SERVER}/rekku_bench_{uuid.uuid4().hex[:8]}?charset=utf8mb4"
        if not option.startswith("mysql"):
            return cls(option)
        parts = urlsplit(option)
        name = parts.path.lstrip("/")
        if not name:
            raise SystemExit("--database-url: name the MariaDB database, e.g. .../rekku_bench")
        import sqlalchemy as sa

        server = sa.create_engine(urlunsplit(parts._replace(path="/")))
        with server.connect() as conn:
            exists = conn.execute(sa.text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :n"),
                                  {"n": name}).first()
            if not exists:
                conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
        server.dispose()
        return cls(option, created=None if exists else name)

    def drop(self) -> None:
        if not self.created:
            return
        import sqlalchemy as sa

        server = sa.create_engine(urlunsplit(urlsplit(self.url)._replace(path="/", query="")))
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{self.created}`"))
        server.dispose()
        self.created = None


@dataclass
class Stack:
    """The ingress, the Rekku worker and the bare Celery worker of one run, on one broker db."""

    broker_url: str
    database_option: str | None
    concurrency: int
    keep_home: bool = False
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rekku-bench-")))
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    node: str = field(default_factory=lambda: f"bench{os.getpid()}")
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    db: Database | None = None
    failed: bool = False
    leased: bool = False

    # ------------------------------------------------------------------ names
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ours_node(self) -> str:
        return f"{POOL}@{self.node}"

    @property
    def bare_node(self) -> str:
        return f"bare@{self.node}"

    def baseline_node(self, name: str) -> str:
        """The node name of a baseline's worker (``bare`` or ``plain``)."""
        return f"{name}@{self.node}"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def env(self) -> dict[str, str]:
        """The children's environment: only what this run sets, none of the caller's REKKU_* or DB_*."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REKKU_", "DB_", "TRAINER", "FLOWER"))}
        assert self.db is not None
        env.update(REKKU_HOME=str(self.home), REKKU_BROKER_URL=self.broker_url, REKKU_DATABASE_URL=self.db.url,
                   REKKU_API_TOKEN=self.token, REKKU_PLUGIN_PATH=str(BENCH_PLUGINS), REKKU_LOG_LEVEL="INFO",
                   PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                               env.get("PYTHONPATH")])))
        return env

    # ------------------------------------------------------------------ start
    def start(self, workers: bool = True) -> None:
        """Flush the broker db, prepare the database, start the ingress and (unless ``workers`` is off)
        Rekku's worker and the two baseline workers, wait until ready."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self._lease()
        self.redis().flushdb()
        self.db = Database.prepare(self.database_option, self.home)
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("REKKU_")})  # for bench.bare_app
        me = [sys.executable, "-m", "rekku"]
        ingress = self._spawn("ingress", me + ["ingress", "--host", "127.0.0.1", "--port", str(self.port)])
        wait_until(self._ingress_ready, 90, "the ingress's /readyz", alive=ingress, log=self.logs / "ingress.log")
        if not workers:
            return
        # Workers start after the ingress: it has run the migrations they rely on.
        ours = self._spawn("worker-ours", me + ["worker", "--pool", POOL, "--concurrency", str(self.concurrency),
                                                "--node", self.node])
        bare = self._spawn("worker-bare", [sys.executable, "-m", "celery"] + self.bare_worker_argv())
        plain = self._spawn("worker-plain", [sys.executable, "-m", "celery"] + self.plain_worker_argv())
        for proc, name, node in ((ours, "worker-ours", self.ours_node), (bare, "worker-bare", self.bare_node),
                                 (plain, "worker-plain", self.baseline_node("plain"))):
            wait_until(lambda n=node: self.ping(n), 90, f"{node} to answer ping", interval=0.3,
                       alive=proc, log=self.logs / f"{name}.log")

    def bare_worker_argv(self) -> list[str]:
        """Rekku's own worker arguments for the pool, with only the app, queue and node name swapped."""
        from bench.bare_app import BARE
        from rekku.pools import worker_argv

        argv = worker_argv(POOL, self.concurrency, self.node, "INFO")
        swap = {"-A": "bench.bare_app", "-Q": BARE.queue, "-n": self.bare_node}
        return [swap.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]

    def plain_worker_argv(self) -> list[str]:
        """What a user of plain Celery runs: a prefork worker with task events and Celery's defaults
        (prefetch multiplier 4 included). Gossip and mingle are off only so the three workers on one
        broker do not talk to each other."""
        from bench.bare_app import PLAIN

        return ["-A", "bench.bare_app:plain_app", "worker", "-Q", PLAIN.queue, "-P", "prefork",
                "-c", str(self.concurrency), "-n", self.baseline_node("plain"), "-E", "--loglevel", "INFO",
                "--without-gossip", "--without-mingle"]

    def spawn_worker(self, name: str, node: str, concurrency: int) -> subprocess.Popen:
        """One more ``rekku worker --pool default`` process, as on a machine of its own (its own node name)."""
        return self._spawn(name, [sys.executable, "-m", "rekku", "worker", "--pool", POOL, "--concurrency",
                                  str(concurrency), "--node", node])

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(argv, env=self.env(), cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent)
        self.children[name] = proc
        return proc

    def _ingress_ready(self) -> bool:
        try:
            return requests.get(self.base_url + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def ping(self, node: str) -> bool:
        from bench.bare_app import app

        return bool(app.control.ping([node], timeout=0.5))

    def _lease(self) -> None:
        take_lease(self.broker_url)
        self.leased = True

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.broker_url)

    def check_alive(self) -> None:
        """Fail the run (not hang) when a child died mid-measurement."""
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.logs / (name + '.log')}")

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left, flush the Redis db, drop a created database."""
        for proc in self.children.values():
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.children.values():
            signal_group(proc, signal.SIGKILL)  # stray pool children included
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()
        if self.leased:
            try:
                self.redis().flushdb()
                release_lease(self.broker_url)
                self.leased = False
            except redis.RedisError:
                pass
        if self.db is not None:
            self.db.drop()
        if self.keep_home or self.failed:
            print(f"bench home kept (logs, database): {self.home}", file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)
