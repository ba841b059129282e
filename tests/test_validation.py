"""Validation rules and wording (docs/contracts.md §1), de-duplication, and the trainer/restricted policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from rekku.plugin_base import AIPluginBase
from rekku.registry import Registry
from rekku.settings import Settings
from rekku.validation import validate_actions


class Demo(AIPluginBase):
    @staticmethod
    def get_supported_action_types():
        return ["send", "speak", "shell", "picky", "buggy"]

    def get_supported_actions(self):
        return {
            "send": {"description": "", "required_fields": ["text", "target"], "optional_fields": []},
            "speak": {"description": "", "required_fields": [], "optional_fields": [], "restricted": True},
            "shell": {"description": "", "required_fields": [], "optional_fields": [], "trainer_only": True},
            "picky": {"description": "", "required_fields": ["n"], "optional_fields": []},
            "buggy": {"description": "", "required_fields": [], "optional_fields": []},
        }

    def validate_payload(self, action_type, payload):
        if action_type == "picky":
            return ["n must be positive", "n must be positive"]
        if action_type == "buggy":
            raise KeyError("oops")
        return []


class Offline(AIPluginBase):
    @staticmethod
    def get_supported_action_types():
        return ["offline"]

    def unavailable_reason(self):
        return "TOKEN is not set"


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.add_plugin("demo", Demo())
    reg.add_plugin("offline", Offline())
    return reg


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings(REKKU_HOME=str(tmp_path), **env)


def errors_of(registry, raw, tmp_path, context=None, **env):
    accepted, rejected = validate_actions(raw, registry, context or {}, settings(tmp_path, **env))
    return [a.spec.type for a in accepted], [(r.index, r.type, r.errors) for r in rejected]


def test_upstream_wording_for_each_rule(registry, tmp_path) -> None:
    _, rejected = errors_of(registry, [
        {"payload": {}}, {"type": "zzz", "payload": {}}, {"type": "send"}, {"type": "send", "payload": []},
        {"type": "send", "payload": {"text": "", "target": None}}, "not an object", {"type": 5, "payload": {}},
    ], tmp_path)
    assert rejected == [
        (0, None, ["Missing 'type'"]),
        (1, "zzz", ["Unsupported type 'zzz' - no plugin or interface found to handle it"]),
        (2, "send", ["Missing 'payload'"]),
        (3, "send", ["'payload' must be a dict"]),
        (4, "send", ["Field 'text' cannot be empty for action 'send'",
                     "Field 'target' cannot be empty for action 'send'"]),
        (5, None, ["Each action must be a JSON object with 'type' and 'payload'"]),
        (6, None, ["'type' must be a string"]),
    ]


def test_errors_are_reported_once(registry, tmp_path) -> None:
    _, rejected = errors_of(registry, [{"type": "picky", "payload": {"n": -1}}], tmp_path)
    assert rejected == [(0, "picky", ["n must be positive"])]


def test_a_plugin_validator_that_raises_is_a_rejection_not_a_crash(registry, tmp_path) -> None:
    _, rejected = errors_of(registry, [{"type": "buggy", "payload": {}}], tmp_path)
    assert "failed inside its plugin: KeyError" in rejected[0][2][0]


def test_disabled_actions_say_why(registry, tmp_path) -> None:
    _, rejected = errors_of(registry, [{"type": "offline", "payload": {}}], tmp_path)
    assert rejected == [(0, "offline", ["Action 'offline' is unavailable: TOKEN is not set"])]


def test_valid_and_invalid_mixed_keeps_the_valid(registry, tmp_path) -> None:
    accepted, rejected = errors_of(registry, [{"type": "send", "payload": {"text": "a", "target": 1}},
                                              {"type": "zzz", "payload": {}}], tmp_path)
    assert accepted == ["send"] and rejected[0][0] == 1


@pytest.mark.parametrize(("policy", "context", "allowed"), [
    ("trainer_only", {"interface": "telegram_bot", "user_id": "42"}, True),
    ("trainer_only", {"interface": "telegram_bot", "user_id": "43"}, False),
    ("trainer_only", {}, False),  # no user is never a trainer (upstream bug)
    ("off", {}, True),
    ("on", {"interface": "telegram_bot", "user_id": "42"}, False),
])
def test_restricted_actions_follow_restrict_actions(registry, tmp_path, policy, context, allowed) -> None:
    accepted, _ = errors_of(registry, [{"type": "speak", "payload": {}}], tmp_path, context,
                            RESTRICT_ACTIONS=policy, TRAINER_IDS="telegram_bot:42")
    assert (accepted == ["speak"]) is allowed


def test_trainer_only_actions_ignore_restrict_actions_off(registry, tmp_path) -> None:
    accepted, rejected = errors_of(registry, [{"type": "shell", "payload": {}}], tmp_path, {"user_id": "1"},
                                   RESTRICT_ACTIONS="off", TRAINER_IDS="telegram_bot:42")
    assert not accepted and rejected[0][2] == ["Action 'shell' is restricted to trainers"]


def test_no_trainer_configured_says_so(registry, tmp_path) -> None:
    _, rejected = errors_of(registry, [{"type": "shell", "payload": {}}], tmp_path, {"user_id": "1"})
    assert "no trainer is configured" in rejected[0][2][0]


def test_legacy_telegram_trainer_id_and_interface_scoping(tmp_path) -> None:
    s = settings(tmp_path, TELEGRAM_TRAINER_ID="77", TRAINER_IDS="discord_bot:5, 9")
    assert s.is_trainer("telegram_bot", 77) and not s.is_trainer("discord_bot", 77)
    assert s.is_trainer("discord_bot", "5") and not s.is_trainer("telegram_bot", "5")
    assert s.is_trainer("anything", "9")  # an id without interface counts everywhere
    assert not s.is_trainer("telegram_bot", None) and not s.is_trainer("telegram_bot", "")


def test_every_payload_string_is_bounded_even_nested(registry, tmp_path) -> None:
    payload = {"text": "x" * 101, "target": "1", "extra": {"deep": ["ok", "y" * 150]}}
    _, rejected = errors_of(registry, [{"type": "send", "payload": payload}], tmp_path, REKKU_MAX_FIELD_CHARS="100")
    assert rejected[0][2] == ["Field 'text' is too long for action 'send' (101 characters; at most 100)",
                              "Field 'extra.deep[1]' is too long for action 'send' (150 characters; at most 100)"]


# ----------------------------------------------------------------------------- the original Rekku's older forms
class Older(AIPluginBase):
    """Declares the older forms the original Rekku's prompts use: renamed fields and fields on the action."""

    @staticmethod
    def get_supported_action_types():
        return ["linkish", "legacy", "message_outbox", "audio_outbox", "message_chatty"]

    def get_supported_actions(self):
        return {
            "linkish": {"required_fields": ["chat_id"], "optional_fields": ["thread_id", "thread_name"],
                        "aliases": {"message_thread_id": "thread_id", "message_thread_name": "thread_name"}},
            "legacy": {"required_fields": ["target", "fields"], "fields_on_action": ["target", "fields"]},
            "message_outbox": {"required_fields": ["text"]},
            "audio_outbox": {"required_fields": ["audio"]},
            "message_chatty": {"required_fields": ["text"]},
        }

    def validate_payload(self, action_type, payload):
        return ["thread_id must not be 'x'"] if payload.get("thread_id") == "x" else []


class ChattyOff(AIPluginBase):
    @staticmethod
    def get_supported_action_types():
        return ["message_sleepy"]

    def unavailable_reason(self):
        return "SLEEPY_TOKEN is not set"


@pytest.fixture
def older() -> Registry:
    reg = Registry()
    reg.add_plugin("older", Older())
    reg.add_plugin("sleepy", ChattyOff())
    return reg


def test_an_older_field_name_is_renamed_before_any_check_reads_the_payload(older, tmp_path) -> None:
    accepted, rejected = validate_actions([
        {"type": "linkish", "payload": {"chat_id": "1", "message_thread_id": 5, "message_thread_name": "News"}},
        {"type": "linkish", "payload": {"chat_id": "1", "thread_id": "5", "message_thread_id": 5}},
        {"type": "linkish", "payload": {"chat_id": "1", "message_thread_id": "x"}},
    ], older, {}, settings(tmp_path))
    assert [a.payload for a in accepted] == [{"chat_id": "1", "thread_id": 5, "thread_name": "News"},
                                             {"chat_id": "1", "thread_id": "5"}]
    assert [(r.index, r.errors) for r in rejected] == [(2, ["thread_id must not be 'x'"])]  # the plugin saw it renamed


def test_an_older_and_a_current_name_that_differ_are_an_error(older, tmp_path) -> None:
    _, rejected = errors_of(older, [{"type": "linkish", "payload": {"chat_id": "1", "thread_id": 5,
                                                                    "message_thread_id": 6}}], tmp_path)
    assert rejected == [(0, "linkish", ["Fields 'thread_id' and 'message_thread_id' (its older name) differ for "
                                        "action 'linkish': give only one"])]


def test_fields_on_the_action_itself_only_for_the_types_that_declare_them(older, tmp_path) -> None:
    accepted, rejected = validate_actions([
        {"type": "legacy", "target": "7", "fields": {"likes": ["jazz"]}},
        {"type": "legacy", "target": "7"},
        {"type": "linkish", "chat_id": "1"},
        {"type": "legacy", "target": "7", "payload": {"target": "8", "fields": {}}},
    ], older, {}, settings(tmp_path))
    assert [(a.index, a.payload) for a in accepted] == [(0, {"target": "7", "fields": {"likes": ["jazz"]}})]
    assert [(r.index, r.errors) for r in rejected] == [
        (1, ["Missing required field 'fields' for action 'legacy'"]),
        (2, ["Missing 'payload'"]),
        (3, ["Give the fields of action 'legacy' either in 'payload' or on the action itself, not both "
             "('target' on the action)"]),
    ]


def test_a_send_through_an_interface_not_here_names_the_ones_that_are(older, tmp_path) -> None:
    _, rejected = errors_of(older, [{"type": t, "payload": {"text": "hi"}} for t in (
        "message_webui", "x_search", "audio_chatty", "message_sleepy", "audio_sleepy", "webui_thing")], tmp_path)
    start = "Unsupported type '{}' - no plugin or interface found to handle it"
    assert [r[2][0] for r in rejected] == [
        start.format("message_webui") + ": interface 'webui' is not available here; available: chatty, outbox "
                                        "(not configured: sleepy)",
        start.format("x_search") + ": interface 'x' is not available here; available: chatty, outbox "
                                   "(not configured: sleepy)",
        start.format("audio_chatty") + ": interface 'chatty' sends no audio here; audio goes through: outbox",
        "Action 'message_sleepy' is unavailable: SLEEPY_TOKEN is not set",
        start.format("audio_sleepy") + ": interface 'sleepy' is not configured here (SLEEPY_TOKEN is not set)",
        start.format("webui_thing"),
    ]
