"""message_map plugin: messages forwarded to the trainer, mapped back to their chat and message.

Revision ID: message_map_0001
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import UTCDateTime

revision = "message_map_0001"
down_revision = "0001"
branch_labels = ("message_map",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_map",
        sa.Column("trainer_message_id", sa.String(191), primary_key=True),
        sa.Column("chat_id", sa.String(191), nullable=False),
        sa.Column("message_id", sa.String(191), nullable=False),
        sa.Column("interface", sa.String(64)),
        sa.Column("timestamp", UTCDateTime, nullable=False, index=True),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("message_map")
