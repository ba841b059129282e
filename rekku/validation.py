"""Check raw actions against the registry: schema rules first, then the plugin's own ``validate_payload``.

Messages keep upstream's wording (docs/contracts.md §1) and are de-duplicated per action; each rejection
names the action's index and type.
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
        return Rejection(index, shown_type,
                         [f"Unsupported type '{shown_type}' - no plugin or interface found to handle it"])
    if "payload" not in raw:
        return Rejection(index, action_type, ["Missing 'payload'"])
    payload = raw["payload"]
    if not isinstance(payload, dict):
        return Rejection(index, action_type, ["'payload' must be a dict"])
    errors = payload_errors(action_type, payload, settings.max_field_chars)
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
