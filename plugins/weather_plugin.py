"""weather_plugin: the current weather as one line of prompt context (docs/plugins.md §2).

celery beat runs ``rekku.periodic.weather_plugin.refresh`` on the io pool every minute (or every
``WEATHER_FETCH_TIME`` if shorter); it fetches ``WEATHER_URL/<location>?format=j1`` only when the
cached reading is older than ``WEATHER_FETCH_TIME`` minutes, so a failed fetch is retried at the
next tick rather than half an hour later. The reading is cached in Redis (the broker), shared by
every ingress. Prompts never wait on the weather service: the injection only reads the cache. When
the latest fetch failed, the last good line is kept and says how old it is.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any
from urllib.parse import quote

import redis
import requests
from pydantic import Field

from rekku.plugin import AIPluginBase, PluginSettings, broker_client, get_settings, register_plugin, utcnow

log = logging.getLogger(__name__)

#: Redis key prefix of the cached reading (one key per location).
CACHE_KEY = "rekku:weather:"
#: Longest interval between beat's staleness checks, in seconds.
MAX_TICK = 60.0

#: wttr.in (WWO) weather codes → emoji, as wttr.in itself shows them.
_EMOJI = {
    "113": "☀️", "116": "⛅️", "119": "☁️", "122": "☁️", "143": "🌫", "248": "🌫", "260": "🌫",
    "176": "🌦", "263": "🌦", "353": "🌦", "266": "🌧", "293": "🌧", "296": "🌧", "299": "🌧", "302": "🌧",
    "305": "🌧", "308": "🌧", "356": "🌧", "359": "🌧", "281": "🌧", "284": "🌧", "311": "🌧", "314": "🌧",
    "185": "🌧", "179": "🌨", "182": "🌨", "227": "🌨", "230": "❄️", "317": "🌨", "320": "🌨", "323": "🌨",
    "326": "🌨", "329": "❄️", "332": "❄️", "335": "❄️", "338": "❄️", "350": "🌨", "362": "🌨", "365": "🌨",
    "368": "🌨", "371": "❄️", "374": "🌨", "377": "🌨", "200": "⛈", "386": "⛈", "389": "⛈", "392": "⛈",
    "395": "❄️",
}


class WeatherSettings(PluginSettings):
    """The weather service and how fresh its reading stays; .env.example documents each variable."""

    #: Minutes a weather reading stays fresh; beat refreshes it when older.
    fetch_time: float = Field(30.0, gt=0, validation_alias="WEATHER_FETCH_TIME")
    #: Base URL of a wttr.in-compatible service (``<url>/<location>?format=j1``).
    url: str = Field("https://wttr.in", validation_alias="WEATHER_URL")
    #: Seconds one weather request may take.
    timeout: float = Field(10.0, gt=0, validation_alias="REKKU_WEATHER_TIMEOUT")


def location() -> str:
    """The core's: PROMPT_LOCATION, else the city of TZ (the prompt names the same place)."""
    return get_settings().location


def _signed(value: Any) -> str:
    number = int(float(value))
    return f"+{number}" if number > 0 else str(number)


def summary_line(place: str, data: dict) -> str:
    """``Rome: ☀️ Clear +21°C (Feels like 20°C, Humidity 40%, Wind 7km/h NW, Visibility 10km,
    Pressure 1015hPa, Cloud cover 0%)`` from wttr.in's j1 JSON."""
    now = data["current_condition"][0]
    description = " ".join(d.get("value", "") for d in now.get("weatherDesc") or []).strip() or "Unknown"
    emoji = _EMOJI.get(str(now.get("weatherCode", "")), "🌡")
    details = [f"Feels like {int(float(now['FeelsLikeC']))}°C" if now.get("FeelsLikeC") is not None else None,
               f"Humidity {now['humidity']}%" if now.get("humidity") is not None else None,
               f"Wind {now['windspeedKmph']}km/h {now.get('winddir16Point', '')}".rstrip()
               if now.get("windspeedKmph") is not None else None,
               f"Visibility {now['visibility']}km" if now.get("visibility") is not None else None,
               f"Pressure {now['pressure']}hPa" if now.get("pressure") is not None else None,
               f"Cloud cover {now['cloudcover']}%" if now.get("cloudcover") is not None else None]
    return f"{place}: {emoji} {description} {_signed(now['temp_C'])}°C ({', '.join(d for d in details if d)})"


def age_text(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return "less than a minute"
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{hours // 24} days"


def describe(cached: dict | None, now: datetime | None = None) -> str | None:
    """The injected line: the last good reading, marked with its age when the latest fetch failed."""
    if not cached or not cached.get("line"):
        return None
    if not cached.get("error"):
        return cached["line"]
    fetched = datetime.fromisoformat(cached["fetched_at"])
    age = age_text(((now or utcnow()) - fetched).total_seconds())
    return f"{cached['line']} [as of {age} ago; the weather service could not be reached since]"


class WeatherPlugin(AIPluginBase):
    settings_class = WeatherSettings

    def __init__(self) -> None:
        register_plugin("weather_plugin", self)
        self._redis: redis.Redis | None = None

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["static_inject"]

    # ------------------------------------------------------------------ cache
    def _client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = broker_client(timeout=2)
        return self._redis

    def cached(self, place: str | None = None) -> dict | None:
        raw = self._client().get(CACHE_KEY + (place or location()))
        return json.loads(raw) if raw else None

    def _store(self, place: str, value: dict) -> None:
        self._client().set(CACHE_KEY + place, json.dumps(value, ensure_ascii=False))

    # ------------------------------------------------------------------ beat
    def periodic_tasks(self) -> dict:
        every = min(MAX_TICK, WeatherSettings.get().fetch_time * 60)
        return {"refresh": {"every": every, "run": self.refresh, "pool": "io"}}

    def refresh(self, force: bool = False) -> dict:
        """Fetch the weather if the cached reading is stale; a failure keeps the last good line."""
        settings = WeatherSettings.get()
        place = location()
        cached = self.cached(place) or {}
        now = utcnow()
        fresh_for = settings.fetch_time * 60
        last_try = cached.get("attempted_at")
        if not force and last_try and (now - datetime.fromisoformat(last_try)).total_seconds() < fresh_for \
                and not cached.get("error"):
            return {"refreshed": False, "reason": "fresh"}
        url = f"{settings.url.rstrip('/')}/{quote(place)}"
        try:
            resp = requests.get(url, params={"format": "j1"}, timeout=settings.timeout,
                                headers={"User-Agent": "rekku-weather/1"})
            resp.raise_for_status()
            line = summary_line(place, resp.json())
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("weather refresh for %s failed (keeping the last reading): %s", place, error)
            self._store(place, {**cached, "error": error, "attempted_at": now.isoformat()})
            return {"refreshed": False, "error": error}
        self._store(place, {"line": line, "fetched_at": now.isoformat(), "attempted_at": now.isoformat(),
                            "error": None})
        return {"refreshed": True, "line": line}

    # ------------------------------------------------------------------ prompt
    def get_static_injection(self, message: dict | None = None, context_memory: dict | None = None) -> dict:
        return {"weather": describe(self.cached())}


PLUGIN_CLASS = WeatherPlugin
