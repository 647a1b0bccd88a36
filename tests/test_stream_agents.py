"""stream.agents.BatchWriter without Kafka: DLQ filtering, Redis retries, the stop bound.

The agent loop itself runs against the real broker in test_stream_worker.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from stream import agents
from stream.agents import BatchWriter
from userstream.stores import RedisSequenceStore

pytestmark = pytest.mark.integration  # real Redis

TOPIC = "events"
GOOD = b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1}'


class FakeTopic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict]] = []

    async def send(self, *, key, value, force):
        assert force  # never attached to the current event (sent only at its ack)
        self.sent.append((key, json.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class FlakyStore(RedisSequenceStore):
    """A real store whose first ``failures`` writes fail like a Redis outage."""

    def __init__(self, client, keys, failures: int) -> None:
        super().__init__(client, keys)
        self.failures = failures

    def apply_many(self, topic, events, dead=()):
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Redis is down")
        return super().apply_many(topic, events, dead)


async def test_dead_letters_are_sent_once_and_counted(redis_client, keys):
    dlq = FakeTopic()
    store = RedisSequenceStore(redis_client, keys)
    writer = BatchWriter(store, dlq)
    batch = [(0, 0, b"u1", GOOD), (0, 1, b"u2", b"{bad"), (1, 0, b"u3", b"[]")]
    res = await writer.write(TOPIC, batch)
    assert (res.applied, res.dead_lettered) == (1, 2)
    assert [(k, r["offset"], r["partition"]) for k, r in dlq.sent] == [(b"u2", 1, 0), (b"u3", 0, 1)]
    assert dlq.sent[0][1]["payload"] == "{bad" and dlq.sent[0][1]["topic"] == TOPIC
    # redelivery of the same batch: no second dead letter, nothing counted twice
    again = await writer.write(TOPIC, batch)
    assert (again.applied, again.skipped, again.dead_lettered) == (0, 1, 0)
    assert len(dlq.sent) == 2
    assert store.counters()["events_dead_lettered"] == 2
    writer.close()


async def test_redis_errors_are_retried_until_the_write_lands(redis_client, keys):
    store = FlakyStore(redis_client, keys, failures=2)
    writer = BatchWriter(store, FakeTopic())
    res = await writer.write(TOPIC, [(0, 0, b"u1", GOOD)])
    assert res.applied == 1 and store.failures == 0
    assert store.counters()["events_ingested"] == 1
    writer.close()


async def test_stop_during_an_outage_exits_without_commit(redis_client, keys, monkeypatch):
    died: list[str] = []

    def fake_die(reason: str) -> None:
        died.append(reason)
        raise SystemExit(agents.EXIT_UNAPPLIED)

    monkeypatch.setattr(agents, "_die", fake_die)
    store = FlakyStore(redis_client, keys, failures=10**6)
    writer = BatchWriter(store, FakeTopic(), stopping=lambda: True, stop_grace_s=0.2)
    with pytest.raises(SystemExit):
        await writer.write(TOPIC, [(0, 0, b"u1", GOOD)])
    assert died and "Redis is unavailable" in died[0]
    assert store.counters()["events_ingested"] == 0
    writer.close()
