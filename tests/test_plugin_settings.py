"""A plugin's own settings (rekku/plugin_settings.py): read like the core's, by documented names only,
cached beside get_settings(), checked by the registry before the plugin is built."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import Field, SecretStr, ValidationError
from rekku_plugins.terminal.settings import TerminalSettings

from rekku.doctor import _plugins
from rekku.logs import REDACTOR
from rekku.plugin import PluginSettings
from rekku.registry import discover, set_registry
from rekku.settings import Settings, get_settings


class DemoSettings(PluginSettings):
    """A plugin's settings as docs/plugins.md shows them."""

    timeout: float = Field(5.0, gt=0, validation_alias="DEMO_TIMEOUT")
    token: SecretStr | None = Field(None, validation_alias="DEMO_TOKEN")


PLUGIN = '''
from pydantic import Field

from rekku.plugin import AIPluginBase, PluginSettings, register_plugin

class ToySettings(PluginSettings):
    limit: int = Field(3, ge=1, validation_alias="TOY_LIMIT")

class Toy(AIPluginBase):
    settings_class = ToySettings
    def __init__(self):
        self.limit = ToySettings.get().limit
        register_plugin("toy", self)
    @staticmethod
    def get_supported_action_types():
        return ["toy_action"]
    def get_supported_actions(self):
        return {"toy_action": {"description": "d", "required_fields": [], "optional_fields": []}}

PLUGIN_CLASS = Toy
'''


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No .env of the repository's, no variable of the outer environment; settings read afresh."""
    monkeypatch.chdir(tmp_path)
    for name in ("DEMO_TIMEOUT", "DEMO_TOKEN", "TIMEOUT", "TOKEN", "TOY_LIMIT", "TERMINAL_MAX_TIMEOUT",
                 "MAX_TIMEOUT", "ALLOW", "TERMINAL_ALLOW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REKKU_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_plugin_setting_is_read_from_its_variable_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DemoSettings.get().timeout == 5.0
    monkeypatch.setenv("DEMO_TIMEOUT", "7.5")
    get_settings.cache_clear()
    assert DemoSettings.get().timeout == 7.5
    monkeypatch.setenv("TERMINAL_MAX_TIMEOUT", "42")
    assert TerminalSettings.get().max_timeout == 42.0


def test_a_plugin_setting_is_read_from_dot_env_and_the_environment_wins(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DEMO_TIMEOUT=9\nTERMINAL_ALLOW=ls,cat\nSOMETHING_ELSE=1\n")
    assert DemoSettings.get().timeout == 9.0 and TerminalSettings.get().allow == "ls,cat"
    monkeypatch.setenv("DEMO_TIMEOUT", "11")
    get_settings.cache_clear()
    assert DemoSettings.get().timeout == 11.0


def test_a_field_name_as_a_variable_configures_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIMEOUT", "99")
    monkeypatch.setenv("MAX_TIMEOUT", "99")
    (tmp_path / ".env").write_text("ALLOW=rm\nTOKEN=someone-elses\n")
    assert DemoSettings.get().timeout == 5.0 and DemoSettings.get().token is None
    assert TerminalSettings.get().max_timeout == 300.0 and TerminalSettings.get().allow == ""
    # code may still pass a field by its name
    assert TerminalSettings(_env_file=None, max_timeout=12).max_timeout == 12.0


def test_a_field_without_a_documented_variable_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="read by their own name: limit"):
        class Undocumented(PluginSettings):
            limit: int = 3


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_TIMEOUT", "0")
    with pytest.raises(ValidationError, match="DEMO_TIMEOUT"):
        DemoSettings.get()


def test_get_is_cached_until_get_settings_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    first = DemoSettings.get()
    monkeypatch.setenv("DEMO_TIMEOUT", "8")
    assert DemoSettings.get() is first and first.timeout == 5.0
    get_settings.cache_clear()
    assert DemoSettings.get() is not first and DemoSettings.get().timeout == 8.0


def test_a_secret_setting_is_redacted_from_logs_once_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's redactor (every log record passes through it: rekku/logs.py) learns the value."""
    monkeypatch.setenv("DEMO_TOKEN", "plugin-secret-4711")
    settings = DemoSettings.get()
    assert "plugin-secret-4711" not in repr(settings)
    assert REDACTOR.text(f"calling with {settings.token.get_secret_value()}") == "calling with ***"


def _toy_registry(tmp_path: Path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy.py").write_text(textwrap.dedent(PLUGIN))
    return discover(Settings(REKKU_PLUGIN_PATH=str(tmp_path / "plugins"), REKKU_HOME=str(tmp_path / "home")),
                    builtin=False)


def test_the_registry_knows_each_plugins_settings_class(tmp_path: Path) -> None:
    registry = _toy_registry(tmp_path)
    assert registry.errors == [] and registry.plugins["toy"].limit == 3
    assert [cls.__name__ for cls in registry.settings.values()] == ["ToySettings"]
    bundled = discover(Settings(REKKU_HOME=str(tmp_path / "home")))
    assert bundled.settings["terminal"] is TerminalSettings


def test_a_bad_value_skips_that_plugin_with_the_variable_named_and_doctor_says_so(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOY_LIMIT", "0")
    registry = _toy_registry(tmp_path)
    assert "toy" not in registry.plugins and "toy_action" not in registry.actions
    assert len(registry.errors) == 1, registry.errors
    error = registry.errors[0]
    assert "skipped: configuration: TOY_LIMIT: Input should be greater than or equal to 1" in error, error
    assert "Traceback" not in error
    set_registry(registry)
    try:
        checks = [c for c in _plugins() if c.name == "plugin error"]
    finally:
        set_registry(None)
    assert [c.level for c in checks] == ["warn"] and "TOY_LIMIT" in checks[0].detail


def test_a_bundled_plugins_bad_value_skips_it_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TERMINAL_MAX_TIMEOUT", "-1")
    registry = discover(Settings(REKKU_HOME=str(tmp_path / "home")))
    assert "terminal" not in registry.plugins and "echo" in registry.actions
    assert [e for e in registry.errors if "TERMINAL_MAX_TIMEOUT" in e], registry.errors


def test_the_bundled_plugins_credentials_are_redacted_once_their_settings_are_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What rekku/logs.py named itself before the plugins owned these variables."""
    from rekku_plugins.reddit_plugin import RedditSettings
    from rekku_plugins.selenium_elevenlabs.settings import SeleniumElevenLabsSettings

    secrets = {"REDDIT_CLIENT_SECRET": "reddit-client-secret-1", "REDDIT_PASSWORD": "reddit-password-2",
               "ELEVENLABS_PASSWORD": "elevenlabs-password-3"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    RedditSettings.get()
    SeleniumElevenLabsSettings.get()
    assert set(secrets.values()) <= REDACTOR.secrets


def test_a_settings_class_that_is_not_plugin_settings_skips_the_plugin(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy.py").write_text(textwrap.dedent(PLUGIN).replace(
        "settings_class = ToySettings", "settings_class = dict"))
    registry = discover(Settings(REKKU_PLUGIN_PATH=str(tmp_path / "plugins"), REKKU_HOME=str(tmp_path / "home")),
                        builtin=False)
    assert "toy" not in registry.plugins
    assert len(registry.errors) == 1 and "Toy.settings_class must be a PluginSettings subclass" in registry.errors[0]
