"""Plugin discovery: recursion, skipping, broken files, clashes, entry points and the core.* aliases."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from rekku.registry import discover
from rekku.settings import Settings

PLUGIN = '''
from rekku.plugin import AIPluginBase, register_plugin

class P(AIPluginBase):
    pool = "{pool}"
    def __init__(self):
        register_plugin("{name}", self)
    @staticmethod
    def get_supported_action_types():
        return ["{action}"]
    def get_supported_actions(self):
        return {{"{action}": {{"description": "d", "required_fields": ["a"], "optional_fields": ["b"]}}}}
    async def handle_custom_action(self, action_type, payload):
        return payload

PLUGIN_CLASS = P
'''


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _discover(root: Path, builtin: bool = False):
    return discover(Settings(REKKU_PLUGIN_PATH=str(root), REKKU_HOME=str(root / ".home")), builtin=builtin)


def test_recursive_discovery_skips_underscore_files(tmp_path: Path) -> None:
    _write(tmp_path, "top.py", PLUGIN.format(name="top", action="a_top", pool="default"))
    _write(tmp_path, "deep/er/nested.py", PLUGIN.format(name="nested", action="a_nested", pool="io"))
    _write(tmp_path, "_private.py", PLUGIN.format(name="private", action="a_private", pool="default"))
    _write(tmp_path, "_hidden/inside.py", PLUGIN.format(name="hidden", action="a_hidden", pool="default"))
    _write(tmp_path, "helper.py", "VALUE = 1\n")
    registry = _discover(tmp_path)
    assert set(registry.actions) == {"a_top", "a_nested"}
    assert registry.actions["a_nested"].pool == "io"
    assert registry.actions["a_top"].required_fields == ("a",)
    assert registry.errors == []


def test_a_broken_plugin_is_reported_and_the_others_load(tmp_path: Path) -> None:
    _write(tmp_path, "good.py", PLUGIN.format(name="good", action="a_good", pool="default"))
    _write(tmp_path, "syntax.py", "def broken(:\n")
    _write(tmp_path, "raises.py", "raise RuntimeError('no config')\n")
    _write(tmp_path, "ctor.py", """
        class X:
            def __init__(self):
                raise ValueError('bad ctor')
        PLUGIN_CLASS = X
    """)
    _write(tmp_path, "badpool.py", PLUGIN.format(name="badpool", action="a_bad", pool="gpu"))
    registry = _discover(tmp_path)
    assert set(registry.actions) == {"a_good"}
    joined = "\n".join(registry.errors)
    for fragment in ("syntax.py: SyntaxError", "raises.py: RuntimeError: no config", "ctor.py: ValueError: bad ctor",
                     "unknown pool 'gpu'"):
        assert fragment in joined


def test_an_action_type_claimed_twice_is_an_error_not_an_override(tmp_path: Path) -> None:
    _write(tmp_path, "a.py", PLUGIN.format(name="first", action="same", pool="default"))
    _write(tmp_path, "b.py", PLUGIN.format(name="second", action="same", pool="io"))
    registry = _discover(tmp_path)
    assert registry.actions["same"].plugin == "first"
    assert any("already provided by plugin 'first'" in e for e in registry.errors)


def test_a_plugin_that_forgets_to_register_is_registered_by_class_name(tmp_path: Path) -> None:
    _write(tmp_path, "quiet.py", """
        from rekku import AIPluginBase  # the package root's names still work, as before rekku.plugin
        class Quiet(AIPluginBase):
            @staticmethod
            def get_supported_action_types():
                return ["quiet"]
        PLUGIN_CLASS = Quiet
    """)
    registry = _discover(tmp_path)
    assert registry.actions["quiet"].plugin == "Quiet"


def test_missing_plugin_directory_is_reported(tmp_path: Path) -> None:
    registry = _discover(tmp_path / "nope")
    assert registry.errors and "does not exist" in registry.errors[0]


def test_builtin_plugins_and_the_unchanged_seed_example(tmp_path: Path) -> None:
    # the seed's example is opt-in (issue 14): loaded when its folder is in REKKU_PLUGIN_PATH
    registry = discover(Settings(REKKU_HOME=str(tmp_path), REKKU_PLUGIN_PATH="plugins/examples"))
    assert registry.errors == []
    assert {"echo", "my_action"} <= set(registry.actions)
    assert "time_plugin" in registry.plugins and "myplugin" in registry.plugins
    assert registry.actions["my_action"].instructions["payload"]["value"]["type"] == "string"
    from core.core_initializer import core_initializer

    assert "myplugin" in core_initializer.loaded_plugins


def test_entry_point_plugins_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real installed distribution (a dist-info on sys.path) declaring the rekku.plugins group."""
    site = tmp_path / "site"
    _write(site, "rekku_ep_demo.py", PLUGIN.format(name="ep_demo", action="a_entry", pool="default"))
    dist = site / "rekku_ep_demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rekku-ep-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[rekku.plugins]\ndemo = rekku_ep_demo\n")
    monkeypatch.syspath_prepend(str(site))
    no_files = tmp_path / "no-files"
    no_files.mkdir()
    try:
        registry = _discover(no_files)
    finally:
        sys.modules.pop("rekku_ep_demo", None)
    assert "a_entry" in registry.actions and registry.actions["a_entry"].plugin == "ep_demo"
