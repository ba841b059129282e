"""Plugin hooks beyond actions: refusing a request, observing requests, periodic work run by beat."""

from __future__ import annotations

import pytest

from tests.support import Stack, stop_process, wait_until

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def test_check_request_refuses_the_whole_request_with_403(stack: Stack) -> None:
    resp = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                      "context": {"user_id": "blocked-user", "chat_id": "c1"}})
    assert resp.status_code == 403
    assert resp.json()["rejected"] == [{"index": None, "type": None, "errors": ["User blocked-user is blocked"]}]
    assert resp.json()["accepted"] == []


def test_trainers_are_never_refused(stack: Stack) -> None:
    """User 7000 is on the gatekeeper's block list, and a trainer on the webhook interface only."""
    resp = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                      "context": {"interface": "webhook", "user_id": "7000"}})
    assert resp.status_code == 202
    resp = stack.post("/v1/actions", {"actions": [{"type": "echo", "payload": {}}],
                                      "context": {"interface": "discord_bot", "user_id": "7000"}})
    assert resp.status_code == 403


def test_on_request_sees_every_request_with_a_chat_even_rejected_ones(stack: Stack) -> None:
    stack.submit([{"type": "echo", "payload": {}}], {"chat_id": "seen-1"})
    stack.submit([{"type": "nope", "payload": {}}], {"chat_id": "seen-1"})
    assert (stack.home / "testkit" / "chat-seen-1.log").read_text() == "seen\nseen\n"


def test_beat_runs_plugin_periodic_tasks_on_workers(stack: Stack) -> None:
    ticks = stack.home / "testkit" / "ticks.log"
    beat = stack.spawn("beat", log_name="beat")
    try:
        wait_until(lambda: ticks.exists() and len(ticks.read_text().split()) >= 3, timeout=40,
                   what="three beat ticks of the gatekeeper plugin")
    finally:
        stop_process(beat)
