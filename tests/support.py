"""Real services for the tests: Redis db numbers, MariaDB databases, and rekku processes.

Nothing is mocked: a ``Stack`` is a real ingress process and real Celery worker processes on a
real broker and database, each test run on its own Redis db number and database.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
TEST_PLUGINS = ROOT / "tests" / "plugins"
#: The Redis the suite uses (one db per stack). REKKU_TEST_REDIS_PORT points a run at another server, e.g.
#: a second one started for a private run while other suites hold the 14 dbs of the usual one.
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("REKKU_TEST_REDIS_PORT", "6379"))
MARIADB = dict(host="127.0.0.1", port=3306, user="root", password="")
#: Redis db numbers the tests may take (14 and 15 are left to the benchmarks and people).
TEST_DBS = range(1, 14)


# ----------------------------------------------------------------------------- the children's environment
#: A directory of this test process for the junk below: an empty HOME, and nothing else.
_JUNK = Path(tempfile.mkdtemp(prefix="rekku-test-junk-"))
atexit.register(shutil.rmtree, _JUNK, ignore_errors=True)
#: Names a user's shell, a platform or another program sets for itself, none of them Rekku's (its own are
#: REKKU_*, TELEGRAM_BOT_TOKEN … : every Settings name), each with a junk value in every process this
#: suite starts: a child that read one fails loudly (an address it cannot bind, a broker and database
#: that refuse connections, a token nobody sends, a level logging does not know, an app that does not
#: exist), instead of working because the caller's shell happened to hold a usable value.
SHELL_JUNK = {
    "HOME": str(_JUNK / "home"),
    "PORT": "junk-port", "HOST": "203.0.113.7",
    "DATABASE_URL": "mysql+mysqldb://junk:junk@127.0.0.1:9/junk",
    "BROKER_URL": "redis://127.0.0.1:9/0", "REDIS_URL": "redis://127.0.0.1:9/0",
    "RESULT_BACKEND": "redis://127.0.0.1:9/0", "APP": "junk_app_from_the_shell",
    "CONFIG_MODULE": "junk_config_from_the_shell", "LOADER": "junk_loader_from_the_shell",
    "API_TOKEN": "junk-api-token-from-the-shell", "LOG_LEVEL": "JUNK-LEVEL",
    "WEBHOOK_URL": "http://127.0.0.1:9/junk-hook",
    # Celery's own, which it prefers to its configuration: Rekku drops them (rekku/celery_app.py)
    "CELERY_BROKER_URL": "redis://127.0.0.1:9/0", "CELERY_RESULT_BACKEND": "redis://127.0.0.1:9/0",
}
#: Dropped from the children's environment: where a caller's shell points programs at its own files (they
#: follow the junk HOME instead).
SHELL_DROPPED = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR")
(_JUNK / "home").mkdir()


@functools.cache
def settings_classes() -> tuple[type, ...]:
    """The core's Settings and each bundled plugin's settings class, as the registry finds them: between
    them, every variable Rekku reads. A bundled plugin that does not load here is an error, not a
    class silently left out."""
    from rekku.registry import discover
    from rekku.settings import Settings

    registry = discover(Settings(_env_file=None, REKKU_PLUGIN_PATH=""))
    if registry.errors:
        raise RuntimeError(f"bundled plugins failed to load: {registry.errors}")
    return (Settings, *dict.fromkeys(registry.settings.values()))


@functools.cache
def rekku_variables() -> frozenset[str]:
    """Every environment variable Rekku reads (each field's names, core and plugins), upper case."""
    from pydantic import AliasChoices

    names = set()
    for spec in (spec for cls in settings_classes() for spec in cls.model_fields.values()):
        alias = spec.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        names.update(str(choice).upper() for choice in choices)
    return frozenset(names)


def child_env(**more: str) -> dict[str, str]:
    """The environment of a process this suite starts (``rekku`` or any other): the caller's, without
    anything that configures Rekku (every settings name, and REKKU_*, DB_*, TRAINER*, FLOWER*), with
    :data:`SHELL_JUNK` over the generic names, then ``more``. Nothing the caller's shell holds can
    make a child work that would not work on a machine without it."""
    ours = rekku_variables()
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ours and k not in SHELL_DROPPED
           and not k.upper().startswith(("REKKU_", "DB_", "TRAINER", "FLOWER"))}
    env.update(SHELL_JUNK)
    env.update(more)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: The last command of a connection that is consuming a queue (kombu waits in BRPOP): a worker's. An idle
#: connection of this test process to a db it released earlier is no reason to skip that db.
CONSUMING = frozenset({"brpop", "blpop", "brpoplpush", "blmove"})


def _own_ports() -> set[str]:
    """Local TCP ports of this process's sockets (its own idle Redis connections are no other run's)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(str(int(fields[1].rpartition(":")[2], 16)))
    return ports


#: How long :func:`claim_redis_db` waits for a db when every one is taken (by other test runs on this
#: machine, or this run's other xdist workers); inside pytest-timeout's 300 s for the test that waits.
CLAIM_WAIT = 180.0
#: Deletes a lease only if it is still the one we took (an expired lease may be someone else's now).
_RELEASE = """if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"""


def _lease_value() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_holder(value: bytes | None) -> bool:
    """The lease names a process of this machine that is gone (a run killed with SIGKILL releases
    nothing; its leases would otherwise starve the next run for up to an hour)."""
    host, _, pid = (value or b"").decode(errors="replace").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _try_claim(lease: redis.Redis) -> int | None:
    for number in TEST_DBS:
        key = f"rekku-test-lease:{number}"
        stale = lease.get(key)
        if _dead_holder(stale):  # take it over only if it is still that dead process's lease
            lease.eval(_RELEASE, 1, key, stale)
        # SET NX is atomic: of several processes (xdist workers, other runs) asking at the same moment,
        # one gets the lease and the others move on to the next number
        if not lease.set(key, _lease_value(), nx=True, ex=3600):
            continue
        mine = _own_ports()
        if any(str(client.get("db")) == str(number) and client.get("cmd") in CONSUMING
               and client.get("addr", "").rpartition(":")[2] not in mine for client in lease.client_list()):
            lease.eval(_RELEASE, 1, key, _lease_value())  # someone's leftover workers consume from it: not ours
            continue
        redis.Redis(REDIS_HOST, REDIS_PORT, db=number).flushdb()
        return number
    return None


def claim_redis_db(wait: float = CLAIM_WAIT) -> int:
    """A Redis db number no other test run or xdist worker holds (a lease key in db 0) and no process is
    connected to (a worker left over from an interrupted run, still consuming a db whose lease expired,
    would take this run's messages), flushed for us. When all are taken, waits up to ``wait`` seconds
    for one to be released."""
    lease = redis.Redis(REDIS_HOST, REDIS_PORT, db=0)
    deadline = time.monotonic() + wait
    while (number := _try_claim(lease)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"every test Redis db was leased or in use for {wait:g} s; stale leases expire "
                               "within an hour")
        time.sleep(1.0)
    return number


def release_redis_db(number: int) -> None:
    redis.Redis(REDIS_HOST, REDIS_PORT, db=number).flushdb()
    redis.Redis(REDIS_HOST, REDIS_PORT, db=0).eval(_RELEASE, 1, f"rekku-test-lease:{number}", _lease_value())


def create_mariadb() -> tuple[str, str]:
    """A fresh database; returns (name, SQLAlchemy URL)."""
    import MySQLdb

    name = f"rekku_test_{uuid.uuid4().hex[:10]}"
    conn = MySQLdb.connect(**MARIADB)
    conn.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    conn.close()
    return name, f"mysql+mysqldb://root@127.0.0.1:3306/{name}?charset=utf8mb4"


def drop_mariadb(name: str) -> None:
    import MySQLdb

    conn = MySQLdb.connect(**MARIADB)
    conn.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@contextmanager
def scratch_database(kind: str, directory: Path, monkeypatch: Any) -> Iterator[str]:
    """A new SQLite file (in ``directory``) or MariaDB database, made this process's database
    (``REKKU_DATABASE_URL`` through ``monkeypatch``) and removed afterwards; migrating is the caller's."""
    from rekku.db import get_engine
    from rekku.settings import get_settings

    name = None
    if kind == "mariadb":
        name, url = create_mariadb()
    else:
        url = f"sqlite:///{directory / 'scratch.db'}"
    monkeypatch.setenv("REKKU_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        yield url
    finally:
        get_engine(url).dispose()
        get_settings.cache_clear()
        if name:
            drop_mariadb(name)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def twice(predicate: Any, gap: float = 0.2) -> Any:
    """``predicate``, true now and again ``gap`` seconds later. For "nothing in flight" on the broker: a
    message a worker has just popped from its queue is in neither the queue nor the unacked set for an
    instant, never for ``gap``."""
    def check() -> Any:
        return predicate() and (time.sleep(gap) or predicate())
    return check


def gone(pid: int) -> bool:
    """The process ``pid`` no longer runs (it may linger as a zombie until whoever inherited it reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


#: PF_EXITING in the flags of /proc/<pid>/stat: the process has begun to exit (it runs no more of its own code).
_PF_EXITING = 0x4
#: SIGKILL's bit in the pending-signal masks of /proc/<pid>/status.
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def on_its_way_out(pid: int) -> bool:
    """The process ``pid`` is gone, a zombie, exiting, or has a SIGKILL pending (it cannot run another
    instruction of its own): whoever stopped it is done with it, though /proc may still show it for a
    moment. A process still running, or one that was only asked to stop (SIGTERM), is not."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        if fields[0] in ("Z", "X") or int(fields[6]) & _PF_EXITING:
            return True
        status = Path(f"/proc/{pid}/status").read_text()
        pending = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
        if any(mask & _SIGKILL_BIT for mask in pending):
            return True
        # between SIGKILL leaving the pending set and PF_EXITING being set: read the flags once more
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)
    except (OSError, IndexError):
        return True


def processes_mentioning(path: Path) -> dict[int, str]:
    """Every live process but this one whose command line or environment mentions ``path`` (pid → its
    command line, shortened): what a test started with ``path`` as its home or HOME, and is still there.
    A zombie shows neither, so it is not listed."""
    found = {}
    needle = str(path).encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if int(pid) != os.getpid() and (needle in cmdline or needle in environ):
            found[int(pid)] = cmdline.replace(b"\x00", b" ").decode(errors="replace")[:120]
    return found


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def stop_processes(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """:func:`stop_process` for several processes, in parallel: SIGTERM every process group first, then
    wait for them all (up to ``timeout`` seconds in all), then SIGKILL what is left. A stack's workers,
    beat and ingress each take a second or more to shut down warm; one after the other, a stack of five
    processes took as long to stop as to start. Nothing here is checked: the stack is done with."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        stop_process(proc)  # SIGKILL the group (what a child left behind in it too), and reap


@dataclass
class Stack:
    """An ingress and workers on one broker db and one database, as separate processes."""

    name: str
    home: Path
    database_url: str
    redis_db: int
    extra_env: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def broker_url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def env(self, **more: str) -> dict[str, str]:
        own = {"REKKU_HOME": str(self.home), "REKKU_BROKER_URL": self.broker_url,
               "REKKU_DATABASE_URL": self.database_url, "REKKU_API_TOKEN": self.token,
               "REKKU_PLUGIN_PATH": str(TEST_PLUGINS), "REKKU_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        return child_env(**(own | self.extra_env | more))

    def spawn(self, *args: str, log_name: str, **env: str) -> subprocess.Popen:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{log_name}.log", "ab")  # noqa: SIM115 - handed to the child
        from rekku.supervisor import die_with_parent

        # its own session (tests signal its group), and gone when the test run dies, however it dies:
        # a killed pytest once left whole stacks consuming Redis test dbs that later runs claimed
        proc = subprocess.Popen([sys.executable, "-m", "rekku", *args], env=self.env(**env), cwd=str(ROOT),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
        self.processes.append(proc)
        return proc

    def start_ingress(self) -> subprocess.Popen:
        proc = self.spawn("ingress", "--port", str(self.port), log_name="ingress")
        wait_until(self._ready, timeout=60, what=f"{self.name} ingress /readyz")
        return proc

    def _ready(self) -> bool:
        try:
            return requests.get(self.base_url + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:  # not listening yet, or too busy to answer in time: not ready
            return False

    def start_worker(self, pool: str = "default", concurrency: int = 2, node: str | None = None,
                     **env: str) -> subprocess.Popen:
        node = node or f"{self.name}-{uuid.uuid4().hex[:6]}"
        proc = self.spawn("worker", "--pool", pool, "--concurrency", str(concurrency), "--node", node,
                          log_name=f"worker-{pool}-{node}", **env)
        wait_until(lambda: self.worker_online(f"{pool}@{node}") or proc.poll() is not None, timeout=60,
                   what=f"worker {pool}@{node}")
        assert proc.poll() is None, f"worker {pool}@{node} exited; see {self.home / 'logs'}"
        proc.node = f"{pool}@{node}"  # type: ignore[attr-defined]
        return proc

    def start_workers(self, workers: list[tuple[str, int, str]]) -> list[subprocess.Popen]:
        """Workers ((pool, concurrency, node) each) started together: each is spawned at once, then
        every one waited for until online (what :meth:`start_worker` does for one)."""
        procs = []
        for pool, concurrency, node in workers:
            proc = self.spawn("worker", "--pool", pool, "--concurrency", str(concurrency), "--node", node,
                              log_name=f"worker-{pool}-{node}")
            proc.node = f"{pool}@{node}"  # type: ignore[attr-defined]
            procs.append(proc)
        for proc in procs:
            wait_until(lambda p=proc: self.worker_online(p.node) or p.poll() is not None, timeout=60,
                       what=f"worker {proc.node}")
            assert proc.poll() is None, f"worker {proc.node} exited; see {self.home / 'logs'}"
        return procs

    def worker_online(self, hostname: str) -> bool:
        from celery import Celery

        if "REKKU_SIGNING_KEY" in self.extra_env:  # it refuses unsigned control messages: read its log instead
            return any(f"{hostname} ready." in path.read_text(errors="replace")
                       for path in (self.home / "logs").glob("worker-*.log"))

        app = Celery(broker=self.broker_url)
        try:
            return bool(app.control.ping([hostname], timeout=0.5))
        finally:
            app.close()

    def stop(self) -> None:
        """Stop every process of the stack at once (see :func:`stop_processes`)."""
        stop_processes(list(reversed(self.processes)))
        self.processes.clear()

    # ------------------------------------------------------------------ HTTP helpers
    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.post(self.base_url + path, json=body, headers=headers, timeout=kwargs.pop("timeout", 30),
                             **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.get(self.base_url + path, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def submit(self, actions: list[dict], context: dict | None = None, **body: Any) -> dict:
        resp = self.post("/v1/actions", {"actions": actions, "context": context or {}, **body})
        assert resp.status_code in (202, 422), resp.text
        return resp.json()

    def wait_action(self, action_id: str, timeout: float = 30) -> dict:
        resp = self.get(f"/v1/actions/{action_id}", params={"wait": timeout}, timeout=timeout + 10)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def run(self, action_type: str, payload: dict | None = None, context: dict | None = None,
            timeout: float = 30) -> dict:
        """Submit one action and wait until it is finished."""
        answer = self.submit([{"type": action_type, "payload": payload or {}}], context)
        assert answer["accepted"], answer
        return self.wait_action(answer["accepted"][0]["id"], timeout)

    def feed(self, **match: Any) -> list[dict]:
        """Every item on the model's feed (paged with ``after``) whose fields equal ``match`` (a key
        ``chat_id`` matches the item's chat)."""
        items: list[dict] = []
        after = 0
        while True:
            page = self.get("/v1/feed", params={"after": after, "limit": 1000}).json()
            items += page["items"]
            if not page["items"]:
                break
            after = page["next"]
        return [i for i in items if all((i["chat"]["chat_id"] if k == "chat_id" else i.get(k)) == v
                                        for k, v in match.items())]

    def feed_item(self, timeout: float = 20, **match: Any) -> dict:
        """The one feed item matching ``match``, once it is there."""
        found = wait_until(lambda: self.feed(**match), timeout=timeout, what=f"a feed item {match}")
        assert len(found) == 1, found
        return found[0]

    def journal(self, action_id: str) -> list[str]:
        path = self.home / "testkit" / f"{action_id}.log"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    # ------------------------------------------------------------------ evidence
    def worker_logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted((self.home / "logs").glob("worker-*.log")))

    def tasks_succeeded(self, task_name: str) -> int:
        """How many runs of the task ``task_name`` the workers have logged as succeeded (Celery's own line)."""
        return sum(1 for line in self.worker_logs().splitlines()
                   if f"Task {task_name}[" in line and "] succeeded in " in line)

    def broker_messages(self) -> list[dict[str, Any]]:
        """Every task message on this stack's broker db that is not finished: waiting in a queue, or
        delivered to a worker and not yet acknowledged (running, prefetched, or held until its ETA; the
        actions acknowledge late, after their run). Each as {"task", "id", "kwargs", "tag"} ("tag": the
        unacked delivery tag, None while queued; "kwargs": None when the body is not plain JSON)."""
        client = redis.Redis(REDIS_HOST, REDIS_PORT, db=self.redis_db)
        raw: list[tuple[str | None, bytes]] = []
        for key in client.scan_iter(_type="list"):
            raw += [(None, item) for item in client.lrange(key, 0, -1)]
        for tag, value in client.hgetall("unacked").items():
            raw.append((tag.decode(), json.dumps(json.loads(value)[0]).encode()))
        found = []
        for tag, item in raw:
            try:
                message = json.loads(item)
                headers = message["headers"]
            except (ValueError, KeyError, TypeError):
                continue  # a list of something else (rekku:malformed's entries among them)
            if not isinstance(headers, dict):
                continue  # an item that is no message (tests push such items: test_malformed_messages)
            try:
                kwargs = json.loads(base64.b64decode(message["body"]))[1]
            except (ValueError, KeyError, TypeError, IndexError):
                kwargs = None
            found.append({"task": headers.get("task"), "id": headers.get("id"), "kwargs": kwargs, "tag": tag})
        return found

    def consumed(self, *task_ids: str) -> bool:
        """No message with one of these task ids is queued or unacknowledged: every delivery of them
        was taken by a worker and acknowledged (after its run: the actions acknowledge late)."""
        wanted = set(task_ids)
        return not any(m["id"] in wanted for m in self.broker_messages())


def race_with_poller(writers: list[Any], read_after: Any) -> tuple[list[int], list[BaseException]]:
    """Run ``writers`` (callables) in threads started at the same moment, while a poller follows the
    ids they make: ``read_after(after)`` returns the ids greater than ``after``, in order, as a reader of
    ``?after=`` sees them. Returns every id the poller saw (with repeats, if any) and the writers'
    errors. The poller makes one last read after the writers ended, so a test compares ``seen`` with
    everything that was written: an id committed late below one already read would be missing."""
    start, done = threading.Barrier(len(writers) + 1), threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def write(work: Any) -> None:
        start.wait()
        try:
            work()
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    def poll() -> None:
        after = 0
        while True:
            finished = done.is_set()  # read before polling: a last poll after the writers ended
            page = read_after(after)
            seen.extend(page)
            after = page[-1] if page else after
            if finished and not page:
                return

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    poller = threading.Thread(target=poll)
    for thread in threads:
        thread.start()
    poller.start()
    start.wait()
    for thread in threads:
        thread.join()
    done.set()
    poller.join(60)
    return seen, errors
