"""The core's settings object, and the rule every settings class follows.

Code never reads ``os.environ`` for configuration: the core asks :func:`get_settings` (or receives a
``Settings``), a plugin asks its own settings class (rekku/plugin_settings.py). Both are
:class:`DocumentedSettings`, so one rule decides what configures Rekku (docs/contracts.md §6), and
`.env.example` can be checked against the fields of all of them.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Restricted-action policies, as upstream's ``RESTRICT_ACTIONS``.
RESTRICT_POLICIES = ("on", "trainer_only", "off")


def location_of(tz_name: str, configured: str | None) -> str:
    """PROMPT_LOCATION, else the city part of the IANA zone ("Europe/Rome" → "Rome")."""
    if configured and configured.strip():
        return configured.strip()
    return tz_name.rsplit("/", 1)[-1].replace("_", " ")


def _env(name: str, *more: str) -> AliasChoices:
    return AliasChoices(name, *more)


def _field_names_to_aliases(cls: type[BaseSettings], values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments given by field name (``home=``), renamed to the field's documented variable
    (``REKKU_HOME=``); everything else (aliases, ``_env_file`` …) unchanged."""
    renamed: dict[str, Any] = {}
    for key, value in values.items():
        field = cls.model_fields.get(key)
        alias = field.validation_alias if field is not None else None
        if isinstance(alias, AliasChoices):
            key = str(alias.choices[0])
        elif isinstance(alias, str):
            key = alias
        renamed[key] = value
    return renamed


#: REKKU_HOME directories this process has made private already (``home_dir`` is read often).
_private_homes: set[Path] = set()


def _make_private(path: Path) -> None:
    """REKKU_HOME holds the action log, the logs, the broker's data and credentials: it is created 0700,
    and an existing one open to other users is made 0700 (with a warning) when it is ours and plainly
    a directory of its own (not /, not a sticky shared one like /tmp, not the home directory)."""
    if path in _private_homes:
        return
    try:
        path.mkdir(mode=0o700, parents=True)
        path.chmod(0o700)  # mkdir's mode went through the umask
    except FileExistsError:
        pass
    info = path.stat()
    if info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        try:
            own_home = path == Path.home().resolve()
        except (KeyError, RuntimeError):
            own_home = False
        log = logging.getLogger("rekku.settings")
        if (info.st_uid == os.getuid() and not info.st_mode & stat.S_ISVTX and path != Path(path.anchor)
                and not own_home):
            path.chmod(0o700)
            log.warning("REKKU_HOME %s was open to other users (mode %o): made it 0700", path, mode)
        else:
            log.warning("REKKU_HOME %s is open to other users (mode %o) and holds the action log, logs and "
                        "credentials: give Rekku a directory of its own, or chmod 700 it", path, mode)
    _private_homes.add(path)


def write_private(path: Path, value: str, *, replace: bool = True) -> None:
    """Write ``value`` to ``path``, readable by its owner only from the start (no window at 0644).
    With ``replace=False`` an existing file (another process was first) is left as it is."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT: tighten it
        fh.write(value)


def describe_invalid(exc: ValidationError) -> str:
    """``VARIABLE: what is wrong`` for each error of a settings class, without a traceback: the
    variable is the field's documented name (its ``validation_alias``), which is what the user set."""
    return "; ".join((f"{e['loc'][0]}: " if e["loc"] else "") + e["msg"] for e in exc.errors())


class DocumentedSettings(BaseSettings):
    """Typed view of the environment (and of ``.env`` when present), by documented names only.

    Only the documented names configure Rekku: each field's ``validation_alias`` (``REKKU_HOME``,
    ``REKKU_PORT``, ``DB_HOST``…), read from the environment and ``.env``. A field's own name is not a
    variable (``HOME``, ``PORT``, ``DATABASE_URL`` belong to the shell and the platform, not to Rekku):
    no ``populate_by_name``, so no settings source ever looks it up; and a field without a
    ``validation_alias`` (which pydantic-settings would read by its name) is refused when the class is
    defined. Code may still pass a field by its name (``Settings(home=path)``): :meth:`__init__` turns
    it into the documented name first.

    The base of the core's :class:`Settings` and of every plugin's settings (``PluginSettings``), so
    the rule is written once."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    def __init__(self, **values: Any) -> None:
        super().__init__(**_field_names_to_aliases(type(self), values))

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unnamed = [name for name, field in cls.model_fields.items() if field.validation_alias is None]
        if unnamed:
            raise TypeError(f"{cls.__name__}: fields without a documented variable (validation_alias), "
                            f"which would be read by their own name: {', '.join(unnamed)}")


class Settings(DocumentedSettings):
    """The core's settings: every variable the core reads (a plugin's own are its settings class's)."""

    home: Path = Field(Path(".rekku"), validation_alias=_env("REKKU_HOME"))
    broker_url: str | None = Field(None, validation_alias=_env("REKKU_BROKER_URL"))
    #: With a ``sentinel://`` REKKU_BROKER_URL: the name of the master in the Sentinels' configuration
    #: (kombu's ``master_name``); the broker and the result backend follow it through failovers.
    sentinel_master: str | None = Field(None, validation_alias=_env("REKKU_SENTINEL_MASTER"))
    #: The Sentinels' own password (their ``requirepass``), when they have one; the data nodes' password
    #: is the one in each ``sentinel://:password@host:port/db`` of the URL.
    sentinel_password: str | None = Field(None, validation_alias=_env("REKKU_SENTINEL_PASSWORD"))
    database_url: str | None = Field(None, validation_alias=_env("REKKU_DATABASE_URL"))
    db_host: str | None = Field(None, validation_alias=_env("DB_HOST"))
    db_port: int = Field(3306, validation_alias=_env("DB_PORT"))
    db_user: str = Field("root", validation_alias=_env("DB_USER"))
    db_pass: str = Field("", validation_alias=_env("DB_PASS"))
    db_name: str = Field("rekku", validation_alias=_env("DB_NAME"))

    api_token: str | None = Field(None, validation_alias=_env("REKKU_API_TOKEN"))
    host: str = Field("127.0.0.1", validation_alias=_env("REKKU_HOST"))
    port: int = Field(8000, validation_alias=_env("REKKU_PORT"))
    #: Largest accepted request body, in bytes.
    max_body_bytes: int = Field(1024 * 1024, validation_alias=_env("REKKU_MAX_BODY_BYTES"))
    #: Longest string in any action payload field, in characters (plugins may set lower limits).
    max_field_chars: int = Field(100_000, ge=100, validation_alias=_env("REKKU_MAX_FIELD_CHARS"))
    #: Most actions one request may hold; more is a 413 before any is validated.
    max_actions_per_request: int = Field(1000, ge=1, le=100_000, validation_alias=_env("REKKU_MAX_ACTIONS_PER_REQUEST"))
    #: Longest ``?wait=`` a client may ask for, in seconds.
    max_wait_seconds: float = Field(300.0, validation_alias=_env("REKKU_MAX_WAIT"))

    flower_port: int = Field(5555, validation_alias=_env("FLOWER_PORT"))
    flower_basic_auth: str | None = Field(None, validation_alias=_env("FLOWER_BASIC_AUTH"))
    #: Let Flower act (shut workers down, revoke and send tasks); off: it only shows (rekku/flower_guard.py).
    flower_control: bool = Field(False, validation_alias=_env("REKKU_FLOWER_CONTROL"))

    # message signing (Celery's auth serializer): all three, or none
    #: PEM private key this node signs its messages with.
    signing_key: Path | None = Field(None, validation_alias=_env("REKKU_SIGNING_KEY"))
    #: PEM certificate of that key (its public half travels with each message).
    signing_cert: Path | None = Field(None, validation_alias=_env("REKKU_SIGNING_CERT"))
    #: Glob of the PEM certificates whose messages are accepted (e.g. /etc/rekku/certs/*.pem).
    signing_cert_store: str | None = Field(None, validation_alias=_env("REKKU_SIGNING_CERT_STORE"))
    #: Seconds a signed task message stays valid (its expiry is signed with it; longer than any ETA,
    #: retry delay or redelivery wait, so nothing legitimate expires on a queue).
    signed_message_ttl: float = Field(6 * 3600, gt=60, validation_alias=_env("REKKU_SIGNED_MESSAGE_TTL"))

    trainer_ids_raw: str = Field("", validation_alias=_env("TRAINER_IDS"))
    telegram_trainer_id: str | None = Field(None, validation_alias=_env("TELEGRAM_TRAINER_ID"))
    restrict_actions: str = Field("trainer_only", validation_alias=_env("RESTRICT_ACTIONS"))
    corrector_retries: int = Field(2, validation_alias=_env("CORRECTOR_RETRIES"))
    #: A reply with no JSON at all (plain prose) is a message to the requesting chat, as the original
    #: Rekku sent it; off, or with no chat in the request's context, it is refused with a correction.
    plain_reply_as_message: bool = Field(True, validation_alias=_env("REKKU_PLAIN_REPLY_AS_MESSAGE"))

    tz: str = Field("UTC", validation_alias=_env("TZ"))
    prompt_location: str | None = Field(None, validation_alias=_env("PROMPT_LOCATION"))

    plugin_path: str = Field("", validation_alias=_env("REKKU_PLUGIN_PATH"))
    #: Default per-action time limit in seconds, when a plugin does not set one.
    default_time_limit: float = Field(300.0, validation_alias=_env("REKKU_DEFAULT_TIME_LIMIT"))
    #: Seconds an unacknowledged message stays invisible before Redis hands it to another worker.
    #: Must exceed the longest action time limit, or a slow action may be redelivered while it runs.
    visibility_timeout: int = Field(3600, validation_alias=_env("REKKU_VISIBILITY_TIMEOUT"))
    #: Worker concurrency override for every pool (``rekku worker --concurrency`` wins).
    worker_concurrency: int | None = Field(None, validation_alias=_env("REKKU_WORKER_CONCURRENCY"))
    log_level: str = Field("INFO", validation_alias=_env("REKKU_LOG_LEVEL"))
    #: ``text`` or ``json`` (one JSON object per line, with action_id and batch_id).
    log_format: str = Field("text", pattern="^(text|json)$", validation_alias=_env("REKKU_LOG_FORMAT"))
    #: The ingress logs a line per HTTP request (uvicorn's access log; JSON with REKKU_LOG_FORMAT=json).
    access_log: bool = Field(False, validation_alias=_env("REKKU_ACCESS_LOG"))
    #: Seconds between reconciler passes (re-enqueue what the broker lost or a dead worker held).
    reconcile_seconds: float = Field(30.0, gt=0, validation_alias=_env("REKKU_RECONCILE_SECONDS"))
    #: Seconds an unfinished action must sit untouched before the reconciler looks at it.
    reconcile_grace: float = Field(60.0, ge=0, validation_alias=_env("REKKU_RECONCILE_GRACE"))
    #: Seconds a worker counts as alive after its last heartbeat (it beats every third of it, at most every 2 s).
    worker_heartbeat_ttl: float = Field(30.0, ge=3, validation_alias=_env("REKKU_WORKER_HEARTBEAT_TTL"))
    #: Times an action's worker process may die while running it (killed by the OS, out of memory, a
    #: crash) before the action is failed instead of being run again (a poison message).
    max_attempts: int = Field(5, ge=1, validation_alias=_env("REKKU_MAX_ATTEMPTS"))
    #: Seconds between a worker process's sends of its run metrics to Redis (and on its shutdown).
    metrics_flush_seconds: float = Field(1.0, gt=0, validation_alias=_env("REKKU_METRICS_FLUSH_SECONDS"))

    # interfaces and chat plugins
    telegram_bot_token: str | None = Field(None, validation_alias=_env("TELEGRAM_BOT_TOKEN"))
    telegram_api_url: str = Field("https://api.telegram.org", validation_alias=_env("TELEGRAM_API_URL"))
    #: Webhook mode: ``POST /v1/telegram/webhook`` takes updates only with this value in Telegram's
    #: ``X-Telegram-Bot-Api-Secret-Token`` header (setWebhook's ``secret_token``); unset, the route is a 404.
    #: Set, `rekku up` starts no getUpdates poller (Telegram delivers one way or the other, never both).
    telegram_webhook_secret: str | None = Field(None, validation_alias=_env("TELEGRAM_WEBHOOK_SECRET"))
    #: Seconds one getUpdates long poll of `rekku receive` waits for an update (Telegram's ``timeout``).
    receive_poll_timeout: int = Field(30, ge=0, le=600, validation_alias=_env("REKKU_RECEIVE_POLL_TIMEOUT"))
    #: Longest pause, in seconds, between `rekku receive`'s retries after network errors and 5xx answers
    #: (the pause doubles from 1 s; a 429's ``retry_after`` is always honoured).
    receive_max_backoff: float = Field(60.0, ge=1, validation_alias=_env("REKKU_RECEIVE_MAX_BACKOFF"))
    #: Discord bot token: with it, discord_bot sends through the bot API to any channel the bot is in.
    discord_bot_token: str | None = Field(None, validation_alias=_env("DISCORD_BOT_TOKEN"))
    #: Base URL of Discord's REST API (the bot's ``/channels/{id}/messages``).
    discord_api_url: str = Field("https://discord.com/api/v10", validation_alias=_env("DISCORD_API_URL"))
    #: Without a bot token: the webhook of each channel, ``channel_id=url`` entries separated by commas.
    discord_webhook_urls: str = Field("", validation_alias=_env("DISCORD_WEBHOOK_URLS"))
    #: Without a bot token: the webhook of the default channel (its channel is the one Discord reports).
    discord_webhook_url: str | None = Field(None, validation_alias=_env("DISCORD_WEBHOOK_URL"))
    webhook_url: str | None = Field(None, validation_alias=_env("REKKU_WEBHOOK_URL"))
    webhook_secret: str | None = Field(None, validation_alias=_env("REKKU_WEBHOOK_SECRET"))
    # the model's webhook: the feed pushed, item by item, in id order (rekku/feed_push.py)
    #: URL every feed item is POSTed to; unset: the feed is only read (GET /v1/feed, the stream).
    model_webhook_url: str | None = Field(None, validation_alias=_env("REKKU_MODEL_WEBHOOK_URL"))
    #: HMAC-SHA256 secret of the pushes' X-Rekku-Signature; without it nothing is pushed (doctor says so).
    model_webhook_secret: str | None = Field(None, validation_alias=_env("REKKU_MODEL_WEBHOOK_SECRET"))
    #: Seconds one push may take (the connection at most 5 of them).
    model_webhook_timeout: float = Field(10.0, gt=0, le=300, validation_alias=_env("REKKU_MODEL_WEBHOOK_TIMEOUT"))
    #: Seconds between beat's wake-ups of the pusher (it is also woken as soon as items are added).
    model_webhook_poll_seconds: float = Field(1.0, gt=0, validation_alias=_env("REKKU_MODEL_WEBHOOK_POLL_SECONDS"))
    #: Longest wait, in seconds, between two tries of an item that failed (exponential, jittered, up to this).
    model_webhook_max_backoff: float = Field(60.0, ge=1, validation_alias=_env("REKKU_MODEL_WEBHOOK_MAX_BACKOFF"))
    #: Tries of an item the receiver refuses (a 4xx about the item: 400, 413, 422 ...) before it is skipped.
    model_webhook_refused_attempts: int = Field(5, ge=1, validation_alias=_env("REKKU_MODEL_WEBHOOK_REFUSED_ATTEMPTS"))
    #: Interface of a request context that names a chat but no interface (query outputs go there).
    default_interface: str = Field("outbox", validation_alias=_env("REKKU_DEFAULT_INTERFACE"))
    #: Seconds one HTTP request to a messaging platform may take.
    interface_timeout: float = Field(15.0, validation_alias=_env("REKKU_INTERFACE_TIMEOUT"))

    # the prompt
    #: Character budget of a whole GET /v1/prompt answer (JSON); the diary is dropped first.
    prompt_max_chars: int = Field(100_000, ge=1000, validation_alias=_env("REKKU_PROMPT_MAX_CHARS"))
    #: Most chat-history entries a prompt carries (before the budget trims older ones).
    prompt_history_limit: int = Field(30, ge=0, validation_alias=_env("REKKU_PROMPT_HISTORY_LIMIT"))
    #: Oldest chat-history entry a prompt carries, in days.
    prompt_history_days: float = Field(7.0, ge=0, validation_alias=_env("REKKU_PROMPT_HISTORY_DAYS"))
    #: Seconds each plugin's prompt injection may take; a slower one is left out (and logged).
    injection_timeout: float = Field(3.0, gt=0, validation_alias=_env("REKKU_INJECTION_TIMEOUT"))

    # the model loop (optional; rekku/model_loop.py): with REKKU_LLM_URL set, Rekku asks the model itself
    #: Base URL of an OpenAI-compatible chat-completions API (``POST {url}/chat/completions``: OpenAI,
    #: llama.cpp, vLLM, Ollama ``.../v1``). Unset: no model loop (no turn is published, nothing of it loads).
    llm_url: str | None = Field(None, validation_alias=_env("REKKU_LLM_URL"))
    #: The ``model`` of each completions request (left out when unset: a server with one model needs none).
    llm_model: str | None = Field(None, validation_alias=_env("REKKU_LLM_MODEL"))
    #: Sent as ``Authorization: Bearer <key>`` when set; never logged.
    llm_api_key: str | None = Field(None, validation_alias=_env("REKKU_LLM_API_KEY"))
    #: Seconds one completions request may take.
    llm_timeout: float = Field(120.0, gt=0, validation_alias=_env("REKKU_LLM_TIMEOUT"))
    #: Times a turn is retried (jittered backoff: up to 1, 2, 4 … 60 s) when the endpoint fails (connection, 5xx, 429).
    llm_retries: int = Field(5, ge=0, validation_alias=_env("REKKU_LLM_RETRIES"))
    #: Turns in a row a chat may get from its own actions' outputs (and failures) with no new message or
    #: reminder: a model that answers every output with another query would otherwise never stop.
    llm_max_chained_turns: int = Field(3, ge=0, validation_alias=_env("REKKU_LLM_MAX_CHAINED_TURNS"))

    # artifacts
    #: Where actions write files (speech audio); a volume shared by the workers and the ingress.
    artifact_dir: Path | None = Field(None, validation_alias=_env("REKKU_ARTIFACT_DIR"))
    #: Largest artifact (e.g. a downloaded .mp3) an action may keep, in bytes.
    artifact_max_bytes: int = Field(20 * 1024 * 1024, ge=1024, validation_alias=_env("REKKU_ARTIFACT_MAX_BYTES"))

    # retention (rekku/retention.py): days each kind of record is kept; 0 keeps it forever
    #: Finished actions (action_runs) and their batches (action_batches, once none of their actions is left).
    retain_actions_days: float = Field(30.0, ge=0, validation_alias=_env("REKKU_RETAIN_ACTIONS_DAYS"))
    #: Messages of the outbox interface (GET /v1/outbox).
    retain_outbox_days: float = Field(30.0, ge=0, validation_alias=_env("REKKU_RETAIN_OUTBOX_DAYS"))
    #: Interfaces' delivery records (interface_deliveries: also "what Rekku said" in the prompt's chat history).
    retain_deliveries_days: float = Field(30.0, ge=0, validation_alias=_env("REKKU_RETAIN_DELIVERIES_DAYS"))
    #: Incoming messages (table messages: the prompt's chat history reads the last REKKU_PROMPT_HISTORY_DAYS).
    retain_messages_days: float = Field(30.0, ge=0, validation_alias=_env("REKKU_RETAIN_MESSAGES_DAYS"))
    #: Feed items (never one the model webhook has not been given yet).
    retain_feed_days: float = Field(30.0, ge=0, validation_alias=_env("REKKU_RETAIN_FEED_DAYS"))
    #: Files in the artifact directory (never one a kept action or outbox message names).
    retain_artifacts_days: float = Field(30.0, ge=0, validation_alias=_env("REKKU_RETAIN_ARTIFACTS_DAYS"))
    #: Seconds between beat's pruning passes; 0: beat never prunes (`rekku prune` still does).
    prune_seconds: float = Field(3600.0, ge=0, validation_alias=_env("REKKU_PRUNE_SECONDS"))
    #: Rows deleted per transaction: small, so neither SQLite nor MariaDB holds its locks for long.
    prune_batch: int = Field(500, ge=1, le=10_000, validation_alias=_env("REKKU_PRUNE_BATCH"))

    @field_validator("restrict_actions")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in RESTRICT_POLICIES:
            raise ValueError(f"RESTRICT_ACTIONS must be one of {', '.join(RESTRICT_POLICIES)}")
        return value

    @field_validator("telegram_webhook_secret", mode="before")
    @classmethod
    def _webhook_secret_as_telegram_takes_it(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_-]{16,256}", value):
            # setWebhook's secret_token: 1-256 of these characters; at least 16 here, as it is the route's only lock
            raise ValueError("TELEGRAM_WEBHOOK_SECRET must be 16 to 256 letters, digits, '_' or '-' "
                             "(what Telegram's setWebhook accepts as secret_token)")
        return value

    @field_validator("model_webhook_url", "model_webhook_secret", mode="before")
    @classmethod
    def _model_webhook(cls, value: object, info: Any) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        if info.field_name == "model_webhook_url" and isinstance(value, str) \
                and not value.strip().lower().startswith(("https://", "http://")):
            raise ValueError("REKKU_MODEL_WEBHOOK_URL must be an http(s) URL")
        return value.strip() if isinstance(value, str) and info.field_name == "model_webhook_url" else value

    @field_validator("signing_key", "signing_cert", "signing_cert_store", "llm_url", "llm_model", "llm_api_key",
                     "sentinel_master", "sentinel_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_signing(self) -> Settings:
        given = [self.signing_key, self.signing_cert, self.signing_cert_store]
        if any(given) and not all(given):
            raise ValueError("message signing needs REKKU_SIGNING_KEY, REKKU_SIGNING_CERT and "
                             "REKKU_SIGNING_CERT_STORE together (or none of them)")
        return self

    @model_validator(mode="after")
    def _check_sentinel(self) -> Settings:
        from rekku.broker_url import is_sentinel_url, parse_sentinel_url

        sentinel = bool(self.broker_url) and is_sentinel_url(self.broker_url or "")
        if sentinel and not self.sentinel_master:
            raise ValueError("a sentinel:// REKKU_BROKER_URL needs REKKU_SENTINEL_MASTER (the master's name "
                             "in the Sentinels' configuration)")
        if self.sentinel_master and not sentinel:
            raise ValueError("REKKU_SENTINEL_MASTER is set but REKKU_BROKER_URL is not a sentinel:// URL")
        if sentinel:
            parse_sentinel_url(self.broker_url or "")  # a ValueError names what is wrong
        return self

    # ----------------------------------------------------------------- derived values
    @property
    def model_loop(self) -> bool:
        """Rekku closes the loop itself against REKKU_LLM_URL (rekku/model_loop.py)."""
        return bool(self.llm_url)

    @property
    def signing_enabled(self) -> bool:
        """Every task and control message is signed and verified (Celery's ``auth`` serializer)."""
        return self.signing_key is not None

    @property
    def home_dir(self) -> Path:
        """REKKU_HOME, created (or tightened to) 0700: see :func:`_make_private`."""
        path = self.home.expanduser().resolve()
        _make_private(path)
        return path

    def resolved_database_url(self) -> str:
        """REKKU_DATABASE_URL, else MariaDB from the seed's DB_* variables, else SQLite in REKKU_HOME."""
        if self.database_url:
            return self.database_url
        if self.db_host:
            auth = quote_plus(self.db_user) + (":" + quote_plus(self.db_pass) if self.db_pass else "")
            return f"mysql+mysqldb://{auth}@{self.db_host}:{self.db_port}/{self.db_name}?charset=utf8mb4"
        return f"sqlite:///{self.home_dir / 'rekku.db'}"

    def resolved_broker_url(self) -> str:
        """REKKU_BROKER_URL, else the embedded Redis that `rekku up` started (its URL, with its password,
        recorded 0600 in REKKU_HOME: rekku/embedded_redis.py), else local Redis."""
        if self.broker_url:
            return self.broker_url
        recorded = self.home_dir / "embedded-redis.url"
        if recorded.exists():
            return recorded.read_text().strip()
        return "redis://127.0.0.1:6379/0"

    @property
    def trainer_ids(self) -> frozenset[tuple[str, str]]:
        """``(interface, user_id)`` pairs; the legacy TELEGRAM_TRAINER_ID means telegram_bot."""
        pairs: set[tuple[str, str]] = set()
        for item in self.trainer_ids_raw.split(","):
            item = item.strip()
            if not item:
                continue
            interface, sep, user = item.rpartition(":")
            if sep and interface:
                pairs.add((interface.strip(), user.strip()))
            else:
                pairs.add(("*", user.strip()))
        if self.telegram_trainer_id and self.telegram_trainer_id.strip():
            pairs.add(("telegram_bot", self.telegram_trainer_id.strip()))
        return frozenset(pairs)

    @property
    def discord_webhooks(self) -> dict[str, str]:
        """DISCORD_WEBHOOK_URLS as ``{channel id: webhook URL}``; ValueError naming a malformed entry."""
        hooks: dict[str, str] = {}
        entries = [item.strip() for item in self.discord_webhook_urls.replace("\n", ",").split(",")]
        for number, item in enumerate(filter(None, entries), 1):
            channel, sep, url = (part.strip() for part in item.partition("="))
            if not sep or not channel.isalnum() or not url.startswith(("https://", "http://")):  # not shown: a secret
                raise ValueError(f"DISCORD_WEBHOOK_URLS: entry {number} is not channel_id=https://webhook-url")
            if channel in hooks:
                raise ValueError(f"DISCORD_WEBHOOK_URLS names channel {channel} twice")
            hooks[channel] = url
        return hooks

    def is_trainer(self, interface: str | None, user_id: str | int | None) -> bool:
        """An action with no user is never a trainer (upstream let it pass: a bug)."""
        if user_id is None or str(user_id).strip() == "":
            return False
        uid = str(user_id).strip()
        return any(uid == u and (i == "*" or i == (interface or "")) for i, u in self.trainer_ids)

    @property
    def location(self) -> str:
        """Where Rekku is, for the prompt and the weather: PROMPT_LOCATION, else the city of TZ."""
        return location_of(self.tz, self.prompt_location)

    def plugin_dirs(self) -> list[Path]:
        return [Path(p).expanduser() for p in self.plugin_path.split(os.pathsep) if p.strip()]

    def ensure_api_token(self) -> str:
        """The configured token, else one kept in REKKU_HOME (created once) so CLI and ingress agree."""
        if self.api_token:
            return self.api_token
        path = self.home_dir / "api_token"
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32), replace=False)
        return path.read_text().strip()

    def ensure_flower_auth(self) -> str:
        """FLOWER_BASIC_AUTH, else generated credentials kept in REKKU_HOME: Flower never runs open."""
        if self.flower_basic_auth:
            return self.flower_basic_auth
        path = self.home_dir / "flower_auth"
        if not path.exists():
            write_private(path, "rekku:" + secrets.token_urlsafe(16), replace=False)
        return path.read_text().strip()


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
