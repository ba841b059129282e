"""The action log's indexed chat id (migration 0002): filled for old rows, set on new ones, and what
the prompt's chat history reads by index, still exact for case variants and ids past its length."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from rekku.action_log import ActionLog, NewRun
from rekku.db import get_engine
from rekku.migrate import _config, upgrade
from rekku.models import CHAT_ID_LENGTH, ActionRun, utcnow
from rekku.prompt import chat_history
from tests.support import scratch_database

LONG = "x" * (CHAT_ID_LENGTH + 20)
CHATS = ["Room", "room", LONG, LONG + "y"]


@pytest.fixture(params=["sqlite", "mariadb"])
def old_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database migrated only to the action log's first revision (before the chat id column)."""
    with scratch_database(request.param, tmp_path, monkeypatch) as url:
        with get_engine(url).begin() as connection:
            cfg = _config(url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "0001")
        yield url


def _old_row(chat: str | None, text: str) -> dict:
    now = utcnow() - timedelta(hours=1)
    return {"id": str(uuid.uuid4()), "batch_id": str(uuid.uuid4()), "position": 0, "type": "echo", "queue": "default",
            "status": "succeeded", "payload": {"text": text}, "context": {"chat_id": chat} if chat else {},
            "attempts": 1, "cancel_requested": False, "created_at": now, "updated_at": now}


def _texts(chat: str) -> list[str]:
    return [entry["payload"]["text"] for entry in chat_history(None, chat)]


def test_old_rows_are_filled_new_rows_set_and_history_stays_exact(old_db: str) -> None:
    old_columns = [c for c in ActionRun.__table__.c if c.name != "chat_id"]
    with get_engine().begin() as conn:
        conn.execute(sa.insert(sa.table("action_runs", *[sa.column(c.name, c.type) for c in old_columns])),
                     [_old_row(chat, f"old {chat[:6]}{len(chat)}") for chat in CHATS] + [_old_row(None, "no chat")])

    upgrade(old_db)

    with get_engine().connect() as conn:
        filled = dict(conn.execute(sa.select(ActionRun.payload["text"].as_string(), ActionRun.chat_id)).all())
    assert filled == {"old Room4": "Room", "old room4": "room", f"old xxxxxx{len(LONG)}": LONG[:CHAT_ID_LENGTH],
                      f"old xxxxxx{len(LONG) + 1}": LONG[:CHAT_ID_LENGTH], "no chat": None}

    ActionLog().record_batch(str(uuid.uuid4()), None, [
        NewRun(str(uuid.uuid4()), n, "echo", "default", {"text": f"new {chat[:6]}{len(chat)}"}, {"chat_id": chat})
        for n, chat in enumerate(CHATS)], response={})

    for chat in CHATS:
        assert _texts(chat) == [f"old {chat[:6]}{len(chat)}", f"new {chat[:6]}{len(chat)}"], chat
    assert _texts("ROOM") == []


@pytest.mark.parametrize("old_db", ["mariadb"], indirect=True)
def test_chat_history_reads_the_chat_by_index(old_db: str) -> None:
    upgrade(old_db)
    ActionLog().record_batch(str(uuid.uuid4()), None, [
        NewRun(str(uuid.uuid4()), n, "echo", "default", {"text": str(n)}, {"chat_id": f"chat-{n % 50}"})
        for n in range(500)], response={})
    engine = get_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE TABLE action_runs")
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if "FROM action_runs" in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        assert len(_texts("chat-7")) == 10
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    [(statement, parameters)] = statements
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN " + statement, parameters).mappings().all()
    assert [row["key"] for row in plan] == ["ix_action_runs_chat_created"], plan
