"""The plugin API: the one module a plugin imports from Rekku.

``from rekku.plugin import AIPluginBase, register_plugin, current_action, ...`` gives a plugin all it
may use of the core; everything else in ``rekku`` is the core's own and may change without notice.
The rule is enforced (``[tool.importlinter]`` in pyproject.toml, ``tests/test_architecture.py``) and
explained in docs/plugins.md, "The plugin API".

Nothing is defined here: each name is re-exported from the core module that owns it, and the comment
beside it says why a plugin needs it. A few are renamed where the core's own name is too generic to
read well in a plugin (``keep`` → ``keep_artifact``, ``app`` → ``celery_app``, ...); they are the
same objects. The seed's ``core.ai_plugin_base`` / ``core.core_initializer`` import paths keep
working beside this module (see :func:`rekku.registry.install_core_aliases`).
"""

from __future__ import annotations

from rekku.action_log import ActionLog, shared_log
from rekku.artifacts import artifact_size
from rekku.artifacts import keep as keep_artifact
from rekku.artifacts import url_of as artifact_url
from rekku.backoff import retry_delay
from rekku.broker import broker_client
from rekku.celery_app import app as celery_app
from rekku.context import ActionContext, current_action, normalize_context
from rekku.db import get_engine, session_factory
from rekku.errors import NotAuthorized, PluginError, RekkuError, TransientError, ValidationError
from rekku.feed import EVENT_REMINDER as FEED_EVENT_REMINDER
from rekku.feed import NewItem as NewFeedItem
from rekku.feed import announce as feed_announce
from rekku.feed import append as feed_append
from rekku.feed import append_now as feed_append_now
from rekku.feed import prepare as feed_prepare
from rekku.feed import send_output
from rekku.ingest import default_ingress
from rekku.interfaces.delivery import deliver, deliver_to_outbox_at_once, prepare_outbox_at_once
from rekku.interfaces.links import Chat, chats_named, is_known_chat_id, looks_like_id, resolve_chat, resolve_thread
from rekku.interfaces.models import SENDING as DELIVERY_SENDING
from rekku.interfaces.models import SENT as DELIVERY_SENT
from rekku.interfaces.models import ChatForward, ChatLink, Delivery
from rekku.interfaces.registry import get_interfaces
from rekku.messages import find as find_message
from rekku.models import JSONType, UTCDateTime, utcnow
from rekku.ordering import literal_renderer
from rekku.ordering import run as run_rendered
from rekku.plugin_base import AIPluginBase, TablePlugin
from rekku.plugin_settings import PluginSettings
from rekku.registry import core_initializer, get_registry, register_plugin
from rekku.retention import SerialLog as PrunableLog
from rekku.schedule import Rule, ScheduleError, build_rule, next_occurrence, upcoming
from rekku.settings import Settings, get_settings, location_of
from rekku.supervisor import die_with_parent
from rekku.validation import Rejection, validate_one

__all__ = [
    # --- being a plugin
    "AIPluginBase",       # the base class every plugin extends (the seed's contract)
    "TablePlugin",        # a base class whose actions are a table: schema and instructions written once
    "register_plugin",    # called from the constructor: puts the plugin in the registry
    "core_initializer",   # the seed's second registration call, kept so seed plugins run unchanged
    # --- the action being run
    "current_action",     # inside a handler: the action's context (chat, user, attempt, report_progress)
    "ActionContext",      # the type current_action() returns, for annotations
    "normalize_context",  # a request context as the ingress keeps it (known keys, as strings)
    # --- errors a handler raises
    "RekkuError",         # the base of them all, to catch the core's errors
    "PluginError",        # the action fails with this message; the worker goes on
    "TransientError",     # the action is retried with backoff (a timeout, a 5xx)
    "retry_delay",        # seconds before a retry a plugin schedules itself: exponential, capped, jittered
    "ValidationError",    # the payload is wrong; the caller must change it
    "NotAuthorized",      # this requester may not do this (not a trainer, another chat)
    # --- settings
    "PluginSettings",     # base of a plugin's own settings (its variables): subclass, then MySettings.get()
    "PrunableLog",        # a log table the pruner may thin (offered by the optional hook prunable())
    "Settings",           # the core's typed settings object, for annotations and tests
    "get_settings",       # the process's core settings (TZ, trainers, API keys, limits)
    "location_of",        # the prompt's location from TZ / PROMPT_LOCATION, as time_plugin shows it
    # --- the broker's Redis
    "broker_client",      # a client of it (caches, locks, liveness), following a Sentinel master's failovers
    # --- the database
    "session_factory",    # ORM sessions on the configured database (plugin tables, the chat directory)
    "get_engine",         # the configured database's engine, for plain SQL
    "utcnow",             # the aware UTC "now" every table stores
    "UTCDateTime",        # column type: stored as naive UTC, read back timezone-aware
    "JSONType",           # column type: JSON on SQLite and MariaDB alike
    "literal_renderer",   # MariaDB: render a value as SQL text (before an order lock), None elsewhere
    "run_rendered",       # run such a rendered statement as it is; its row count
    # --- chats and replies
    "send_output",        # give the model an action's result (an "output" item of the feed, not a chat message)
    "feed_append",        # add items to the model's feed in the caller's transaction (once per dedupe_key)
    "feed_append_now",    # the same in a transaction of its own
    "feed_prepare",       # feed_append in two steps: build (before the feed's order lock), then .append()
    "feed_announce",      # after feed_append's transaction committed: start the model loop's turns, if on
    "NewFeedItem",        # an item to add: its type, its chat, what it says, its dedupe_key
    "FEED_EVENT_REMINDER",  # the feed item type of a due reminder's system message
    "deliver",            # send a message to a chat (and to the chats linked to it), exactly once
    "deliver_to_outbox_at_once",  # many one-part outbox messages in the caller's transaction, exactly once
    "prepare_outbox_at_once",  # the same in two steps: check and build (before the order lock), then .write()
    "find_message",       # a stored user message by (interface, chat_id, message_id), e.g. the one an action answers
    "get_interfaces",     # the configured interfaces (telegram, discord, webhook, outbox...) by name
    "Chat",               # an (interface, chat, thread) destination, as deliver() takes it
    "resolve_chat",       # a chat given by id or by name -> (interface, chat_id)
    "resolve_thread",     # a thread of a chat given by its stored name -> its thread id
    "looks_like_id",      # whether a string is a chat id (or @handle) rather than a name
    "is_known_chat_id",   # whether a request came from this chat or the directory holds it
    "chats_named",        # every stored chat with this name, to ask which one when it is ambiguous
    "ChatLink",           # ORM model of the chat directory (chat_link)
    "ChatForward",        # ORM model of the forwards between linked chats (chat_link)
    "Delivery",           # ORM model of one sent message part, so a retried send is not sent twice
    "DELIVERY_SENDING",   # Delivery.status: the platform call is under way or its outcome unknown
    "DELIVERY_SENT",      # Delivery.status: sent
    # --- actions: submitting more, the registry, the log
    "default_ingress",    # submit actions from inside a handler, as the API would accept them
    "get_registry",       # the loaded plugins and action types (to check a nested action's type)
    "validate_one",       # validate one action exactly as the ingress does, for a given requester
    "Rejection",          # what validate_one returns for a refused action
    "shared_log",         # the process's action log (another action's state, a batch's order)
    "ActionLog",          # its type; ActionLog.is_final(status) says whether a run is over
    # --- time rules (pure functions, no database)
    "Rule",               # when an event happens: a local start in a zone and how it repeats
    "ScheduleError",      # an invalid time or recurrence; the message says what to fix
    "build_rule",         # an event payload -> its Rule and first occurrence
    "upcoming",           # the next occurrences of a Rule, for listings
    "next_occurrence",    # a Rule's first occurrence after a moment
    # --- Celery and processes
    "celery_app",         # Rekku's Celery app, to publish a plugin's own tasks by name (send_task)
    "die_with_parent",    # preexec_fn of a child process (a browser) that must not outlive its worker
    # --- artifacts (files the API serves, e.g. audio)
    "keep_artifact",      # move a made file into the artifact directory under a name
    "artifact_url",       # the artifact's URL path on the ingress (GET /v1/artifacts/{name})
    "artifact_size",      # the artifact's size in bytes, or None when there is none
]
