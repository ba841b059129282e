"""blocklist plugin: users whose requests the ingress refuses (trainers excepted).

Revision ID: blocklist_0001
Revises: 0001
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

from rekku.plugin import UTCDateTime

revision = "blocklist_0001"
down_revision = "0001"
branch_labels = ("blocklist",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blocklist",
        sa.Column("user_id", sa.String(191), primary_key=True),
        sa.Column("reason", sa.Text),
        sa.Column("blocked_at", UTCDateTime, nullable=False),
        mysql_charset="utf8mb4",
    )


def downgrade() -> None:
    op.drop_table("blocklist")
