"""The action log: action_batches.request_hash, so an idempotency key reused for a different request
is refused (409) instead of silently answering the first request.

Batches written before have no hash and keep answering any request with their key, as they did.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("action_batches", sa.Column("request_hash", sa.String(64)))


def downgrade() -> None:
    op.drop_column("action_batches", "request_hash")
