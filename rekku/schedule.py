"""Time and recurrence of scheduled events: pure functions of a payload and an injected ``now``.

No database, no clock, no settings: everything the event plugin and its dispatcher decide about
*when* lives here, so it is tested in-process with any ``now`` (DST days, leap years, the 31st).

The rules:

* A ``Rule`` (stored as JSON with the event) keeps the **local wall-clock start** in an IANA zone;
  calendar recurrences (daily, weekly, monthly, yearly) are computed from that start and an
  occurrence index, never by adding to the previous UTC time, so nothing drifts across DST and
  monthly keeps the day of month (31 Jan → 28/29 Feb → 31 Mar).
* Local → UTC uses ``fold=0``: a wall-clock time skipped by a spring-forward happens at the
  same instant as with the offset before the change (02:30 → 03:30 new time); a time repeated by a
  fall-back happens once, at its first occurrence.
* ``every`` N minutes/hours is elapsed time (UTC arithmetic), not wall-clock.
* ``cron`` expressions are matched against local wall-clock times (croniter on naive local time),
  so ``0 9 * * *`` is 09:00 local on both sides of a DST change.
* ``until`` (inclusive) and ``count`` (occurrences in the series, like iCalendar's COUNT) end a series.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from dateutil.relativedelta import relativedelta

#: Recurrence kinds of the ``repeat`` field.
REPEATS = ("none", "daily", "weekly", "monthly", "yearly", "every", "cron")
#: Shortest ``every`` interval, in seconds.
MIN_EVERY = 60
#: Most occurrences skipped while looking for the next one (guards against pathological rules).
MAX_STEPS = 200_000

_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
          "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800}
_DURATION = re.compile(r"(\d+)\s*([a-z]+)")


class ScheduleError(ValueError):
    """A payload whose time or recurrence is invalid; the message says what to fix."""


@dataclass(frozen=True)
class Rule:
    """When an event happens: a local start in ``tz`` and how it repeats."""

    tz: str
    #: Local wall-clock start, ISO ``YYYY-MM-DDTHH:MM:SS`` (naive, in ``tz``).
    start: str
    repeat: str = "none"
    #: Seconds between occurrences, for ``every``.
    every: int | None = None
    cron: str | None = None
    #: Last allowed occurrence, ISO UTC (inclusive).
    until: str | None = None
    count: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        return cls(**{k: data.get(k) for k in ("tz", "start", "repeat", "every", "cron", "until", "count")
                      if data.get(k) is not None})

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    @property
    def local_start(self) -> datetime:
        return datetime.fromisoformat(self.start)


def to_utc(local: datetime, zone: ZoneInfo) -> datetime:
    """A naive local wall-clock time in ``zone`` as an aware UTC instant (fold=0, see the module doc)."""
    return local.replace(tzinfo=zone, fold=0).astimezone(timezone.utc)


def parse_duration(text: str) -> timedelta:
    """``"in 10 minutes"``, ``"2 hours"``, ``"1h 30m"``, ``"1 day and 2 hours"`` → timedelta."""
    cleaned = text.strip().lower()
    cleaned = re.sub(r"^in\s+", "", cleaned)
    cleaned = re.sub(r"\b(and)\b|,", " ", cleaned)
    pieces = _DURATION.findall(cleaned)
    if not pieces or _DURATION.sub("", cleaned).strip():
        raise ScheduleError(f"cannot read the duration {text!r}; write e.g. 'in 10 minutes' or 'in 2 hours'")
    seconds = 0
    for number, unit in pieces:
        if unit not in _UNITS:
            raise ScheduleError(f"unknown time unit {unit!r} in {text!r}; use seconds, minutes, hours, days or weeks")
        seconds += int(number) * _UNITS[unit]
    if seconds <= 0:
        raise ScheduleError(f"the duration {text!r} must be positive")
    return timedelta(seconds=seconds)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown timezone {name!r}; use an IANA name such as 'Europe/Rome'") from None


def _parse_time(text: str) -> time:
    if not re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text.strip()):
        raise ScheduleError(f"time {text!r} must be HH:MM or HH:MM:SS")
    try:
        return time.fromisoformat(text.strip().zfill(5) if len(text.strip()) == 4 else text.strip())
    except ValueError:
        raise ScheduleError(f"time {text!r} is not a valid time of day") from None


def _parse_date(text: str) -> date:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            raise ValueError
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ScheduleError(f"date {text!r} must be YYYY-MM-DD") from None


def _parse_datetime(text: str, zone: ZoneInfo) -> datetime:
    """ISO 8601; with an offset it is that instant, without one it is local wall-clock in ``zone``. Aware UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ScheduleError(f"datetime {text!r} must be ISO 8601, e.g. 2026-12-24T09:00:00+01:00") from None
    return to_utc(value, zone) if value.tzinfo is None else value.astimezone(timezone.utc)


def _parse_repeat(payload: dict) -> tuple[str, int | None, str | None]:
    raw = payload.get("repeat")
    repeat = "none" if raw in (None, "") else str(raw).strip().lower()
    every: int | None = None
    cron = payload.get("cron")
    if cron and repeat == "none":
        repeat = "cron"
    if repeat.startswith("every") and repeat != "every":
        every = int(parse_duration(repeat[len("every"):]).total_seconds())
        repeat = "every"
    elif repeat == "every":
        if payload.get("every") in (None, ""):
            raise ScheduleError("repeat 'every' needs the field 'every', e.g. \"15 minutes\" or \"2 hours\"")
        every = int(parse_duration(str(payload["every"])).total_seconds())
    if repeat == "always":
        raise ScheduleError("repeat 'always' is not supported (upstream re-fired it on every tick); "
                            "use 'every' with an interval, e.g. \"every 10 minutes\"")
    if repeat not in REPEATS:
        raise ScheduleError(f"repeat {raw!r} must be one of none, daily, weekly, monthly, yearly, "
                            "'every N minutes|hours', cron")
    if repeat == "every" and every is not None and every < MIN_EVERY:
        raise ScheduleError(f"'every' must be at least {MIN_EVERY // 60} minute")
    if repeat == "cron":
        if not cron or not croniter.is_valid(str(cron)):
            raise ScheduleError(f"cron expression {cron!r} is not valid (five fields, e.g. '0 9 * * 1-5')")
        cron = str(cron)
    else:
        cron = None
    return repeat, every, cron


def build_rule(payload: dict, now: datetime, default_tz: str) -> tuple[Rule, datetime]:
    """The rule of an ``event`` payload and its first occurrence (aware UTC), as of ``now``.

    Raises ScheduleError with a clear message for bad fields and for a first occurrence in the past."""
    zone = _zone(str(payload.get("timezone") or default_tz))
    tz_name = str(payload.get("timezone") or default_tz)
    repeat, every, cron = _parse_repeat(payload)
    given = [k for k in ("date", "datetime", "in") if payload.get(k) not in (None, "")]
    if len(given) > 1:
        raise ScheduleError(f"give only one of date(+time), datetime or in (got {', '.join(given)})")
    if payload.get("datetime"):
        start_utc = _parse_datetime(str(payload["datetime"]), zone)
    elif payload.get("in"):
        start_utc = now + parse_duration(str(payload["in"]))
    elif payload.get("date"):
        day = _parse_date(str(payload["date"]))
        at = _parse_time(str(payload.get("time") or "00:00"))
        start_utc = to_utc(datetime.combine(day, at), zone)
    elif repeat == "cron":
        start_utc = now
    else:
        raise ScheduleError("say when: 'date' (YYYY-MM-DD, with optional 'time'), 'datetime' (ISO 8601) "
                            "or 'in' (e.g. 'in 10 minutes')")
    local = start_utc.astimezone(zone).replace(tzinfo=None, microsecond=0)
    until = None
    if payload.get("until") not in (None, ""):
        text = str(payload["until"])
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):  # a date: until the end of that local day
            until_utc = to_utc(datetime.combine(_parse_date(text), time(23, 59, 59)), zone)
        else:
            until_utc = _parse_datetime(text, zone)
        until = until_utc.isoformat()
    count = payload.get("count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ScheduleError("'count' must be a positive integer")
    rule = Rule(tz=tz_name, start=local.isoformat(), repeat=repeat, every=every, cron=cron, until=until,
                count=count)
    if repeat == "cron":
        first = next_occurrence(rule, now, -1, inclusive_from=max(start_utc, now))
    else:
        first = (occurrence_at(rule, 0), 0)
    if first is None or first[0] <= now:
        when = first[0].astimezone(zone).isoformat() if first else "never"
        raise ScheduleError(f"the event would happen in the past ({when}, now is "
                            f"{now.astimezone(zone).isoformat(timespec='seconds')}); give a future time")
    if not _within(rule, first[0], first[1]):
        raise ScheduleError("'until' is before the first occurrence")
    return rule, first[0]


def occurrence_at(rule: Rule, index: int) -> datetime:
    """The ``index``-th occurrence (0 = the start) of a non-cron rule, aware UTC."""
    start = rule.local_start
    zone = rule.zone
    if rule.repeat == "every":
        return to_utc(start, zone) + timedelta(seconds=(rule.every or 0) * index)
    step = {"none": relativedelta(), "daily": relativedelta(days=index), "weekly": relativedelta(weeks=index),
            "monthly": relativedelta(months=index), "yearly": relativedelta(years=index)}[rule.repeat]
    return to_utc(start + step, zone)


def _within(rule: Rule, at: datetime, index: int) -> bool:
    if rule.count is not None and index >= rule.count:
        return False
    return not (rule.until is not None and at > datetime.fromisoformat(rule.until))


def next_occurrence(rule: Rule, after: datetime, index: int,
                    inclusive_from: datetime | None = None) -> tuple[datetime, int] | None:
    """The first occurrence strictly after ``after`` (aware) whose index is greater than ``index``,
    as ``(utc, index)``; None when the series is over. ``inclusive_from`` (cron) may equal the match."""
    if rule.repeat == "none":
        return None
    if rule.repeat == "cron":
        zone = rule.zone
        base = (inclusive_from or after).astimezone(zone).replace(tzinfo=None)
        if inclusive_from is not None:
            base -= timedelta(seconds=1)
        it = croniter(rule.cron, base)
        for step in range(1, MAX_STEPS):
            local = it.get_next(datetime)
            at = to_utc(local, zone)
            if at > after or (inclusive_from is not None and at >= inclusive_from):
                found = (at, index + step)
                return found if _within(rule, *found) else None
        return None
    start_index = index + 1
    if rule.repeat == "every" and rule.every:
        elapsed = (after - to_utc(rule.local_start, rule.zone)).total_seconds()
        start_index = max(start_index, int(elapsed // rule.every))
    for candidate in range(start_index, start_index + MAX_STEPS):
        at = occurrence_at(rule, candidate)
        if at > after:
            return (at, candidate) if _within(rule, at, candidate) else None
        if rule.until is not None and at > datetime.fromisoformat(rule.until):
            return None
    return None


def upcoming(rule: Rule, first: datetime, limit: int, index: int = 0) -> list[datetime]:
    """``limit`` occurrences of a series from ``first`` (occurrence number ``index``), for listings and tests."""
    out = [first]
    while len(out) < limit:
        found = next_occurrence(rule, out[-1], index)
        if found is None:
            break
        out.append(found[0])
        index = found[1]
    return out
