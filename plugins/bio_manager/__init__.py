"""bio_manager: what Rekku knows about each person, and the chat's participants as prompt context.

``bio_update`` (``target``, ``fields``) merges fields into a person's bio: lists become unions,
objects merge deeply, anything else replaces (:func:`merge_values`). Guards: at most
:data:`MAX_FIELDS` fields per update (refused at the ingress), at most one update per person per
:data:`UPDATE_INTERVAL` (refused by the handler). Only real updates count: reading a bio
(``bio_full_request``, the prompt's ``participants``) touches ``last_accessed`` at most, so an
active person can still be updated (upstream counted reads as updates: a bug).

Targets are ids or names: an exact id first, then ``user_name`` (with or without ``@``), then any of
``known_as``, case-insensitively. A name that matches several people is an error asking for the id;
a ``bio_update`` target that names nobody starts a new bio with that id.

The original Rekku's prompts also wrote these two actions in a legacy form, with ``target``/``fields``
(or ``targets``) on the action itself and no ``payload``; it is accepted for these two types only
(``fields_on_action``; the ingress moves the fields into the payload).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from rekku.plugin import (
    AIPluginBase,
    JSONType,
    PluginError,
    UTCDateTime,
    register_plugin,
    send_output,
    session_factory,
    utcnow,
)

log = logging.getLogger(__name__)

#: Most fields one bio_update may change.
MAX_FIELDS = 3
#: Shortest time between two updates of the same person's bio.
UPDATE_INTERVAL = timedelta(hours=1)
#: Most participants injected into a prompt.
MAX_PARTICIPANTS = 10

#: Fields holding lists (a single value sent for one of them is added as one element).
LIST_FIELDS = ("known_as", "likes", "not_likes", "past_events", "feelings")
#: Fields holding objects (merged deeply).
DICT_FIELDS = ("contacts", "social_accounts")
#: Fields holding any JSON value (merged by the value's own type).
FREE_FIELDS = ("information", "privacy")
#: The one plain-text column.
TEXT_FIELDS = ("user_name",)
FIELDS = LIST_FIELDS + DICT_FIELDS + FREE_FIELDS + TEXT_FIELDS

metadata = sa.MetaData()
bio = sa.Table(
    "bio", metadata,
    sa.Column("id", sa.String(191), primary_key=True),
    *(sa.Column(name, JSONType) for name in LIST_FIELDS + DICT_FIELDS + FREE_FIELDS),
    sa.Column("user_name", sa.String(255)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_accessed", UTCDateTime),
    sa.Column("last_update", UTCDateTime),
    sa.Column("update_count", sa.Integer, nullable=False, default=0),
)


# ----------------------------------------------------------------------------- merge rules (pure)
def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def union(old: list, new: list) -> list:
    """``old`` followed by the elements of ``new`` it lacks (JSON equality; no duplicates added)."""
    seen = {_key(v) for v in old}
    out = list(old)
    for value in new:
        key = _key(value)
        if key not in seen:
            seen.add(key)
            out.append(value)
    return out


def merge_values(old: Any, new: Any) -> Any:
    """Lists → union, objects → deep merge, anything else (or a change of type) → ``new``."""
    if isinstance(old, list) and isinstance(new, list):
        return union(old, new)
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = merge_values(old[key], value) if key in old else value
        return merged
    return new


def merge_field(name: str, old: Any, new: Any) -> Any:
    """Merge one bio field: list fields stay lists (a lone value is one more element)."""
    if name in LIST_FIELDS:
        return union(old if isinstance(old, list) else ([] if old is None else [old]),
                     new if isinstance(new, list) else [new])
    if old is None:
        return new
    return merge_values(old, new)


def merge_bio(current: dict, fields: dict) -> dict:
    """The changed columns after merging ``fields`` into ``current`` (a bio's field values)."""
    return {name: merge_field(name, current.get(name), value) for name, value in fields.items()}


def field_errors(action: str, fields: Any) -> list[str]:
    """What is wrong with a bio_update's ``fields`` (names, types, the per-update limit)."""
    if not isinstance(fields, dict) or not fields:
        return [f"Field 'fields' must be a non-empty object for action '{action}'"]
    errors = []
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        errors.append(f"Unknown bio field(s) {', '.join(unknown)} for action '{action}' "
                      f"(known: {', '.join(FIELDS)})")
    if len(fields) > MAX_FIELDS:
        errors.append(f"At most {MAX_FIELDS} fields per update for action '{action}' (got {len(fields)}: "
                      f"{', '.join(sorted(fields))}); send the most important ones")
    for name in DICT_FIELDS:
        if name in fields and not isinstance(fields[name], dict):
            errors.append(f"Field '{name}' must be an object for action '{action}'")
    if "user_name" in fields and not isinstance(fields["user_name"], str):
        errors.append(f"Field 'user_name' must be a string for action '{action}'")
    return errors


# ----------------------------------------------------------------------------- storage
def _norm(name: str) -> str:
    return name.strip().lstrip("@").casefold()


def bio_view(row: Any) -> dict:
    out: dict[str, Any] = {"id": row["id"]}
    for name in FIELDS:
        if row[name] not in (None, [], {}, ""):
            out[name] = row[name]
    for name in ("created_at", "last_accessed", "last_update"):
        if row[name] is not None:
            out[name] = row[name].isoformat(timespec="seconds")
    out["update_count"] = row["update_count"]
    return out


def find(session: Any, target: str) -> tuple[dict | None, str | None]:
    """``(row, None)`` for the person ``target`` names, ``(None, None)`` for nobody, ``(None, error)``
    when a name is ambiguous."""
    target = str(target).strip()
    row = session.execute(sa.select(bio).where(bio.c.id == target)).mappings().first()
    if row is not None:
        return dict(row), None
    wanted = _norm(target)
    if not wanted:
        return None, None
    # Bios are few (one per person met); names live in JSON lists, so match in Python.
    rows = session.execute(sa.select(bio.c.id, bio.c.user_name, bio.c.known_as)).mappings().all()
    by_user_name = [r["id"] for r in rows if r["user_name"] and _norm(r["user_name"]) == wanted]
    matches = by_user_name or [r["id"] for r in rows if isinstance(r["known_as"], list)
                               and any(isinstance(n, str) and _norm(n) == wanted for n in r["known_as"])]
    if len(matches) > 1:
        return None, (f"'{target}' matches several people ({', '.join(sorted(matches))}); "
                      "use the numeric id")
    if not matches:
        return None, None
    return dict(session.execute(sa.select(bio).where(bio.c.id == matches[0])).mappings().one()), None


def update_bio(target: str, fields: dict, now: datetime | None = None) -> dict:
    """Merge ``fields`` into the bio ``target`` names (creating it), enforcing the guards."""
    errors = field_errors("bio_update", fields)
    if errors:
        raise PluginError("; ".join(errors))
    sessions = session_factory()
    for _ in range(5):
        now = now or utcnow()
        with sessions() as s:
            row, error = find(s, target)
        if error:
            raise PluginError(error)
        if row is None:
            values = {name: None for name in FIELDS}
            values.update(merge_bio({}, fields))
            try:
                with sessions.begin() as s:
                    s.execute(sa.insert(bio).values(id=str(target).strip(), created_at=now, last_update=now,
                                                    update_count=1, **values))
            except IntegrityError:
                continue  # created concurrently: apply the guard to it
            return {"updated": True, "id": str(target).strip(), "created": True, "fields": sorted(fields)}
        last = row["last_update"]
        if last is not None and now - last < UPDATE_INTERVAL:
            wait = int((UPDATE_INTERVAL - (now - last)).total_seconds() // 60) + 1
            raise PluginError(f"the bio of {row['id']} was updated {int((now - last).total_seconds() // 60)} min "
                              f"ago; at most one update per person per hour (try again in {wait} min)")
        changes = merge_bio(row, fields)
        with sessions.begin() as s:
            # Optimistic: only if nobody updated it since we read it (update_count is the version).
            done = s.execute(sa.update(bio).where(bio.c.id == row["id"], bio.c.update_count == row["update_count"])
                             .values(last_update=now, update_count=row["update_count"] + 1, **changes)).rowcount
        if done:
            return {"updated": True, "id": row["id"], "created": False, "fields": sorted(fields)}
    raise PluginError(f"the bio of {target} kept changing while being updated; try again")


def read_bios(targets: list, touch: bool = True) -> dict:
    """Full bios for ids or names: ``{"bios": [...], "not_found": [...], "ambiguous": {...}}``.

    Reading sets ``last_accessed`` only: it is never an update (upstream's bug)."""
    bios, not_found, ambiguous, seen = [], [], {}, set()
    with session_factory()() as s:
        for target in targets:
            row, error = find(s, str(target))
            if error:
                ambiguous[str(target)] = error
            elif row is None:
                not_found.append(str(target))
            elif row["id"] not in seen:
                seen.add(row["id"])
                bios.append(row)
    if touch and bios:
        now = utcnow()
        with session_factory().begin() as s:
            s.execute(sa.update(bio).where(bio.c.id.in_([r["id"] for r in bios])).values(last_accessed=now))
        for row in bios:
            row["last_accessed"] = now
    return {"bios": [bio_view(r) for r in bios], "not_found": not_found, "ambiguous": ambiguous}


def participants(people: list[dict]) -> list[dict]:
    """The prompt's ``participants``: each person's bio (or just who they are, when there is none)."""
    ids = []
    for person in people:
        uid = person.get("user_id")
        if uid is not None and str(uid) not in ids:
            ids.append(str(uid))
    ids = ids[:MAX_PARTICIPANTS]
    if not ids:
        return []
    with session_factory()() as s:
        rows = {r["id"]: r for r in s.execute(sa.select(bio).where(bio.c.id.in_(ids))).mappings().all()}
    out = []
    for uid in ids:
        if uid in rows:
            view = bio_view(rows[uid])
            for name in ("created_at", "last_accessed", "last_update", "update_count"):
                view.pop(name, None)
            out.append(view)
        else:
            username = next((p.get("username") for p in people if str(p.get("user_id")) == uid and p.get("username")),
                            None)
            out.append({"id": uid, **({"user_name": username} if username else {}), "bio": "none yet"})
    return out


# ----------------------------------------------------------------------------- the plugin
class BioPlugin(AIPluginBase):
    def __init__(self) -> None:
        register_plugin("bio_manager", self)

    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["bio_update", "bio_full_request", "static_inject"]

    def get_supported_actions(self) -> dict:
        return {
            "bio_update": {"description": "Remember facts about a person (merged into their bio)",
                           "required_fields": ["target", "fields"], "optional_fields": [],
                           "fields_on_action": ["target", "fields"]},
            "bio_full_request": {"description": "Read the full bios of people, by id or name",
                                 "required_fields": ["targets"], "optional_fields": [], "idempotent": True,
                                 "fields_on_action": ["targets"]},
        }

    def get_prompt_instructions(self, action_name: str) -> dict:
        if action_name == "bio_update":
            return {
                "description": f"Update what you know about a person. At most {MAX_FIELDS} fields per update and "
                               "one update per person per hour, so keep only what matters. Lists are merged "
                               "(nothing is lost), objects merged deeply, text replaced.",
                "payload": {"target": {"type": "string", "description": "The person's user id, or a name",
                                       "required": True},
                            "fields": {"type": "object", "required": True,
                                       "description": f"Fields to merge, among: {', '.join(FIELDS)}"}},
                "example": {"type": "bio_update", "payload": {"target": "123456",
                                                              "fields": {"likes": ["jazz"], "known_as": ["Marco"]}}},
            }
        if action_name == "bio_full_request":
            return {
                "description": "Get the complete bios of people (context.participants only shows a summary).",
                "payload": {"targets": {"type": "array", "description": "User ids or names", "required": True}},
                "example": {"type": "bio_full_request", "payload": {"targets": ["123456", "Marco"]}},
            }
        return {}

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        if action_type == "bio_update":
            errors = []
            if not isinstance(payload.get("target"), (str, int)) or isinstance(payload.get("target"), bool):
                errors.append("Field 'target' must be a user id or a name for action 'bio_update'")
            return errors + field_errors("bio_update", payload.get("fields"))
        if action_type == "bio_full_request":
            targets = payload.get("targets")
            if not isinstance(targets, list) or not targets or not all(
                    isinstance(t, (str, int)) and not isinstance(t, bool) and str(t).strip() for t in targets):
                return ["Field 'targets' must be a non-empty list of user ids or names for action 'bio_full_request'"]
        return []

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        if action_type == "bio_update":
            return update_bio(str(payload["target"]), payload["fields"])
        result = read_bios(payload["targets"])
        _send_back(result, f"{len(result['bios'])} bio(s)")
        return result

    def get_static_injection(self, message: dict | None = None, context_memory: dict | None = None) -> dict:
        people = list((context_memory or {}).get("participants") or [])
        return {"participants": participants(people)}


def _send_back(result: dict, message: str) -> None:
    """Also send a query's result to the chat that asked, like the other query plugins (best effort)."""
    try:
        send_output(result, message)
    except Exception:
        log.warning("could not send the bios back to the chat", exc_info=True)


PLUGIN_CLASS = BioPlugin
