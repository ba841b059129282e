"""Interfaces: delivery records (a message part is never sent twice) and the outbox.

Revision ID: interfaces_0001
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import UTCDateTime

revision = "interfaces_0001"
down_revision = "0001"
branch_labels = ("interfaces",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "interface_deliveries",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("action_id", sa.String(36), nullable=False),
        sa.Column("part_key", sa.String(191), nullable=False),
        sa.Column("interface", sa.String(64), nullable=False),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("remote_id", sa.String(191)),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("action_id", "part_key", name="uq_interface_deliveries_part"),
        mysql_charset="utf8mb4",
    )
    op.create_table(
        "outbox_messages",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("text", sa.Text),
        sa.Column("audio_url", sa.Text),
        sa.Column("reply_to", sa.String(191)),
        sa.Column("action_id", sa.String(36)),
        sa.Column("created_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_outbox_messages_chat", "outbox_messages", ["chat_id", "thread_id", "id"])


def downgrade() -> None:
    op.drop_table("outbox_messages")
    op.drop_table("interface_deliveries")
