"""rekku.kombu_clients: kombu's Redis channel reuses one redis.Redis per connection pool (it built one
per publish, acknowledgement and event flush), and still works through it; a new pool gets a new one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from rekku.kombu_clients import reuse_clients
from tests.support import REDIS_HOST, REDIS_PORT, claim_redis_db, release_redis_db


@pytest.fixture
def channel() -> Iterator[object]:
    reuse_clients()
    number = claim_redis_db()
    connection = Connection(f"redis://{REDIS_HOST}:{REDIS_PORT}/{number}")
    try:
        yield connection.default_channel
    finally:
        connection.release()
        redis.Redis(REDIS_HOST, REDIS_PORT, db=number).flushdb()
        release_redis_db(number)


def test_one_client_per_pool_serves_every_command(channel) -> None:  # noqa: ANN001 - kombu's channel
    first = channel._create_client()
    assert channel._create_client() is first  # not a new redis.Redis per command
    with channel.conn_or_acquire() as client:
        assert client is first
        client.lpush("kombu-clients-test", b"x")
    assert first.llen("kombu-clients-test") == 1
    assert channel._create_client(asynchronous=True) is not first  # the event loop's own client is untouched


def test_a_new_pool_gets_a_new_client(channel) -> None:  # noqa: ANN001
    before = channel._create_client()
    channel._pool = None  # kombu drops its pool when the connection is lost, and makes a new one
    after = channel._create_client()
    assert after is not before and after.connection_pool is channel.pool
    assert after.ping()
