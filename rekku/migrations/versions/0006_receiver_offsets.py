"""Receivers' positions: the getUpdates offset of the Telegram receiver (`rekku receive`).

Revision ID: 0006_receiver_offsets
Revises: 0005_conversation
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.models import UTCDateTime

revision = "0006_receiver_offsets"
down_revision = "0005_conversation"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "receiver_offsets",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("next_offset", BigId, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("receiver_offsets")
