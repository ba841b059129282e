"""Fixtures that start real services: Redis and MariaDB must be running (`make test` starts them)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest
import redis

from tests.support import (
    MARIADB,
    REDIS_HOST,
    REDIS_PORT,
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
        redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        problems.append(f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable ({exc}); `make services` starts it")
    try:
        import MySQLdb

        MySQLdb.connect(**MARIADB, connect_timeout=3).close()
    except Exception as exc:
        problems.append(f"MariaDB at 127.0.0.1:3306 is not reachable ({exc}); `make services` starts it")
    if problems:
        pytest.exit("\n".join(problems), returncode=3)


# ----------------------------------------------------------------------------- shared stacks, and xdist
#: The session's shared stacks: the fixture that asks for each, and its key in :class:`SharedStacks`
#: (``stack`` is parametrized: "standard:sqlite" and "standard:mariadb").
SHARED = {"chat_stack": "chat", "memory_stack": "memory", "plugin_stack": "plugins", "event_stack": "events"}
#: Test files that share a stack of their own and run on one xdist worker, one after the other (with
#: ``-n N --dist loadgroup``; other files are each a group of their own): that stack starts once in
#: the run, not once per worker.
XDIST_GROUPS = {
    "chat-and-events": ("test_chat_plugins", "test_interfaces", "test_discord", "test_trust_files",
                        "test_trust_identity", "test_event_delivery"),
    "memory": ("test_bio", "test_diary", "test_history", "test_prompt", "test_weather"),
    "plugins": ("test_reddit", "test_selenium"),
}


#: Seconds each of the heaviest groups took in all (setup, call and teardown of its tests) on a 2-core
#: machine, ``-n 3``: with ``--dist loadgroup`` they are handed out first, heaviest first, and the other
#: groups after them by their number of tests (xdist's own order). Handed out in file order instead, a
#: heavy file that comes late (test_sentinel, test_worker_restart) kept one worker busy while the others
#: had nothing left. Only the order depends on these figures: a stale one costs balance, never a test.
GROUP_SECONDS = {
    "tests/test_adversarial_restart.py": 198, "tests/test_reliability.py": 188, "chat-and-events": 140,
    "tests/test_receive.py": 113, "tests/test_feed_push.py": 112, "memory": 75, "tests/test_worker_restart.py": 74,
    "tests/test_end_to_end.py": 62, "plugins": 58, "tests/test_first_day_cli.py": 56,
    "tests/test_selenium_remote.py": 50, "tests/test_retention.py": 48, "tests/test_sentinel.py": 48,
    "tests/test_actions_list.py": 45, "tests/test_event_dispatch.py": 45, "tests/test_first_day.py": 45,
    "tests/test_client.py": 44, "tests/test_trust_infra.py": 44, "tests/test_migration_lock.py": 37,
    "tests/test_cli.py": 35, "tests/test_ops_files.py": 35, "tests/test_openapi_fuzz.py": 30,
    "tests/test_event_fastpath.py": 31, "tests/test_metrics_multiprocess.py": 31, "tests/test_signing.py": 29,
    "tests/test_held.py": 27, "tests/test_terminal.py": 25, "tests/test_plugin_packages.py": 24,
    "tests/test_model_loop.py": 23, "tests/test_rekku_up.py": 20,
}


def xdist_group(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    module = Path(path).stem
    return next((name for name, modules in XDIST_GROUPS.items() if module in modules), path)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup``: whole groups of files (:data:`XDIST_GROUPS`, else one file) to one worker, in
    collection order. xdist's own loadgroup reads the group from a suffix it appends to each node id,
    which pytest 9.2 no longer lets it do (pytest-dev/pytest-xdist#1386): every test went anywhere."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        weighed = False

        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

        def _assign_work_unit(self, node: object) -> None:
            if not self.weighed:  # the queue is complete by the first assignment: heaviest groups first
                self.weighed = True
                order = sorted(self.workqueue.items(), key=lambda unit: (-GROUP_SECONDS.get(unit[0], 0), -len(unit[1])))
                self.workqueue.clear()
                self.workqueue.update(order)
            super()._assign_work_unit(node)

    return FileGroupScheduling(config, log)


def _shared_keys(item: pytest.Item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    keys = {SHARED[name] for name in names if name in SHARED}
    if "stack" in names:
        kind = getattr(item, "callspec", None) and item.callspec.params.get("stack")
        keys |= {f"standard:{kind}"} if kind else {"standard:sqlite", "standard:mariadb"}
    return keys


class SharedStacks:
    """The shared stacks of this process: each started when a test first asks for it, and stopped
    after the last test that needs it (in collection order, the order tests run in, serially or on an
    xdist worker with --dist loadfile or loadgroup) instead of at the end of the session. A run holds
    fewer Redis test dbs at once that way (13 for every run on the machine), and fewer processes.
    A stack asked for again after it stopped starts again. (On an xdist worker the standard stacks
    stop at the end of the session instead: see pytest_collection_finish.)"""

    def __init__(self) -> None:
        self.running: dict[str, tuple[Stack, ExitStack]] = {}
        self.last_user: dict[str, str] = {}

    def get(self, key: str, start: Callable[[], AbstractContextManager[Stack]]) -> Stack:
        if key not in self.running:
            exits = ExitStack()
            self.running[key] = (exits.enter_context(start()), exits)
        return self.running[key][0]

    def stop(self, key: str) -> None:
        _, exits = self.running.pop(key, (None, None))
        if exits is not None:
            exits.close()

    def close(self) -> None:
        for key in reversed(list(self.running)):
            self.stop(key)


#: This process's shared stacks (each xdist worker has its own).
SHARED_STACKS = SharedStacks()


def pytest_collection_finish(session: pytest.Session) -> None:
    # On an xdist worker the standard stacks (the ``stack`` fixture, asked for by files of many groups)
    # stay up until the session ends: the worker runs only some groups, in the order the scheduler hands
    # them out, not in collection order, so the last user in collection order may run before other users
    # on this worker, and stopping there made the next one start the whole stack again (5 to 10 s, and
    # as long to stop). The other shared stacks serve the files of one group (XDIST_GROUPS), which run
    # in collection order on one worker: they still stop after their last user.
    on_xdist_worker = hasattr(session.config, "workerinput")
    for item in session.items:
        for key in _shared_keys(item):
            if not (on_xdist_worker and key.startswith("standard:")):
                SHARED_STACKS.last_user[key] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)  # the test's own fixtures first (a module's may still use a stack)
    finally:
        for key, nodeid in list(SHARED_STACKS.last_user.items()):
            if nodeid == item.nodeid:
                SHARED_STACKS.stop(key)


def pytest_sessionfinish(session: pytest.Session) -> None:
    SHARED_STACKS.close()


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
        stack.start_workers(workers)
        yield stack
    finally:
        stack.stop()
        release_redis_db(db_number)
        if db_name:
            drop_mariadb(db_name)


@pytest.fixture(scope="session")
def shared_stacks(tmp_home: Path) -> Iterator[SharedStacks]:
    """This process's :class:`SharedStacks`; the ones still running stop with the session, before its
    temporary home goes."""
    try:
        yield SHARED_STACKS
    finally:
        SHARED_STACKS.close()


def _home(tmp_home: Path, name: str) -> Path:
    home, n = tmp_home / name, 1
    while home.exists():  # a shared stack started again
        n += 1
        home = tmp_home / f"{name}-{n}"
    home.mkdir()
    return home


@pytest.fixture(scope="module", params=["sqlite", "mariadb"])
def stack(request: pytest.FixtureRequest, tmp_home: Path, shared_stacks: SharedStacks) -> Stack:
    """An ingress and a default-pool worker, on SQLite and again on MariaDB (shared: see SharedStacks)."""
    kind = request.param
    return shared_stacks.get(f"standard:{kind}", lambda: running_stack(
        kind, _home(tmp_home, kind), kind, {"TRAINER_IDS": "telegram_bot:42,webhook:7000"},
        [("default", 2, f"{kind}-main")]))


# ----------------------------------------------------------------------------- interfaces (issue 3)
#: Bot token the fake Telegram API accepts, and the webhook's signing secret, in the chat stack.
TELEGRAM_TOKEN = "123456:fake-token"
WEBHOOK_SECRET = "webhook-test-secret"


#: Discord channels the chat stack reaches through DISCORD_WEBHOOK_URLS (each with a webhook of its own on
#: the fake), and one whose entry there gives it the webhook of another channel (DISCORD_ELSEWHERE).
DISCORD_CHANNELS = ("3001", "3002")
DISCORD_MISMAPPED, DISCORD_ELSEWHERE = "3003", "3999"


def discord_webhook_urls(discord: object) -> str:
    """DISCORD_WEBHOOK_URLS for the chat stack, with those webhooks made on the fake Discord."""
    entries = [f"{channel}={discord.add_webhook(channel)}" for channel in DISCORD_CHANNELS]
    return ",".join(entries + [f"{DISCORD_MISMAPPED}={discord.add_webhook(DISCORD_ELSEWHERE)}"])


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict]:
    """Fake Telegram Bot API, Discord (webhooks and bot API) and webhook receiver, on 127.0.0.1."""
    from tests.fakes.discord import FakeDiscord
    from tests.fakes.telegram import FakeTelegram
    from tests.fakes.webhook import FakeWebhookReceiver

    servers = {"telegram": FakeTelegram(TELEGRAM_TOKEN).start(), "discord": FakeDiscord().start(),
               "webhook": FakeWebhookReceiver().start()}
    yield servers
    servers["telegram"].release.set()
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def chat_stack(tmp_home: Path, fakes: dict, shared_stacks: SharedStacks) -> Stack:
    """MariaDB, an ingress, a default and an io worker, with every interface configured against the fakes
    (shared: see SharedStacks)."""
    return shared_stacks.get("chat", lambda: _chat_stack(_home(tmp_home, "chat"), fakes))


def _chat_stack(home: Path, fakes: dict) -> AbstractContextManager[Stack]:
    env = {"TRAINER_IDS": "telegram_bot:42", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
           "TELEGRAM_API_URL": fakes["telegram"].url, "DISCORD_WEBHOOK_URL": fakes["discord"].webhook_url,
           "DISCORD_WEBHOOK_URLS": discord_webhook_urls(fakes["discord"]),  # made once per start of the stack
           "REKKU_WEBHOOK_URL": fakes["webhook"].url + "/hook", "REKKU_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "REKKU_INTERFACE_TIMEOUT": "5"}
    return running_stack("chat", home, "mariadb", env, [("default", 2, "chat-main"), ("io", 4, "chat-io")])


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


@contextmanager
def _with_beats(stack_cm: AbstractContextManager[Stack], *beats: str) -> Iterator[Stack]:
    """``stack_cm``'s stack, with a beat process per name in ``beats`` (each in its own REKKU_HOME below
    the stack's when there are several, as two beats need their own schedule files)."""
    with stack_cm as stack:
        for name in beats:
            if len(beats) == 1:
                stack.spawn("beat", log_name=name)
            else:
                (stack.home / name).mkdir()
                stack.spawn("beat", log_name=name, REKKU_HOME=str(stack.home / name))
        yield stack


@pytest.fixture(scope="module")
def memory_stack(tmp_home: Path, wttr: object, shared_stacks: SharedStacks) -> Stack:
    """MariaDB, an ingress, a default and an io worker and beat; weather from the fake wttr.in
    (refreshed every 1.2 s), a 1 s injection timeout, and the misbehaving test injectors switched on
    (shared: see SharedStacks)."""
    env = {"TRAINER_IDS": "telegram_bot:42", "WEATHER_URL": wttr.url, "WEATHER_FETCH_TIME": "0.02",
           "PROMPT_LOCATION": "Rome", "TZ": "Europe/Rome", "REKKU_INJECTION_TIMEOUT": "1",
           "REKKU_TEST_SLOW_INJECTION": "1", "REKKU_TEST_FAILING_INJECTION": "1"}
    return shared_stacks.get("memory", lambda: _with_beats(running_stack(
        "memory", _home(tmp_home, "memory"), "mariadb", env, [("default", 2, "memory-main"), ("io", 2, "memory-io")]),
        "beat"))


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


@pytest.fixture(scope="module")
def plugin_stack(tmp_home: Path, fakes: dict, tts_site: object, fake_reddit: object,
                 shared_stacks: SharedStacks) -> Stack:
    """SQLite, an ingress, a default, an io and a selenium worker (one browser), against the fake
    text-to-speech site, fake Telegram and fake Reddit; short browser timeouts (shared: see SharedStacks)."""
    return shared_stacks.get("plugins", lambda: _plugin_stack(_home(tmp_home, "plugins"), fakes, tts_site,
                                                              fake_reddit))


def _plugin_stack(home: Path, fakes: dict, tts_site: object, fake_reddit: object) -> AbstractContextManager[Stack]:
    env = {"TRAINER_IDS": "telegram_bot:42", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN,
           "TELEGRAM_API_URL": fakes["telegram"].url, "REKKU_INTERFACE_TIMEOUT": "5",
           "ELEVENLABS_URL": tts_site.url, "ELEVENLABS_EMAIL": tts_site.email, "ELEVENLABS_PASSWORD": tts_site.password,
           "ELEVENLABS_GENERATE_TIMEOUT": "2", "ELEVENLABS_DOWNLOAD_TIMEOUT": "2",
           "ELEVENLABS_TIME_LIMIT": str(SPEECH_TIME_LIMIT), "REKKU_ARTIFACT_DIR": str(home / "artifacts"),
           "REKKU_ARTIFACT_MAX_BYTES": "100000", "REKKU_SELENIUM_HEADLESS": "1",
           "REDDIT_CLIENT_ID": REDDIT_ACCOUNT["client_id"], "REDDIT_CLIENT_SECRET": REDDIT_ACCOUNT["secret"],
           "REDDIT_USERNAME": REDDIT_ACCOUNT["username"], "REDDIT_PASSWORD": REDDIT_ACCOUNT["password"],
           "REDDIT_URL": fake_reddit.url, "REDDIT_OAUTH_URL": fake_reddit.url, "REDDIT_RATE_LIMIT": "600/m"}
    return running_stack("plugins", home, "sqlite", env, [("default", 1, "plugins-main"), ("io", 4, "plugins-io"),
                                                          ("selenium", 1, "plugins-browser")])


# ----------------------------------------------------------------------------- events (issue 5)
@pytest.fixture(scope="module")
def event_stack(tmp_home: Path, fakes: dict, shared_stacks: SharedStacks) -> Stack:
    """MariaDB, an ingress, a default worker, two io workers and two beat processes ticking every second;
    Telegram and the webhook against the fakes; a lost delivery is enqueued again after 4 s (shared: see
    SharedStacks)."""
    env = {"TRAINER_IDS": "telegram_bot:42", "TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "TZ": "Europe/Rome",
           "TELEGRAM_API_URL": fakes["telegram"].url, "REKKU_WEBHOOK_URL": fakes["webhook"].url + "/hook",
           "REKKU_WEBHOOK_SECRET": WEBHOOK_SECRET, "REKKU_INTERFACE_TIMEOUT": "5",
           "EVENT_TICK_SECONDS": "1", "REKKU_EVENT_REDELIVER_SECONDS": "4"}
    return shared_stacks.get("events", lambda: _with_beats(running_stack(
        "events", _home(tmp_home, "events"), "mariadb", env,
        [("default", 2, "events-main"), ("io", 4, "events-io1"), ("io", 4, "events-io2")]), "beat1", "beat2"))


#: The real default grace (an hour's visibility timeout stays too): recovery must not rely on them.
RESTART_ENV = {"TRAINER_IDS": "telegram_bot:42", "REKKU_RECONCILE_GRACE": "60"}


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """``make(**env)``: MariaDB and an ingress with ``env`` on their own Redis db, no workers yet
    (tests that kill and restart workers start their own); all removed afterwards."""
    made: list[tuple[Stack, str]] = []

    def make(**env: str) -> Stack:
        db_name, url = create_mariadb()
        stack = Stack("restart", tmp_path, url, claim_redis_db(), extra_env={**RESTART_ENV, **env})
        made.append((stack, db_name))
        stack.start_ingress()
        return stack

    yield make
    for stack, db_name in made:
        stack.stop()
        release_redis_db(stack.redis_db)
        drop_mariadb(db_name)
