"""The LLM-reply parser: every accepted form, prose and fences, and no input that crashes it."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rekku.parsing import parse_text, parse_value

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
actions = st.lists(
    st.fixed_dictionaries({"type": st.text(min_size=1, max_size=20),
                           "payload": st.dictionaries(st.text(max_size=8), json_values, max_size=4)}),
    min_size=1, max_size=6)
prose = st.text(alphabet=st.characters(blacklist_characters="{}[]`"), max_size=80)


def test_three_top_level_forms() -> None:
    one = {"type": "echo", "payload": {"text": "a"}}
    assert parse_value({"actions": [one, one]}).actions == [one, one]
    assert parse_value([one, one]).actions == [one, one]
    assert parse_value(one).actions == [one]


def test_a_bare_array_keeps_all_its_actions_upstream_kept_one() -> None:
    text = '[{"type": "a", "payload": {}}, {"type": "b", "payload": {}}, {"type": "c", "payload": {}}]'
    assert [a["type"] for a in parse_text(text).actions] == ["a", "b", "c"]


def test_code_fence_and_prose_around_the_json() -> None:
    text = 'Okay!\n```json\n{"actions": [{"type": "echo", "payload": {}}]}\n```\nBye {not json}'
    assert parse_text(text).actions == [{"type": "echo", "payload": {}}]


def test_prose_braces_before_the_actions_are_skipped() -> None:
    text = 'I think {this} and {"mood": "ok"} then {"actions": [{"type": "echo", "payload": {}}]}'
    assert parse_text(text).actions == [{"type": "echo", "payload": {}}]


def test_system_message_is_ignored_not_executed() -> None:
    result = parse_text('{"system_message": {"type": "output", "message": "hi"}}')
    assert result.actions == [] and result.ignored_system_message and not result.errors


def test_strictness_nan_duplicates_depth_and_utf8() -> None:
    assert "NaN" in parse_text('{"type": "x", "payload": {"v": NaN}}').errors[0]
    assert "duplicate key 'type'" in parse_text('{"type": "x", "type": "y", "payload": {}}').errors[0]
    assert "nested too deeply" in parse_text("[" * 100_000).errors[0]
    assert "nested too deeply" in parse_text('{"a":' * 50_000).errors[0]
    assert "not valid UTF-8" in parse_text(b'{"type": "\xff"}').errors[0]
    assert parse_text("").errors == ["The reply is empty: expected JSON actions"]


@given(actions, prose, prose, st.booleans())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_any_actions_survive_prose_and_fences(acts, before, after, fenced) -> None:
    body = json.dumps({"actions": acts})
    text = f"{before}\n```json\n{body}\n```\n{after}" if fenced else f"{before} {body} {after}"
    assert parse_text(text).actions == acts


@given(st.text(max_size=2000))
@settings(max_examples=300)
def test_arbitrary_text_never_raises(text) -> None:
    result = parse_text(text)
    assert isinstance(result.actions, list)
    assert result.actions or result.errors or result.ignored_system_message


@given(st.binary(max_size=500))
@settings(max_examples=200)
def test_arbitrary_bytes_never_raise(data) -> None:
    parse_text(data)


def test_huge_string_is_parsed_without_trouble() -> None:
    text = json.dumps({"actions": [{"type": "echo", "payload": {"text": "x" * 900_000}}]})
    assert len(parse_text("noise " + text).actions[0]["payload"]["text"]) == 900_000


# ----------------------------------------------------------------------------- a reply with no JSON at all
def test_plain_prose_is_told_apart_from_json_that_is_not_actions() -> None:
    for text in ("Ciao! Come stai?", "Sure [laughs], {this} is fine.", "The answer is 42.\n"):
        result = parse_text(text)
        assert result.plain_text == text.strip() and result.errors and not result.actions, text
    for text in ('Sure! {"type": "message_telegram_bot", "payload": {"text": "hi"',  # broken JSON, cut off
                 'I feel {"mood": "ok"}', "Numbers [1, 2]", "```json\nnot json\n```", "{'type': 'echo'}",
                 "a [] b", "42", '"just a string"', "true", "", "   ", '{"actions": "echo"}'):
        assert parse_text(text).plain_text is None, text


@given(prose, st.sampled_from(['{"', "{'", "[{", '["', "```", "{}", "[]", "[[", "{ \""]), prose)
@settings(max_examples=200)
def test_nothing_that_looks_like_json_is_ever_taken_for_prose(before, sign, after) -> None:
    assert parse_text(before + sign + after).plain_text is None
