"""Test plugin counting its invocations in the database, for exactly-once tests."""

from __future__ import annotations

import os

import sqlalchemy as sa

from rekku.plugin import AIPluginBase, current_action, get_engine, register_plugin

#: One row per handler invocation; tests create it (``TABLE.create(engine)``) before starting workers.
TABLE = sa.Table("tk_invocations", sa.MetaData(), sa.Column("action_id", sa.String(36)), sa.Column("pid", sa.Integer))


class Counter(AIPluginBase):
    """Counts its invocations in the database (a table of its own), for exactly-once tests."""

    def __init__(self) -> None:
        register_plugin("counter", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["tk_count", "tk_count_io"]

    def get_supported_actions(self) -> dict:
        return {"tk_count": {"description": "record one invocation", "required_fields": [], "optional_fields": []},
                "tk_count_io": {"description": "record one invocation, on the io pool", "required_fields": [],
                                "optional_fields": [], "pool": "io"}}

    def handle_custom_action(self, action_type: str, payload: dict):
        with get_engine().begin() as conn:  # the test creates the table before starting workers
            conn.execute(TABLE.insert().values(action_id=current_action().action_id, pid=os.getpid()))
        return {"counted": True}


PLUGIN_CLASS = Counter
