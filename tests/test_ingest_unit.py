"""The ingress in-process (no broker, no worker, milliseconds): parsing, validation, the action log on
SQLite, and what it publishes, seen by a publisher that records each message instead of sending it.

The end-to-end tests send the same requests through HTTP, Redis and workers; here the publisher is
handed to ``Ingress`` through its constructor, so what is tested is the ingress's own logic.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from rekku.action_log import ActionLog
from rekku.db import make_engine
from rekku.errors import ServiceUnavailable
from rekku.ingest import Ingress
from rekku.models import Base
from rekku.plugin_base import AIPluginBase
from rekku.registry import Registry
from rekku.settings import Settings
from tests.support import REDIS_HOST, REDIS_PORT, claim_redis_db, free_port, release_redis_db


class Notes(AIPluginBase):
    @staticmethod
    def get_supported_action_types() -> list[str]:
        return ["note", "shell"]

    def get_supported_actions(self) -> dict:
        return {"note": {"description": "", "required_fields": ["text"], "optional_fields": []},
                "shell": {"description": "", "required_fields": [], "optional_fields": [], "trainer_only": True}}


class RecordingPublisher:
    """What ``rekku.dispatch.enqueue`` uses of a Celery app, keeping each message instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    @contextmanager
    def producer_or_acquire(self) -> Iterator[None]:
        yield None

    def send_task(self, name: str, kwargs: dict, task_id: str, queue: str, **options: Any) -> None:
        self.sent.append({"name": name, "kwargs": kwargs, "task_id": task_id, "queue": queue})


@pytest.fixture
def ingress(tmp_path: Path) -> Iterator[tuple[Ingress, RecordingPublisher, sa.Engine]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ingest.db'}")
    Base.metadata.create_all(engine)
    registry = Registry()
    registry.add_plugin("notes", Notes())
    publisher = RecordingPublisher()
    settings = Settings(_env_file=None, REKKU_HOME=str(tmp_path), TRAINER_IDS="telegram_bot:42")
    try:
        yield Ingress(settings, registry, ActionLog(engine), publisher=publisher), publisher, engine
    finally:
        engine.dispose()


def _runs(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT id, batch_id, type, status, payload FROM action_runs "
                                                      "ORDER BY position")).mappings()]


def test_accepted_actions_are_logged_then_published_one_message_each(ingress) -> None:
    ing, publisher, engine = ingress
    answer = ing.submit_from_client({"actions": [{"type": "note", "payload": {"text": "a"}},
                                                 {"type": "note", "payload": {"text": "b"}}]}, {"chat_id": "c1"})
    assert answer.status == 202 and answer.rejected == [] and answer.correction is None
    ids = [a["id"] for a in answer.accepted]
    assert [(r["id"], r["batch_id"], r["type"], r["status"]) for r in _runs(engine)] == [
        (ids[0], answer.batch_id, "note", "queued"), (ids[1], answer.batch_id, "note", "queued")]
    assert [(m["name"], m["task_id"], m["queue"]) for m in publisher.sent] == [
        ("rekku.action.note", ids[0], "default"), ("rekku.action.note", ids[1], "default")]
    first = publisher.sent[0]["kwargs"]
    assert first["action_id"] == ids[0] and first["payload"] == {"text": "a"}
    assert first["context"]["batch_id"] == answer.batch_id and first["context"]["chat_id"] == "c1"


def test_a_rejected_action_gets_a_correction_and_publishes_nothing(ingress) -> None:
    ing, publisher, engine = ingress
    answer = ing.submit_from_client({"actions": [{"type": "note", "payload": {}},
                                                 {"type": "shell", "payload": {}}]},
                                    {"interface": "telegram_bot", "user_id": "666", "chat_id": "c1"})
    assert answer.status == 422 and answer.accepted == [] and answer.batch_id is None
    errors = [e for r in answer.rejected for e in r["errors"]]
    assert any("'text'" in e for e in errors) and any("restricted to trainers" in e for e in errors), errors
    assert answer.correction is not None
    assert publisher.sent == [] and _runs(engine) == []


def test_a_partly_rejected_request_publishes_only_what_was_accepted(ingress) -> None:
    ing, publisher, engine = ingress
    answer = ing.submit_from_client({"actions": [{"type": "shell", "payload": {}},
                                                 {"type": "note", "payload": {"text": "ok"}}]},
                                    {"interface": "telegram_bot", "user_id": "666", "chat_id": "c1"})
    assert answer.status == 202 and [a["type"] for a in answer.accepted] == ["note"]
    assert [r["type"] for r in answer.rejected] == ["shell"] and answer.correction is not None
    assert [m["task_id"] for m in publisher.sent] == [answer.accepted[0]["id"]] == [r["id"] for r in _runs(engine)]


def test_an_idempotent_resubmission_answers_the_same_and_publishes_nothing_new(ingress) -> None:
    ing, publisher, engine = ingress
    body, context = {"actions": [{"type": "note", "payload": {"text": "once"}}]}, {"chat_id": "c1"}
    first = ing.submit_from_client(body, context, idempotency_key="client-key-1")
    assert len(publisher.sent) == 1
    again = ing.submit_from_client(body, context, idempotency_key="client-key-1")
    assert again.as_dict() == first.as_dict()
    assert len(publisher.sent) == 1 and len(_runs(engine)) == 1


# ----------------------------------------------------------------------------- through a real broker
def _real_publisher(url: str) -> Celery:
    app = Celery("ingest-unit", broker=url)
    app.config_from_object("rekku.celeryconfig")
    app.conf.broker_url = url
    return app


def test_a_request_s_messages_reach_redis_as_celery_messages_in_order(tmp_path: Path) -> None:
    """The batch publish (one pipeline per request) still writes one ordinary Celery message per action,
    in the request's order, each followed by its task-sent event for Flower."""
    number = claim_redis_db()
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}"
    engine = make_engine(f"sqlite:///{tmp_path / 'ingest.db'}")
    Base.metadata.create_all(engine)
    registry = Registry()
    registry.add_plugin("notes", Notes())
    publisher = _real_publisher(url)
    client = redis.Redis.from_url(url)
    events = client.pubsub()
    try:
        events.psubscribe(f"/{number}.celeryev*")  # kombu's fanout channels are named per db; others share the server
        events.get_message(timeout=2)  # the subscription's confirmation
        ing = Ingress(Settings(_env_file=None, REKKU_HOME=str(tmp_path)), registry, ActionLog(engine),
                      publisher=publisher)
        answer = ing.submit_from_client({"actions": [{"type": "note", "payload": {"text": str(n)}} for n in range(5)]},
                                        {"chat_id": "c1"})
        ids = [a["id"] for a in answer.accepted]
        # kombu LPUSHes and workers BRPOP: the oldest message is at the right end
        raw = [json.loads(m) for m in reversed(client.lrange("default", 0, -1))]
        assert [m["headers"]["id"] for m in raw] == ids
        assert {m["headers"]["task"] for m in raw} == {"rekku.action.note"}
        assert [m["properties"]["delivery_info"]["routing_key"] for m in raw] == ["default"] * 5
        sent = []
        while (message := events.get_message(timeout=2)) is not None:
            if message["type"] == "pmessage":
                body = json.loads(message["data"])
                sent.append(json.loads(base64.b64decode(body["body"]))["uuid"])
        assert sent == ids  # Flower sees each task sent, in order
    finally:
        events.close()
        publisher.close()
        engine.dispose()
        client.flushdb()
        release_redis_db(number)


def test_with_the_broker_down_nothing_is_queued_every_action_fails_and_the_key_is_released(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ingest.db'}")
    Base.metadata.create_all(engine)
    registry = Registry()
    registry.add_plugin("notes", Notes())
    publisher = _real_publisher(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        ing = Ingress(Settings(_env_file=None, REKKU_HOME=str(tmp_path)), registry, ActionLog(engine),
                      publisher=publisher)
        body = {"actions": [{"type": "note", "payload": {"text": "a"}}, {"type": "note", "payload": {"text": "b"}}]}
        with pytest.raises(ServiceUnavailable, match="2 of 2 actions were not enqueued"):
            ing.submit_from_client(body, {"chat_id": "c1"}, idempotency_key="k-1")
        runs = _runs(engine)
        assert [r["status"] for r in runs] == ["failed", "failed"]
        with engine.connect() as conn:
            errors = conn.scalars(sa.text("SELECT error FROM action_runs")).all()
            assert all("the broker is unreachable" in e for e in errors), errors
        # the key was released: the same request again is new work, not the failed batch's answer
        ing.publisher = RecordingPublisher()
        again = ing.submit_from_client(body, {"chat_id": "c1"}, idempotency_key="k-1")
        assert again.status == 202 and {r["batch_id"] for r in runs}.isdisjoint({again.batch_id})
    finally:
        publisher.close()
        engine.dispose()
