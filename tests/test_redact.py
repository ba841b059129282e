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


def test_shown_kwargs_are_cut_at_the_limit_and_hide_secrets_however_deep() -> None:
    """The representation shows nesting at any depth (Python's repr), so redaction must reach it too;
    a long payload is cut at MAX_REPR characters."""
    from rekku.redact import CUT, MAX_REPR, kwargs_repr

    deep: dict = {"password": "hunter2", "note": "visible"}
    for _ in range(12):
        deep = {"level": deep}
    shown = kwargs_repr({"action_id": "a", "payload": deep})
    assert "hunter2" not in shown and "'visible'" in shown and "'***'" in shown

    long_one = kwargs_repr({"action_id": "a", "payload": {"text": "x" * 5000, "api_key": "k" * 10}})
    assert len(long_one) == MAX_REPR and long_one.endswith(CUT) and "kkkkkkkkkk" not in long_one
