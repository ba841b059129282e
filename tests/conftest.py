"""Fixtures that start real services: Redis and MariaDB must be running (`make test` starts them)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.support import (
    MARIADB,
    Stack,
    claim_redis_db,
    create_mariadb,
    drop_mariadb,
    release_redis_db,
)

#: Trainer used by the stacks' TRAINER_IDS.
TRAINER = {"interface": "telegram_bot", "user_id": "42"}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Service tests never skip: a missing service is a failure with the command that fixes it."""
    problems = []
    try:
        redis.Redis("127.0.0.1", 6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        problems.append(f"Redis at 127.0.0.1:6379 is not reachable ({exc}); `make services` starts it")
    try:
        import MySQLdb

        MySQLdb.connect(**MARIADB, connect_timeout=3).close()
    except Exception as exc:
        problems.append(f"MariaDB at 127.0.0.1:3306 is not reachable ({exc}); `make services` starts it")
    if problems:
        pytest.exit("\n".join(problems), returncode=3)


@pytest.fixture(scope="session")
def tmp_home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rekku-test-"))
    yield path
    if not os.environ.get("REKKU_KEEP_TEST_HOME"):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_stack(name: str, home: Path, database: str, extra_env: dict[str, str],
                  workers: list[tuple[str, int, str]]) -> Iterator[Stack]:
    """An ingress and ``workers`` ((pool, concurrency, node) each) on their own Redis db number and
    SQLite file or MariaDB database, all removed afterwards."""
    db_number = claim_redis_db()
    db_name = None
    if database == "mariadb":
        db_name, url = create_mariadb()
    else:
        url = f"sqlite:///{home / 'rekku.db'}"
    stack = Stack(name, home, url, db_number, extra_env=extra_env)
    try:
        stack.start_ingress()
        for pool, concurrency, node in workers:
            stack.start_worker(pool, concurrency=concurrency, node=node)
        yield stack
    finally:
        stack.stop()
        release_redis_db(db_number)
        if db_name:
            drop_mariadb(db_name)


def _home(tmp_home: Path, name: str) -> Path:
    home = tmp_home / name
    home.mkdir()
    return home


@pytest.fixture(scope="session", params=["sqlite", "mariadb"])
def stack(request: pytest.FixtureRequest, tmp_home: Path) -> Iterator[Stack]:
    """An ingress and a default-pool worker, on SQLite and again on MariaDB."""
    kind = request.param
    with running_stack(kind, _home(tmp_home, kind), kind, {"TRAINER_IDS": "telegram_bot:42,webhook:7000"},
                       [("default", 2, f"{kind}-main")]) as running:
        yield running


# ----------------------------------------------------------------------------- interfaces (issue 3)
#: Bot token the fake Telegram API accepts, and the webhook's signing secret, in the chat stack.
TELEGRAM_TOKEN = "123456:fake-token"
WEBHOOK_SECRET = "webhook-test-secret"


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict]:
    """Fake Telegram Bot API, Discord webhook and webhook receiver, on 127.0.0.1."""
    from tests.fakes.discord import FakeDiscord
    from tests.fakes.telegram import FakeTelegram
    from tests.fakes.webhook import FakeWebhookReceiver

    servers = {"telegram": FakeTelegram(TELEGRAM_TOKEN).start(), "discord": FakeDiscord().start(),
               "webhook": FakeWebhookReceiver().start()}
    yield servers
    servers["telegram"].release.set()
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def chat_stack(tmp_home: Path, fakes: dict) -> Iterator[Stack]:
    """MariaDB, an ingress, a default and an io worker, with every interface configured against the fakes."""
    env = {"TRAINER_IDS": "telegram_bot:42", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
           "TELEGRAM_API_URL": fakes["telegram"].url, "DISCORD_WEBHOOK_URL": fakes["discord"].webhook_url,
           "REKKU_WEBHOOK_URL": fakes["webhook"].url + "/hook", "REKKU_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "REKKU_INTERFACE_TIMEOUT": "5"}
    with running_stack("chat", _home(tmp_home, "chat"), "mariadb", env,
                       [("default", 2, "chat-main"), ("io", 4, "chat-io")]) as stack:
        yield stack


@pytest.fixture
def tg(fakes: dict) -> Iterator[object]:
    """The fake Telegram API, emptied for this test."""
    fakes["telegram"].reset()
    yield fakes["telegram"]
    fakes["telegram"].release.set()


# ----------------------------------------------------------------------------- memory and prompt (issue 4)
@pytest.fixture(scope="session")
def wttr() -> Iterator[object]:
    """The fake wttr.in (tests/fakes/wttr.py), answering a clear +21°C until told otherwise."""
    from tests.fakes.wttr import FakeWttr

    fake = FakeWttr().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def memory_stack(tmp_home: Path, wttr: object) -> Iterator[Stack]:
    """MariaDB, an ingress, a default and an io worker and beat; weather from the fake wttr.in
    (refreshed every 1.2 s), a 1 s injection timeout, and the misbehaving test injectors switched on."""
    env = {"TRAINER_IDS": "telegram_bot:42", "WEATHER_URL": wttr.url, "WEATHER_FETCH_TIME": "0.02",
           "PROMPT_LOCATION": "Rome", "TZ": "Europe/Rome", "REKKU_INJECTION_TIMEOUT": "1",
           "REKKU_TEST_SLOW_INJECTION": "1", "REKKU_TEST_FAILING_INJECTION": "1"}
    with running_stack("memory", _home(tmp_home, "memory"), "mariadb", env,
                       [("default", 2, "memory-main"), ("io", 2, "memory-io")]) as stack:
        stack.spawn("beat", log_name="beat")
        yield stack


# ----------------------------------------------------------------------------- selenium and reddit (issue 7)
#: The fake Reddit app and account the plugin stack is configured with.
REDDIT_ACCOUNT = {"client_id": "fake-client", "secret": "fake-secret", "username": "rekku_bot", "password": "pw"}
#: The speech action's time limit in the plugin stack (a hung page fails after it plus Celery's grace).
SPEECH_TIME_LIMIT = 6


@pytest.fixture(scope="session")
def tts_site() -> Iterator[object]:
    """The fake text-to-speech site (tests/fakes/tts_site.py), for real headless Chromium."""
    from tests.fakes.tts_site import FakeTTSSite

    site = FakeTTSSite().start()
    yield site
    site.stop()


@pytest.fixture(scope="session")
def fake_reddit() -> Iterator[object]:
    from tests.fakes.reddit import FakeReddit

    fake = FakeReddit(**REDDIT_ACCOUNT).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def plugin_stack(tmp_home: Path, fakes: dict, tts_site: object, fake_reddit: object) -> Iterator[Stack]:
    """SQLite, an ingress, a default, an io and a selenium worker (one browser), against the fake
    text-to-speech site, fake Telegram and fake Reddit; short browser timeouts."""
    home = _home(tmp_home, "plugins")
    env = {"TRAINER_IDS": "telegram_bot:42", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
           "TELEGRAM_API_URL": fakes["telegram"].url, "REKKU_INTERFACE_TIMEOUT": "5",
           "ELEVENLABS_URL": tts_site.url, "ELEVENLABS_EMAIL": tts_site.email, "ELEVENLABS_PASSWORD": tts_site.password,
           "ELEVENLABS_GENERATE_TIMEOUT": "2", "ELEVENLABS_DOWNLOAD_TIMEOUT": "2",
           "ELEVENLABS_TIME_LIMIT": str(SPEECH_TIME_LIMIT), "REKKU_ARTIFACT_DIR": str(home / "artifacts"),
           "REKKU_ARTIFACT_MAX_BYTES": "100000", "REKKU_SELENIUM_HEADLESS": "1",
           "REDDIT_CLIENT_ID": REDDIT_ACCOUNT["client_id"], "REDDIT_CLIENT_SECRET": REDDIT_ACCOUNT["secret"],
           "REDDIT_USERNAME": REDDIT_ACCOUNT["username"], "REDDIT_PASSWORD": REDDIT_ACCOUNT["password"],
           "REDDIT_URL": fake_reddit.url, "REDDIT_OAUTH_URL": fake_reddit.url, "REDDIT_RATE_LIMIT": "600/m"}
    with running_stack("plugins", home, "sqlite", env, [("default", 1, "plugins-main"), ("io", 4, "plugins-io"),
                                                        ("selenium", 1, "plugins-browser")]) as stack:
        yield stack


# ----------------------------------------------------------------------------- events (issue 5)
@pytest.fixture(scope="session")
def event_stack(tmp_home: Path, fakes: dict) -> Iterator[Stack]:
    """MariaDB, an ingress, a default worker, two io workers and two beat processes ticking every second;
    Telegram and the webhook against the fakes; a lost delivery is enqueued again after 4 s."""
    home = _home(tmp_home, "events")
    env = {"TRAINER_IDS": "telegram_bot:42", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "TZ": "Europe/Rome",
           "TELEGRAM_API_URL": fakes["telegram"].url, "REKKU_WEBHOOK_URL": fakes["webhook"].url + "/hook",
           "REKKU_WEBHOOK_SECRET": WEBHOOK_SECRET, "REKKU_INTERFACE_TIMEOUT": "5",
           "EVENT_TICK_SECONDS": "1", "REKKU_EVENT_REDELIVER_SECONDS": "4"}
    with running_stack("events", home, "mariadb", env, [("default", 2, "events-main"), ("io", 4, "events-io1"),
                                                        ("io", 4, "events-io2")]) as stack:
        for name in ("beat1", "beat2"):  # two beats at once, each with its own schedule file
            (home / name).mkdir()
            stack.spawn("beat", log_name=name, REKKU_HOME=str(home / name))
        yield stack
