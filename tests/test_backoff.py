"""Retry delays (rekku/backoff.py): exponential, capped and jittered by Celery's own helper."""

from __future__ import annotations

from rekku.backoff import retry_delay
from rekku.feed_push import backoff as push_backoff
from rekku.settings import Settings

DRAWS = 300


def test_delays_stay_between_the_minimum_and_the_capped_exponential() -> None:
    for retries in range(12):
        ceiling = min(300.0, 2.0 ** retries)
        delays = [retry_delay(retries, 300.0, minimum=1.0) for _ in range(DRAWS)]
        assert all(1.0 <= d <= max(1.0, ceiling) for d in delays), (retries, min(delays), max(delays))
    assert max(retry_delay(20, 300.0) for _ in range(DRAWS)) <= 300.0  # capped, however many retries


def test_delays_are_spread_not_all_equal() -> None:
    """Actions that failed together (an API's outage) do not all come back at the same moment."""
    for retries in (2, 5, 8):
        delays = [retry_delay(retries, 300.0, minimum=1.0) for _ in range(DRAWS)]
        assert len(set(delays)) > DRAWS // 2, retries  # millisecond resolution: nearly all different
        ceiling = min(300.0, 2.0 ** retries)
        assert min(delays) < 1 + ceiling / 4 and max(delays) > ceiling * 3 / 4  # the whole range is used


def test_a_factor_scales_the_steps_and_the_first_pause_can_be_fixed() -> None:
    assert {retry_delay(0, 60.0, minimum=1.0) for _ in range(50)} == {1.0}  # the receiver's first pause: 1 s
    assert all(0.5 <= retry_delay(3, 60.0, factor=0.5, minimum=0.5) <= 4.0 for _ in range(DRAWS))


def test_the_model_webhook_backoff_uses_it_and_honours_retry_after(tmp_path) -> None:
    settings = Settings(home=tmp_path, model_webhook_max_backoff=8)
    delays = [push_backoff(settings, 4) for _ in range(DRAWS)]
    assert all(0.2 <= d <= 8 for d in delays) and len(set(delays)) > 1
    assert all(push_backoff(settings, 1, retry_after=5) >= 5 for _ in range(20))
    assert all(push_backoff(settings, 1, retry_after=50) <= 8 for _ in range(20))
