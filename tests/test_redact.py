"""What Celery shows of a task (events, Flower, the worker's log line) hides secret-looking fields."""

from __future__ import annotations


def test_redaction_hides_secret_looking_fields_at_any_depth_and_nothing_else() -> None:
    from rekku.redact import HIDDEN, kwargs_repr, redact

    payload = {"text": "hi", "max_tokens": 5, "author": "me", "DB_PASS": "p1", "apiKey": "k1",
               "nested": [{"access_token": "t1", "keep": "ok"}], "headers": {"Authorization": "Bearer t2"}}
    assert redact(payload) == {"text": "hi", "max_tokens": 5, "author": "me", "DB_PASS": HIDDEN, "apiKey": HIDDEN,
                               "nested": [{"access_token": HIDDEN, "keep": "ok"}], "headers": {"Authorization": HIDDEN}}
    shown = kwargs_repr({"action_id": "a", "payload": payload})
    assert not any(secret in shown for secret in ("p1", "k1", "t1", "t2")) and "'hi'" in shown
    assert payload["DB_PASS"] == "p1"  # the payload itself is untouched
