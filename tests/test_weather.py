"""weather_plugin: the one-line summary, and beat refreshing it from a fake wttr.in into every prompt."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from rekku_plugins.weather_plugin import age_text, describe, summary_line

from tests.fakes.wttr import FakeWttr, j1
from tests.support import Stack, wait_until

CLEAR_21 = ("Rome: ☀️ Clear +21°C (Feels like 20°C, Humidity 40%, Wind 7km/h NW, Visibility 10km, "
            "Pressure 1015hPa, Cloud cover 0%)")


def test_summary_line_has_upstream_s_format() -> None:
    assert summary_line("Rome", j1()) == CLEAR_21
    snowy = j1(temp_C="-3", FeelsLikeC="-8", weatherCode="338", weatherDesc=[{"value": "Heavy snow"}])
    assert summary_line("Oslo", snowy).startswith("Oslo: ❄️ Heavy snow -3°C (Feels like -8°C, ")
    assert " 0°C (" in summary_line("X", j1(temp_C="0"))


def test_a_failed_refresh_keeps_the_last_line_and_says_how_old_it_is() -> None:
    now = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)
    good = {"line": CLEAR_21, "fetched_at": (now - timedelta(minutes=95)).isoformat(), "error": None}
    assert describe(good, now) == CLEAR_21
    failed = {**good, "error": "ConnectionError: refused"}
    assert describe(failed, now) == CLEAR_21 + " [as of 1 h 35 min ago; the weather service could not be reached since]"
    assert describe({"error": "never worked", "attempted_at": now.isoformat()}, now) is None
    assert describe(None) is None


def test_age_text() -> None:
    assert [age_text(s) for s in (5, 60, 3599, 3600, 7260, 3 * 86400)] == [
        "less than a minute", "1 min", "59 min", "1 h", "2 h 1 min", "3 days"]


def weather(stack: Stack) -> str | None:
    resp = stack.get("/v1/prompt", params={"chat_id": "weather", "text": "how is the weather?"})
    assert resp.status_code == 200, resp.text
    return resp.json()["context"]["weather"]


def test_beat_refreshes_the_weather_and_a_failed_fetch_keeps_the_last_reading(memory_stack: Stack,
                                                                                 wttr: FakeWttr) -> None:
    wttr.current, wttr.fail = {}, False
    wait_until(lambda: weather(memory_stack) == CLEAR_21, timeout=30, interval=0.3,
               what="the first weather reading in the prompt")
    assert "/Rome" in wttr.requests, wttr.requests[-3:]

    wttr.current = {"temp_C": "25", "weatherCode": "116", "weatherDesc": [{"value": "Partly cloudy"}]}
    wait_until(lambda: (weather(memory_stack) or "").startswith("Rome: ⛅️ Partly cloudy +25°C"), timeout=30,
               interval=0.3, what="the refreshed reading (every WEATHER_FETCH_TIME = 1.2 s here)")

    wttr.fail = True
    failed_from = len(wttr.requests)
    stale = wait_until(lambda: (w := weather(memory_stack)) and "as of" in w and w, timeout=30, interval=0.3,
                       what="the failed refresh to be noted")
    assert stale.startswith("Rome: ⛅️ Partly cloudy +25°C"), stale
    assert "could not be reached since" in stale
    assert len(wttr.requests) > failed_from

    wttr.fail = False
    wttr.current = {}
    wait_until(lambda: weather(memory_stack) == CLEAR_21, timeout=30, interval=0.3, what="recovery")
