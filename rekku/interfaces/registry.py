"""The interface registry: interface classes register themselves on import; the ones whose
configuration is complete are built, the others are listed with the reason they are off.

Interfaces are the modules of this package (one per platform); :func:`get_interfaces` imports them
all once per process.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from rekku.interfaces.base import Interface
from rekku.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Modules of this package that are machinery, not interfaces.
_NOT_INTERFACES = frozenset({"base", "registry", "delivery", "links", "models", "replies"})

_classes: dict[str, type[Interface]] = {}
_lock = threading.Lock()
_current: InterfaceRegistry | None = None


def register_interface(cls: type[Interface]) -> type[Interface]:
    """Class decorator: make an interface known (it is built only when its configuration is complete)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    other = _classes.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"interface '{cls.name}' is already registered by {other.__name__}")
    _classes[cls.name] = cls
    return cls


@dataclass
class InterfaceRegistry:
    """Available interfaces by name, and the reason each other one is off."""

    available: dict[str, Interface] = field(default_factory=dict)
    disabled: dict[str, str] = field(default_factory=dict)
    #: Every interface class, available or not.
    known: dict[str, type[Interface]] = field(default_factory=dict)

    def get(self, name: str | None) -> Interface | None:
        return self.available.get(name or "")

    def describe(self) -> list[dict]:
        """For GET /v1/capabilities: every interface, available or not."""
        out = [{**iface.describe(), "available": True} for _, iface in sorted(self.available.items())]
        out += [{"name": name, "available": False, "reason": reason} for name, reason in sorted(self.disabled.items())]
        return out


def _import_interface_modules() -> None:
    """Import every interface module of this package (each registers its class), found by path: the
    package's __init__ imports this module, so this module does not import the package back."""
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)]):
        if info.name not in _NOT_INTERFACES and not info.name.startswith("_"):
            importlib.import_module(f"rekku.interfaces.{info.name}")


def build(settings: Settings) -> InterfaceRegistry:
    """A registry of every known interface class, built against ``settings``."""
    _import_interface_modules()
    registry = InterfaceRegistry(known=dict(_classes))
    for name, cls in sorted(_classes.items()):
        reason = cls.unavailable_reason(settings)
        if reason:
            registry.disabled[name] = reason
            continue
        try:
            registry.available[name] = cls(settings)
        except Exception as exc:  # a broken interface is reported, never fatal
            log.exception("interface %s failed to start", name)
            registry.disabled[name] = f"failed to start: {type(exc).__name__}: {exc}"
    return registry


def get_interfaces() -> InterfaceRegistry:
    """The process's interfaces, built on first use from the process settings."""
    global _current
    with _lock:
        if _current is None:
            _current = build(get_settings())
        return _current
