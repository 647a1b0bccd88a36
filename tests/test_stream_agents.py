"""stream.agents.BatchWriter without Kafka: DLQ filtering, Redis retries, the stop bound.

The agent loop itself runs against the real broker in test_stream_worker.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from stream import agents
from stream.agents import BatchWriter
from stream.events import DEAD_LETTER_MAX_BYTES
from userstream.stores import RedisSequenceStore

pytestmark = pytest.mark.integration  # real Redis

TOPIC = "events"
GOOD = b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1700000000}'


class FakeTopic:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, dict]] = []

    async def send(self, *, key, value, force):
        assert force  # never attached to the current event (sent only at its ack)
        self.sent.append((key, json.loads(value)))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class RefusingTopic(FakeTopic):
    """A DLQ whose broker refuses values over ``limit``, at send or on delivery."""

    def __init__(self, limit: int, on_delivery: bool) -> None:
        super().__init__()
        self.limit = limit
        self.on_delivery = on_delivery

    async def send(self, *, key, value, force):
        if len(value) <= self.limit:
            return await super().send(key=key, value=value, force=force)
        exc = MessageSizeTooLargeError(f"{len(value)} bytes")
        if not self.on_delivery:  # what Faust raises when aiokafka's send() refuses it
            raise ProducerSendError(f"Error while sending: {exc!r}") from exc
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(exc)
        return fut


class DownTopic(FakeTopic):
    async def send(self, *, key, value, force):
        raise ProducerSendError("Error while sending") from KafkaConnectionError("no broker")


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

    def fake_die(reason: str, code: int = agents.EXIT_UNAPPLIED) -> None:
        died.append(reason)
        raise SystemExit(code)

    monkeypatch.setattr(agents, "die", fake_die)
    store = FlakyStore(redis_client, keys, failures=10**6)
    writer = BatchWriter(store, FakeTopic(), stopping=lambda: True, stop_grace_s=0.2)
    with pytest.raises(SystemExit):
        await writer.write(TOPIC, [(0, 0, b"u1", GOOD)])
    assert died and "Redis is unavailable" in died[0]
    assert store.counters()["events_ingested"] == 0
    writer.close()


BIG = b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1700000000, "text": "%s"}' % (
    b"x" * 100_000
)


@pytest.mark.parametrize("on_delivery", [False, True])
async def test_a_refused_dead_letter_is_replaced_by_a_short_one(redis_client, keys, on_delivery):
    dlq = RefusingTopic(limit=10_000, on_delivery=on_delivery)
    store = RedisSequenceStore(redis_client, keys)
    writer = BatchWriter(store, dlq)
    res = await writer.write(TOPIC, [(0, 0, b"u1", BIG), (0, 1, b"u1", GOOD)])
    assert (res.applied, res.dead_lettered) == (1, 1)
    [(key, record)] = dlq.sent
    assert key is None and record["truncated"] is True and record["payload_bytes"] == len(BIG)
    assert record["reason"] == "text is 100000 characters long (at most 1024)"
    assert record["offset"] == 0 and BIG.decode().startswith(record["payload"])
    writer.close()


async def test_dead_letters_fit_the_default_producer_limit(redis_client, keys):
    dlq = RefusingTopic(limit=DEAD_LETTER_MAX_BYTES, on_delivery=False)
    writer = BatchWriter(RedisSequenceStore(redis_client, keys), dlq)
    huge = BIG.replace(b"x" * 100_000, b'\\"' * 300_000)  # escapes grow in the record
    await writer.write(TOPIC, [(0, 0, b"u1", huge)])
    [(key, record)] = dlq.sent
    assert key == b"u1" and record["truncated"] is True and record["payload_bytes"] == len(huge)
    assert record["reason"] == "text is 300000 characters long (at most 1024)"
    writer.close()


async def test_a_broker_outage_fails_the_batch_so_it_is_redelivered(redis_client, keys):
    store = RedisSequenceStore(redis_client, keys)
    writer = BatchWriter(store, DownTopic())
    with pytest.raises(ProducerSendError):
        await writer.write(TOPIC, [(0, 0, b"u1", b"{bad"), (0, 1, b"u1", GOOD)])
    # nothing applied, no offset stored: the agent exits (70) and the batch comes again
    assert store.counters()["events_ingested"] == 0 and store.applied_offsets(TOPIC) == {}
    writer.close()


async def test_a_record_delivered_twice_in_one_batch_counts_once(redis_client, keys):
    """Kafka has one record per (partition, offset): a repeat within a batch (a seek
    while messages were buffered) is not an array message and is applied once."""
    store = RedisSequenceStore(redis_client, keys)
    writer = BatchWriter(store, FakeTopic())
    other = GOOD.replace(b'"i1"', b'"i2"')
    batch = [(0, 0, b"u1", GOOD), (0, 1, b"u1", other), (0, 0, b"u1", GOOD), (0, 1, b"u1", other)]
    assert (await writer.write(TOPIC, batch)).applied == 2
    assert [b.item_id for b in store.read_many(["u1"])[0]] == ["i1", "i2"]
    writer.close()
