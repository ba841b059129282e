"""message_reddit end to end: ingress → io worker → praw → the fake Reddit API on 127.0.0.1."""

from __future__ import annotations

import sqlalchemy as sa
from rekku_plugins.reddit_plugin import subreddit_name

from tests.support import Stack

CTX = {"interface": "telegram_bot", "user_id": "42", "chat_id": "42"}


def test_subreddit_names_keep_their_leading_r() -> None:
    assert [subreddit_name(t) for t in ("r/rome", "rome", "/r/rome/", "R/rome", "rust", "r/rust", "r")] == [
        "rome", "rome", "rome", "rome", "rust", "rust", "r"]


def test_a_new_self_post_with_title_and_flair(plugin_stack: Stack, fake_reddit: object) -> None:
    fake_reddit.reset()
    run = plugin_stack.run("message_reddit", {"text": "Hello Reddit", "target": "r/rust", "title": "Hi",
                                              "flair_id": "flair-1"}, CTX)
    assert run["status"] == "succeeded", run
    assert run["queue"] == "io" and run["result"]["kind"] == "post" and run["result"]["subreddit"] == "rust"
    assert fake_reddit.posts == [{"kind": "submission", "id": run["result"]["id"], "sr": "rust", "title": "Hi",
                                  "text": "Hello Reddit", "flair_id": "flair-1"}]
    plain = plugin_stack.run("message_reddit", {"text": "again", "target": "rome", "title": "T"}, CTX)
    assert plain["status"] == "succeeded" and fake_reddit.posts[-1]["sr"] == "rome"


def test_a_reply_goes_to_the_comment_or_falls_back_to_the_submission(plugin_stack: Stack,
                                                                      fake_reddit: object) -> None:
    fake_reddit.reset()
    to_comment = plugin_stack.run("message_reddit", {"text": "re", "target": "r/rekku", "thread_id": "cmt456"}, CTX)
    to_post = plugin_stack.run("message_reddit", {"text": "re2", "target": "r/rekku", "thread_id": "abc123"}, CTX)
    assert to_comment["status"] == to_post["status"] == "succeeded", (to_comment, to_post)
    assert [p["parent"] for p in fake_reddit.posts] == ["t1_cmt456", "t3_abc123"]
    assert to_post["result"]["parent"] == "t3_abc123"


def test_the_original_interfaces_reply_message_id_is_a_reply_and_its_other_meanings_are_refused(
        plugin_stack: Stack, fake_reddit: object) -> None:
    fake_reddit.reset()
    run = plugin_stack.run("message_reddit", {"text": "re", "target": "r/rekku", "reply_message_id": "t1_cmt456"}, CTX)
    assert run["status"] == "succeeded", run
    assert run["payload"] == {"text": "re", "target": "r/rekku", "thread_id": "t1_cmt456"}
    assert [(p["parent"], p["text"]) for p in fake_reddit.posts] == [("t1_cmt456", "re")]
    refused = [
        ({"target": "r/rekku", "thread_id": "cmt456", "reply_message_id": "abc123"},
         "Fields 'thread_id' and 'reply_message_id' (its older name) differ for action 'message_reddit': "
         "give only one"),
        ({"target": "r/rekku", "reply_message_id": "t4_msg1"},
         "Field 'thread_id' is a private message (t4_) for action 'message_reddit': replies to private messages are "
         "not sent here; give a comment (t1_) or post (t3_) id"),
        ({"target": "u/someone", "title": "hi"},
         "Field 'target' must be a subreddit like r/name for action 'message_reddit' (direct messages to users are "
         "not sent here)"),
    ]
    answer = plugin_stack.submit([{"type": "message_reddit", "payload": {"text": "x", **p}} for p, _ in refused], CTX)
    assert answer["accepted"] == [] and [r["errors"] for r in answer["rejected"]] == [[e] for _, e in refused]
    assert len(fake_reddit.posts) == 1


def test_a_new_post_needs_a_title_and_a_subreddit(plugin_stack: Stack) -> None:
    no_title = {"text": "x", "target": "r/ok"}
    bad_name = {"text": "x", "target": "r/a b", "title": "t"}
    answer = plugin_stack.submit([{"type": "message_reddit", "payload": no_title},
                                  {"type": "message_reddit", "payload": bad_name}], CTX)
    errors = [e for r in answer["rejected"] for e in r["errors"]]
    assert any("'title' is needed" in e for e in errors) and any("subreddit like r/name" in e for e in errors)


def test_reddit_errors_are_clear_failed_results(plugin_stack: Stack, fake_reddit: object) -> None:
    fake_reddit.reset()
    forbidden = plugin_stack.run("message_reddit", {"text": "x", "target": "r/private_club", "title": "t"}, CTX)
    deleted = plugin_stack.run("message_reddit", {"text": "x", "target": "r/rekku", "thread_id": "gone99"}, CTX)
    fake_reddit.rate_limited = 1
    limited = plugin_stack.run("message_reddit", {"text": "x", "target": "r/rekku", "title": "t"}, CTX)
    assert forbidden["status"] == deleted["status"] == limited["status"] == "failed"
    assert "r/private_club is private, banned or forbids this account" in forbidden["error"]
    assert "thread gone99 is deleted" in deleted["error"]
    assert limited["error"].startswith("PluginError: Reddit rate limit: RATELIMIT")
    assert fake_reddit.posts == []


def test_a_redelivered_action_never_posts_twice(plugin_stack: Stack, fake_reddit: object) -> None:
    """The same action run again (as a redelivery would) finds its post recorded and does not post."""
    from celery import Celery

    fake_reddit.reset()
    run = plugin_stack.run("message_reddit", {"text": "once", "target": "r/rekku", "title": "t"}, CTX)
    assert run["status"] == "succeeded"
    engine = sa.create_engine(plugin_stack.database_url)
    with engine.begin() as conn:  # make the log believe its worker died mid-run
        conn.execute(sa.text("UPDATE action_runs SET status='running' WHERE id=:id"), {"id": run["id"]})
    engine.dispose()
    app = Celery(broker=plugin_stack.broker_url)
    app.send_task("rekku.action.message_reddit", kwargs={"action_id": run["id"], "payload": run["payload"],
                                                          "context": run["context"]}, queue="io")
    app.close()
    again = plugin_stack.wait_action(run["id"])
    while again["status"] == "running":
        again = plugin_stack.wait_action(run["id"])
    assert again["status"] == "succeeded" and again["result"]["already_posted"] is True, again
    assert again["result"]["id"] == run["result"]["id"] and len(fake_reddit.posts) == 1
