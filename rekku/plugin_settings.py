"""A plugin's own settings: the variables only that plugin reads, declared in the plugin.

A plugin subclasses :class:`PluginSettings` with its fields (each named by its documented variable,
``validation_alias="TERMINAL_MAX_TIMEOUT"``), names the class on its plugin class
(``settings_class = TerminalSettings``) and reads it with ``TerminalSettings.get()``. The core's
``Settings`` then holds only what the core reads, and a plugin's variables travel with its code.

The rules are the core's (:class:`rekku.settings.DocumentedSettings`): the environment and ``.env``,
by documented names only. ``get()`` is cached beside :func:`rekku.settings.get_settings`, so whatever
makes the core read its settings again (``get_settings.cache_clear()``) makes plugins read theirs again.
The registry reads a plugin's settings before building the plugin: a wrong value skips that plugin
with the variable named (the log, ``rekku doctor``, ``/v1/capabilities``), and the others load.
"""

from __future__ import annotations

import threading
from typing import Self

from pydantic import SecretStr

from rekku.logs import REDACTOR
from rekku.settings import DocumentedSettings, Settings, get_settings

_lock = threading.Lock()
#: Each settings class's instance, with the core settings object it was read beside.
_cache: dict[type[PluginSettings], tuple[Settings, PluginSettings]] = {}


class PluginSettings(DocumentedSettings):
    """Base of a plugin's settings class. A credential is a ``SecretStr`` field: its value is then
    replaced by ``***`` in every log line from the moment the settings are read (rekku/logs.py), and
    its repr shows no value."""

    @classmethod
    def get(cls) -> Self:
        """This process's settings of the plugin, read once (again after ``get_settings.cache_clear()``)."""
        core = get_settings()
        with _lock:
            cached = _cache.get(cls)
            if cached is not None and cached[0] is core:
                return cached[1]  # type: ignore[return-value]
        settings = cls()
        REDACTOR.add(settings.secret_values())
        with _lock:
            _cache[cls] = (core, settings)
        return settings

    def secret_values(self) -> set[str]:
        """The values of the ``SecretStr`` fields that are set."""
        values = (getattr(self, name) for name in type(self).model_fields)
        return {v.get_secret_value() for v in values if isinstance(v, SecretStr) and v.get_secret_value()}


def settings_class_of(plugin_class: type) -> type[PluginSettings] | None:
    """The ``settings_class`` a plugin class declares (None: it has no variables of its own)."""
    declared = getattr(plugin_class, "settings_class", None)
    if declared is not None and not (isinstance(declared, type) and issubclass(declared, PluginSettings)):
        raise TypeError(f"{plugin_class.__name__}.settings_class must be a PluginSettings subclass, not {declared!r}")
    return declared
