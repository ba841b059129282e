"""What an installed Rekku puts into an environment, checked on a wheel built from this checkout.

A regular (non-editable) install is what the Docker image and a user's ``pip install`` get; it must
hold every bundled plugin and migration, find them without the checkout, and put no generic name
(``plugins``, ``workers``, ``celeryconfig``) at the top of site-packages, where another project's
module of that name would collide with it (setup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import ROOT, child_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the venv's setuptools builds it, so the test needs no download.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, env=child_env(), cwd=str(out))
    return next(out.glob("rekku_on_celery-*.whl"))


def _top_level(names: list[str]) -> set[str]:
    return {n.split("/")[0].removesuffix(".py") for n in names if not n.split("/")[0].endswith(".dist-info")}


def test_the_wheel_installs_only_rekku_names_at_the_top(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert _top_level(names) == {"rekku", "rekku_workers", "rekku_plugins"}


def test_the_wheel_holds_every_bundled_plugin_its_migrations_and_the_worker_side(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (ROOT / "plugins").rglob("*.py"):
        if "__pycache__" not in path.parts:
            assert f"rekku_plugins/{path.relative_to(ROOT / 'plugins').as_posix()}" in names, path
    for path in (ROOT / "workers").glob("*.py"):
        assert f"rekku_workers/{path.name}" in names, path
    assert "rekku/celeryconfig.py" in names and "rekku/migrations/script.py.mako" in names
    for path in (ROOT / "rekku" / "web").iterdir():  # the web view's files (rekku/view_api.py serves them)
        assert f"rekku/web/{path.name}" in names, path


def test_an_installed_copy_finds_its_plugins_and_migrations_without_the_checkout(wheel: Path,
                                                                                tmp_path: Path) -> None:
    """Unpacked away from the checkout (and first on the path, ahead of this venv's editable install),
    the registry loads every bundled plugin from the installed copy, the seed example stays opt-in and
    is found by its documented path, and every migration folder is the installed one."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import json\n"
        "from rekku.registry import BUILTIN_PLUGIN_DIR, discover, migration_dirs\n"
        "from rekku.settings import Settings\n"
        "plain, example = discover(Settings()), discover(Settings(plugin_path='plugins/examples'))\n"
        "print(json.dumps({'dir': str(BUILTIN_PLUGIN_DIR), 'plugins': sorted(plain.plugins),\n"
        "                  'errors': plain.errors + example.errors,\n"
        "                  'example': sorted(set(example.plugins) - set(plain.plugins)),\n"
        "                  'migrations': [str(d) for d in migration_dirs(Settings())]}))\n"
    )
    env = child_env(PYTHONPATH=str(site), REKKU_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=str(tmp_path), check=True,
                         capture_output=True, text=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert Path(found["dir"]) == site / "rekku_plugins"
    assert found["errors"] == []
    assert {"event", "terminal", "selenium_elevenlabs", "echo", "message_plugin"} <= set(found["plugins"])
    assert found["example"], "REKKU_PLUGIN_PATH=plugins/examples loads the seed example from the installed copy"
    assert len(found["migrations"]) == len(list((ROOT / "plugins").glob("*/migrations")))
    assert all(Path(d).is_relative_to(site) for d in found["migrations"]), found["migrations"]
