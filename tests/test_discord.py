"""Discord end to end: HTTP → ingress → io worker → the fake Discord (tests/fakes/discord.py).

Two configurations: the bot (``bot_stack``: DISCORD_BOT_TOKEN, any channel the bot may post in, at
DEBUG so every HTTP request line is logged) and webhooks (the shared ``chat_stack``: a webhook per
channel in DISCORD_WEBHOOK_URLS, and DISCORD_WEBHOOK_URL for the default channel). A message goes to
the channel its action names, or fails saying why; it never goes anywhere else.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    DISCORD_CHANNELS,
    DISCORD_ELSEWHERE,
    DISCORD_MISMAPPED,
    running_stack,
)
from tests.fakes.discord import FakeDiscord
from tests.support import Stack
from tests.test_trust_files import _publish_raw

DISCORD = {"interface": "discord_bot"}


# ----------------------------------------------------------------------------- configuration
def test_a_malformed_webhook_list_turns_discord_off_without_showing_a_webhook(tmp_path: Path) -> None:
    """The reason names the entry by its number: the entry itself is a credential. Its webhook is still
    redacted from logs, and a bot token turns Discord on whatever the list holds (it is not used)."""
    from rekku.interfaces.discord import DiscordBot
    from rekku.logs import configured_secrets
    from rekku.settings import Settings

    hooks = "123=https://d.example/api/webhooks/1/tokA,https://d.example/api/webhooks/2/tokB"
    settings = Settings(home=tmp_path, discord_webhook_urls=hooks)
    assert DiscordBot.unavailable_reason(settings) == "DISCORD_WEBHOOK_URLS: entry 2 is not channel_id=https://webhook-url"
    assert {"tokA", "tokB", "/api/webhooks/2/tokB"} <= configured_secrets(settings)
    with_bot = Settings(home=tmp_path, discord_webhook_urls=hooks, discord_bot_token="bot-token-1")
    assert DiscordBot.unavailable_reason(with_bot) is None and "bot-token-1" in configured_secrets(with_bot)
    good = Settings(home=tmp_path, discord_webhook_urls="1=https://a.example/h/1/t1,\n 2 = https://a.example/h/2/t2")
    assert good.discord_webhooks == {"1": "https://a.example/h/1/t1", "2": "https://a.example/h/2/t2"}


# ----------------------------------------------------------------------------- helpers and the bot stack
def _channel() -> str:
    """A fresh snowflake-like channel id."""
    return str(10**17 + uuid.uuid4().int % 10**17)


def words(n: int) -> str:
    return " ".join(f"word{i:05d}" for i in range(n))


def _artifact(stack: Stack, suffix: str = ".mp3") -> tuple[str, bytes]:
    """An artifact in the stack's artifact directory (REKKU_HOME/artifacts): its name and bytes."""
    directory = stack.home / "artifacts"
    directory.mkdir(exist_ok=True)
    name, content = f"{uuid.uuid4()}{suffix}", b"ID3 fake speech " + os.urandom(16)
    (directory / name).write_bytes(content)
    return name, content


def _message_posts(discord: FakeDiscord) -> list:
    """Every message post the fake received (accepted or not), oldest first."""
    return [r for r in discord.requests if r.method == "POST"]


@pytest.fixture
def discord(fakes: dict) -> FakeDiscord:
    fakes["discord"].reset()
    return fakes["discord"]


@pytest.fixture(scope="module")
def bot_stack(tmp_path_factory: pytest.TempPathFactory, fakes: dict) -> Iterator[Stack]:
    """SQLite, an ingress and an io worker, logging at DEBUG, with the Discord bot against the fake.
    DISCORD_WEBHOOK_URL is set too: with a bot token it is not used."""
    fake = fakes["discord"]
    env = {"DISCORD_BOT_TOKEN": fake.bot_token, "DISCORD_API_URL": fake.api_url,
           "DISCORD_WEBHOOK_URL": fake.webhook_url, "REKKU_LOG_LEVEL": "DEBUG", "REKKU_INTERFACE_TIMEOUT": "5"}
    with running_stack("discord-bot", tmp_path_factory.mktemp("discord-bot"), "sqlite", env,
                       [("io", 2, "discord-io")]) as stack:
        yield stack


# ----------------------------------------------------------------------------- the bot
def test_the_bot_posts_to_the_target_channel_with_its_token_and_the_reply(bot_stack: Stack,
                                                                        discord: FakeDiscord) -> None:
    channel = _channel()
    discord.add_channel(channel)
    run = bot_stack.run("message_discord_bot", {"text": "hello", "target": channel, "reply_to_message_id": "77"},
                        {**DISCORD, "chat_id": _channel()})
    assert run["status"] == "succeeded", run
    [message] = discord.messages(channel)
    assert message.via == "bot" and message.content == "hello" and message.reply_to == "77"
    assert message.request.path == f"/api/v10/channels/{channel}/messages"
    assert message.request.headers["authorization"] == f"Bot {discord.bot_token}"
    assert run["result"]["sent"] == [message.id]
    assert [r for r in discord.requests if r.path.startswith("/api/webhooks/")] == []  # no webhook with a bot


def test_the_bot_posts_into_a_thread_split_at_2000_characters(bot_stack: Stack, discord: FakeDiscord) -> None:
    """A thread is a channel: the message goes to the thread's id, never to its parent. The thread
    comes from the payload, or from the request when the action answers its own chat."""
    channel, thread = _channel(), _channel()
    discord.add_channel(channel, thread)
    text = words(300)  # 2,999 characters: two Discord messages
    run = bot_stack.run("message_discord_bot", {"text": text, "target": channel, "thread_id": thread})
    assert run["status"] == "succeeded", run
    parts = [m.content for m in discord.messages(thread)]
    assert len(parts) == 2 and all(len(p) <= 2000 for p in parts) and " ".join(parts) == text
    here = bot_stack.run("message_discord_bot", {"text": "in the thread"},
                         {**DISCORD, "chat_id": channel, "thread_id": thread})
    assert here["status"] == "succeeded", here
    assert discord.messages(thread)[-1].content == "in the thread"
    assert discord.messages(channel) == []


def test_the_bot_fails_clearly_for_a_channel_it_cannot_reach(bot_stack: Stack, discord: FakeDiscord) -> None:
    unknown = bot_stack.run("message_discord_bot", {"text": "hi", "target": _channel()})
    assert unknown["status"] == "failed" and "Unknown Channel" in unknown["error"], unknown
    assert unknown["attempts"] == 1  # refused for good, not retried
    not_an_id = bot_stack.run("message_discord_bot", {"text": "hi", "target": "../../users/@me"})
    assert not_an_id["status"] == "failed" and "is not one" in not_an_id["error"], not_an_id
    assert len(_message_posts(discord)) == 1 and discord.posted == {}  # only the one Discord refused


def test_a_429_is_waited_out_and_the_message_delivered_once(bot_stack: Stack, discord: FakeDiscord) -> None:
    channel = _channel()
    discord.add_channel(channel)
    discord.rate_limit(1, retry_after=1.5)
    run = bot_stack.run("message_discord_bot", {"text": "patience", "target": channel}, timeout=40)
    assert run["status"] == "succeeded", run
    assert run["attempts"] == 2
    limited, delivered = _message_posts(discord)
    assert delivered.at - limited.at >= 1.4  # Discord's retry_after, not the default backoff
    assert [m.content for m in discord.messages(channel)] == ["patience"]


def test_the_bot_uploads_an_artifact_as_a_file_and_posts_a_url_as_a_link(bot_stack: Stack,
                                                                       discord: FakeDiscord) -> None:
    channel = _channel()
    discord.add_channel(channel)
    name, content = _artifact(bot_stack)
    run = bot_stack.run("audio_discord_bot", {"audio": name, "target": channel})
    assert run["status"] == "succeeded", run
    url = "https://files.example/song.mp3"
    linked = bot_stack.run("audio_discord_bot", {"audio": url, "target": channel})
    assert linked["status"] == "succeeded", linked
    upload, link = discord.messages(channel)
    assert upload.files == [("files[0]", name, content)]
    assert json.loads(upload.request.data["payload_json"])["attachments"] == [{"id": 0, "filename": name}]
    assert link.content == url and link.files == []


def test_a_server_file_as_discord_audio_is_refused(bot_stack: Stack, discord: FakeDiscord) -> None:
    """At the ingress (422, nothing queued), and again by the worker for a message that skipped it."""
    channel = _channel()
    discord.add_channel(channel)
    for path in ("/etc/passwd", "../api_token", "file:///etc/passwd"):
        answer = bot_stack.submit([{"type": "audio_discord_bot", "payload": {"audio": path, "target": channel}}])
        assert not answer["accepted"], answer
        assert "Field 'audio' of action 'audio_discord_bot' was refused" in answer["rejected"][0]["errors"][0]
    action_id = _publish_raw(bot_stack, "audio_discord_bot", {"audio": "/proc/self/environ", "target": channel},
                             DISCORD)
    run = bot_stack.wait_action(action_id)
    assert run["status"] == "failed" and "was refused" in run["error"] and run["attempts"] == 1, run
    assert _message_posts(discord) == []


def test_the_bot_token_is_in_no_log(bot_stack: Stack, discord: FakeDiscord) -> None:
    """The stack logs at DEBUG: urllib3 writes every request line, and Celery every task's arguments.
    The token goes to Discord in each request's Authorization header; a message quoting it (a steered
    model could write one) puts it in the task's arguments; it appears in no log of the stack."""
    channel = _channel()
    discord.add_channel(channel)
    run = bot_stack.run("message_discord_bot", {"text": f"quiet {discord.bot_token}", "target": channel})
    assert run["status"] == "succeeded", run
    assert discord.messages(channel)[0].request.headers["authorization"] == f"Bot {discord.bot_token}"
    logs = sorted((bot_stack.home / "logs").glob("*.log"))
    io_log = next(p for p in logs if "worker-io" in p.name).read_text(errors="replace")
    assert f'"POST /api/v10/channels/{channel}/messages HTTP/1.1" 200' in io_log  # the request line, logged
    assert "'text': 'quiet ***'" in io_log  # the task's arguments, logged and redacted
    for path in logs:
        assert discord.bot_token not in path.read_text(errors="replace"), path.name


# ----------------------------------------------------------------------------- webhooks
def _webhook_path(discord: FakeDiscord, channel: str) -> str:
    """The path of the channel's webhook the chat stack uses (the newest: a restarted stack makes new ones)."""
    return [path for path, owner in discord.webhooks.items() if owner == channel][-1]


def test_each_channel_gets_its_own_webhook(chat_stack: Stack, discord: FakeDiscord) -> None:
    first, second = DISCORD_CHANNELS
    one = chat_stack.run("message_discord_bot", {"text": "to one", "target": first})
    two = chat_stack.run("message_discord_bot", {"text": "to two", "thread_id": "th2"},
                         {**DISCORD, "chat_id": second})
    assert one["status"] == two["status"] == "succeeded", (one, two)
    [to_one] = discord.messages(first)
    [to_two] = discord.messages("th2")  # a thread of the second channel, through that channel's webhook
    assert to_one.via == to_two.via == "webhook" and (to_one.content, to_two.content) == ("to one", "to two")
    assert to_one.request.path == _webhook_path(discord, first)
    assert to_two.request.path == _webhook_path(discord, second)
    assert to_two.request.query == {"wait": "true", "thread_id": "th2"}


def test_without_a_target_from_no_discord_chat_the_default_webhooks_channel_gets_it(
        chat_stack: Stack, discord: FakeDiscord) -> None:
    run = chat_stack.run("message_discord_bot", {"text": "to the default channel"})
    assert run["status"] == "succeeded", run
    default = discord.webhooks[discord.path]
    assert [(m.content, m.request.path) for m in discord.messages(default)] == [("to the default channel",
                                                                                  discord.path)]


def test_a_channel_no_webhook_reaches_fails_naming_what_is_configured(chat_stack: Stack,
                                                                      discord: FakeDiscord) -> None:
    channel = _channel()
    run = chat_stack.run("message_discord_bot", {"text": "lost?", "target": channel})
    assert run["status"] == "failed", run
    assert f"No Discord webhook reaches channel '{channel}'" in run["error"], run["error"]
    assert f"DISCORD_WEBHOOK_URLS has channels {', '.join(sorted([*DISCORD_CHANNELS, DISCORD_MISMAPPED]))}" \
        in run["error"] and "DISCORD_WEBHOOK_URL posts to channel chan" in run["error"], run["error"]
    assert run["attempts"] == 1 and _message_posts(discord) == [] and discord.posted == {}


def test_a_webhook_of_another_channel_is_refused(chat_stack: Stack, discord: FakeDiscord) -> None:
    """DISCORD_WEBHOOK_URLS gives a channel the webhook of another: Discord says where it posts, and
    nothing is sent there."""
    run = chat_stack.run("message_discord_bot", {"text": "misrouted?", "target": DISCORD_MISMAPPED})
    assert run["status"] == "failed", run
    assert f"posts to channel {DISCORD_ELSEWHERE}" in run["error"], run["error"]
    assert _message_posts(discord) == [] and discord.posted == {}


def test_a_webhook_uploads_an_artifact_as_a_file(chat_stack: Stack, discord: FakeDiscord) -> None:
    channel = DISCORD_CHANNELS[0]
    name, content = _artifact(chat_stack)
    run = chat_stack.run("audio_discord_bot", {"audio": name, "target": channel})
    assert run["status"] == "succeeded", run
    [upload] = discord.messages(channel)
    assert upload.via == "webhook" and upload.files == [("files[0]", name, content)]
    assert upload.request.path == _webhook_path(discord, channel)

