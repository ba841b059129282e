"""Rekku-on-Celery: LLM JSON actions run as Celery tasks on worker pools.

The public API, by role:
"""

from rekku.context import ActionContext, current_action
from rekku.errors import (
    Conflict,
    DeliveryError,
    NotAuthorized,
    NotFound,
    PluginError,
    RekkuError,
    ServiceUnavailable,
    TransientError,
    ValidationError,
)
from rekku.plugin_base import ActionSpec, AIPluginBase
from rekku.registry import core_initializer, get_registry, register_plugin
from rekku.settings import Settings, get_settings

__all__ = [
    # writing plugins
    "AIPluginBase", "register_plugin", "core_initializer", "current_action", "ActionContext", "ActionSpec",
    # errors
    "RekkuError", "ValidationError", "NotAuthorized", "NotFound", "Conflict", "PluginError",
    "TransientError", "DeliveryError", "ServiceUnavailable",
    # configuration and registry
    "Settings", "get_settings", "get_registry",
]
