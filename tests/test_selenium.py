"""speech_selenium_elevenlabs end to end: ingress → selenium worker driving real headless Chromium on the
fake text-to-speech site → audio to Telegram (fake) and the outbox, credits to the trainer."""

from __future__ import annotations

import uuid

import requests

from tests.conftest import SPEECH_TIME_LIMIT
from tests.support import Stack, wait_until

TRAINER_CTX = {"interface": "telegram_bot", "user_id": "42", "chat_id": "42"}
SPEECH = "speech_selenium_elevenlabs"


def _outbox_chat() -> str:
    return f"speech-{uuid.uuid4().hex[:8]}"


def speak(stack: Stack, message: str, destinations: list[dict] | None = None, timeout: float = 60) -> dict:
    destinations = destinations or [{"interface": "outbox", "chat_id": _outbox_chat()}]
    return stack.run(SPEECH, {"message": message, "destinations": destinations}, TRAINER_CTX, timeout=timeout)


def test_speech_is_restricted_to_trainers(plugin_stack: Stack) -> None:
    caps = plugin_stack.get("/v1/capabilities").json()["actions"][SPEECH]
    assert caps["queue"] == "selenium" and caps["restricted"] is True
    payload = {"message": "hi", "destinations": [{"interface": "outbox", "chat_id": "x"}]}
    answer = plugin_stack.submit([{"type": SPEECH, "payload": payload}],
                                 {"interface": "telegram_bot", "user_id": "7", "chat_id": "7"})
    assert not answer["accepted"] and "trainer" in str(answer["rejected"]).lower()


def test_speech_payload_is_validated(plugin_stack: Stack) -> None:
    answer = plugin_stack.submit([{"type": SPEECH, "payload": {"message": "x" * 3001, "destinations": [{}]}}],
                                 TRAINER_CTX)
    errors = answer["rejected"][0]["errors"]
    assert any("3000" in e for e in errors) and any("destinations[0]" in e for e in errors)


def test_speech_reaches_telegram_and_the_outbox_and_reports_credits(plugin_stack: Stack, tg: object,
                                                                     tts_site: object) -> None:
    chat = _outbox_chat()
    run = speak(plugin_stack, "Ciao, sono Rekku.", [{"interface": "telegram_bot", "chat_id": "-1001"},
                                                   {"interface": "outbox", "chat_id": chat, "thread_id": "t"}])
    assert run["status"] == "succeeded", (run["error"], run)
    result = run["result"]
    assert run["worker"].startswith("selenium@") and run["progress"]["step"] == "downloading the audio"
    assert result["credits_remaining"] == tts_site.credits and result["credits"].endswith("credits remaining")
    assert tts_site.generated[-1] == "Ciao, sono Rekku."
    name = result["audio"]
    audio = plugin_stack.get(f"/v1/artifacts/{name}")
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/mpeg"
    assert audio.content[:2] == b"\xff\xfb" and len(audio.content) == result["bytes"]
    assert requests.get(plugin_stack.base_url + f"/v1/artifacts/{name}", timeout=10).status_code == 401
    assert plugin_stack.get("/v1/artifacts/..%2Frekku.db").status_code == 404
    kept = plugin_stack.home / "artifacts" / name  # the audio is the requester's: private like all state
    assert kept.stat().st_mode & 0o077 == 0, oct(kept.stat().st_mode)
    for delivery in result["deliveries"]:
        done = plugin_stack.wait_action(delivery["action_id"])
        assert done["status"] == "succeeded", done
    sent = [r for r in tg.sends("-1001") if r.path.endswith("/sendAudio")]
    assert len(sent) == 1 and sent[0].files["audio"][1] == audio.content
    outbox = plugin_stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]
    assert [(m["audio_url"], m["thread_id"]) for m in outbox] == [(f"/v1/artifacts/{name}", "t")]
    assert result["credits_reported_to"] == ["telegram_bot:42"]
    wait_until(lambda: any("credits remaining" in str(r.data.get("text")) for r in tg.sends("42")),
               timeout=20, what="the credits message to the trainer")


def test_the_browser_is_reused_between_actions(plugin_stack: Stack) -> None:
    first = speak(plugin_stack, "one")
    second = speak(plugin_stack, "two")
    assert first["status"] == second["status"] == "succeeded", (first, second)
    one, two = first["result"]["browser"], second["result"]["browser"]
    assert one["session"] == two["session"] and two["actions"] == one["actions"] + 1


def test_a_wrong_password_fails_clearly_and_the_browser_stays_healthy(plugin_stack: Stack, tts_site: object) -> None:
    before = speak(plugin_stack, "warm up")
    real = tts_site.password
    tts_site.sessions.clear()  # logged out: the site asks for the login again
    tts_site.password = "changed"
    try:
        failed = speak(plugin_stack, "never spoken")
    finally:
        tts_site.password = real
    assert failed["status"] == "failed" and "login failed: Wrong email or password" in failed["error"], failed
    after = speak(plugin_stack, "logged in again")
    assert after["status"] == "succeeded", after
    assert after["result"]["browser"]["session"] == before["result"]["browser"]["session"]


def test_generation_that_never_finishes_fails_and_the_next_action_works(plugin_stack: Stack,
                                                                         tts_site: object) -> None:
    tts_site.never_finish = True
    try:
        failed = speak(plugin_stack, "stuck")
    finally:
        tts_site.reset()
    assert failed["status"] == "failed" and "speech generation did not finish within 2 s" in failed["error"]
    assert speak(plugin_stack, "unstuck")["status"] == "succeeded"


def test_a_download_that_stalls_fails_and_the_next_action_works(plugin_stack: Stack, tts_site: object) -> None:
    tts_site.stall_download = True
    try:
        failed = speak(plugin_stack, "slow download")
    finally:
        tts_site.reset()
    assert failed["status"] == "failed" and "download did not finish within 2 s" in failed["error"], failed
    after = speak(plugin_stack, "fast download")
    assert after["status"] == "succeeded", after
    assert after["result"]["bytes"] == 8 * 417


def test_a_hung_page_hits_the_time_limit_and_the_worker_keeps_serving(plugin_stack: Stack,
                                                                       tts_site: object) -> None:
    before = speak(plugin_stack, "before the hang")
    tts_site.hang_page = True
    try:
        failed = speak(plugin_stack, "hang", timeout=SPEECH_TIME_LIMIT + 40)
    finally:
        tts_site.reset()
    assert failed["status"] == "failed" and "time limit" in failed["error"], failed
    after = speak(plugin_stack, "after the hang")
    assert after["status"] == "succeeded", after
    assert after["result"]["browser"]["session"] != before["result"]["browser"]["session"]
    assert after["worker"] == before["worker"]


def test_progress_is_published_as_the_celery_task_state(plugin_stack: Stack) -> None:
    """What Flower shows: the action's task id carries state PROGRESS with the step names."""
    from celery import Celery

    run = speak(plugin_stack, "progress please")
    assert run["status"] == "succeeded", run
    app = Celery(broker=plugin_stack.broker_url, backend=plugin_stack.broker_url)
    try:
        state = app.AsyncResult(run["id"])
        assert state.state == "PROGRESS" and state.info == {"step": "downloading the audio"}
    finally:
        app.close()

