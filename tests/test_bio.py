"""bio_manager: merge rules (property tests, in-process), guards and name resolution (end to end, MariaDB)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from rekku_plugins.bio_manager import LIST_FIELDS, MAX_FIELDS, bio, field_errors, merge_field, merge_values, union

from rekku.models import utcnow
from tests.support import Stack

# ----------------------------------------------------------------------------- merge rules (pure)
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=4), max_leaves=12)
lists = st.lists(json_values, max_size=6)
dicts = st.dictionaries(st.text(max_size=3), json_values, max_size=5)


def key(value: object) -> str:
    return json.dumps(value, sort_keys=True)


@given(lists, lists)
def test_list_union_keeps_the_old_list_and_adds_each_missing_new_element_once(old: list, new: list) -> None:
    merged = union(old, new)
    assert merged[:len(old)] == old
    added = merged[len(old):]
    assert {key(v) for v in merged} == {key(v) for v in old + new}
    assert len({key(v) for v in added}) == len(added), "nothing is added twice"
    assert not {key(v) for v in added} & {key(v) for v in old}, "nothing already there is added"


@given(lists, lists, lists)
def test_list_union_is_associative(a: list, b: list, c: list) -> None:
    assert union(union(a, b), c) == union(a, union(b, c))


@given(json_values)
def test_merging_a_value_into_itself_changes_nothing(value: object) -> None:
    assert merge_values(value, value) == value


@given(dicts, dicts)
def test_dicts_merge_deeply_and_lose_no_key(old: dict, new: dict) -> None:
    merged = merge_values(old, new)
    assert set(merged) == set(old) | set(new)
    for k in merged:
        if k not in new:
            assert merged[k] == old[k]
        elif k not in old:
            assert merged[k] == new[k]
        else:
            assert merged[k] == merge_values(old[k], new[k])


@given(dicts)
def test_an_empty_object_is_the_identity_of_the_deep_merge(value: dict) -> None:
    assert merge_values(value, {}) == value
    assert merge_values({}, value) == value


@given(json_values, scalars)
def test_scalars_replace_whatever_was_there(old: object, new: object) -> None:
    assert merge_values(old, new) == new


@given(st.sampled_from(LIST_FIELDS), st.none() | lists, scalars | lists)
def test_list_fields_stay_lists_even_when_sent_one_value(name: str, old: list | None, new: object) -> None:
    merged = merge_field(name, old, new)
    assert isinstance(merged, list)
    for value in new if isinstance(new, list) else [new]:
        assert key(value) in {key(v) for v in merged}


def test_nested_contacts_merge_deeply() -> None:
    old = {"telegram": {"ids": ["1"], "name": "a"}, "email": "a@x"}
    new = {"telegram": {"ids": ["2", "1"], "name": "b"}, "phone": "123"}
    assert merge_field("contacts", old, new) == {"telegram": {"ids": ["1", "2"], "name": "b"}, "email": "a@x",
                                                 "phone": "123"}


def test_field_errors_enforce_the_per_update_limit_and_known_names() -> None:
    assert field_errors("bio_update", {"likes": ["x"], "known_as": ["y"], "feelings": ["z"]}) == []
    too_many = {"likes": [1], "known_as": [2], "feelings": [3], "not_likes": [4]}
    assert any(f"At most {MAX_FIELDS} fields" in e for e in field_errors("bio_update", too_many))
    assert any("Unknown bio field(s) shoe_size" in e for e in field_errors("bio_update", {"shoe_size": 42}))
    assert field_errors("bio_update", {}) == ["Field 'fields' must be a non-empty object for action 'bio_update'"]
    assert field_errors("bio_update", {"contacts": "x"}) == [
        "Field 'contacts' must be an object for action 'bio_update'"]


# ----------------------------------------------------------------------------- end to end on MariaDB
def uid() -> str:
    return uuid.uuid4().hex[:10]


def insert_bio(stack: Stack, bio_id: str, hours_ago: float, **fields: object) -> None:
    engine = sa.create_engine(stack.database_url)
    when = utcnow() - timedelta(hours=hours_ago)
    with engine.begin() as c:
        c.execute(sa.insert(bio).values(id=bio_id, created_at=when, last_update=when, update_count=1, **fields))
    engine.dispose()


def read_bio(stack: Stack, bio_id: str) -> dict:
    engine = sa.create_engine(stack.database_url)
    with engine.connect() as c:
        row = c.execute(sa.select(bio).where(bio.c.id == bio_id)).mappings().one()
    engine.dispose()
    return dict(row)


def test_bio_update_creates_then_refuses_a_second_update_within_the_hour(memory_stack: Stack) -> None:
    person = uid()
    run = memory_stack.run("bio_update", {"target": person,
                                          "fields": {"likes": ["jazz"], "user_name": "marco_" + person}})
    assert run["status"] == "succeeded", run
    assert run["result"] == {"updated": True, "id": person, "created": True, "fields": ["likes", "user_name"]}
    again = memory_stack.run("bio_update", {"target": person, "fields": {"likes": ["rock"]}})
    assert again["status"] == "failed"
    assert "at most one update per person per hour" in again["error"]
    row = read_bio(memory_stack, person)
    assert row["likes"] == ["jazz"] and row["update_count"] == 1 and row["user_name"] == "marco_" + person


def test_reading_a_bio_is_not_an_update(memory_stack: Stack) -> None:
    """Upstream counted reads as updates, so an active person could never be updated."""
    person = uid()
    insert_bio(memory_stack, person, hours_ago=2, likes=["jazz"], known_as=["Marco"],
               contacts={"telegram": {"ids": ["1"]}})
    read = memory_stack.run("bio_full_request", {"targets": [person]})
    assert read["status"] == "succeeded", read
    assert read["result"]["bios"][0]["likes"] == ["jazz"]
    prompt = memory_stack.get("/v1/prompt", params={"chat_id": "bio-chat-" + person, "user_id": person}).json()
    assert prompt["context"]["participants"][0]["likes"] == ["jazz"]
    before = read_bio(memory_stack, person)
    assert before["update_count"] == 1 and before["last_accessed"] is not None
    run = memory_stack.run("bio_update", {"target": person, "fields": {
        "likes": ["rock", "jazz"], "contacts": {"telegram": {"ids": ["2"]}, "email": "m@example.org"},
        "information": "Plays the sax"}})
    assert run["status"] == "succeeded", run
    row = read_bio(memory_stack, person)
    assert row["likes"] == ["jazz", "rock"]
    assert row["contacts"] == {"telegram": {"ids": ["1", "2"]}, "email": "m@example.org"}
    assert row["information"] == "Plays the sax"
    assert row["update_count"] == 2 and row["last_update"] > before["last_update"]


def test_bio_full_request_resolves_ids_user_names_and_nicknames(memory_stack: Stack) -> None:
    a, b, c = uid(), uid(), uid()
    nick = "Nick" + a
    insert_bio(memory_stack, a, hours_ago=3, user_name="alice_" + a, known_as=["Ally " + a])
    insert_bio(memory_stack, b, hours_ago=3, user_name="bob_" + a, known_as=[nick])
    insert_bio(memory_stack, c, hours_ago=3, user_name="carl_" + a, known_as=[nick.upper()])
    run = memory_stack.run("bio_full_request", {"targets": [b, "@ALICE_" + a, "ally " + a, nick, "nobody-" + a]},
                           context={"chat_id": "bio-q-" + a})
    assert run["status"] == "succeeded", run
    result = run["result"]
    assert [x["id"] for x in result["bios"]] == [b, a]  # alice found twice, listed once
    assert result["bios"][1]["user_name"] == "alice_" + a
    assert result["not_found"] == ["nobody-" + a]
    assert "matches several people" in result["ambiguous"][nick] and "numeric id" in result["ambiguous"][nick]


def test_bio_update_by_nickname_updates_that_person(memory_stack: Stack) -> None:
    a = uid()
    insert_bio(memory_stack, a, hours_ago=5, known_as=["Zed" + a])
    run = memory_stack.run("bio_update", {"target": "zed" + a, "fields": {"known_as": "Zeddy" + a}})
    assert run["status"] == "succeeded", run
    assert run["result"]["id"] == a and run["result"]["created"] is False
    assert read_bio(memory_stack, a)["known_as"] == ["Zed" + a, "Zeddy" + a]


def test_bio_update_of_more_than_three_fields_is_rejected_at_the_ingress(memory_stack: Stack) -> None:
    answer = memory_stack.submit([{"type": "bio_update", "payload": {"target": uid(), "fields": {
        "likes": ["a"], "not_likes": ["b"], "known_as": ["c"], "feelings": ["d"]}}}])
    assert answer["accepted"] == []
    assert "At most 3 fields per update" in answer["rejected"][0]["errors"][0]
    bad = memory_stack.submit([{"type": "bio_full_request", "payload": {"targets": "someone"}}])
    assert bad["rejected"][0]["errors"] == [
        "Field 'targets' must be a non-empty list of user ids or names for action 'bio_full_request'"]


def test_participants_injection_lists_the_asking_user_and_the_chat_s_users(memory_stack: Stack) -> None:
    chat, known, stranger = "part-" + uid(), uid(), uid()
    insert_bio(memory_stack, known, hours_ago=2, likes=["tea"], user_name="known_" + known)
    assert memory_stack.run("echo", {"text": "hi"}, {"chat_id": chat, "user_id": stranger,
                                                     "username": "stranger_" + stranger})["status"] == "succeeded"
    prompt = memory_stack.get("/v1/prompt", params={"chat_id": chat, "user_id": known, "text": "hello"}).json()
    people = prompt["context"]["participants"]
    assert people[0] == {"id": known, "likes": ["tea"], "user_name": "known_" + known}
    assert people[1] == {"id": stranger, "user_name": "stranger_" + stranger, "bio": "none yet"}



def test_the_original_legacy_form_with_fields_on_the_action_works_for_the_two_bio_actions_only(
        memory_stack: Stack) -> None:
    """The original's prompts wrote bio_update/bio_full_request with their fields on the action and no
    payload: a model reply in that form (raw text, as a model writes it) runs; any other type still needs
    its payload."""
    person = uid()
    reply = json.dumps({"actions": [
        {"type": "bio_update", "target": person, "fields": {"likes": ["jazz"], "known_as": ["Legacy " + person]}},
        {"type": "create_personal_diary_entry", "interaction_summary": "talked about jazz"},
        {"type": "echo", "text": "hi"}]})
    resp = memory_stack.post("/v1/actions", {"text": f"Sure.\n```json\n{reply}\n```"})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert [(a["index"], a["type"]) for a in body["accepted"]] == [(0, "bio_update")]
    assert [(r["index"], r["errors"]) for r in body["rejected"]] == [(1, ["Missing 'payload'"]),
                                                                     (2, ["Missing 'payload'"])]
    update = memory_stack.wait_action(body["accepted"][0]["id"])
    assert update["status"] == "succeeded", update
    assert update["payload"] == {"target": person, "fields": {"likes": ["jazz"], "known_as": ["Legacy " + person]}}
    assert read_bio(memory_stack, person)["likes"] == ["jazz"]
    resp = memory_stack.post("/v1/actions", {"actions": [{"type": "bio_full_request",
                                                          "targets": ["legacy " + person]}]})
    assert resp.status_code == 202, resp.text
    read = memory_stack.wait_action(resp.json()["accepted"][0]["id"])
    assert read["status"] == "succeeded" and [b["id"] for b in read["result"]["bios"]] == [person], read
    both = memory_stack.submit([{"type": "bio_full_request", "targets": [person], "payload": {"targets": ["x"]}}])
    assert both["rejected"][0]["errors"] == ["Give the fields of action 'bio_full_request' either in 'payload' or "
                                             "on the action itself, not both ('targets' on the action)"]
