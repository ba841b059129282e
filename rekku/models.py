"""SQLAlchemy models of the action log. Plugins' own tables live with their plugins' migrations."""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Action states (docs/contracts.md §2); the last three are final.
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """Stored as naive UTC (SQLite and MariaDB keep no zone), always returned timezone-aware."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect):  # microseconds on MariaDB too
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware one")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=timezone.utc)


#: JSON that becomes LONGTEXT-backed JSON on MariaDB and TEXT on SQLite.
JSONType = sa.JSON().with_variant(mysql.JSON(), "mysql")
#: Auto-increment ids: BIGINT on MariaDB, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements).
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Batch(Base):
    """One accepted request: its idempotency key and the answer it got."""

    __tablename__ = "action_batches"
    #: Old batches by time, for the pruner (rekku/retention.py; migration 0006_retention_indexes).
    __table_args__ = (sa.Index("ix_action_batches_created", "created_at", "id"),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    response: Mapped[dict | None] = mapped_column(JSONType)
    #: SHA-256 of the client's request (body and context): the same key with another request is a 409.
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


#: Characters of the context's chat id kept in ``action_runs.chat_id`` (the index; the context has all).
CHAT_ID_LENGTH = 255


def chat_key(chat_id: object) -> str | None:
    """What ``action_runs.chat_id`` holds for a chat id: a prefix that narrows by index, never the
    whole test (a longer id, or a case variant under MariaDB's collation, shares it)."""
    return None if chat_id is None else str(chat_id)[:CHAT_ID_LENGTH]


class ActionRun(Base):
    """One action: written before it is enqueued, moved through its states by the worker."""

    __tablename__ = "action_runs"
    __table_args__ = (sa.Index("ix_action_runs_status_updated", "status", "updated_at"),
                      # GET /v1/actions: newest first by (created_at, id), alone or within a chat, status or type
                      sa.Index("ix_action_runs_chat_created", "chat_id", "created_at", "id"),
                      sa.Index("ix_action_runs_created", "created_at", "id"),
                      sa.Index("ix_action_runs_status_created", "status", "created_at", "id"),
                      sa.Index("ix_action_runs_type_created", "type", "created_at", "id"))

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    batch_id: Mapped[str] = mapped_column(sa.String(36), index=True)
    position: Mapped[int] = mapped_column(sa.Integer, default=0)
    type: Mapped[str] = mapped_column(sa.String(128))
    queue: Mapped[str] = mapped_column(sa.String(128))
    status: Mapped[str] = mapped_column(sa.String(16), default=QUEUED)
    payload: Mapped[dict] = mapped_column(JSONType)
    context: Mapped[dict | None] = mapped_column(JSONType)
    #: The context's chat id (its first CHAT_ID_LENGTH characters), indexed for the prompt's chat history.
    chat_id: Mapped[str | None] = mapped_column(sa.String(CHAT_ID_LENGTH))
    result: Mapped[object | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(sa.Text)
    progress: Mapped[dict | None] = mapped_column(JSONType)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    #: Runs lost with their worker process (killed mid-run): counted by whoever notices (the worker's main
    #: process when a pool process dies, the reconciler or a restarted node when a whole node died); at
    #: REKKU_MAX_ATTEMPTS the action fails instead of running again (a poison message).
    lost_runs: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(sa.String(255))
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
