"""The action log: action_batches and action_runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import JSONType, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "action_batches",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("response", JSONType),
        sa.Column("created_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "action_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("batch_id", sa.String(36), nullable=False, index=True),
        sa.Column("position", sa.Integer, nullable=False, server_default="0"),
        sa.Column("type", sa.String(128), nullable=False, index=True),
        sa.Column("queue", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("context", JSONType),
        sa.Column("result", JSONType),
        sa.Column("error", sa.Text),
        sa.Column("progress", JSONType),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("worker", sa.String(255)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_action_runs_status_updated", "action_runs", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("action_runs")
    op.drop_table("action_batches")
