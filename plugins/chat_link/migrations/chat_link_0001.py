"""chat_link plugin: upstream's chat_link table plus cross-platform forwards.

Revision ID: chat_link_0001
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import UTCDateTime

revision = "chat_link_0001"
down_revision = "0001"
branch_labels = ("chat_link",)
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "chat_link",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("interface", sa.String(64), nullable=False, server_default=""),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("link", sa.Text),
        sa.Column("chat_name", sa.String(255)),
        sa.Column("thread_name", sa.String(255)),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("interface", "chat_id", "thread_id", name="uq_chat_link_chat"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_chat_link_chat_name", "chat_link", ["chat_name"])
    op.create_table(
        "chat_link_forwards",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("source_interface", sa.String(64), nullable=False),
        sa.Column("source_chat_id", sa.String(191), nullable=False),
        sa.Column("target_interface", sa.String(64), nullable=False),
        sa.Column("target_chat_id", sa.String(191), nullable=False),
        sa.Column("target_thread_id", sa.String(191), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("source_interface", "source_chat_id", "target_interface", "target_chat_id",
                            "target_thread_id", name="uq_chat_link_forward"),
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_chat_link_forwards_source", "chat_link_forwards", ["source_interface", "source_chat_id"])


def downgrade() -> None:
    op.drop_table("chat_link_forwards")
    op.drop_table("chat_link")
