"""The event plugin's variables, read by this package only.

Its own module, so the plugin (``__init__``) and its engine (``engine.py``) both import it.
"""

from __future__ import annotations

from pydantic import Field

from rekku.plugin import PluginSettings


class EventSettings(PluginSettings):
    """``EventSettings.get()``; .env.example documents each variable."""

    #: Seconds between beat's checks for due events (the dispatcher task rekku.periodic.event.tick).
    tick_seconds: float = Field(5.0, gt=0, validation_alias="EVENT_TICK_SECONDS")
    #: Seconds an unfinished event delivery may sit untouched before a tick enqueues it again.
    redeliver_seconds: float = Field(60.0, gt=0, validation_alias="REKKU_EVENT_REDELIVER_SECONDS")
    #: Days a finished event delivery (delivered, cancelled, or failed for good) is kept; 0: forever.
    #: The events themselves are user data and never pruned (rekku/retention.py).
    retain_deliveries_days: float = Field(30.0, ge=0, validation_alias="REKKU_RETAIN_EVENT_DELIVERIES_DAYS")
