"""Interfaces: the outbox's order lock, so messages become visible in id order.

Revision ID: interfaces_0002
Revises: interfaces_0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "interfaces_0002"
down_revision = "interfaces_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table("outbox_order", sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                            mysql_charset="utf8mb4")
    op.bulk_insert(table, [{"id": 1}])


def downgrade() -> None:
    op.drop_table("outbox_order")
