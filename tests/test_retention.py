"""Retention (rekku/retention.py): each kind of record is pruned after its REKKU_RETAIN_* days, on a real
MariaDB and SQLite, while what is not final or still needed survives; `rekku prune` in a clean
environment (``--dry-run`` deletes nothing); beat runs the pass; and 200,000 old rows are pruned from
MariaDB while actions flow through a real stack, none of them slowed past its time limit, and a poller
following the outbox's ``after`` sees every new message once, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from rekku import retention
from rekku.db import get_engine
from rekku.feed import FeedItem
from rekku.feed_push import FeedPush
from rekku.interfaces.models import Delivery, OutboxMessage
from rekku.messages import Message
from rekku.migrate import upgrade
from rekku.models import ActionRun, Batch, utcnow
from rekku.settings import get_settings
from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    ROOT,
    Stack,
    child_env,
    claim_redis_db,
    release_redis_db,
    scratch_database,
    wait_until,
)

OLD_DAYS, RECENT_DAYS = 40, 1


def ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


# ----------------------------------------------------------------------------- rows, fast
def runs(n: int, when: datetime, status: str = "succeeded", batch: str | None = None, **more: Any) -> list[dict]:
    """``n`` action_runs rows (each in its own batch unless ``batch`` is given)."""
    return [{"id": str(uuid.uuid4()), "batch_id": batch or str(uuid.uuid4()), "position": 0, "type": "tk_sync",
             "queue": "default", "status": status, "payload": {"n": i}, "attempts": 1, "lost_runs": 0,
             "cancel_requested": False, "created_at": when, "updated_at": when, **more} for i in range(n)]


def batches_of(rows: list[dict], when: datetime) -> list[dict]:
    return [{"id": b, "created_at": when} for b in sorted({r["batch_id"] for r in rows})]


def outbox(n: int, when: datetime, chat: str = "old-chat") -> list[dict]:
    return [{"chat_id": chat, "thread_id": "", "text": f"old {i}", "created_at": when} for i in range(n)]


def feed_items(n: int, when: datetime) -> list[dict]:
    return [{"type": "message", "interface": "outbox", "chat_id": "c", "thread_id": "", "data": {"i": i},
             "created_at": when} for i in range(n)]


def messages(n: int, when: datetime) -> list[dict]:
    return [{"interface": "outbox", "chat_id": "c", "thread_id": "", "message_id": uuid.uuid4().hex,
             "user_id": "u", "text": f"hi {i}", "date": when, "received_at": when} for i in range(n)]


def deliveries(action_ids: list[str], when: datetime) -> list[dict]:
    return [{"action_id": a, "part_key": f"outbox|c||{i}", "interface": "outbox", "chat_id": "c", "thread_id": "",
             "status": "sent", "created_at": when, "updated_at": when} for i, a in enumerate(action_ids)]


def insert(url: str | None, table: sa.Table, rows: list[dict], chunk: int = 10_000) -> None:
    """Many rows at once: executemany (mysqlclient makes it multi-row INSERTs), not through the API."""
    engine = get_engine(url)
    for start in range(0, len(rows), chunk):
        with engine.begin() as connection:
            connection.execute(sa.insert(table), rows[start:start + chunk])


def count(table: sa.Table, *where: Any, url: str | None = None) -> int:
    with get_engine(url).connect() as connection:
        return connection.scalar(sa.select(sa.func.count()).select_from(table).where(*where))


def ids(table: sa.Table, *where: Any) -> set:
    with get_engine().connect() as connection:
        return set(connection.scalars(sa.select(table.c.id).where(*where)))


# ----------------------------------------------------------------------------- in process, both databases
@pytest.fixture(params=["sqlite", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("REKKU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REKKU_PRUNE_BATCH", "7")  # small, so every kind takes several batches
    with scratch_database(request.param, tmp_path, monkeypatch) as url:
        upgrade(url)
        yield url


def event_tables() -> tuple[sa.Table, sa.Table]:
    from rekku_plugins.event import engine as ev

    return ev.events, ev.deliveries


def seed(directory: Path) -> dict[str, Any]:
    """Old and recent rows of every kind, some old ones still needed; returns what must stay and go."""
    old, recent = ago(OLD_DAYS), ago(RECENT_DAYS)
    gone_batch, busy_batch = str(uuid.uuid4()), str(uuid.uuid4())
    finished = (runs(10, old, "succeeded", gone_batch) + runs(4, old, "failed", gone_batch)
                + runs(3, old, "cancelled", busy_batch))
    unfinished = runs(2, old, "queued", busy_batch) + runs(2, old, "running", busy_batch)
    fresh = runs(3, recent, "succeeded")
    empty_old, fresh_batches = {"id": str(uuid.uuid4()), "created_at": old}, batches_of(fresh, recent)
    insert(None, ActionRun.__table__, finished + unfinished + fresh)
    insert(None, Batch.__table__, [{"id": gone_batch, "created_at": old}, {"id": busy_batch, "created_at": old},
                                   empty_old, *fresh_batches])
    # delivery records: of finished actions (go), of unfinished ones (stay: they stop a second send), recent
    insert(None, Delivery.__table__, deliveries([r["id"] for r in finished], old)
           + deliveries([r["id"] for r in unfinished], old) + deliveries([r["id"] for r in fresh], recent))
    insert(None, OutboxMessage.__table__, outbox(20, old) + outbox(3, recent))
    insert(None, FeedItem.__table__, feed_items(20, old) + feed_items(2, recent))
    insert(None, Message.__table__, messages(12, old))  # all old: the newest stays (ids are never reused)
    events, event_deliveries = event_tables()
    event = {"recurrence_type": "none", "description": "x", "created_at": old, "delivered": True,
             "timezone": "UTC", "rule": {}, "occurrence_index": 0, "status": "done", "interface": "outbox",
             "chat_id": "c", "thread_id": "", "updated_at": old}
    insert(None, events, [event] * 3)
    statuses = ([("delivered", 1)] * 6 + [("cancelled", 1)] * 2 + [("failed", 6)] * 2  # finished: go
                + [("pending", 0), ("failed", 2)] * 2)  # still to be made or retried: stay
    insert(None, event_deliveries, [
        {"event_id": 1, "occurrence": old + timedelta(minutes=i), "status": s, "attempts": a, "created_at": old,
         "updated_at": old} for i, (s, a) in enumerate(statuses)])
    # artifacts: by an action gone, by a kept action, named in a kept action's result, by nobody, new, partial
    artifacts = directory / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    named_in_result = "speech-reused.mp3"
    with get_engine().begin() as connection:
        connection.execute(sa.update(ActionRun.__table__).where(ActionRun.__table__.c.id == fresh[0]["id"])
                           .values(result={"audio": named_in_result}))
    files = {"gone": [f"{finished[0]['id']}.mp3", "orphan.ogg", ".orphan.mp3.x1y2.part"],
             "kept": [f"{unfinished[0]['id']}.mp3", f"{fresh[1]['id']}.mp3", named_in_result],
             "new": ["fresh.mp3"]}
    for name in files["gone"] + files["kept"] + files["new"]:
        (artifacts / name).write_bytes(b"ID3")
        if name not in files["new"]:
            os.utime(artifacts / name, (old.timestamp(), old.timestamp()))
    os.symlink("/etc/hostname", artifacts / "link.mp3")
    os.utime(artifacts / "link.mp3", (old.timestamp(), old.timestamp()), follow_symlinks=False)
    return {"finished": {r["id"] for r in finished}, "unfinished": {r["id"] for r in unfinished},
            "fresh": {r["id"] for r in fresh}, "gone_batch": gone_batch, "busy_batch": busy_batch,
            "empty_batch": empty_old["id"], "fresh_batches": {b["id"] for b in fresh_batches},
            "artifacts": artifacts, "files": files}


def snapshot() -> dict[str, int]:
    events, event_deliveries = event_tables()
    tables = [ActionRun.__table__, Batch.__table__, Delivery.__table__, OutboxMessage.__table__,
              FeedItem.__table__, Message.__table__, events, event_deliveries]
    return {t.name: count(t) for t in tables}


def test_each_kind_is_pruned_and_what_is_still_needed_stays(db: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REKKU_MODEL_WEBHOOK_URL", "http://127.0.0.1:9/hook")  # the push cursor counts
    get_settings.cache_clear()
    seeded = seed(tmp_path / "home")
    feed_ids = sorted(ids(FeedItem.__table__))
    with get_engine().begin() as connection:  # the model webhook has been given the first 12 items only
        connection.execute(sa.update(FeedPush.__table__).where(FeedPush.__table__.c.id == 1)
                           .values(last_id=feed_ids[11]))
    before, files_before = snapshot(), sorted(os.listdir(seeded["artifacts"]))

    planned = retention.prune(dry_run=True)
    assert snapshot() == before, "a dry run deleted rows"
    assert sorted(os.listdir(seeded["artifacts"])) == files_before, "a dry run deleted files"

    done = retention.prune()
    counts = {t.kind: t.count for t in done.kinds}
    assert counts == {t.kind: t.count for t in planned.kinds}, "the dry run counted otherwise"
    assert counts == {"actions": 17, "batches": 2, "deliveries": 17, "outbox": 20, "feed": 12, "messages": 11,
                      "event_deliveries": 10, "artifacts": 3}
    assert done.batches > len(counts) and done.longest_batch > 0

    runs_left = ids(ActionRun.__table__)
    assert runs_left == seeded["unfinished"] | seeded["fresh"], "a queued or running action went, or a finished stayed"
    assert ids(Batch.__table__) == {seeded["busy_batch"]} | seeded["fresh_batches"], \
        "a batch with a kept action went, or an empty old one stayed"
    with get_engine().connect() as connection:
        kept_deliveries = set(connection.scalars(sa.select(Delivery.__table__.c.action_id)))
    assert kept_deliveries == seeded["unfinished"] | seeded["fresh"]
    assert count(OutboxMessage.__table__) == 3
    assert sorted(ids(FeedItem.__table__)) == feed_ids[12:], "an item not yet pushed went"
    assert count(Message.__table__) == 1
    events, event_deliveries = event_tables()
    assert count(events) == 3, "scheduled events are user data"
    with get_engine().connect() as connection:
        left = sorted(connection.execute(sa.select(event_deliveries.c.status, event_deliveries.c.attempts)).all())
    assert left == [("failed", 2), ("failed", 2), ("pending", 0), ("pending", 0)]
    files = sorted(os.listdir(seeded["artifacts"]))
    assert files == sorted(seeded["files"]["kept"] + seeded["files"]["new"] + ["link.mp3"])

    again = retention.prune()
    assert again.total == 0, "a second pass found more"


def test_ids_are_never_reused_after_a_prune(db: str, tmp_path: Path) -> None:
    """SQLite hands out the largest id plus one: pruning every row would give a poller's ``after`` to a new
    message. The newest row stays, so a new one always gets a larger id than any a poller saw."""
    insert(None, OutboxMessage.__table__, outbox(15, ago(OLD_DAYS)))
    insert(None, FeedItem.__table__, feed_items(15, ago(OLD_DAYS)))
    newest = {t: max(ids(t)) for t in (OutboxMessage.__table__, FeedItem.__table__)}
    retention.prune()
    for table, top in newest.items():
        with get_engine().begin() as connection:
            row = {"chat_id": "new", "text": "new", "created_at": utcnow()} if table.name == "outbox_messages" \
                else {"type": "message", "data": {}, "created_at": utcnow()}
            new_id = connection.execute(sa.insert(table).values(**row)).inserted_primary_key[0]
        assert new_id > top, f"{table.name} handed out id {new_id} again"


def test_zero_days_keeps_a_kind_forever(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REKKU_RETAIN_OUTBOX_DAYS", "0")
    monkeypatch.setenv("REKKU_RETAIN_ACTIONS_DAYS", "60")
    get_settings.cache_clear()
    insert(None, OutboxMessage.__table__, outbox(5, ago(1000)))
    insert(None, ActionRun.__table__, runs(3, ago(OLD_DAYS)) + runs(2, ago(61)))
    counts = {t.kind: t.count for t in retention.prune().kinds}
    assert counts["outbox"] == 0 and count(OutboxMessage.__table__) == 5
    assert counts["actions"] == 2 and count(ActionRun.__table__) == 3


@pytest.fixture
def broker_db(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    number = claim_redis_db()
    monkeypatch.setenv("REKKU_BROKER_URL", f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}")
    get_settings.cache_clear()
    try:
        yield number
    finally:
        release_redis_db(number)
        get_settings.cache_clear()


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_one_pass_at_a_time(db: str, broker_db: int) -> None:
    insert(None, ActionRun.__table__, runs(5, ago(OLD_DAYS)))
    other = redis.Redis(REDIS_HOST, REDIS_PORT, db=broker_db).lock(retention.LOCK_KEY, timeout=60)
    assert other.acquire(blocking=False)
    try:
        assert retention.prune_pass()["state"] == "busy"
        assert count(ActionRun.__table__) == 5, "a second pass ran beside the first"
    finally:
        other.release()
    assert [t.count for t in retention.prune().kinds if t.kind == "actions"] == [5]


# ----------------------------------------------------------------------------- the command, in a clean environment
def rekku(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rekku", *args], env=env, cwd=str(cwd), capture_output=True,
                          text=True, timeout=120)


def test_rekku_prune_command(tmp_path: Path) -> None:
    home, number = tmp_path / "home", claim_redis_db()
    url = f"sqlite:///{home / 'rekku.db'}"
    env = child_env(REKKU_HOME=str(home), REKKU_BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}")
    try:
        done = rekku("migrate", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        insert(url, ActionRun.__table__, runs(30, ago(OLD_DAYS)) + runs(4, ago(RECENT_DAYS)))
        insert(url, OutboxMessage.__table__, outbox(10, ago(OLD_DAYS)))

        dry = rekku("prune", "--dry-run", "--json", env=env, cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        planned = {k["kind"]: k["count"] for k in json.loads(dry.stdout)["kinds"]}
        assert planned["actions"] == 30 and planned["batches"] == 0 and planned["outbox"] == 9
        assert count(ActionRun.__table__, url=url) == 34 and count(OutboxMessage.__table__, url=url) == 10

        shown = rekku("prune", "--dry-run", env=env | {"COLUMNS": "120"}, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert "would delete" in shown.stdout and "39 rows and files would be deleted" in shown.stdout, shown.stdout
        assert count(ActionRun.__table__, url=url) == 34

        real = rekku("prune", "--json", env=env, cwd=tmp_path)
        assert real.returncode == 0, real.stderr
        report = json.loads(real.stdout)
        assert {k["kind"]: k["count"] for k in report["kinds"]} == planned and not report["dry_run"]
        assert count(ActionRun.__table__, url=url) == 4 and count(OutboxMessage.__table__, url=url) == 1

        lock = redis.Redis(REDIS_HOST, REDIS_PORT, db=number).lock(retention.LOCK_KEY, timeout=60)
        assert lock.acquire(blocking=False)
        busy = rekku("prune", env=env, cwd=tmp_path)
        lock.release()
        assert busy.returncode == 1 and "another pruning pass is running" in busy.stderr, busy.stderr
    finally:
        release_redis_db(number)


# ----------------------------------------------------------------------------- a real stack
def test_beat_prunes(make_stack: Any) -> None:
    stack: Stack = make_stack(REKKU_PRUNE_SECONDS="1")
    insert(stack.database_url, ActionRun.__table__, runs(50, ago(OLD_DAYS)))
    stack.start_worker("default", concurrency=1)
    stack.spawn("beat", log_name="beat")
    wait_until(lambda: count(ActionRun.__table__, url=stack.database_url) == 0, timeout=60,
               what="beat's pruning pass")


#: Old rows for the load test, 200,000 in all: actions four to a batch, their batches, outbox messages, feed items.
LOAD = {"actions": 60_000, "batches": 15_000, "outbox": 70_000, "feed": 55_000}
#: Actions under load run with this limit (tk_sync and tk_sleep take the default).
LOAD_TIME_LIMIT = "5"


def insert_load(url: str) -> None:
    """LOAD's rows on MariaDB, each table in one multi-row INSERT ... SELECT over the SEQUENCE engine's
    ``seq_1_to_N``: the rows are made by the server (through the API, or even row by row from here, it
    takes minutes on this machine)."""
    old = ago(OLD_DAYS).replace(tzinfo=None)
    with get_engine(url).begin() as connection:
        sql = connection.exec_driver_sql
        sql("INSERT INTO action_runs (id, batch_id, position, type, queue, status, payload, attempts, lost_runs, "
            "cancel_requested, created_at, updated_at) SELECT UUID(), CONCAT('load-', (seq - 1) DIV 4), "
            f"(seq - 1) MOD 4, 'tk_sync', 'default', 'succeeded', '{{}}', 1, 0, 0, %s, %s "
            f"FROM seq_1_to_{LOAD['actions']}", (old, old))
        sql(f"INSERT INTO action_batches (id, created_at) SELECT CONCAT('load-', seq - 1), %s "
            f"FROM seq_1_to_{LOAD['batches']}", (old,))
        sql("INSERT INTO outbox_messages (chat_id, thread_id, text, created_at) SELECT 'load', '', "
            f"CONCAT('old ', seq), %s FROM seq_1_to_{LOAD['outbox']}", (old,))
        sql("INSERT INTO feed_items (type, interface, chat_id, thread_id, data, created_at) SELECT 'message', "
            f"'outbox', 'c', '', '{{}}', %s FROM seq_1_to_{LOAD['feed']}", (old,))


def test_pruning_200000_rows_while_actions_flow(make_stack: Any) -> None:
    stack: Stack = make_stack(REKKU_DEFAULT_TIME_LIMIT=LOAD_TIME_LIMIT)
    url = stack.database_url
    assert sum(LOAD.values()) == 200_000
    started = time.monotonic()
    filler = threading.Thread(target=insert_load, args=(url,))
    filler.start()  # while the workers start
    stack.start_worker("default", concurrency=2)
    stack.start_worker("io", concurrency=4)
    filler.join()
    print(f"\n200000 rows inserted, workers up, in {time.monotonic() - started:.1f} s")
    with get_engine(url).connect() as connection:
        after = connection.scalar(sa.select(sa.func.max(OutboxMessage.__table__.c.id)))
    assert count(ActionRun.__table__, url=url) == LOAD["actions"] and after == LOAD["outbox"]

    submitted: list[str] = []

    def submit() -> None:
        answer = stack.submit([{"type": "message_outbox", "payload": {"text": f"m{len(submitted)}"}},
                               {"type": "tk_sleep", "payload": {"seconds": 0.05}},
                               {"type": "tk_sync", "payload": {}}],
                              {"interface": "outbox", "chat_id": "load"})
        assert len(answer["accepted"]) == 3, answer
        submitted.extend(a["id"] for a in answer["accepted"])

    submit()  # the newest outbox message is a new one before the prune starts
    assert stack.wait_action(submitted[0])["status"] == "succeeded"

    # the outbox poller: follows ``after`` on the chat the actions write to, from the newest old message
    seen: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        last = after
        while True:
            finished = stop.is_set()  # read before polling: one last poll after the actions ended
            page = stack.get("/v1/outbox", params={"after": last, "chat_id": "load", "limit": 1000}).json()
            got = [m["id"] for m in page["messages"]]
            seen.extend(got)
            last = got[-1] if got else last
            if finished and not got:
                return

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    prune = subprocess.Popen([sys.executable, "-m", "rekku", "prune", "--json"], env=stack.env(), cwd=str(ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    during = len(submitted)
    try:
        while prune.poll() is None:  # actions keep coming for as long as the prune runs
            submit()
            time.sleep(0.3)
        out, err = prune.communicate(timeout=10)
    finally:
        if prune.poll() is None:
            prune.kill()
    assert prune.returncode == 0, err
    report = json.loads(out)
    counts = {k["kind"]: k["count"] for k in report["kinds"]}
    print(f"pruned {sum(counts.values())} rows on MariaDB in {report['seconds']:.1f} s, {report['batches']} batches,"
          f" the longest {report['longest_batch_seconds'] * 1000:.0f} ms; {len(submitted) - during} actions "
          "submitted meanwhile")
    assert len(submitted) - during >= 30, "too few actions ran during the prune to say anything"

    runs_table = ActionRun.__table__

    def outcomes() -> dict[str, int]:
        with get_engine(url).connect() as connection:
            return dict(connection.execute(sa.select(runs_table.c.status, sa.func.count()).where(
                runs_table.c.id.in_(submitted)).group_by(runs_table.c.status)).all())

    wait_until(lambda: set(outcomes()) <= {"succeeded", "failed", "cancelled"}, timeout=120,
               what="every action submitted during the prune to finish")
    # none was slowed past its time limit: it would have failed
    assert outcomes() == {"succeeded": len(submitted)}
    stop.set()
    poller.join(60)
    assert not poller.is_alive()
    box = OutboxMessage.__table__
    with get_engine(url).connect() as connection:
        new = list(connection.scalars(sa.select(box.c.id).where(box.c.id > after).order_by(box.c.id)))
    assert len(new) == len(submitted) // 3
    assert seen == new, "the poller following after missed a message, saw one twice or out of order"
    # a poller with an old ``after`` still gets every remaining message, in order
    page = stack.get("/v1/outbox", params={"after": 0, "chat_id": "load", "limit": 1000}).json()["messages"]
    assert [m["id"] for m in page] == new[:1000]
    # and the old rows went: all but the newest feed item (the newest outbox message is a new one)
    assert counts["actions"] == LOAD["actions"] and counts["batches"] == LOAD["batches"]
    assert counts["outbox"] == LOAD["outbox"] and counts["feed"] == LOAD["feed"] - 1
