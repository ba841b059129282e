"""Interfaces: what each delivered part said (its thread, text and audio), and the chat's deliveries by
time, so the prompt's chat history shows what Rekku really sent (rekku.prompt.chat_history).

Rows written before this revision keep an empty thread and no text: the history leaves them out.
On MariaDB the texts are MEDIUMTEXT: an outbox part may hold 100 000 characters, more than TEXT's
65 535 bytes (outbox_messages.text was TEXT, and such a message failed there).

Revision ID: interfaces_0003_history
Revises: interfaces_0002
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "interfaces_0003_history"
down_revision = "interfaces_0002"
branch_labels = None
depends_on = None

#: TEXT, MEDIUMTEXT on MariaDB (rekku.interfaces.models.LongText).
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")


def upgrade() -> None:
    op.add_column("interface_deliveries", sa.Column("thread_id", sa.String(191), nullable=False, server_default=""))
    op.add_column("interface_deliveries", sa.Column("text", LongText))
    if op.get_bind().dialect.name == "mysql":
        op.alter_column("outbox_messages", "text", type_=mysql.MEDIUMTEXT(), existing_type=sa.Text(),
                        existing_nullable=True)
    op.add_column("interface_deliveries", sa.Column("audio", sa.Text))
    op.create_index("ix_interface_deliveries_chat_created", "interface_deliveries", ["chat_id", "created_at"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "mysql":
        op.alter_column("outbox_messages", "text", type_=sa.Text(), existing_type=mysql.MEDIUMTEXT(),
                        existing_nullable=True)
    op.drop_index("ix_interface_deliveries_chat_created", table_name="interface_deliveries")
    with op.batch_alter_table("interface_deliveries") as batch:
        batch.drop_column("audio")
        batch.drop_column("text")
        batch.drop_column("thread_id")
