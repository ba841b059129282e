"""Run Alembic migrations programmatically (``rekku migrate`` and start-up), and report their state.

The action log is revision ``0001`` and its own later revisions (``0002``, …) in
``rekku/migrations/versions/``. Each plugin package keeps its tables' revisions in its own
``migrations/`` folder (``plugins/<name>/migrations/``), a branch of its own on top of ``0001``
(``down_revision = "0001"``, ``branch_labels = ("<plugin>",)``), so plugins add tables without ordering
their migrations against each other; ``upgrade`` goes to every head. Alembic reads all those folders
(``version_locations``, from rekku.registry.migration_dirs), enabled plugins or not. Moving a revision
file between folders changes nothing in a database: revisions are known by id."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from rekku.db import get_engine
from rekku.registry import migration_dirs
from rekku.settings import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    locations = [MIGRATIONS_DIR / "versions", *migration_dirs(get_settings())]
    cfg.set_main_option("path_separator", "os")  # paths may hold spaces, never os.pathsep
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations).replace("%", "%%"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (idempotent)."""
    engine = get_engine(url)
    with engine.begin() as connection:
        cfg = _config(url)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "heads")


def state(url: str) -> tuple[str, str]:
    """``(current revisions, head revisions)`` of the database at ``url``, each as a sorted, comma-joined string."""
    heads = ScriptDirectory.from_config(_config(url)).get_heads()
    with get_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    return ",".join(sorted(current)) or "none", ",".join(sorted(heads))
