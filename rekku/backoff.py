"""How long to wait before trying again: exponential, capped, with full jitter, from Celery's own helper
(``celery.utils.time.get_exponential_backoff_interval``), for every retry Rekku schedules (actions'
TransientError, the model loop's turns, event deliveries, the model webhook's pushes, the Telegram
receiver). Without jitter, every action that failed together (an API's outage) comes back at the same
moment, again and again."""

from __future__ import annotations

from celery.utils.time import get_exponential_backoff_interval

#: Celery's helper draws whole units; it is given milliseconds so short delays are not all 0 or 1 s.
_MS = 1000


def retry_delay(retries: int, maximum: float, *, factor: float = 1.0, minimum: float = 0.0) -> float:
    """Seconds before the next try after ``retries`` earlier retries: drawn uniformly between
    ``minimum`` and ``min(maximum, factor * 2 ** retries)`` (never below ``minimum``)."""
    drawn = get_exponential_backoff_interval(factor=int(factor * _MS), retries=max(0, retries),
                                             maximum=int(maximum * _MS), full_jitter=True) / _MS
    return max(minimum, drawn)
