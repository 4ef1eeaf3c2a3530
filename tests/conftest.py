"""Session fixtures shared by every test module: real servers on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from harness.redis_server import RedisServer

pytest_plugins = ["harness.cluster_fixtures", "harness.operator_fixtures"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture()
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A clean database for each test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()
