"""A highly available broker: a Redis Sentinel group as broker and result backend (issue 17).

A real primary, a real replica and three real Sentinels (Debian's redis-sentinel), all on 127.0.0.1 on
ports of their own, with passwords on the data nodes and on the Sentinels. A Rekku stack (ingress, a
default and an io worker, beat) is pointed at them with a ``sentinel://`` URL and REKKU_SENTINEL_MASTER.
The primary is SIGKILLed while 1,000 actions flow; Sentinel promotes the replica, and every process
(Celery's transport, and Rekku's own clients of the broker's Redis: rekku/broker.py) must follow it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests
import sqlalchemy as sa

from tests.support import Stack, create_mariadb, drop_mariadb, free_port, stop_process, wait_until

MASTER = "rekku-ha"
#: The data nodes' requirepass (in the broker URL) and the Sentinels' own (REKKU_SENTINEL_PASSWORD).
DATA_PASSWORD, SENTINEL_PASSWORD = "data-node-secret-7", "sentinel-secret-9"
#: A node is down after this long without answering; a failover then takes about one more second.
DOWN_AFTER_MS = 1000


def _redis_server() -> list[str]:
    sentinel = shutil.which("redis-sentinel")
    if sentinel:
        return [sentinel]
    server = shutil.which("redis-server")
    if server:
        return [server, "--sentinel"]  # the same program; `make system-deps` installs redis-sentinel
    pytest.fail("no redis-server: run `make system-deps` (it installs redis-server and redis-sentinel)")


@dataclass
class Group:
    """A primary, a replica and three Sentinels watching them as ``MASTER``."""

    directory: Path
    data_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    sentinel_ports: list[int] = field(default_factory=lambda: [free_port() for _ in range(3)])
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """kombu's sentinel URL: every part with the same password and db (rekku/broker_url.py)."""
        return ";".join(f"sentinel://:{DATA_PASSWORD}@127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def _spawn(self, port: int, command: list[str]) -> None:
        from rekku.supervisor import die_with_parent

        log = open(self.directory / f"{port}.log", "ab")  # noqa: SIM115 - handed to the child
        self.processes[port] = subprocess.Popen(command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=die_with_parent)

    def data(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=DATA_PASSWORD, socket_timeout=2)

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis("127.0.0.1", port, password=SENTINEL_PASSWORD, socket_timeout=2)

    def start(self) -> None:
        primary, replica = self.data_ports
        for port in self.data_ports:
            (self.directory / str(port)).mkdir()
            command = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                       "--save", "", "--appendonly", "no", "--dir", str(self.directory / str(port)),
                       "--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD]
            if port == replica:
                command += ["--replicaof", "127.0.0.1", str(primary)]
            self._spawn(port, command)
        wait_until(lambda: self._answers(replica) and self.data(replica).info("replication").get(
            "master_link_status") == "up", timeout=30, what="the replica to sync with the primary")
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"  # Sentinel rewrites it: one each, writable
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                            f"requirepass {SENTINEL_PASSWORD}\n"
                            f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                            f"sentinel auth-pass {MASTER} {DATA_PASSWORD}\n"
                            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                            f"sentinel failover-timeout {MASTER} 10000\n")
            self._spawn(port, [*_redis_server(), str(conf)])

        def ready() -> bool:
            try:
                states = [self.sentinel(p).sentinel_master(MASTER) for p in self.sentinel_ports]
            except redis.RedisError:
                return False
            return all(s["num-other-sentinels"] == 2 and s["num-slaves"] == 1 for s in states)
        wait_until(ready, timeout=60, what="three Sentinels that know each other and the replica")

    def _answers(self, port: int) -> bool:
        try:
            return bool(self.data(port).ping())
        except redis.RedisError:
            return False

    def master_port(self) -> int | None:
        """The master's port as every Sentinel names it (None while they disagree or cannot say)."""
        try:
            named = {self.sentinel(p).sentinel_get_master_addr_by_name(MASTER) for p in self.sentinel_ports}
        except redis.RedisError:
            return None
        return int(named.pop()[1]) if len(named) == 1 and None not in named else None

    def kill(self, port: int) -> None:
        self.processes[port].send_signal(signal.SIGKILL)
        self.processes[port].wait(10)

    def stop(self) -> None:
        for proc in self.processes.values():
            stop_process(proc, timeout=5)


@dataclass
class BrokerStack(Stack):
    """A :class:`Stack` on a broker of this test's own (a Sentinel group, or a Redis it kills)."""

    url: str = ""
    transport_options: dict = field(default_factory=dict)

    @property
    def broker_url(self) -> str:
        return self.url

    def worker_online(self, hostname: str) -> bool:
        from celery import Celery

        app = Celery(broker=self.broker_url, broker_transport_options=self.transport_options)
        try:
            return bool(app.control.ping([hostname], timeout=0.5))
        finally:
            app.close()


HAStack = tuple[BrokerStack, Group]


@pytest.fixture
def ha_stack(tmp_path: Path) -> Iterator[HAStack]:
    """A Sentinel group, MariaDB and an ingress on them; the reconciler runs every second."""
    group = Group(tmp_path / "redis")
    group.directory.mkdir()
    db_name, url = create_mariadb()
    env = {"REKKU_SENTINEL_MASTER": MASTER, "REKKU_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
           "REKKU_RECONCILE_SECONDS": "1", "REKKU_RECONCILE_GRACE": "2"}
    stack = BrokerStack("sentinel", tmp_path / "home", url, 0, extra_env=env, url=group.url, transport_options={
        "master_name": MASTER, "sentinel_kwargs": {"password": SENTINEL_PASSWORD}})
    stack.home.mkdir()
    engine = sa.create_engine(url)
    from tests.plugins.counter import TABLE

    try:
        group.start()
        stack.start_ingress()
        TABLE.create(engine)
        yield stack, group
    finally:
        engine.dispose()
        stack.stop()
        group.stop()
        drop_mariadb(db_name)


def _statuses(engine: sa.Engine, ids: set[str]) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, status FROM action_runs")).all()
    return Counter(status for action_id, status in rows if action_id in ids)


def _invocations(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(r[0] for r in conn.execute(sa.text("SELECT action_id FROM tk_invocations")))


def _whereabouts(group: Group, ids: set[str]) -> Counter[str]:
    """Where the broker (its master now) holds the messages of ``ids``: in a queue, in the unacknowledged
    set (by holder), or nowhere: what a failure says about actions that did not end."""
    from rekku.reconciler import ids_in, unacked

    port = group.master_port()
    if port is None:
        return Counter({"(no master)": len(ids)})
    client = group.data(port)
    where: Counter[str] = Counter()
    seen: set[str] = set()
    for key in client.scan_iter(_type="list"):
        found = ids_in(client.lrange(key, 0, -1)) & ids
        where[f"queue {key.decode()}"] += len(found)
        seen |= found
    for delivery in unacked(client):
        if delivery.task_id in ids:
            where[f"unacked, held by {delivery.owner}"] += 1
            seen.add(delivery.task_id)
    where["nowhere"] = len(ids - seen)
    return Counter({k: v for k, v in where.items() if v})


class Submitter(threading.Thread):
    """Submits ``batches`` batches of ``size`` counting actions (half on the default pool, half on io), each
    with its own idempotency key; a batch the ingress refuses (503: the broker is failing over) or does
    not answer is sent again with the same key, as a client should. ``accepted``: the ids of every 202."""

    def __init__(self, stack: Stack, batches: int, size: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.batches, self.size = stack, batches, size
        self.accepted: set[str] = set()
        self.refused = 0
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for number in range(self.batches):
                body = {"actions": [{"type": "tk_count" if i % 2 else "tk_count_io", "payload": {}}
                                    for i in range(self.size)],
                        "context": {}, "idempotency_key": f"ha-{number}-{uuid.uuid4().hex[:6]}"}
                deadline = time.monotonic() + 60
                while True:
                    try:
                        resp = self.stack.post("/v1/actions", body, timeout=20)
                    except requests.RequestException:
                        resp = None
                    if resp is not None and resp.status_code == 202:
                        with self.lock:
                            self.accepted.update(a["id"] for a in resp.json()["accepted"])
                        break
                    assert resp is None or resp.status_code == 503, resp.text
                    self.refused += 1
                    assert time.monotonic() < deadline, "the ingress refused one batch for a minute"
                    time.sleep(0.2)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)


def test_primary_killed_during_1000_actions_every_accepted_action_ends_succeeded_once(ha_stack: HAStack) -> None:
    stack, group = ha_stack
    primary, replica = group.data_ports
    assert group.master_port() == primary
    stack.start_worker("default", concurrency=2, node="ha-default")
    stack.start_worker("io", concurrency=2, node="ha-io")
    stack.spawn("beat", log_name="beat")
    engine = sa.create_engine(stack.database_url)
    try:
        submitter = Submitter(stack, batches=50, size=20)
        submitter.start()
        # fail over with actions both waiting to run and still to be submitted
        wait_until(lambda: submitter.count() >= 300 and _statuses(engine, submitter.accepted)["succeeded"] >= 100,
                   timeout=60, interval=0.05, what="the first actions to run through the primary")
        with submitter.lock:
            accepted_then = set(submitter.accepted)
        in_flight = len(accepted_then) - _statuses(engine, accepted_then)["succeeded"]
        killed_at = time.monotonic()
        group.kill(primary)
        wait_until(lambda: group.master_port() == replica, timeout=30, interval=0.05,
                   what="Sentinel to promote the replica")
        promoted_after = time.monotonic() - killed_at
        assert submitter.is_alive() or submitter.count() < 1000, "every action was submitted before the failover"

        submitter.join(120)
        assert submitter.error is None, repr(submitter.error)
        accepted = submitter.accepted
        assert len(accepted) == 1000
        try:
            wait_until(lambda: _statuses(engine, accepted)["succeeded"] == 1000, timeout=60, interval=0.5,
                       what="all 1000 accepted actions to succeed")
        except AssertionError:
            with engine.connect() as conn:
                left = {r[0] for r in conn.execute(sa.text("SELECT id FROM action_runs WHERE status <> 'succeeded'"))}
            raise AssertionError(f"not every accepted action succeeded: {_statuses(engine, accepted)}; "
                                 f"the broker holds the others' messages: {_whereabouts(group, left & accepted)}")
        all_done_after = time.monotonic() - killed_at
        runs = _invocations(engine)
        twice = {action_id: n for action_id, n in runs.items() if n > 1}
        assert not twice, f"actions run more than once: {twice}"
        assert accepted <= set(runs), f"{len(accepted - set(runs))} accepted actions never ran"
        print(f"\nfailover: replica promoted {promoted_after:.2f} s after the primary's SIGKILL; "
              f"{in_flight} of {len(accepted_then)} accepted actions unfinished then; "
              f"{submitter.refused} batch submissions refused (503) or unanswered meanwhile; "
              f"{len(runs)} handler runs in all; all succeeded {all_done_after:.1f} s after the kill; reconciler: "
              f"{group.data(replica).hgetall('rekku:metrics:reconciler')}")
        # Rekku's own clients of the broker's Redis follow the master too: each worker's heartbeat, deleted
        # on the promoted replica, is written there again
        new_master = group.data(replica)
        assert new_master.info("replication")["role"] == "master"
        beats = ["rekku:worker:default@ha-default", "rekku:worker:io@ha-io"]
        new_master.delete(*beats)
        wait_until(lambda: all(new_master.exists(key) for key in beats), timeout=15,
                   what="the workers' heartbeats on the promoted replica")
        # and through all the connection errors, no password reached a log
        for path in (stack.home / "logs").glob("*.log"):
            text = path.read_text(errors="replace")
            assert DATA_PASSWORD not in text and SENTINEL_PASSWORD not in text, path.name
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- the settings
def _settings(**env: str):  # noqa: ANN202 - a Settings, imported late as the suite's other settings tests do
    from rekku.settings import Settings

    return Settings(_env_file=None, **env)


def test_a_sentinel_url_needs_the_master_name_and_one_password_and_db_on_every_part() -> None:
    from pydantic import ValidationError

    from rekku.broker import transport_options

    url = "sentinel://:pw@127.0.0.1:26390/2;sentinel://:pw@127.0.0.1:26391/2"
    options = transport_options(_settings(REKKU_BROKER_URL=url, REKKU_SENTINEL_MASTER="m",
                                          REKKU_SENTINEL_PASSWORD="spw"))
    assert options["master_name"] == "m" and options["sentinel_kwargs"]["password"] == "spw"
    from rekku.logs import configured_secrets

    assert {"data-pw-1", "sentinel-pw-2"} <= configured_secrets(_settings(
        REKKU_BROKER_URL=url.replace(":pw@", ":data-pw-1@"), REKKU_SENTINEL_MASTER="m",
        REKKU_SENTINEL_PASSWORD="sentinel-pw-2"))  # kept out of the logs
    assert transport_options(_settings(REKKU_BROKER_URL="redis://127.0.0.1:6379/0")) == {}
    with pytest.raises(ValidationError, match="REKKU_SENTINEL_MASTER"):
        _settings(REKKU_BROKER_URL=url)
    with pytest.raises(ValidationError, match="not a sentinel:// URL"):
        _settings(REKKU_BROKER_URL="redis://127.0.0.1:6379/0", REKKU_SENTINEL_MASTER="m")
    for odd in ("sentinel://:pw@127.0.0.1:26390;sentinel://127.0.0.1:26391",  # Celery's docs' example
                "sentinel://:pw@127.0.0.1:26390/2;sentinel://:pw@127.0.0.1:26391/3"):
        with pytest.raises(ValidationError, match="same password and db") as caught:
            _settings(REKKU_BROKER_URL=odd, REKKU_SENTINEL_MASTER="m")
        assert "pw" not in str(caught.value).replace("password", "")


def test_a_sentinel_url_is_shown_without_any_of_its_passwords() -> None:
    from rekku.embedded_redis import without_password

    shown = without_password("sentinel://:s3cret@h1:26379/0;sentinel://:s3cret@h2:26379/0")
    assert shown == "sentinel://:***@h1:26379/0;sentinel://:***@h2:26379/0"
