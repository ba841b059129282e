"""Ids that become visible in commit order, for tables read by polling ``after=<last id seen>``.

MariaDB hands out an auto-increment id when a row is inserted, not when it commits: a writer holding
id 10 that commits after the writer of id 11 would be skipped by a poller that already read 11 (seen
in tests: a few rows of every few hundred, with six writers). Every transaction that adds rows to such
a table therefore first locks the one row of its order table (a table with a single row, id 1), and
holds the lock to commit, so ids are taken in commit order. SQLite needs nothing: its single writer
lock already does that. The outbox and the feed use it.

The lock serializes every writer of the table from its first insert to its commit, so whatever a writer
does while holding it limits how many rows all writers together can add per second. :class:`Rendered`
lets a writer do the costly part of a large insert (building and escaping the statement) before it takes
the lock, so that holding it costs little more than the database's own work.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa


def hold(connection: sa.Connection | Any, order_table: Any) -> None:
    """Lock ``order_table``'s row until this transaction ends; call it right before inserting (a
    Connection or a Session). On SQLite the FOR UPDATE renders as a plain read. On MariaDB the
    statement goes to the driver as it is: SQLAlchemy's own execution of it cost about 2 ms a time."""
    if isinstance(connection, sa.Connection) and connection.dialect.name == "mysql":
        connection.exec_driver_sql(_lock_statement(connection.dialect, order_table.__tablename__),
                                   execution_options=_AS_IS).all()
        return
    connection.execute(sa.select(order_table.id).where(order_table.id == 1).with_for_update())


def _lock_statement(dialect: sa.Dialect, table_name: str) -> str:
    quote = dialect.identifier_preparer.quote
    return f"SELECT {quote('id')} FROM {quote(table_name)} WHERE {quote('id')} = 1 FOR UPDATE"


class Rendered:
    """Rows of one table as SQL text, built and escaped when this is made, so that running the statement
    later (under an order lock) costs the database's work and not ours.

    Only for a MySQL-family connection whose driver escapes values itself (mysqlclient, PyMySQL:
    ``literal``); :meth:`of` answers None for any other, and the caller inserts through SQLAlchemy. Values
    pass the column types' own bind processors first (UTC datetimes, JSON), exactly as SQLAlchemy would
    send them. A column listed in ``later`` is left out of the rendering and given, per row, to
    :meth:`insert`: the id of a row written under the lock, known only there."""

    def __init__(self, connection: sa.Connection, table: sa.Table, rows: list[dict[str, Any]],
                 later: tuple[str, ...] = ()) -> None:
        dialect = connection.dialect
        text = _driver_text(connection)
        assert text is not None, "Rendered.of answers None where the driver cannot render values"
        columns = list(rows[0])
        self.table, self.later = table, later
        processors = [(name, table.c[name].type._cached_bind_processor(dialect)) for name in columns
                      if name not in later]

        def renderer(process: Any) -> Any:
            seen: dict[Any, str] = {}  # a chunk repeats values (its one timestamp, a chat): render each once

            def render(value: Any) -> str:
                try:
                    return seen[value]
                except KeyError:
                    done = seen[value] = text(process(value) if process else value)
                    return done
                except TypeError:  # unhashable (JSON)
                    return text(process(value) if process else value)
            return render

        renderers = [(name, renderer(process)) for name, process in processors]
        self.values = [[render(row[name]) for name, render in renderers] for row in rows]
        quote = dialect.identifier_preparer.quote
        self.head = (f"INSERT INTO {quote(table.name)} ("
                     + ", ".join(quote(name) for name, _ in processors)
                     + "".join(f", {quote(name)}" for name in later) + ") VALUES ")
        self._text, self._later_type = text, {name: table.c[name].type for name in later}
        self._dialect = dialect

    @classmethod
    def of(cls, connection: sa.Connection, table: sa.Table, rows: list[dict[str, Any]],
           later: tuple[str, ...] = ()) -> Rendered | None:
        """The rows rendered for ``connection``, or None where this does not apply (not MySQL/MariaDB, a
        driver without ``literal``, no RETURNING on the server, no rows)."""
        if not rows or not connection.dialect.insert_returning or _driver_text(connection) is None:
            return None
        return cls(connection, table, rows, later)

    def statement(self, positions: Iterable[int] | None = None, **later: list[Any]) -> str:
        """The INSERT of the rows at ``positions`` (default all), with the ``later`` columns' values."""
        picked = range(len(self.values)) if positions is None else list(positions)
        extra = []
        for name in self.later:
            process = self._later_type[name]._cached_bind_processor(self._dialect)
            extra.append([self._text(process(v) if process else v) for v in later[name]])
        rows = []
        for k, n in enumerate(picked):
            rows.append("(" + ", ".join([*self.values[n], *(column[k] for column in extra)]) + ")")
        return self.head + ", ".join(rows)

    def insert(self, connection: sa.Connection, positions: Iterable[int] | None = None,
               returning: bool = True, **later: list[Any]) -> list[int]:
        """Run the INSERT (one statement); with ``returning``, the new rows' ids in the rows' order (a
        multi-row INSERT takes ascending auto-increment ids in row order; sorted, as SQLAlchemy's own
        ``sort_by_parameter_order`` does for this dialect)."""
        sql = self.statement(positions, **later)
        if not returning:
            run(connection, sql)
            return []
        sql += " RETURNING " + self._dialect.identifier_preparer.quote(self.table.c.id.name)
        return sorted(int(row[0]) for row in connection.exec_driver_sql(sql, execution_options=_AS_IS))


def literal_renderer(connection: sa.Connection) -> Any:
    """For a MySQL-family connection whose driver escapes values (``literal``), a function
    ``(column, value) -> SQL text`` that renders a value as SQLAlchemy would bind it for that column (its
    type's bind processor first); None for any other connection."""
    text, dialect = _driver_text(connection), connection.dialect
    if text is None:
        return None

    def render(column: sa.Column, value: Any) -> str:
        process = column.type._cached_bind_processor(dialect)
        return text(process(value) if process else value)

    return render


def _driver_text(connection: sa.Connection) -> Any:
    """For a MySQL-family connection whose driver escapes values itself (``literal``: mysqlclient,
    PyMySQL), ``value -> SQL text`` as the driver would put it into a statement; None for any other."""
    if connection.dialect.name != "mysql":
        return None
    dbapi = connection.connection.dbapi_connection
    literal = getattr(dbapi, "literal", None)
    if literal is None:
        return None
    encoding = dbapi.encoding  # type: ignore[union-attr]

    def text(value: Any) -> str:
        out = literal(value)  # bytes from mysqlclient, str from PyMySQL
        return out if isinstance(out, str) else out.decode(encoding)

    return text


def run(connection: sa.Connection, sql: str) -> int:
    """Run a statement rendered by this module's helpers as it is (no parameters: the driver must not
    look for ``%`` placeholders in the escaped values); its row count. Errors are SQLAlchemy's, as for
    any statement (an IntegrityError on a unique key)."""
    return connection.exec_driver_sql(sql, execution_options=_AS_IS).rowcount


#: Execution options of a statement rendered with its values: sent as it is, with no parameters.
_AS_IS = {"no_parameters": True}
