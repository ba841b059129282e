"""Check raw actions against the registry: schema rules first, then the plugin's own ``validate_payload``.

Messages keep upstream's wording (docs/contracts.md §1) and are de-duplicated per action; each rejection
names the action's index and type.

This is also the one place where the original Rekku's older forms become current ones, before any check
reads the payload: a field's older name (an action's declared ``aliases``, e.g. ``message_thread_id``) is
renamed to the current one, and the legacy form of ``bio_update``/``bio_full_request`` (fields on the
action itself, no ``payload``; declared as ``fields_on_action``) gets its payload. An older name given
with a different value than the current one is an error, never a silent choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rekku.limits import MAX_CONTEXT_CHARS, is_valid_text, payload_errors, printable
from rekku.plugin_base import ActionSpec
from rekku.registry import Registry
from rekku.settings import Settings

log = logging.getLogger(__name__)

#: Action types of the original Rekku's interfaces that have no counterpart here, by interface (its
#: ``message_<interface>`` sends are recognised by their name).
OTHER_INTERFACE_ACTIONS = {"x_timeline_read": "x", "x_search": "x"}


@dataclass
class ValidAction:
    index: int
    spec: ActionSpec
    payload: dict
    interface_hint: str | None = None


@dataclass
class Rejection:
    index: int | None
    type: str | None
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"index": self.index, "type": self.type, "errors": self.errors}


def _dedupe(messages: list[str]) -> list[str]:
    return list(dict.fromkeys(m for m in messages if m))


def _schema_errors(spec: ActionSpec, payload: dict) -> list[str]:
    errors = []
    for name in spec.required_fields:
        if name not in payload:
            errors.append(f"Missing required field '{name}' for action '{spec.type}'")
        elif payload[name] is None or payload[name] == "":
            errors.append(f"Field '{name}' cannot be empty for action '{spec.type}'")
    return errors


def _unsupported(shown_type: str, action_type: str, registry: Registry) -> str:
    """Upstream's wording for a type nobody handles; for a send through an interface that is not here
    (the original's ``message_webui``, ``x_search`` …), which interfaces are."""
    message = f"Unsupported type '{shown_type}' - no plugin or interface found to handle it"
    kind, _, name = action_type.partition("_")
    interface = OTHER_INTERFACE_ACTIONS.get(action_type) or (name if kind in ("message", "audio") and name else None)
    if interface is None:
        return message
    shown = printable(interface[:100])
    available = sorted(t.partition("_")[2] for t in registry.actions if t.startswith("message_"))
    off = sorted(t.partition("_")[2] for t in registry.disabled if t.startswith("message_"))
    if f"message_{interface}" in registry.actions:  # audio_<name> of an interface that sends no audio
        audio = sorted(t.partition("_")[2] for t in registry.actions if t.startswith("audio_"))
        return (f"{message}: interface '{shown}' sends no audio here; audio goes through: "
                f"{', '.join(audio) or 'none'}")
    if interface in off:
        reason = registry.disabled[f"message_{interface}"].disabled
        return f"{message}: interface '{shown}' is not configured here ({reason})"
    return (f"{message}: interface '{shown}' is not available here; available: {', '.join(available) or 'none'}"
            + (f" (not configured: {', '.join(off)})" if off else ""))


def _same(a: Any, b: Any) -> bool:
    """Two values of one field given twice mean the same (``5`` and ``"5"`` are the same thread)."""
    scalar = (str, int, float)
    if isinstance(a, scalar) and isinstance(b, scalar) and not isinstance(a, bool) and not isinstance(b, bool):
        return str(a) == str(b)
    return a == b


def _current_names(spec: ActionSpec, payload: dict) -> tuple[dict, list[str]]:
    """``payload`` with its fields' older names (``spec.aliases``) renamed to the current ones; an old
    and a current name given with different values is an error, never a silent choice."""
    if not spec.aliases or not any(old in payload for old, _ in spec.aliases):
        return payload, []
    renamed, errors = dict(payload), []
    for old, new in spec.aliases:
        if old not in renamed:
            continue
        value = renamed.pop(old)
        if new in renamed and renamed[new] is not None and value is not None and not _same(renamed[new], value):
            errors.append(f"Fields '{new}' and '{old}' (its older name) differ for action '{spec.type}': "
                          "give only one")
        elif renamed.get(new) is None:
            renamed[new] = value
    return renamed, errors


def authorization_error(spec: ActionSpec, context: dict, settings: Settings, payload: dict | None = None,
                        registry: Registry | None = None) -> str | None:
    """Why the context's user may not run this action, or None. Checked at the ingress and in the worker.

    The context is the token holder's word (who speaks); the payload is the model's, so a plugin's
    ``authorize_payload`` decides what a payload may do for that requester (e.g. only trainers may
    touch a chat other than their own)."""
    is_trainer = settings.is_trainer(context.get("interface"), context.get("user_id"))
    if spec.trainer_only and not is_trainer:
        if not settings.trainer_ids:
            return f"Action '{spec.type}' is disabled: no trainer is configured (TRAINER_IDS)"
        return f"Action '{spec.type}' is restricted to trainers"
    if spec.restricted:
        if settings.restrict_actions == "on":
            return f"Action '{spec.type}' is restricted and disabled (RESTRICT_ACTIONS=on)"
        if settings.restrict_actions == "trainer_only" and not is_trainer:
            return f"Action '{spec.type}' is restricted to trainers"
    if payload is not None and registry is not None:
        check = getattr(registry.plugins.get(spec.plugin), "authorize_payload", None)
        if check is not None:
            try:
                return check(spec.type, payload, context, is_trainer) or None
            except Exception as exc:  # a broken check refuses: it guards a trust boundary
                log.exception("authorize_payload of %s raised", spec.type)
                return f"Authorization of '{spec.type}' failed inside its plugin: {type(exc).__name__}"
    return None


def authorize_again(action_type: str, payload: dict, context: dict, settings: Settings,
                    registry: Registry) -> str | None:
    """Why ``context`` may not run this logged or internally made action now (a retry, a query's output
    reply), as the ingress would decide it; an action type no longer available is refused too."""
    spec = registry.actions.get(action_type)
    if spec is None:
        return f"Action '{action_type}' is unavailable here (no enabled plugin handles it)"
    return authorization_error(spec, context, settings, payload, registry)


def validate_one(index: int, raw: Any, registry: Registry, context: dict,
                 settings: Settings) -> ValidAction | Rejection:
    if not isinstance(raw, dict):
        return Rejection(index, None, ["Each action must be a JSON object with 'type' and 'payload'"])
    action_type = raw.get("type")
    if action_type is None or action_type == "":
        return Rejection(index, None, ["Missing 'type'"])
    if not isinstance(action_type, str):
        return Rejection(index, None, ["'type' must be a string"])
    shown_type = printable(action_type[:200])
    spec = registry.actions.get(action_type)
    if spec is None:
        disabled = registry.disabled.get(action_type)
        if disabled is not None:
            return Rejection(index, action_type, [f"Action '{action_type}' is unavailable: {disabled.disabled}"])
        return Rejection(index, shown_type, [_unsupported(shown_type, action_type, registry)])
    on_action = [name for name in spec.fields_on_action if name in raw]
    if "payload" not in raw:
        if not on_action:
            return Rejection(index, action_type, ["Missing 'payload'"])
        payload = {name: raw[name] for name in on_action}  # the original's legacy form (bio_update)
    elif on_action:
        return Rejection(index, action_type, [
            f"Give the fields of action '{action_type}' either in 'payload' or on the action itself, not both "
            f"({', '.join(repr(n) for n in on_action)} on the action)"])
    else:
        payload = raw["payload"]
    if not isinstance(payload, dict):
        return Rejection(index, action_type, ["'payload' must be a dict"])
    errors = payload_errors(action_type, payload, settings.max_field_chars)
    if not errors:
        payload, errors = _current_names(spec, payload)
    errors = errors or _schema_errors(spec, payload)
    if not errors:
        plugin = registry.plugins[spec.plugin]
        try:
            errors.extend(str(e) for e in (plugin.validate_payload(action_type, payload) or []))
        except Exception as exc:
            log.exception("validate_payload of %s raised", action_type)
            errors.append(f"Validation of '{action_type}' failed inside its plugin: {type(exc).__name__}: {exc}")
    if not errors:
        denied = authorization_error(spec, context, settings, payload, registry)
        if denied:
            errors.append(denied)
    if errors:
        return Rejection(index, action_type, _dedupe(errors))
    hint = raw.get("interface")
    if not isinstance(hint, str) or len(hint) > MAX_CONTEXT_CHARS or not is_valid_text(hint):
        hint = None  # only a hint: an unusable one is ignored like any unknown key
    return ValidAction(index, spec, payload, hint)


def validate_actions(raw_actions: list[Any], registry: Registry, context: dict,
                     settings: Settings) -> tuple[list[ValidAction], list[Rejection]]:
    accepted: list[ValidAction] = []
    rejected: list[Rejection] = []
    for index, raw in enumerate(raw_actions):
        outcome = validate_one(index, raw, registry, context, settings)
        (accepted if isinstance(outcome, ValidAction) else rejected).append(outcome)
    return accepted, rejected
