"""The one plugin registry, and discovery that fills it.

Plugins call :func:`register_plugin` from their constructor, as the seed shows; discovery imports
every candidate module, builds its ``PLUGIN_CLASS`` with no arguments and records what failed
(import error, constructor error, clashing action type) without stopping the others. A candidate is
a ``.py`` file or a package (a folder with ``__init__.py``, loaded whole; its ``migrations/`` folder
holds its Alembic revisions, see :func:`migration_dirs` and rekku.migrate).

Order, and who wins a clash: the directories of ``REKKU_PLUGIN_PATH`` first (in their order), then the
bundled ``plugins/``, then the ``rekku.plugins`` entry points. The first plugin to take a plugin name
or an action type keeps it; a later one that wants the same is skipped with one error line (in the
logs, ``rekku doctor`` and ``/v1/capabilities`` ``errors``), so a user's copy of a bundled plugin
replaces it. ``plugins/examples/`` is not loaded unless asked for (``REKKU_PLUGIN_PATH=plugins/examples``).

The seed's import paths ``core.ai_plugin_base`` and ``core.core_initializer`` are provided as
aliases of this package (see :func:`install_core_aliases`), so the seed's example loads unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import threading
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rekku.plugin_base import STATIC_INJECT, ActionSpec, build_spec
from rekku.plugin_settings import PluginSettings, settings_class_of
from rekku.settings import Settings, describe_invalid, get_settings

log = logging.getLogger(__name__)

#: The package the bundled plugins (the repository's ``plugins/``) are installed as (setup.py says why
#: not ``plugins``); their modules are named under it.
BUILTIN_PACKAGE = "rekku_plugins"


def _builtin_plugin_dir() -> Path:
    """Where the bundled plugins are: the installed package's folder (found without importing it), or
    the checkout's ``plugins/`` when the project runs from a checkout that was not installed."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        return Path(location).resolve()
    return Path(__file__).resolve().parent.parent / "plugins"


#: Directory of the bundled plugins.
BUILTIN_PLUGIN_DIR = _builtin_plugin_dir()
#: Entry-point group installed packages use to offer plugins.
ENTRY_POINT_GROUP = "rekku.plugins"
#: Folders of the bundled plugins that are loaded only when named in REKKU_PLUGIN_PATH.
OPT_IN_DIRS = frozenset({"examples"})
#: A plugin package's folder of Alembic revisions (a branch of its own on the action log's ``0001``).
MIGRATIONS_DIR_NAME = "migrations"
#: The rule applied to clashes, as error lines state it.
CLASH_RULE = "REKKU_PLUGIN_PATH wins over bundled plugins, an earlier directory over a later one"


class PluginClash(ValueError):
    """A plugin wants a plugin name or an action type that an earlier plugin already took."""


class PluginConfigError(ValueError):
    """A plugin's own variable has a value its settings class refuses; the message names the variable."""


@dataclass
class Registry:
    """Plugins by name, action specs by type, and every load error."""

    plugins: dict[str, Any] = field(default_factory=dict)
    actions: dict[str, ActionSpec] = field(default_factory=dict)
    disabled: dict[str, ActionSpec] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    loaded_modules: list[str] = field(default_factory=list)
    #: Where each plugin came from (file or entry point), by name; and what is being loaded now.
    origins: dict[str, str] = field(default_factory=dict)
    loading: str | None = None
    #: Each plugin's settings class (its ``settings_class``), by name, for those that declare one.
    settings: dict[str, type[PluginSettings]] = field(default_factory=dict)

    def add_plugin(self, name: str, plugin: Any) -> None:
        """Register ``plugin`` under ``name`` and resolve its actions; clashes are errors, not crashes."""
        if name in self.plugins and self.plugins[name] is not plugin:
            raise PluginClash(f"plugin name '{name}' is already registered by "
                              f"{self.origins.get(name, 'an earlier plugin')}")
        settings_class = settings_class_of(type(plugin))
        types_ = [t for t in plugin.get_supported_action_types() if t != STATIC_INJECT]
        schemas = plugin.get_supported_actions() if types_ else {}
        specs = []
        for action_type in types_:
            if not isinstance(action_type, str) or not action_type:
                raise ValueError(f"plugin '{name}' declares an invalid action type {action_type!r}")
            owner = self.actions.get(action_type) or self.disabled.get(action_type)
            if owner is not None and owner.plugin != name:
                raise PluginClash(f"action type '{action_type}' of plugin '{name}' is already provided by "
                                  f"plugin '{owner.plugin}' ({self.origins.get(owner.plugin, 'an earlier plugin')})")
            specs.append(build_spec(name, plugin, action_type, schemas.get(action_type, {}) or {}))
        self.plugins[name] = plugin
        self.origins.setdefault(name, self.loading or "an earlier plugin")
        if settings_class is not None:
            self.settings[name] = settings_class
        for spec in specs:
            (self.disabled if spec.disabled else self.actions)[spec.type] = spec

    def plugin_for(self, action_type: str) -> Any:
        spec = self.actions[action_type]
        return self.plugins[spec.plugin]

    def injectors(self) -> list[tuple[str, Any]]:
        """Plugins offering prompt context through ``get_static_injection``."""
        return [(n, p) for n, p in self.plugins.items() if callable(getattr(p, "get_static_injection", None))]


_lock = threading.RLock()
_active: Registry | None = None  # the registry being filled by discovery
_current: Registry | None = None  # the process's finished registry


def register_plugin(name: str, plugin: Any) -> None:
    """Called by plugins from their constructor (the seed's API)."""
    target = _active if _active is not None else get_registry()
    target.add_plugin(name, plugin)


class CoreInitializer:
    """The seed's ``core_initializer``: remembers which plugins announced themselves."""

    def __init__(self) -> None:
        self.loaded_plugins: list[str] = []

    def register_plugin(self, name: str) -> None:
        if name not in self.loaded_plugins:
            self.loaded_plugins.append(name)

    def register_action(self, *_args: Any, **_kwargs: Any) -> None:
        """Accepted for compatibility; actions are taken from ``get_supported_actions``."""


core_initializer = CoreInitializer()


def install_core_aliases() -> None:
    """Make ``core.ai_plugin_base`` and ``core.core_initializer`` importable, without a core/ folder."""
    if "core" in sys.modules and getattr(sys.modules["core"], "__rekku_alias__", False):
        return
    from rekku import plugin_base

    core = types.ModuleType("core")
    core.__path__ = []  # a package, so submodule imports resolve from sys.modules
    core.__rekku_alias__ = True
    core.ai_plugin_base = plugin_base
    core.core_initializer = sys.modules[__name__]
    sys.modules.setdefault("core", core)
    sys.modules.setdefault("core.ai_plugin_base", plugin_base)
    sys.modules.setdefault("core.core_initializer", sys.modules[__name__])


def _candidate_files(root: Path) -> list[Path]:
    """The plugin modules under ``root``: every ``.py`` file, and every package (a folder with an
    ``__init__.py``), which is one plugin loaded whole: its other files (its tables, its runtime, its
    ``migrations/``) are its own to import. Names starting with ``_`` or ``.`` are skipped."""
    if not root.is_dir():
        return []
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.name.startswith(("_", ".")):
                continue
            if root == BUILTIN_PLUGIN_DIR and path.relative_to(root).parts[0] in OPT_IN_DIRS:
                continue  # opt-in: REKKU_PLUGIN_PATH=plugins/examples
            if path.is_dir():
                if (path / "__init__.py").is_file():
                    found.append(path)
                else:
                    walk(path)
            elif path.suffix == ".py":
                found.append(path)

    walk(root)
    return sorted(found)


def plugin_roots(settings: Settings, *, builtin: bool = True) -> list[Path]:
    """The plugin directories, in the order discovery reads them (the user's first, then the bundled)."""
    roots = [_resolve(root) for root in settings.plugin_dirs()] + ([BUILTIN_PLUGIN_DIR] if builtin else [])
    return list(dict.fromkeys(roots))  # a directory named twice is read once


def migration_dirs(settings: Settings) -> list[Path]:
    """Every plugin package's ``migrations/`` folder (its Alembic revisions), on the plugin directories
    and in the entry points' packages, whether the plugin is enabled or not: a database that already
    has a plugin's revisions must find them to be upgraded at all."""
    dirs = [path / MIGRATIONS_DIR_NAME for root in plugin_roots(settings) for path in _candidate_files(root)
            if path.is_dir() and (path / MIGRATIONS_DIR_NAME).is_dir()]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = importlib.util.find_spec(ep.module)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            if (Path(location) / MIGRATIONS_DIR_NAME).is_dir():
                dirs.append(Path(location) / MIGRATIONS_DIR_NAME)
    return list(dict.fromkeys(dirs))


def _module_name(root: Path, path: Path) -> str:
    rel = ".".join(path.relative_to(root).with_suffix("").parts)
    if root == BUILTIN_PLUGIN_DIR:
        return f"{BUILTIN_PACKAGE}.{rel}"
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return f"rekku_ext_{digest}.{rel}"


def _load_file(registry: Registry, root: Path, path: Path) -> None:
    name = _module_name(root, path)
    try:
        module = sys.modules.get(name)
        if module is None:
            if path.is_dir():  # a package: its __init__, with its folder to import its own modules from
                spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                              submodule_search_locations=[str(path)])
            else:
                spec = importlib.util.spec_from_file_location(name, path)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        _instantiate(registry, module, str(path))
    except Exception as exc:
        _report(registry, str(path), exc)


def _instantiate(registry: Registry, module: Any, origin: str) -> None:
    cls = getattr(module, "PLUGIN_CLASS", None)
    if cls is None:
        return  # a helper module, not a plugin
    _read_settings(cls)
    before = set(registry.plugins)
    registry.loading = origin
    instance = cls()
    if not any(p is instance for p in registry.plugins.values()):
        # Not self-registered: register it under its class name rather than lose it.
        registry.add_plugin(getattr(instance, "name", None) or cls.__name__, instance)
    registry.loaded_modules.append(origin)
    log.debug("loaded plugin module %s (%s)", origin, sorted(set(registry.plugins) - before))


def _read_settings(plugin_class: type) -> None:
    """Read the plugin's own settings before its constructor does: a wrong value is then a
    :class:`PluginConfigError` naming the variable, rather than a traceback from wherever it is used."""
    settings_class = settings_class_of(plugin_class)
    if settings_class is None:
        return
    try:
        settings_class.get()
    except ValidationError as exc:
        raise PluginConfigError(describe_invalid(exc)) from None


def _report(registry: Registry, origin: str, exc: BaseException) -> None:
    # Expected, and said in one line without a traceback: a user's copy of a plugin, a wrong variable.
    if isinstance(exc, PluginClash | PluginConfigError):
        message = (f"{origin}: skipped: {exc} ({CLASH_RULE})" if isinstance(exc, PluginClash)
                   else f"{origin}: skipped: configuration: {exc}")
        registry.errors.append(message)
        log.error("plugin %s", message)
        return
    message = f"{origin}: {type(exc).__name__}: {exc}"
    registry.errors.append(message)
    log.error("plugin %s failed to load and was skipped:\n%s", origin,
              "".join(traceback.format_exception(exc)).rstrip())


def _resolve(root: Path) -> Path:
    """A relative REKKU_PLUGIN_PATH entry from the working directory, else ``plugins/...`` from the
    bundled plugins (so ``plugins/examples`` works from anywhere, installed or not); the bundled
    directory itself when it names it."""
    if not root.is_absolute() and not root.is_dir() and root.parts[:1] == ("plugins",):
        root = BUILTIN_PLUGIN_DIR.joinpath(*root.parts[1:])
    return BUILTIN_PLUGIN_DIR if root.is_dir() and root.resolve() == BUILTIN_PLUGIN_DIR else root


def discover(settings: Settings | None = None, *, builtin: bool = True) -> Registry:
    """Build a registry from plugins/, REKKU_PLUGIN_PATH and the ``rekku.plugins`` entry points."""
    global _active
    settings = settings or get_settings()
    install_core_aliases()
    registry = Registry()
    with _lock:
        _active = registry
        try:
            # the user's directories first: the first to take a name keeps it (see the module's doc)
            for root in plugin_roots(settings, builtin=builtin):
                if not root.is_dir():
                    registry.errors.append(f"{root}: plugin directory does not exist")
                    continue
                for path in _candidate_files(root):
                    _load_file(registry, root, path)
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                try:
                    obj = ep.load()
                    if isinstance(obj, types.ModuleType):
                        _instantiate(registry, obj, f"entry point {ep.name}")
                    else:
                        _instantiate(registry, types.SimpleNamespace(PLUGIN_CLASS=obj), f"entry point {ep.name}")
                except Exception as exc:
                    _report(registry, f"entry point {ep.name}", exc)
        finally:
            _active = None
    return registry


def get_registry() -> Registry:
    """The process's registry, discovered on first use."""
    global _current
    with _lock:
        if _current is None:
            _current = discover()
        return _current


def set_registry(registry: Registry | None) -> None:
    """Replace the process's registry (tests, or after changing REKKU_PLUGIN_PATH)."""
    global _current
    with _lock:
        _current = registry
