"""Plugins as packages (issue 15): a plugin folder with its own modules and its own Alembic revisions.

* a database made while every revision lived in rekku/migrations/versions/ (the layout before plugins
  kept their own) is recognized as current and loses nothing, on SQLite and MariaDB; one made halfway
  is upgraded the rest of the way;
* a user's package plugin on REKKU_PLUGIN_PATH imports its own modules, gets its table from its own
  revision through ``rekku migrate``, and its action writes there, through the real CLI.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from rekku import migrate
from rekku.registry import BUILTIN_PLUGIN_DIR, MIGRATIONS_DIR_NAME
from tests.conftest import running_stack
from tests.support import TEST_PLUGINS, create_mariadb, drop_mariadb
from tests.test_first_day_cli import clean_env, rekku


@pytest.fixture(params=["sqlite", "mariadb"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    name, url = create_mariadb()
    try:
        yield url
    finally:
        drop_mariadb(name)


def _old_layout(tmp_path: Path) -> Path:
    """rekku/migrations as it was before: every revision, core and plugins', in one versions/ folder."""
    old = tmp_path / "old_migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, old, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in BUILTIN_PLUGIN_DIR.glob(f"*/{MIGRATIONS_DIR_NAME}"):
        for revision in folder.glob("*.py"):
            shutil.copy(revision, old / "versions" / revision.name)
    return old


def _upgrade_old(url: str, old: Path, target: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(old))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, target)


def test_a_database_made_with_every_revision_in_one_folder_is_current_and_keeps_its_rows(
        database_url: str, tmp_path: Path) -> None:
    _upgrade_old(database_url, _old_layout(tmp_path), "heads")
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO blocklist (user_id, reason, blocked_at) "
                                 "VALUES ('u1', 'spam', '2026-11-29 10:00:00')"))
        current, heads = migrate.state(database_url)
        assert current == heads, (current, heads)  # the new layout knows every revision it has
        migrate.upgrade(database_url)  # a no-op, and no error about a revision it cannot locate
        assert migrate.state(database_url) == (current, heads)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT user_id, reason FROM blocklist")).all() == [("u1", "spam")]
    finally:
        engine.dispose()


def test_a_database_migrated_halfway_before_is_upgraded_the_rest_of_the_way(database_url: str,
                                                                             tmp_path: Path) -> None:
    _upgrade_old(database_url, _old_layout(tmp_path), "blocklist@head")  # 0001 and the blocklist branch
    migrate.upgrade(database_url)
    current, heads = migrate.state(database_url)
    assert current == heads and "event_0002" in heads and "recent_chats_0001" in heads
    engine = sa.create_engine(database_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"blocklist", "scheduled_events", "recent_chats", "ai_diary", "action_runs"} <= tables


PACKAGE_INIT = '''
"""A user's plugin kept as a package: its table in a module of its own, its revision in migrations/."""
from rekku.plugin import AIPluginBase, register_plugin, session_factory

from .tables import notes


class NotesPlugin(AIPluginBase):
    def __init__(self):
        register_plugin("notes", self)

    @staticmethod
    def get_supported_action_types():
        return ["note_add"]

    def get_supported_actions(self):
        return {"note_add": {"description": "keep a note", "required_fields": ["text"], "optional_fields": []}}

    def handle_custom_action(self, action_type, payload):
        with session_factory().begin() as session:
            session.execute(notes.insert().values(text=payload["text"]))
        return {"kept": payload["text"]}


PLUGIN_CLASS = NotesPlugin
'''

PACKAGE_TABLES = '''
import sqlalchemy as sa

notes = sa.Table("notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("text", sa.Text, nullable=False))
'''

PACKAGE_REVISION = '''
"""notes plugin: its one table."""
import sqlalchemy as sa
from alembic import op

revision = "notes_0001"
down_revision = "0001"
branch_labels = ("notes",)
depends_on = None


def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True), sa.Column("text", sa.Text, nullable=False))


def downgrade() -> None:
    op.drop_table("notes")
'''


def test_a_users_package_plugin_brings_its_own_modules_and_revisions(tmp_path: Path) -> None:
    package = tmp_path / "my_plugins" / "notes"
    (package / MIGRATIONS_DIR_NAME).mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PACKAGE_INIT))
    (package / "tables.py").write_text(textwrap.dedent(PACKAGE_TABLES))
    (package / MIGRATIONS_DIR_NAME / "notes_0001.py").write_text(textwrap.dedent(PACKAGE_REVISION))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    db = tmp_path / "notes.db"

    # the CLI as a user runs it: the plugin's revision creates its table
    env = clean_env(home, REKKU_PLUGIN_PATH=str(package.parent), REKKU_DATABASE_URL=f"sqlite:///{db}")
    migrated = rekku("migrate", cwd=work, env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    listed = rekku("actions", cwd=work, env=env)
    assert "note_add" in listed.stdout and "notes" not in listed.stderr, listed.stdout + listed.stderr

    # a worker runs its action, which imports the package's own module and writes to its table
    stack_home = tmp_path / "stack"
    stack_home.mkdir()
    plugin_path = f"{TEST_PLUGINS}:{package.parent}"
    with running_stack("packages", stack_home, "sqlite", {"REKKU_PLUGIN_PATH": plugin_path},
                       [("default", 1, "packages")]) as stack:
        run = stack.run("note_add", {"text": "hello"})
        assert run["status"] == "succeeded" and run["result"] == {"kept": "hello"}, run
        engine = sa.create_engine(stack.database_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT text FROM notes")).scalars().all() == ["hello"]
        finally:
            engine.dispose()
