"""event plugin: scheduled events (upstream's columns plus zone, rule, target, actions) and their deliveries.

Revision ID: event_0001
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import JSONType, UTCDateTime

revision = "event_0001"
down_revision = "0001"
branch_labels = ("event",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "scheduled_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("date", sa.String(10)),
        sa.Column("time", sa.String(8)),
        sa.Column("recurrence_type", sa.String(16), nullable=False),
        sa.Column("next_run", UTCDateTime),
        sa.Column("description", sa.String(500), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("delivered", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_by", sa.String(191)),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("rule", JSONType, nullable=False),
        sa.Column("occurrence_index", sa.Integer, nullable=False, server_default="0"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("interface", sa.String(64), nullable=False),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("actions", JSONType),
        sa.Column("action_id", sa.String(36)),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_scheduled_events_due", "scheduled_events", ["status", "next_run"])
    op.create_index("ix_scheduled_events_chat", "scheduled_events", ["interface", "chat_id"])
    op.create_index("ix_scheduled_events_action", "scheduled_events", ["action_id"])
    op.create_table(
        "event_deliveries",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("event_id", BigId, nullable=False),
        sa.Column("occurrence", UTCDateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("result", JSONType),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("delivered_at", UTCDateTime),
        sa.Column("retry_at", UTCDateTime),
        sa.UniqueConstraint("event_id", "occurrence", name="uq_event_deliveries_occurrence"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_event_deliveries_open", "event_deliveries", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("event_deliveries")
    op.drop_table("scheduled_events")
