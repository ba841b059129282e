"""time_plugin's static injection: location, local date and time with the UTC time beside it."""

from __future__ import annotations

from datetime import datetime, timezone

from rekku_plugins.time_plugin import time_context

from rekku.settings import location_of


def test_local_time_with_utc_and_city_from_tz() -> None:
    now = datetime(2026, 7, 1, 7, 30, tzinfo=timezone.utc)
    ctx = time_context(now, "Europe/Rome", location="")
    assert ctx == {"location": "Rome", "date": "2026-07-01 (Wednesday)", "time": "09:30 CEST (07:30 UTC)"}


def test_winter_offset_and_configured_location() -> None:
    now = datetime(2026, 1, 15, 23, 50, tzinfo=timezone.utc)
    ctx = time_context(now, "America/New_York", location="Brooklyn, NY")
    assert ctx == {"location": "Brooklyn, NY", "date": "2026-01-15 (Thursday)", "time": "18:50 EST (23:50 UTC)"}


def test_location_of_zone_names() -> None:
    assert location_of("America/Argentina/Buenos_Aires", None) == "Buenos Aires"
    assert location_of("UTC", None) == "UTC"
