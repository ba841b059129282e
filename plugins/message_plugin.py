"""message_plugin: ``message_<interface>`` (and ``audio_<interface>``) for every registered interface.

Target and thread default to the chat the request came from, else to the interface's default chat if
it has one (Discord's DISCORD_WEBHOOK_URL channel); a ``target`` may also be a chat's name stored by
chat_link (a name shared by several chats is an error asking for the numeric id).
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
)

_ID_FIELDS = ("target", "thread_id", "reply_to_message_id")
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
                "required_fields": ["audio"], "optional_fields": list(_ID_FIELDS)}
    return {"description": f"Send a text message through {name}",
            "required_fields": ["text"], "optional_fields": list(_ID_FIELDS)}


def instructions(action_type: str) -> dict:
    kind, _, name = action_type.partition("_")
    payload = {
        "target": {"type": "string", "description": "chat id, or a chat name stored with store_link; "
                                                   "default: the chat the request came from"},
        "thread_id": {"type": "string", "description": "thread/topic id; default: the request's thread"},
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
        for key in _ID_FIELDS:
            value = payload.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                errors.append(f"Field '{key}' must be a string or an integer for action '{action_type}'")
        if not errors and action_type.startswith("audio_"):
            errors += _audio_errors(action_type, payload.get("audio"))
        return errors

    def handle_custom_action(self, action_type: str, payload: dict) -> Any:
        kind, _, interface = action_type.partition("_")
        ctx = current_action()
        same_origin = ctx is not None and ctx.chat_id and (ctx.interface or interface) == interface
        target = _text(payload.get("target"))
        if target is None:
            target = ctx.chat_id if same_origin else _default_chat(interface)
            if target is None:
                origin = f"from {ctx.interface}" if ctx is not None and ctx.interface else "from no chat"
                raise PluginError(f"Action '{action_type}' has no 'target' and the request came {origin}; "
                                  "give the target chat id")
        elif not looks_like_id(target):
            target = resolve_chat(target, interface, strict=False)[1]
        thread = _text(payload.get("thread_id"))
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


PLUGIN_CLASS = MessagePlugin
