"""message_plugin: ``message_<interface>`` (and ``audio_<interface>``) for every registered interface.

Target and thread default to the chat the request came from, else to the interface's default chat if
it has one (Discord's DISCORD_WEBHOOK_URL channel); a ``target`` may also be a chat's
name stored by chat_link (a name shared by several chats is an error asking for the numeric id).
The original Rekku's ways of naming the destination all work, with their original meaning:
``target`` as a number, a string or an object ``{chat_id, thread_id | message_thread_id,
thread_name | message_thread_name}``; ``chat_name`` (a stored chat's name, never taken as an id);
``thread_name`` (a thread of the destination chat by its stored name; unknown or ambiguous is an
error); ``message_thread_id``/``message_thread_name`` for ``thread_id``/``thread_name``. The same thing
given twice with different values (``thread_id`` and ``target.thread_id``, ``target`` and a
``chat_name`` of another chat) is an error, never a silent choice.
Sends run on the io pool; each part of a message is delivered once per action, whatever
redelivers the task (see rekku/interfaces/delivery.py), and also to the chats linked to the
target with chat_link's ``link_chats``. Interfaces missing their configuration still declare
their actions, disabled with the reason, so the LLM gets a clear refusal.

``audio`` follows the one file rule (rekku.artifacts.classify_file_ref, through the interface's
``audio_error``): an artifact's name, an http(s) URL, or (Telegram only) a file_id. A local path is
refused here, before anything is queued, and again by the interface in the worker.
"""

from __future__ import annotations

from typing import Any

from rekku.plugin import (
    AIPluginBase,
    Chat,
    PluginError,
    current_action,
    deliver,
    get_interfaces,
    looks_like_id,
    register_plugin,
    resolve_chat,
    resolve_thread,
)

_ID_FIELDS = ("target", "chat_name", "thread_id", "thread_name", "reply_to_message_id")
#: The original's names of the thread fields (renamed at the ingress: rekku.validation).
_ALIASES = {"message_thread_id": "thread_id", "message_thread_name": "thread_name"}
#: Keys of an object ``target``, each with the field it stands for.
_TARGET_KEYS = {"chat_id": "target", "thread_id": "thread_id", "message_thread_id": "thread_id",
                "thread_name": "thread_name", "message_thread_name": "thread_name"}
#: What each destination field names, for error messages.
_NOUNS = {"target": "chat", "chat_name": "chat", "thread_id": "thread", "thread_name": "thread"}
#: What ``audio`` takes, for the prompt (the rule itself is rekku.artifacts.classify_file_ref).
_AUDIO_HELP = ("the name of an artifact Rekku produced (e.g. '<action id>.mp3'), an http(s) URL, or a "
               "Telegram file_id (telegram_bot only); never a file path")


def action_types(name: str, audio: bool) -> list[str]:
    return [f"message_{name}"] + ([f"audio_{name}"] if audio else [])


def schema(action_type: str) -> dict:
    kind, _, name = action_type.partition("_")
    if kind == "audio":
        return {"description": f"Send an audio file (an artifact's name, an http(s) URL or a platform file id) "
                               f"through {name}",
                "required_fields": ["audio"], "optional_fields": list(_ID_FIELDS), "aliases": dict(_ALIASES)}
    return {"description": f"Send a text message through {name}",
            "required_fields": ["text"], "optional_fields": list(_ID_FIELDS), "aliases": dict(_ALIASES)}


def instructions(action_type: str) -> dict:
    kind, _, name = action_type.partition("_")
    payload = {
        "target": {"type": "string", "description": "chat id, or a chat name stored with store_link; "
                                                   "default: the chat the request came from"},
        "chat_name": {"type": "string", "description": "the chat by its stored name (instead of target)"},
        "thread_id": {"type": "string", "description": "thread/topic id; default: the request's thread"},
        "thread_name": {"type": "string", "description": "the thread by its stored name (instead of thread_id)"},
        "reply_to_message_id": {"type": "string", "description": "message to reply to"},
    }
    if kind == "audio":
        payload = {"audio": {"type": "string", "description": _AUDIO_HELP}, **payload}
    else:
        payload = {"text": {"type": "string", "description": "the message; long texts are split"}, **payload}
    return {"description": f"{schema(action_type)['description']}.", "payload": payload}


class MessagePlugin(AIPluginBase):
    pool = "io"
    max_retries = 5
    time_limit = 120.0

    def __init__(self) -> None:
        interfaces = get_interfaces()
        self.types = [t for name, iface in sorted(interfaces.available.items())
                      for t in action_types(name, iface.audio)]
        register_plugin("message_plugin", self)
        for name, reason in sorted(interfaces.disabled.items()):
            cls = interfaces.known.get(name)
            register_plugin(f"message_plugin.{name}",
                            UnavailableInterface(action_types(name, bool(cls and cls.audio)), reason))

    def get_supported_action_types(self) -> list[str]:
        return list(self.types)

    def get_supported_actions(self) -> dict:
        return {t: schema(t) for t in self.types}

    def get_prompt_instructions(self, action_name: str) -> dict:
        return instructions(action_name) if action_name in self.types else {}

    def validate_payload(self, action_type: str, payload: dict) -> list[str]:
        errors = []
        for key in ("text", "audio"):
            if key in payload and not isinstance(payload[key], str):
                errors.append(f"Field '{key}' must be a string for action '{action_type}'")
        errors += destination(action_type, payload)[1]
        if not errors and action_type.startswith("audio_"):
            errors += _audio_errors(action_type, payload.get("audio"))
        return errors

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        kind, _, interface = action_type.partition("_")
        ctx = current_action()
        same_origin = ctx is not None and ctx.chat_id and (ctx.interface or interface) == interface
        fields, errors = destination(action_type, payload)
        if errors:  # checked at the ingress; a message that skipped it meets the same rule here
            raise PluginError("; ".join(errors))
        target = fields["target"]
        if target is not None and not looks_like_id(target):
            target = resolve_chat(target, interface, strict=False)[1]
        if fields["chat_name"] is not None:
            named = resolve_chat(fields["chat_name"], interface)[1]  # a name: unknown is an error
            if target is not None and named != target:
                raise PluginError(f"Fields 'target' and 'chat_name' name different chats for action '{action_type}': "
                                  f"target is {target}, chat '{fields['chat_name']}' is {named}; give one")
            target = named
        if target is None:
            target = ctx.chat_id if same_origin else _default_chat(interface)
            if target is None:
                origin = f"from {ctx.interface}" if ctx is not None and ctx.interface else "from no chat"
                raise PluginError(f"Action '{action_type}' has no 'target' and the request came {origin}; "
                                  "give the target chat id")
        thread = fields["thread_id"]
        if fields["thread_name"] is not None:
            named = resolve_thread(interface, target, fields["thread_name"])
            if thread is not None and named != thread:
                raise PluginError(f"Fields 'thread_id' and 'thread_name' name different threads for action "
                                  f"'{action_type}': thread_id is {thread}, thread '{fields['thread_name']}' is "
                                  f"{named}; give one")
            thread = named
        if thread is None and same_origin and target == ctx.chat_id:
            thread = ctx.thread_id
        result = deliver(Chat(interface, target, thread), ctx.action_id if ctx else "",
                         text=payload.get("text") if kind == "message" else None,
                         audio=payload.get("audio") if kind == "audio" else None,
                         reply_to=_text(payload.get("reply_to_message_id")))
        return result


class UnavailableInterface(AIPluginBase):
    """Declares the actions of an interface that is off, so they are refused with the reason."""

    def __init__(self, types: list[str], reason: str) -> None:
        self.types, self.reason = types, reason

    def get_supported_action_types(self) -> list[str]:
        return list(self.types)

    def get_supported_actions(self) -> dict:
        return {t: schema(t) for t in self.types}

    def unavailable_reason(self) -> str | None:
        return self.reason


def _audio_errors(action_type: str, audio: Any) -> list[str]:
    """The interface's refusal of ``audio`` (an unavailable interface is refused elsewhere)."""
    iface = get_interfaces().get(action_type.partition("_")[2])
    error = iface.audio_error(audio, action_type) if iface is not None else None
    return [error] if error else []


def _default_chat(interface: str) -> str | None:
    """The interface's own default chat (Discord's DISCORD_WEBHOOK_URL channel), if it has one."""
    iface = get_interfaces().get(interface)
    return iface.default_chat() if iface is not None else None


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _id_error(action_type: str, field: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"Field '{field}' must be a string or an integer for action '{action_type}'"
    return None


def _name_error(action_type: str, field: str, value: Any) -> str | None:
    if not isinstance(value, str):
        return f"Field '{field}' must be a string for action '{action_type}'"
    return None


def destination(action_type: str, payload: dict) -> tuple[dict[str, str | None], list[str]]:
    """Where the payload sends to, as ``{"target", "chat_name", "thread_id", "thread_name"}`` (each a
    string or None, unresolved), and what is wrong with how it says so. Every way the original Rekku
    named a destination is read here, in one place, for the ingress's check and the handler alike."""
    found: dict[str, str | None] = dict.fromkeys(_NOUNS)
    given_as: dict[str, str] = {}
    errors: list[str] = []

    def put(key: str, value: Any, where: str) -> None:
        text = _text(value)
        if text is None:
            return
        if found[key] is not None and found[key] != text:
            errors.append(f"Fields '{given_as[key]}' and '{where}' differ for action '{action_type}': "
                          f"give the {_NOUNS[key]} once")
            return
        found[key], given_as[key] = text, where

    target = payload.get("target")
    if isinstance(target, dict):
        unknown = sorted(str(k) for k in target if k not in _TARGET_KEYS)
        if unknown:
            errors.append(f"Field 'target' has unknown keys {', '.join(repr(k) for k in unknown)} for action "
                          f"'{action_type}' (an object target takes chat_id, thread_id or message_thread_id, "
                          "thread_name or message_thread_name)")
        if _text(target.get("chat_id")) is None:
            errors.append(f"Field 'target.chat_id' is missing for action '{action_type}' (an object target "
                          "names its chat)")
        for key, field in _TARGET_KEYS.items():
            if key not in target or target[key] is None:
                continue
            check = _name_error if field == "thread_name" else _id_error
            problem = check(action_type, f"target.{key}", target[key])
            if problem:
                errors.append(problem)
            else:
                put(field, target[key], f"target.{key}")
    elif target is not None:
        problem = _id_error(action_type, "target", target)
        if problem:
            errors.append(problem)
        else:
            put("target", target, "target")
    for key in ("chat_name", "thread_name", "thread_id", "reply_to_message_id"):
        if payload.get(key) is None:
            continue
        problem = (_name_error if key.endswith("_name") else _id_error)(action_type, key, payload[key])
        if problem:
            errors.append(problem)
        elif key != "reply_to_message_id":
            put(key, payload[key], key)
    return found, errors


PLUGIN_CLASS = MessagePlugin
