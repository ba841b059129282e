"""The time math of events (rekku.schedule), in-process with an injected ``now``: formats, DST, the 31st,
leap years, until/count, cron and refusals."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from rekku.schedule import Rule, ScheduleError, build_rule, next_occurrence, parse_duration, upcoming

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def local(times: list[datetime], tz: str) -> list[str]:
    return [t.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %Z") for t in times]


def series(payload: dict, n: int, now: datetime = NOW, tz: str = "UTC") -> tuple[Rule, list[datetime]]:
    rule, first = build_rule(payload, now, tz)
    return rule, upcoming(rule, first, n)


# ----------------------------------------------------------------------------- formats
def test_date_and_time_are_local_to_tz_and_stored_as_utc() -> None:
    rule, first = build_rule({"date": "2026-12-24", "time": "09:00"}, NOW, "Europe/Rome")
    assert first == datetime(2026, 12, 24, 8, 0, tzinfo=timezone.utc)
    assert rule.tz == "Europe/Rome" and rule.start == "2026-12-24T09:00:00"


def test_time_with_seconds_and_default_midnight() -> None:
    assert build_rule({"date": "2026-02-01", "time": "07:05:30"}, NOW, "UTC")[1] == \
        datetime(2026, 2, 1, 7, 5, 30, tzinfo=timezone.utc)
    assert build_rule({"date": "2026-02-01"}, NOW, "UTC")[1] == datetime(2026, 2, 1, tzinfo=timezone.utc)


def test_iso_datetime_with_offset_is_that_instant_whatever_the_zone() -> None:
    rule, first = build_rule({"datetime": "2026-06-01T09:00:00-04:00", "timezone": "Asia/Tokyo"}, NOW, "UTC")
    assert first == datetime(2026, 6, 1, 13, 0, tzinfo=timezone.utc)
    assert rule.start == "2026-06-01T22:00:00"  # kept as Tokyo wall-clock for recurrences


def test_iso_datetime_without_offset_is_local_to_the_event_zone() -> None:
    first = build_rule({"datetime": "2026-06-01T09:00", "timezone": "America/New_York"}, NOW, "UTC")[1]
    assert first == datetime(2026, 6, 1, 13, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, seconds", [("in 10 minutes", 600), ("2 hours", 7200), ("in 1h 30m", 5400),
                                           ("in 1 day and 2 hours", 93600), ("in 45 seconds", 45)])
def test_relative_in(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert build_rule({"in": text}, NOW, "Europe/Rome")[1] == NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize("payload, message", [
    ({"date": "2025-12-31", "time": "23:59"}, "in the past"),
    ({"in": "in ten minutes"}, "cannot read the duration"),
    ({"date": "2026-13-01"}, "must be YYYY-MM-DD"),
    ({"date": "2026-02-01", "time": "25:00"}, "not a valid time"),
    ({"date": "2026-02-01", "time": "9am"}, "HH:MM"),
    ({"date": "2026-02-01", "timezone": "Mars/Olympus"}, "unknown timezone"),
    ({"date": "2026-02-01", "repeat": "always"}, "use 'every'"),
    ({"date": "2026-02-01", "repeat": "fortnightly"}, "must be one of"),
    ({"date": "2026-02-01", "repeat": "every 30 seconds"}, "at least 1 minute"),
    ({"repeat": "cron", "cron": "61 * * * *"}, "not valid"),
    ({"description": "x"}, "say when"),
    ({"date": "2026-02-01", "in": "5 minutes"}, "only one of"),
    ({"date": "2026-02-01", "repeat": "daily", "until": "2026-01-15"}, "'until' is before"),
    ({"date": "2026-02-01", "repeat": "daily", "count": 0}, "positive integer"),
])
def test_bad_payloads_are_refused_with_a_clear_message(payload: dict, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        build_rule(payload, NOW, "UTC")


# ----------------------------------------------------------------------------- calendar recurrences
def test_monthly_from_the_31st_keeps_the_day_of_month() -> None:
    _, times = series({"date": "2026-01-31", "time": "10:00", "repeat": "monthly"}, 5, tz="Europe/Rome")
    assert [t.astimezone(ZoneInfo("Europe/Rome")).date().isoformat() for t in times] == \
        ["2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]


def test_monthly_from_the_31st_in_a_leap_year_gets_the_29th() -> None:
    _, times = series({"date": "2028-01-31", "repeat": "monthly"}, 3)
    assert [t.date().isoformat() for t in times] == ["2028-01-31", "2028-02-29", "2028-03-31"]


def test_yearly_from_29_february() -> None:
    _, times = series({"date": "2028-02-29", "time": "08:00", "repeat": "yearly"}, 5)
    assert [t.date().isoformat() for t in times] == ["2028-02-29", "2029-02-28", "2030-02-28", "2031-02-28",
                                                     "2032-02-29"]


def test_weekly() -> None:
    _, times = series({"date": "2026-01-05", "time": "18:00", "repeat": "weekly"}, 3)
    assert [t.date().isoformat() for t in times] == ["2026-01-05", "2026-01-12", "2026-01-19"]


def test_count_limits_the_series() -> None:
    _, times = series({"date": "2026-02-01", "repeat": "daily", "count": 3}, 10)
    assert len(times) == 3


def test_until_is_inclusive_and_a_date_means_the_end_of_that_local_day() -> None:
    _, times = series({"date": "2026-02-01", "time": "21:00", "repeat": "daily", "until": "2026-02-03",
                       "timezone": "Europe/Rome"}, 10)
    assert local(times, "Europe/Rome") == ["2026-02-01 21:00 CET", "2026-02-02 21:00 CET", "2026-02-03 21:00 CET"]


def test_every_n_minutes_and_hours_is_elapsed_time() -> None:
    _, times = series({"in": "10 minutes", "repeat": "every 90 minutes"}, 3)
    assert [t - NOW for t in times] == [timedelta(minutes=10), timedelta(minutes=100), timedelta(minutes=190)]
    _, times = series({"in": "1 hour", "repeat": "every", "every": "2 hours", "count": 2}, 5)
    assert [t - NOW for t in times] == [timedelta(hours=1), timedelta(hours=3)]


def test_next_occurrence_after_a_long_outage_skips_to_the_future_once() -> None:
    rule, first = build_rule({"date": "2026-02-01", "time": "09:00", "repeat": "daily"}, NOW, "UTC")
    later = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)
    at, index = next_occurrence(rule, later, 0)
    assert at == datetime(2026, 3, 11, 9, 0, tzinfo=timezone.utc) and index == 38


# ----------------------------------------------------------------------------- DST
@pytest.mark.parametrize("tz, start, utc_hours, labels", [
    # spring forward: Rome 29 Mar 2026, New York 8 Mar 2026
    ("Europe/Rome", "2026-03-28", [8, 7, 7], ["CET", "CEST", "CEST"]),
    ("America/New_York", "2026-03-07", [14, 13, 13], ["EST", "EDT", "EDT"]),
    # fall back: Rome 25 Oct 2026, New York 1 Nov 2026
    ("Europe/Rome", "2026-10-24", [7, 8, 8], ["CEST", "CET", "CET"]),
    ("America/New_York", "2026-10-31", [13, 14, 14], ["EDT", "EST", "EST"]),
])
def test_daily_keeps_local_wall_clock_across_dst(tz: str, start: str, utc_hours: list[int],
                                                 labels: list[str]) -> None:
    _, times = series({"date": start, "time": "09:00", "repeat": "daily", "timezone": tz}, 3)
    assert [t.hour for t in times] == utc_hours
    assert [t.astimezone(ZoneInfo(tz)).strftime("%H:%M %Z") for t in times] == [f"09:00 {z}" for z in labels]


def test_a_time_skipped_by_spring_forward_fires_once_an_hour_later_that_day() -> None:
    _, times = series({"date": "2026-03-28", "time": "02:30", "repeat": "daily", "timezone": "Europe/Rome"}, 3)
    assert local(times, "Europe/Rome") == ["2026-03-28 02:30 CET", "2026-03-29 03:30 CEST", "2026-03-30 02:30 CEST"]


def test_a_time_repeated_by_fall_back_fires_once() -> None:
    _, times = series({"date": "2026-10-31", "time": "01:30", "repeat": "daily", "timezone": "America/New_York"}, 3)
    assert local(times, "America/New_York") == ["2026-10-31 01:30 EDT", "2026-11-01 01:30 EDT",
                                                "2026-11-02 01:30 EST"]
    assert times[2] - times[1] == timedelta(hours=25)


def test_weekly_and_monthly_across_dst_keep_local_time() -> None:
    _, times = series({"date": "2026-03-22", "time": "09:00", "repeat": "weekly", "timezone": "Europe/Rome"}, 2)
    assert local(times, "Europe/Rome") == ["2026-03-22 09:00 CET", "2026-03-29 09:00 CEST"]
    _, times = series({"date": "2026-10-15", "time": "09:00", "repeat": "monthly",
                       "timezone": "America/New_York"}, 2)
    assert local(times, "America/New_York") == ["2026-10-15 09:00 EDT", "2026-11-15 09:00 EST"]


def test_every_hour_across_fall_back_is_elapsed_time() -> None:
    now = datetime(2026, 10, 24, 22, 0, tzinfo=timezone.utc)
    _, times = series({"datetime": "2026-10-25T01:00", "repeat": "every 1 hour", "timezone": "Europe/Rome"}, 4,
                      now=now)
    assert local(times, "Europe/Rome") == ["2026-10-25 01:00 CEST", "2026-10-25 02:00 CEST",
                                           "2026-10-25 02:00 CET", "2026-10-25 03:00 CET"]


def test_cron_is_local_wall_clock_across_dst() -> None:
    now = datetime(2026, 3, 6, tzinfo=timezone.utc)
    _, times = series({"cron": "0 9 * * *", "timezone": "America/New_York"}, 3, now=now)
    assert local(times, "America/New_York") == ["2026-03-06 09:00 EST", "2026-03-07 09:00 EST",
                                                "2026-03-08 09:00 EDT"]
    _, times = series({"repeat": "cron", "cron": "0 9 * * 1-5", "date": "2026-10-23", "timezone": "Europe/Rome",
                       "count": 3}, 5, now=now)
    assert local(times, "Europe/Rome") == ["2026-10-23 09:00 CEST", "2026-10-26 09:00 CET", "2026-10-27 09:00 CET"]


def test_cron_every_30_minutes_across_spring_forward_never_repeats_an_instant() -> None:
    now = datetime(2026, 3, 29, 0, 10, tzinfo=timezone.utc)  # 01:10 CET
    _, times = series({"cron": "*/30 * * * *", "timezone": "Europe/Rome"}, 4, now=now)
    assert local(times, "Europe/Rome") == ["2026-03-29 01:30 CET", "2026-03-29 03:00 CEST",
                                           "2026-03-29 03:30 CEST", "2026-03-29 04:00 CEST"]
    assert len(set(times)) == len(times)
