"""Ids that become visible in commit order, for tables read by polling ``after=<last id seen>``.

MariaDB hands out an auto-increment id when a row is inserted, not when it commits: a writer holding
id 10 that commits after the writer of id 11 would be skipped by a poller that already read 11 (seen
in tests: a few rows of every few hundred, with six writers). Every transaction that adds rows to such
a table therefore first locks the one row of its order table (a table with a single row, id 1), and
holds the lock to commit, so ids are taken in commit order. SQLite needs nothing: its single writer
lock already does that. The outbox and the feed use it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa


def hold(connection: sa.Connection | Any, order_table: Any) -> None:
    """Lock ``order_table``'s row until this transaction ends; call it right before inserting (a
    Connection or a Session). On SQLite the FOR UPDATE renders as a plain read."""
    connection.execute(sa.select(order_table.id).where(order_table.id == 1).with_for_update())
