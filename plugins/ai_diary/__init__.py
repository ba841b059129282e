"""ai_diary: Rekku's personal diary, and its recent entries as prompt context (docs/plugins.md §2).

``create_personal_diary_entry`` stores one entry with the chat it was written in (from the
action's context) and, unless the payload gives ``user_message``, the text of the message the turn
answers (the context's ``message_id``, looked up among the stored messages). Upstream lost the
summary when ``content`` was absent and had no ``involved_users`` column; here every field is
kept. The prompt gets ``latest_diary_entries``: newest first, whole entries only, at most
``REKKU_DIARY_MAX_CHARS`` characters (as JSON) and ``REKKU_DIARY_MAX_DAYS`` days old. ``rekku diary
reset`` empties the table (development).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from rekku.plugin import (
    AIPluginBase,
    JSONType,
    UTCDateTime,
    current_action,
    find_message,
    register_plugin,
    session_factory,
    utcnow,
)

from .settings import DiarySettings

ACTION = "create_personal_diary_entry"
#: Most rows read per injection before the character bound is applied.
MAX_ROWS = 500

metadata = sa.MetaData()
ai_diary = sa.Table(
    "ai_diary", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("content", sa.Text),
    sa.Column("personal_thought", sa.Text),
    sa.Column("emotions", JSONType),
    sa.Column("interaction_summary", sa.Text, nullable=False),
    sa.Column("timestamp", UTCDateTime, nullable=False),
    sa.Column("interface", sa.String(64)),
    sa.Column("chat_id", sa.String(191)),
    sa.Column("thread_id", sa.String(191)),
    sa.Column("user_message", sa.Text),
    sa.Column("context_tags", JSONType),
    sa.Column("involved_users", JSONType),
)

#: Fields of an injected entry, in this order; empty ones are left out.
ENTRY_FIELDS = ("timestamp", "interaction_summary", "content", "personal_thought", "emotions",
                "context_tags", "involved_users", "interface", "chat_id", "thread_id")


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)


def validation_errors(payload: dict) -> list[str]:
    """Type checks beyond the required fields (upstream wording style)."""
    errors = []
    summary = payload.get("interaction_summary")
    if summary is not None and not isinstance(summary, str):
        errors.append(f"Field 'interaction_summary' must be a string for action '{ACTION}'")
    for name in ("content", "personal_thought", "user_message"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            errors.append(f"Field '{name}' must be a string for action '{ACTION}'")
    emotions = payload.get("emotions")
    if emotions is not None:
        ok = isinstance(emotions, list) and all(
            isinstance(e, dict) and isinstance(e.get("type"), str) and e["type"]
            and isinstance(e.get("intensity"), (int, float)) and not isinstance(e.get("intensity"), bool)
            and 1 <= e["intensity"] <= 10 for e in emotions)
        if not ok:
            errors.append(f"Field 'emotions' must be a list of {{\"type\": str, \"intensity\": 1-10}} "
                          f"for action '{ACTION}'")
    for name in ("context_tags", "involved_users"):
        if payload.get(name) is not None and not _str_list(payload[name]):
            errors.append(f"Field '{name}' must be a list of strings for action '{ACTION}'")
    return errors


def entry_view(row: Any) -> dict:
    """An entry as the prompt shows it: its non-empty fields, the time as ISO 8601 UTC."""
    out = {}
    for name in ENTRY_FIELDS:
        value = row[name]
        if value is None or value == [] or value == "":
            continue
        out[name] = value.isoformat(timespec="seconds") if isinstance(value, datetime) else value
    return out


def select_entries(entries: Iterable[dict], max_chars: int) -> list[dict]:
    """Newest-first entries while their JSON fits in ``max_chars``; stops at the first that does not.

    Whole entries only, and no older entry jumps the queue because it happens to be shorter: the
    result is always the most recent stretch of the diary."""
    chosen, used = [], 0
    for entry in entries:
        size = len(json.dumps(entry, ensure_ascii=False)) + (2 if chosen else 0)  # ", " between entries
        if used + size > max_chars:
            break
        chosen.append(entry)
        used += size
    return chosen


def latest_entries(now: datetime | None = None, max_chars: int | None = None,
                   max_days: float | None = None) -> list[dict]:
    """The diary as the prompt gets it (bounded by characters and days)."""
    settings = DiarySettings.get()
    max_chars = settings.max_chars if max_chars is None else max_chars
    max_days = settings.max_days if max_days is None else max_days
    since = (now or utcnow()) - timedelta(days=max_days)
    query = (sa.select(ai_diary).where(ai_diary.c.timestamp >= since)
             .order_by(ai_diary.c.timestamp.desc(), ai_diary.c.id.desc()).limit(MAX_ROWS))
    with session_factory()() as s:
        rows = s.execute(query).mappings().all()
    return select_entries((entry_view(r) for r in rows), max_chars)


def add_entry(payload: dict, context: dict | None = None, when: datetime | None = None) -> int:
    """Store one entry; returns its id."""
    context = context or {}
    values = {
        "interaction_summary": payload["interaction_summary"],
        "content": payload.get("content"),
        "personal_thought": payload.get("personal_thought"),
        "emotions": payload.get("emotions") or [],
        "context_tags": [str(t) for t in payload.get("context_tags") or []],
        "involved_users": [str(u) for u in payload.get("involved_users") or []],
        "timestamp": when or utcnow(),
        "interface": context.get("interface"),
        "chat_id": context.get("chat_id"),
        "thread_id": context.get("thread_id"),
        "user_message": payload.get("user_message"),
    }
    with session_factory().begin() as s:
        return s.execute(sa.insert(ai_diary).values(**values)).inserted_primary_key[0]


def reset() -> int:
    """Delete every entry (``rekku diary reset``); returns how many there were."""
    with session_factory().begin() as s:
        return s.execute(sa.delete(ai_diary)).rowcount


class DiaryPlugin(AIPluginBase):
    settings_class = DiarySettings

    def __init__(self) -> None:
        register_plugin("ai_diary", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return [ACTION, "static_inject"]

    def get_supported_actions(self) -> dict:
        return {ACTION: {
            "description": "Write a personal diary entry about the interaction that just happened",
            "required_fields": ["interaction_summary"],
            "optional_fields": ["content", "personal_thought", "emotions", "context_tags", "involved_users",
                                "user_message"],
        }}

    def get_prompt_instructions(self, action_name: str) -> dict:
        if action_name != ACTION:
            return {}
        return {
            "description": "Keep a personal diary: after a meaningful interaction, write what happened and "
                           "what you think and feel about it. Recent entries come back as "
                           "context.latest_diary_entries.",
            "payload": {
                "interaction_summary": {"type": "string", "description": "What happened, in a sentence or two",
                                        "required": True},
                "content": {"type": "string", "description": "The entry itself, in your own voice"},
                "personal_thought": {"type": "string", "description": "A private thought about it"},
                "emotions": {"type": "array", "description": "[{\"type\": \"joy\", \"intensity\": 1-10}]"},
                "context_tags": {"type": "array", "description": "Topics, e.g. [\"music\", \"work\"]"},
                "involved_users": {"type": "array", "description": "Names or ids of the people involved"},
                "user_message": {"type": "string", "description": "The message you are answering (left out, "
                                 "it is taken from the chat)"},
            },
            "example": {"type": ACTION, "payload": {
                "interaction_summary": "Helped Marco plan his trip to Kyoto",
                "content": "Marco is finally going to Japan!", "personal_thought": "I wish I could see it too.",
                "emotions": [{"type": "joy", "intensity": 7}], "context_tags": ["travel"],
                "involved_users": ["Marco"]}},
        }

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        return validation_errors(payload) if action_type == ACTION else []

    def handle_custom_action(self, action_type: str, payload: dict) -> dict:
        ctx = current_action()
        context = {k: getattr(ctx, k) for k in ("interface", "chat_id", "thread_id")} if ctx else {}
        if payload.get("user_message") is None and ctx is not None:
            answered = find_message(ctx.interface, ctx.chat_id, ctx.message_id)
            if answered is not None:
                payload = {**payload, "user_message": answered["text"]}
        entry_id = add_entry(payload, context)
        return {"stored": True, "id": entry_id}

    def get_static_injection(self, message: dict | None = None, context_memory: dict | None = None) -> dict:
        return {"latest_diary_entries": latest_entries()}

    def reset(self) -> int:
        return reset()


PLUGIN_CLASS = DiaryPlugin
