"""Injects the current location, local date and time into the prompt (docs/plugins.md §2, time_plugin)."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rekku.plugin import AIPluginBase, get_settings, location_of, register_plugin


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def time_context(now: datetime | None = None, tz_name: str | None = None,
                 location: str | None = None) -> dict[str, str]:
    settings = get_settings()
    tz_name = tz_name or settings.tz
    zone = _zone(tz_name)
    now_utc = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    local = now_utc.astimezone(zone)
    return {
        "location": location_of(tz_name, location if location is not None else settings.prompt_location),
        "date": local.strftime("%Y-%m-%d (%A)"),
        "time": f"{local:%H:%M} {local.tzname()} ({now_utc:%H:%M} UTC)",
    }


class TimePlugin(AIPluginBase):
    def __init__(self) -> None:
        register_plugin("time_plugin", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["static_inject"]

    def get_static_injection(self, message: dict | None = None, context_memory: dict | None = None) -> dict:
        return time_context()


PLUGIN_CLASS = TimePlugin
