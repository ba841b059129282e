"""Seeing what happened (issue 17): GET /v1/actions (filters, keyset pages), GET /v1/stats, and the CLI's
`rekku list`, `cancel`, `dead-letters` and --json, against a real stack on SQLite and MariaDB."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.support import ROOT, Stack, scratch_database, wait_until


def _chat() -> str:
    return f"view-{uuid.uuid4().hex[:10]}"


def _finished(stack: Stack, answer: dict) -> list[dict]:
    return [stack.wait_action(a["id"]) for a in answer["accepted"]]


def _list(stack: Stack, **params: Any) -> dict:
    resp = stack.get("/v1/actions", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _ids(stack: Stack, **params: Any) -> list[str]:
    return [a["id"] for a in _list(stack, **params)["actions"]]


def _all_pages(stack: Stack, cursor: str | None = None, **params: Any) -> tuple[list[dict], int]:
    """Every page from ``cursor`` (the first page without one) to the last."""
    seen, pages = [], 0
    while True:
        page = _list(stack, **params, **({"cursor": cursor} if cursor else {}))
        seen += page["actions"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return seen, pages
        assert pages < 100


def test_the_list_and_the_stats_need_the_token(stack: Stack) -> None:
    for path in ("/v1/actions", "/v1/actions?status=failed", "/v1/stats", "/v1/actions/x?redact=true"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {stack.token}x"}):
            resp = requests.get(stack.base_url + path, headers=headers, timeout=10)
            assert resp.status_code == 401, (path, headers)
            assert resp.json()["detail"] == "missing or wrong bearer token"


def test_every_filter_narrows_the_list_and_shows_actions_as_get_does(stack: Stack) -> None:
    chat, other = _chat(), _chat()
    first = stack.submit([{"type": "echo", "payload": {"text": "a"}}, {"type": "tk_fail", "payload": {}},
                          {"type": "echo", "payload": {"text": "b", "data": {"api_key": "k-123"}}}],
                         {"chat_id": chat, "interface": "webhook"})
    second = stack.submit([{"type": "echo", "payload": {"text": "c"}}], {"chat_id": other})
    a = _finished(stack, first)
    b = _finished(stack, second)
    a_ids = sorted(r["id"] for r in a)

    assert sorted(_ids(stack, batch_id=first["batch_id"])) == a_ids
    assert sorted(_ids(stack, chat_id=chat)) == a_ids
    assert _ids(stack, chat_id=other) == [b[0]["id"]]
    assert _ids(stack, chat_id=chat[:-1]) == []  # the chat id itself, not a prefix of it
    assert _ids(stack, chat_id=chat, type="tk_fail") == [a[1]["id"]]
    assert _ids(stack, chat_id=chat, status="failed") == [a[1]["id"]]
    assert sorted(_ids(stack, batch_id=first["batch_id"], status="succeeded")) == sorted([a[0]["id"], a[2]["id"]])
    assert _ids(stack, batch_id=first["batch_id"], status="queued") == []
    # since is inclusive, until exclusive, both on created_at (every action of a request shares it)
    split = b[0]["created_at"]
    assert _ids(stack, chat_id=other, since=split) == [b[0]["id"]]
    assert _ids(stack, chat_id=chat, since=split) == []
    assert sorted(_ids(stack, chat_id=chat, until=split)) == a_ids
    assert _ids(stack, chat_id=other, until=split) == []
    naive = datetime.fromisoformat(split).replace(tzinfo=None).isoformat()  # no zone: UTC
    assert _ids(stack, chat_id=other, since=naive) == [b[0]["id"]]
    # the unfiltered list has them too, newest first
    newest = _ids(stack, limit=500)
    assert newest.index(b[0]["id"]) < min(newest.index(i) for i in a_ids)
    # each action exactly as GET /v1/actions/{id} shows it (payloads included, secrets and all)
    for shown in _list(stack, chat_id=chat)["actions"]:
        assert shown == stack.get(f"/v1/actions/{shown['id']}").json()
    assert any(s["payload"].get("data") == {"api_key": "k-123"} for s in _list(stack, chat_id=chat)["actions"])


def test_redact_shows_secret_values_as_stars_in_the_list_and_the_action(stack: Stack) -> None:
    chat = _chat()
    payload = {"text": "login", "data": {"password": "hunter2", "nested": [{"botToken": "t-9"}], "user": "ann"}}
    run = stack.run("echo", payload, {"chat_id": chat})
    hidden = {"text": "login", "data": {"password": "***", "nested": [{"botToken": "***"}], "user": "ann"}}
    one = stack.get(f"/v1/actions/{run['id']}", params={"redact": "true"}).json()
    listed = _list(stack, chat_id=chat, redact="true")["actions"][0]
    assert one["payload"] == listed["payload"] == hidden
    assert one["result"] == listed["result"] == hidden  # echo's result is its payload: hidden the same way
    assert "hunter2" not in json.dumps(one) + json.dumps(listed)
    assert stack.get(f"/v1/actions/{run['id']}").json()["payload"] == payload  # without ?redact, as it was


def test_pages_with_equal_timestamps_skip_and_repeat_nothing(stack: Stack) -> None:
    chat = _chat()
    big = stack.submit([{"type": "echo", "payload": {"text": str(i)}} for i in range(23)], {"chat_id": chat})
    small = stack.submit([{"type": "echo", "payload": {"text": f"s{i}"}} for i in range(5)], {"chat_id": chat})
    expected = [a["id"] for a in small["accepted"]] + [a["id"] for a in big["accepted"]]
    runs = {r["id"]: r for r in _finished(stack, big) + _finished(stack, small)}
    assert len({runs[a["id"]]["created_at"] for a in big["accepted"]}) == 1  # one timestamp for 23 actions

    for limit in (1, 4, 5, 23, 28, 29):
        seen, pages = _all_pages(stack, chat_id=chat, limit=limit)
        ids = [a["id"] for a in seen]
        assert len(ids) == len(set(ids)) == 28, limit  # nothing repeated
        assert set(ids) == set(expected), limit  # nothing skipped
        assert pages == -(-28 // limit), limit  # a full last page says so: no empty page after it
        keys = [(runs[i]["created_at"], i) for i in ids]
        assert keys == sorted(keys, reverse=True), limit  # newest first, then by id
        assert ids[:5] == sorted((a["id"] for a in small["accepted"]), reverse=True)

    # an action written while someone pages never shifts the pages after the cursor
    page = _list(stack, chat_id=chat, limit=10)
    late = stack.submit([{"type": "echo", "payload": {"text": "late"}}], {"chat_id": chat})["accepted"][0]["id"]
    rest, _ = _all_pages(stack, chat_id=chat, limit=10, cursor=page["next_cursor"])
    assert [a["id"] for a in page["actions"] + rest] == [a["id"] for a in seen]
    assert _ids(stack, chat_id=chat, limit=1) == [late]


def test_a_bad_filter_value_is_a_422_in_the_error_shape(stack: Stack) -> None:
    not_a_cursor = base64.urlsafe_b64encode(b'["yesterday", 5]').decode()
    for params in ({"status": "done"}, {"since": "last tuesday"}, {"until": "2026-13-40"}, {"limit": 0},
                   {"limit": 501}, {"cursor": "!!!"}, {"cursor": not_a_cursor}, {"type": ""}, {"chat_id": "x" * 256},
                   {"redact": "maybe"}):
        resp = stack.get("/v1/actions", params=params)
        assert resp.status_code == 422, (params, resp.text)
        body = resp.json()
        assert set(body) == {"detail", "errors"} and body["errors"], params
    assert stack.get("/v1/stats", params={"minutes": 0}).status_code == 422
    assert stack.get("/v1/stats", params={"minutes": 1441}).status_code == 422


def test_stats_count_this_minute_s_actions_and_see_the_queues_and_workers(stack: Stack) -> None:
    before = stack.get("/v1/stats").json()
    answer = stack.submit([{"type": "echo", "payload": {"text": str(i)}} for i in range(6)], {"chat_id": _chat()})
    _finished(stack, answer)
    stats = stack.get("/v1/stats", params={"minutes": 60}).json()
    assert len(stats["per_minute"]) == 60 and stats["truncated"] is False
    created = sum(m["created"] for m in stats["per_minute"])
    assert created >= sum(m["created"] for m in before["per_minute"][1:]) + 6
    finished = [m for m in stats["per_minute"] if m["finished"]]
    assert finished and all(0 <= m["p50_seconds"] <= m["p99_seconds"] for m in finished)
    assert stats["latency"]["finished"] >= 6 and stats["latency"]["p50_seconds"] <= stats["latency"]["p99_seconds"]
    assert set(stats["queues"]) == {"default", "io", "selenium", "terminal"}
    assert all(isinstance(n, int) and n >= 0 for n in stats["queues"].values())
    assert stats["workers"]["default"] == [f"default@{stack.name}-main"] and stats["workers"]["io"] == []
    assert stats["broker_error"] is None


def test_stats_count_queued_actions_per_pool(stack: Stack) -> None:
    """No io worker in this stack: io actions wait in the io queue, and the stats say how many."""
    before = stack.get("/v1/stats").json()["queues"]["io"]
    answer = stack.submit([{"type": "tk_io", "payload": {}} for _ in range(3)], {"chat_id": _chat()})
    ids = [a["id"] for a in answer["accepted"]]
    try:
        assert wait_until(lambda: stack.get("/v1/stats").json()["queues"]["io"] >= before + 3, what="io queue")
        assert sorted(_ids(stack, batch_id=answer["batch_id"], status="queued")) == sorted(ids)
    finally:
        for action_id in ids:
            stack.post(f"/v1/actions/{action_id}/cancel")


@pytest.mark.parametrize("kind", ["sqlite", "mariadb"])
def test_stats_buckets_and_percentiles_are_exact(kind: str, tmp_path: Path, monkeypatch) -> None:
    """Known rows in a real database: each action in the minute it was created, finished and failed
    counted there, nearest-rank p50/p99 of the time to finish, nothing from before the window."""
    from rekku.action_query import minute_stats
    from rekku.db import get_engine
    from rekku.migrate import upgrade
    from rekku.models import ActionRun

    now = datetime.fromisoformat("2026-11-30T10:30:20+00:00")  # the window: 09:31 to 10:31 (excluded)
    rows = []

    def add(created: str, seconds: float | None, status: str = "succeeded") -> None:
        at = datetime.fromisoformat(f"2026-11-30T{created}+00:00")
        rows.append({"id": uuid.uuid4().hex, "batch_id": "b", "position": len(rows), "type": "echo", "queue": "default",
                     "status": status if seconds is not None else "queued", "payload": {}, "context": {},
                     "attempts": 1, "cancel_requested": False, "created_at": at, "updated_at": at,
                     "finished_at": None if seconds is None else at + timedelta(seconds=seconds)})

    for i in range(1, 101):  # 10:29: 100 actions taking 0.001 s to 0.100 s
        add(f"10:29:{i % 60:02d}.{i:06d}", i / 1000, "failed" if i % 10 == 0 else "succeeded")
    add("10:30:59.999999", 2.5)  # the last minute of the window
    add("10:30:00", None)  # not finished: created, no latency
    add("09:31:00", 1.25)  # the window's first instant
    add("09:30:59.999999", 9)  # before the window
    with scratch_database(kind, tmp_path, monkeypatch) as url:
        upgrade(url)
        engine = get_engine(url)
        with engine.begin() as c:
            c.execute(sa.insert(ActionRun.__table__), rows)
        stats = minute_stats(engine, 60, now=now)
    minutes = stats["per_minute"]
    assert (stats["since"], stats["until"]) == ("2026-11-30T09:31:00+00:00", "2026-11-30T10:31:00+00:00")
    assert len(minutes) == 60 and minutes[0]["minute"] == stats["since"]
    assert minutes[0] == {"minute": "2026-11-30T09:31:00+00:00", "created": 1, "finished": 1, "failed": 0,
                          "p50_seconds": 1.25, "p99_seconds": 1.25}
    assert minutes[58] == {"minute": "2026-11-30T10:29:00+00:00", "created": 100, "finished": 100, "failed": 10,
                           "p50_seconds": 0.05, "p99_seconds": 0.099}
    assert minutes[59] == {"minute": "2026-11-30T10:30:00+00:00", "created": 2, "finished": 1, "failed": 0,
                           "p50_seconds": 2.5, "p99_seconds": 2.5}
    assert sum(m["created"] for m in minutes) == 103 and stats["truncated"] is False
    assert stats["latency"] == {"finished": 102, "p50_seconds": 0.051, "p99_seconds": 1.25}


# ----------------------------------------------------------------------------- the indexes
def _plan(engine: sa.Engine, query: sa.Select) -> str:
    """The database's plan of ``query``: SQLite's EXPLAIN QUERY PLAN lines, or MariaDB's EXPLAIN rows."""
    compiled = query.compile(dialect=engine.dialect)
    params = [compiled.params[name] for name in compiled.positiontup]
    params = [p.replace(tzinfo=None) if isinstance(p, datetime) else p for p in params]
    if engine.dialect.name == "sqlite":
        params = [p.isoformat(" ") if isinstance(p, datetime) else p for p in params]
        with engine.connect() as c:
            return "\n".join(str(r[-1]) for r in c.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled),
                                                                    tuple(params)).all())
    with engine.connect() as c:
        return "\n".join(str(dict(r._mapping)) for r in c.exec_driver_sql("EXPLAIN " + str(compiled),
                                                                          tuple(params)).all())


@pytest.mark.parametrize("kind", ["sqlite", "mariadb"])
def test_each_filter_pages_on_an_index_without_sorting(kind: str, tmp_path: Path, monkeypatch) -> None:
    """Every page, first or later, with or without a filter, reads a range of the filter's index in its
    order; none scans the table or sorts. (SQLite's planner needs no statistics; MariaDB is told the index,
    as it otherwise reads a type's whole entry from its newest row and filters up to the cursor.)"""
    from rekku.action_query import ActionFilter, encode_cursor, list_query
    from rekku.db import get_engine
    from rekku.migrate import upgrade
    from rekku.models import ActionRun

    with scratch_database(kind, tmp_path, monkeypatch) as url:
        upgrade(url)
        engine = get_engine(url)
        at = datetime.fromisoformat("2026-11-30T10:00:00+00:00")
        with engine.begin() as c:  # a few rows: MariaDB plans an empty table differently
            c.execute(sa.insert(ActionRun.__table__), [
                {"id": f"a{i:03d}", "batch_id": f"b{i % 7}", "position": 0, "type": ("echo", "tk_fail")[i % 2],
                 "queue": "default", "status": ("succeeded", "failed", "queued")[i % 3], "payload": {},
                 "context": {"chat_id": f"c{i % 5}"}, "chat_id": f"c{i % 5}", "attempts": 0,
                 "cancel_requested": False, "created_at": at - timedelta(seconds=i // 3), "updated_at": at}
                for i in range(300)])
        cursor = encode_cursor("2026-11-30T09:59:00+00:00", "a100")
        since = datetime.fromisoformat("2026-11-30T09:00:00+00:00")
        for where, index in ((ActionFilter(), "ix_action_runs_created"),
                             (ActionFilter(status="failed"), "ix_action_runs_status_created"),
                             (ActionFilter(type="echo"), "ix_action_runs_type_created"),
                             (ActionFilter(type="echo", status="failed"), "ix_action_runs_type_created|status"),
                             (ActionFilter(chat_id="c1"), "ix_action_runs_chat_created"),
                             (ActionFilter(since=since, until=since + timedelta(hours=1)), "ix_action_runs_created")):
            for page in (None, cursor):
                plan = _plan(engine, list_query(where, 51, page))
                if kind == "sqlite":  # both filters: either index is a range in order
                    assert any(i in plan for i in (index, index.replace("type_created|status", "status_created"))
                               ), (where, page, plan)
                    assert "TEMP B-TREE" not in plan and "SCAN action_runs\n" not in plan + "\n", (where, page, plan)
                else:  # a later page is a range from the cursor, not the filter's whole entry read up to it
                    index = index.partition("|")[0]
                    assert f"'key': '{index}'" in plan, (where, page, plan)
                    assert page is None or "'type': 'range'" in plan, (where, page, plan)
                    assert "filesort" not in plan and "temporary" not in plan, (where, page, plan)


# ----------------------------------------------------------------------------- the CLI
def rekku(stack: Stack, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """The CLI in a clean environment (tests.support.child_env, through Stack.env)."""
    env = stack.env(REKKU_PORT=str(stack.port), REKKU_HOST="127.0.0.1", COLUMNS="250")
    return subprocess.run([sys.executable, "-m", "rekku", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout)


def _json_out(done: subprocess.CompletedProcess) -> Any:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_rekku_list_filters_and_pages_like_the_api(stack: Stack) -> None:
    chat = _chat()
    answer = stack.submit([{"type": "echo", "payload": {"text": str(i)}} for i in range(3)] +
                          [{"type": "tk_fail", "payload": {}}], {"chat_id": chat})
    runs = _finished(stack, answer)
    page = _json_out(rekku(stack, "list", "--json", "--chat-id", chat))
    assert page == _list(stack, chat_id=chat)
    assert [a["id"] for a in _json_out(rekku(stack, "list", "--json", "--chat-id", chat, "--status", "failed",
                                            "--type", "tk_fail"))["actions"]] == [runs[3]["id"]]
    assert len(_json_out(rekku(stack, "list", "--json", "--batch-id", answer["batch_id"]))["actions"]) == 4
    first = _json_out(rekku(stack, "list", "--json", "--chat-id", chat, "--limit", "3"))
    rest = _json_out(rekku(stack, "list", "--json", "--chat-id", chat, "--limit", "3",
                           "--cursor", first["next_cursor"]))
    assert {a["id"] for a in first["actions"] + rest["actions"]} == {r["id"] for r in runs}
    assert rest["next_cursor"] is None
    since = _json_out(rekku(stack, "list", "--json", "--chat-id", chat, "--since", runs[0]["created_at"]))
    assert len(since["actions"]) == 4
    table = rekku(stack, "list", "--chat-id", chat, "--limit", "3")
    # the table shows the same page as --json (one batch: equal created_at, so the ids order it)
    assert table.returncode == 0 and "rekku list --cursor" in table.stdout
    assert all(a["id"] in table.stdout for a in first["actions"]), table.stdout
    bad = rekku(stack, "list", "--since", "last tuesday")
    assert bad.returncode == 1 and "422" in bad.stderr and "since" in bad.stderr
    assert rekku(stack, "list", "--status", "done").returncode == 2


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_rekku_cancel_stops_an_action_and_refuses_a_finished_one(stack: Stack) -> None:
    answer = stack.submit([{"type": "tk_io", "payload": {}}])  # no io worker: it stays queued
    action_id = answer["accepted"][0]["id"]
    done = _json_out(rekku(stack, "cancel", action_id, "--json"))
    assert done == {"id": action_id, "status": "cancelled", "detail": "cancelled before it ran"}
    assert stack.get(f"/v1/actions/{action_id}").json()["status"] == "cancelled"
    again = rekku(stack, "cancel", action_id)
    assert again.returncode == 1 and "409" in again.stderr and "already cancelled" in again.stderr
    missing = rekku(stack, "cancel", "no-such-action")
    assert missing.returncode == 1 and "404" in missing.stderr
    other = stack.submit([{"type": "tk_io", "payload": {}}])["accepted"][0]["id"]
    plain = rekku(stack, "cancel", other)
    assert plain.returncode == 0 and "cancelled before it ran" in plain.stdout


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_rekku_dead_letters_lists_failed_actions(stack: Stack) -> None:
    failed = stack.run("tk_fail", {"message": "dead-letter-cli"})
    page = _json_out(rekku(stack, "dead-letters", "--json"))
    assert page == stack.get("/v1/dead-letters").json()
    assert page["actions"][0]["id"] == failed["id"] and all(a["status"] == "failed" for a in page["actions"])
    table = rekku(stack, "dead-letters", "--limit", "5")
    assert table.returncode == 0 and failed["id"] in table.stdout and "dead-letter-cli" in table.stdout


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_every_listing_command_has_json(stack: Stack) -> None:
    listed = _json_out(rekku(stack, "actions", "--json"))
    types = {a["type"]: a for a in listed["actions"]}
    assert types["echo"]["queue"] == "default" and types["tk_io"]["queue"] == "io"
    assert set(types["echo"]) == {"type", "plugin", "queue", "required_fields", "optional_fields", "description"}
    assert isinstance(listed["errors"], list) and isinstance(listed["disabled"], dict)
    stuck = rekku(stack, "status", "--stuck", "--json")
    assert stuck.returncode in (0, 1) and isinstance(json.loads(stuck.stdout)["actions"], list)
    run = stack.run("echo", {"text": "json"})
    assert _json_out(rekku(stack, "status", run["id"], "--json")) == run
    checks = json.loads(rekku(stack, "doctor", "--json").stdout)["checks"]
    assert {"broker", "database"} <= {c["name"] for c in checks}
    assert all(set(c) == {"name", "level", "detail", "fix"} for c in checks)
