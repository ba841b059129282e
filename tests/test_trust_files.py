"""A file field names only what may leave the server (issue 13, item 1: file exfiltration).

The model's reply is untrusted: any chat user can steer it. ``audio_telegram_bot`` with
``"audio": "/proc/self/environ"`` used to upload the io worker's whole environment (API token, bot
token, passwords) to a chat. An audio field now takes only (a) an artifact Rekku produced, by name,
opened inside the artifact directory without following links, (b) an http(s) URL, passed on as a
link, (c) a platform file id (Telegram). Everything else is refused at the ingress (422, before
anything is queued), and again by the io worker for a message that skipped the ingress.

Real processes throughout (the ``chat_stack``: ingress, default and io workers on MariaDB) against
the fake Telegram Bot API and webhook receiver, which record every request body and upload whole.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TELEGRAM_TOKEN, WEBHOOK_SECRET
from tests.support import Stack

AUDIO_ACTIONS = ["audio_telegram_bot", "audio_webhook", "audio_outbox"]
#: A non-trainer speaks (any chat user can steer the model).
USER = "7"
#: Text of /etc/passwd's first line on every Linux system.
PASSWD = "root:x:0:0"
#: Values naming files on the worker that must never leave it; ``{home}`` is the stack's REKKU_HOME.
LOCAL_FILES = {
    "proc-environ": "/proc/self/environ",
    "etc-passwd": "/etc/passwd",
    "home-api-token": "{home}/api_token",
    "relative-api-token": "../api_token",
    "file-url": "file:///etc/passwd",
    "relative-in-worker-cwd": "pyproject.toml",
}
#: A Telegram-like file_id: opaque, no '/' or '.'.
FILE_ID = "AwACAgQAAxkBAAIBZ2Zx_Fake-File-Id_0123456789"


# ----------------------------------------------------------------------------- helpers
def _chat() -> str:
    return str(-100_000_000 - uuid.uuid4().int % 1_000_000)


def _context(action_type: str, chat: str) -> dict:
    """The request comes from ``chat`` on the action's own interface, from a non-trainer."""
    return {"interface": action_type.partition("_")[2], "chat_id": chat, "user_id": USER}


def _secrets(stack: Stack) -> list[str]:
    """What must never reach an outside service: the tokens and secrets of the stack, /etc/passwd."""
    return [stack.token, TELEGRAM_TOKEN, WEBHOOK_SECRET, PASSWD]


def _leaks(stack: Stack, fakes: dict) -> list[str]:
    """Every request to a fake (body, upload or query) that carried a secret."""
    return [f"{name}: {request.method} {request.path}" for name, fake in fakes.items()
            for secret in _secrets(stack) for request in fake.containing(secret)]


def _hook_bodies(fakes: dict, chat: str) -> list[dict]:
    return [body for r in fakes["webhook"].requests if r.raw and (body := json.loads(r.raw)).get("chat_id") == chat]


def _outbox(stack: Stack, chat: str) -> list[dict]:
    return stack.get("/v1/outbox", params={"chat_id": chat}).json()["messages"]


def _reset(fakes: dict) -> None:
    for fake in fakes.values():
        fake.reset()


def _artifacts(stack: Stack) -> Path:
    """The stack's artifact directory (no REKKU_ARTIFACT_DIR: REKKU_HOME/artifacts)."""
    path = stack.home / "artifacts"
    path.mkdir(exist_ok=True)
    return path


def _submit(stack: Stack, action_type: str, audio: str, chat: str) -> tuple[int, dict]:
    """POST one audio action; whatever was accepted is waited for, so a leak would have happened."""
    resp = stack.post("/v1/actions", {"actions": [{"type": action_type, "payload": {"audio": audio}}],
                                      "context": _context(action_type, chat)})
    answer = resp.json()
    for accepted in answer.get("accepted") or []:
        stack.wait_action(accepted["id"])
    return resp.status_code, answer


def _assert_clear_refusal(status: int, answer: dict, action_type: str, *, why: str = "") -> None:
    """422, nothing accepted, and one error naming the field, the action and the accepted forms."""
    assert status == 422 and not answer.get("accepted"), answer
    [rejection] = answer["rejected"]
    error = " ".join(rejection["errors"])
    assert f"Field 'audio' of action '{action_type}' was refused" in error, error
    assert "artifact" in error and "http:// or https:// URL" in error, error
    assert ("(c) a platform file id" in error) == (action_type == "audio_telegram_bot"), error
    assert why in error, error


def _nothing_delivered(stack: Stack, fakes: dict, tg: Any, chat: str) -> None:
    assert tg.sends(chat) == [] and tg.uploads() == []
    assert _hook_bodies(fakes, chat) == []
    assert _outbox(stack, chat) == []
    assert _leaks(stack, fakes) == []


def _publish_raw(stack: Stack, action_type: str, payload: dict, context: dict) -> str:
    """Put an action on the io queue as a broker client would, skipping the ingress's validation.

    Its row is written to the action log first (as a message queued before the check existed would
    have one): the worker runs only actions its log knows."""
    import sqlalchemy as sa
    from celery import Celery

    from rekku.action_log import ActionLog, NewRun

    action_id = str(uuid.uuid4())
    engine = sa.create_engine(stack.database_url)
    try:
        ActionLog(engine).record_batch(str(uuid.uuid4()), None,
                                       [NewRun(action_id, 0, action_type, "io", payload, context)], {})
    finally:
        engine.dispose()
    app = Celery(broker=stack.broker_url)
    app.send_task(f"rekku.action.{action_type}", task_id=action_id, queue="io",
                  kwargs={"action_id": action_id, "payload": payload, "context": context})
    app.close()
    return action_id


@pytest.fixture
def fakes_reset(fakes: dict, tg: Any) -> dict:
    """All the fakes emptied for this test (``tg`` is the Telegram one)."""
    _reset(fakes)
    return fakes


@pytest.fixture
def token_file(chat_stack: Stack) -> Path:
    """REKKU_HOME/api_token holding the API token, as `rekku up` writes it."""
    path = chat_stack.home / "api_token"
    path.write_text(chat_stack.token)
    return path


# ----------------------------------------------------------------------------- refused at the ingress
@pytest.mark.parametrize("value", LOCAL_FILES.values(), ids=LOCAL_FILES.keys())
@pytest.mark.parametrize("action_type", AUDIO_ACTIONS)
def test_a_server_file_as_audio_is_refused_at_the_ingress(chat_stack: Stack, fakes_reset: dict, tg: Any,
                                                          token_file: Path, action_type: str, value: str) -> None:
    """/proc/self/environ, /etc/passwd, the API token file (absolute or relative), a file: URL and a
    file in the worker's working directory: 422 with the correction, nothing queued, nothing sent."""
    chat = _chat()
    status, answer = _submit(chat_stack, action_type, value.format(home=chat_stack.home), chat)
    assert _leaks(chat_stack, fakes_reset) == []
    _assert_clear_refusal(status, answer, action_type)
    _nothing_delivered(chat_stack, fakes_reset, tg, chat)


# ----------------------------------------------------------------------------- refused by the worker
@pytest.mark.parametrize("kind", ["proc-environ", "api-token-path", "symlink-in-artifacts"])
@pytest.mark.parametrize("action_type", AUDIO_ACTIONS)
def test_a_message_pushed_straight_to_the_broker_reads_no_server_file(chat_stack: Stack, fakes_reset: dict,
                                                                     tg: Any, token_file: Path, action_type: str,
                                                                     kind: str) -> None:
    """Defence in depth: the io worker applies the same rule, so an action that never met the
    ingress's check (queued earlier, or published by anything that can reach the broker) fails and
    uploads nothing — also when the name is a link inside the artifact directory."""
    chat = _chat()
    audio = {"proc-environ": "/proc/self/environ", "api-token-path": str(token_file)}.get(kind)
    if audio is None:
        audio = f"link-{uuid.uuid4().hex[:8]}.ogg"
        (_artifacts(chat_stack) / audio).symlink_to(token_file)
    action_id = _publish_raw(chat_stack, action_type, {"audio": audio}, _context(action_type, chat))
    run = chat_stack.wait_action(action_id)
    assert _leaks(chat_stack, fakes_reset) == []
    assert run["status"] == "failed", run
    assert f"Field 'audio' of action '{action_type}' was refused" in run["error"], run["error"]
    assert run["attempts"] == 1  # refused for good, not retried
    _nothing_delivered(chat_stack, fakes_reset, tg, chat)


# ----------------------------------------------------------------------------- what is accepted
def test_an_artifact_by_name_is_uploaded_to_telegram_and_linked_for_webhook_and_outbox(
        chat_stack: Stack, fakes_reset: dict, tg: Any) -> None:
    """(a) The artifact's bytes go to Telegram under its name; the webhook and the outbox get its
    /v1/artifacts/{name} link, which serves the same bytes."""
    name, content = f"{uuid.uuid4()}.ogg", b"OggS artifact " + os.urandom(16)
    (_artifacts(chat_stack) / name).write_bytes(content)
    chats = {action_type: _chat() for action_type in AUDIO_ACTIONS}
    for action_type, chat in chats.items():
        status, answer = _submit(chat_stack, action_type, name, chat)
        assert status == 202, answer
        run = chat_stack.wait_action(answer["accepted"][0]["id"])
        assert run["status"] == "succeeded", run
    [send] = tg.sends(chats["audio_telegram_bot"])
    assert send.path.endswith("/sendVoice") and send.uploads == [("voice", name, content)]
    [hook] = _hook_bodies(fakes_reset, chats["audio_webhook"])
    assert hook["audio_url"] == f"/v1/artifacts/{name}"
    assert [m["audio_url"] for m in _outbox(chat_stack, chats["audio_outbox"])] == [f"/v1/artifacts/{name}"]
    served = chat_stack.get(f"/v1/artifacts/{name}")
    assert served.status_code == 200 and served.content == content
    assert served.headers["content-type"] == "audio/ogg"
    assert _leaks(chat_stack, fakes_reset) == []


def test_an_http_url_is_passed_on_never_fetched_and_other_schemes_are_refused(
        chat_stack: Stack, fakes_reset: dict, tg: Any) -> None:
    """(b) An http(s) URL goes to Telegram as a URL (no upload) and into the webhook's and outbox's
    audio_url as is; Rekku never requests it. ftp:, data:, javascript: and a host-less URL are refused."""
    url = f"{fakes_reset['webhook'].url}/never-fetched/{uuid.uuid4().hex[:8]}.mp3"
    chats = {action_type: _chat() for action_type in AUDIO_ACTIONS}
    for action_type, chat in chats.items():
        status, answer = _submit(chat_stack, action_type, url, chat)
        assert status == 202, answer
        assert chat_stack.wait_action(answer["accepted"][0]["id"])["status"] == "succeeded"
    [send] = tg.sends(chats["audio_telegram_bot"])
    assert send.path.endswith("/sendAudio") and send.data["audio"] == url and send.uploads == []
    assert _hook_bodies(fakes_reset, chats["audio_webhook"])[0]["audio_url"] == url
    assert [m["audio_url"] for m in _outbox(chat_stack, chats["audio_outbox"])] == [url]
    assert not [r for r in fakes_reset["webhook"].requests if r.path.startswith("/never-fetched/")]
    for action_type in AUDIO_ACTIONS:
        for bad in ("ftp://files.example/a.mp3", "data:audio/mpeg;base64,SUQz", "javascript:alert(1)",
                    "https:///etc/passwd"):
            chat = _chat()
            status, answer = _submit(chat_stack, action_type, bad, chat)
            _assert_clear_refusal(status, answer, action_type)
            _nothing_delivered(chat_stack, fakes_reset, tg, chat)


def test_a_file_id_goes_to_telegram_as_is_and_is_refused_where_it_means_nothing(
        chat_stack: Stack, fakes_reset: dict, tg: Any) -> None:
    """(c) A Telegram file_id is handed to the Bot API unchanged and nothing is opened or uploaded; the
    webhook and the outbox, whose audio_url clients fetch, refuse it with the reason."""
    chat = _chat()
    status, answer = _submit(chat_stack, "audio_telegram_bot", FILE_ID, chat)
    assert status == 202, answer
    assert chat_stack.wait_action(answer["accepted"][0]["id"])["status"] == "succeeded"
    [send] = tg.sends(chat)
    assert send.data["audio"] == FILE_ID and send.uploads == []
    for action_type in ("audio_webhook", "audio_outbox"):
        other = _chat()
        status, answer = _submit(chat_stack, action_type, FILE_ID, other)
        _assert_clear_refusal(status, answer, action_type, why="file id means nothing")
        _nothing_delivered(chat_stack, fakes_reset, tg, other)


# ----------------------------------------------------------------------------- links in the artifact dir
def test_a_symlink_in_the_artifact_dir_is_refused_as_audio_and_by_the_artifacts_api(
        chat_stack: Stack, fakes_reset: dict, tg: Any, token_file: Path) -> None:
    """A link placed in the artifact directory (to /etc/passwd, to the API token file) is no artifact:
    refused as any action's audio, and a 404 from GET /v1/artifacts/{name}."""
    links = {f"passwd-{uuid.uuid4().hex[:8]}.ogg": Path("/etc/passwd"),
             f"token-{uuid.uuid4().hex[:8]}.mp3": token_file}
    for name, target in links.items():
        (_artifacts(chat_stack) / name).symlink_to(target)
        served = chat_stack.get(f"/v1/artifacts/{name}")
        assert served.status_code == 404 and PASSWD.encode() not in served.content
        assert chat_stack.token.encode() not in served.content
        for action_type in AUDIO_ACTIONS:
            chat = _chat()
            status, answer = _submit(chat_stack, action_type, name, chat)
            assert _leaks(chat_stack, fakes_reset) == []
            _assert_clear_refusal(status, answer, action_type, why="symbolic link")
            _nothing_delivered(chat_stack, fakes_reset, tg, chat)
    for sneaky in ("..%2Fapi_token", ".%2E%2Fapi_token", "%2Fetc%2Fpasswd", ".hidden.mp3"):
        assert chat_stack.get(f"/v1/artifacts/{sneaky}").status_code == 404, sneaky


def test_a_hard_link_to_a_file_outside_the_artifact_dir_is_refused(
        chat_stack: Stack, fakes_reset: dict, tg: Any) -> None:
    """A hard link is the same file under a second name: one in the artifact directory to a secret
    elsewhere is refused as audio and by the API (an artifact Rekku kept has exactly one name)."""
    secret = chat_stack.home / f"secret-{uuid.uuid4().hex[:8]}.txt"
    secret.write_text(chat_stack.token)
    name = f"hard-{uuid.uuid4().hex[:8]}.mp3"
    os.link(secret, _artifacts(chat_stack) / name)
    served = chat_stack.get(f"/v1/artifacts/{name}")
    assert served.status_code == 404 and chat_stack.token.encode() not in served.content
    chat = _chat()
    status, answer = _submit(chat_stack, "audio_telegram_bot", name, chat)
    assert _leaks(chat_stack, fakes_reset) == []
    _assert_clear_refusal(status, answer, "audio_telegram_bot", why="hard link")
    _nothing_delivered(chat_stack, fakes_reset, tg, chat)
