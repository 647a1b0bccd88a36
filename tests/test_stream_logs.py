"""Offsets tied to the log they came from (``stream.logs``): a new broker, a
recreated topic, never turn new events into "duplicates"."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from stream import agents
from stream.agents import BatchWriter
from stream.logs import LogChanged, LogGuard
from stream.topics import delete_topics, ensure_topics
from tests.helpers import wait_until
from tests.test_stream_worker import Worker, _send_raw, wait_ready
from userstream.embedded import free_port, start_broker
from userstream.settings import Settings
from userstream.stores import MemorySequenceStore, RedisSequenceStore
from userstream.types import Event


class Ids:
    """A log identity the test changes by hand."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __call__(self, topics):
        return {t: self.value for t in topics}


def test_the_guard_binds_at_assignment_and_refuses_a_changed_log():
    store, ids = MemorySequenceStore(), Ids("c/1")
    guard = LogGuard(store, "t", ids)
    assert guard.bind([0]) == {} and guard.bound == "c/1" and store.log_of("t", 0) == "c/1"
    store.apply_many("t", [(0, i, Event("u", f"i{i}", "view", 1.0 + i)) for i in range(3)])
    guard.check()  # the same log: fine
    ids.value = "c/2"  # the broker came back empty, without a rebalance
    with pytest.raises(LogChanged, match="from log c/1 to c/2"):
        guard.check()
    assert guard.bind([0]) == {0: "c/1"} and guard.bound == "c/2"
    assert store.applied_offsets("t") == {} and store.counters()["offset_log_resets"] == 1


async def test_a_batch_of_a_changed_log_is_not_applied(monkeypatch):
    """The writer exits (75) before applying a batch read from an unknown log."""
    died = []

    def fake_die(reason: str, code: int = agents.EXIT_UNAPPLIED) -> None:
        died.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(agents, "die", fake_die)
    store, ids = MemorySequenceStore(), Ids("c/1")
    guard = LogGuard(store, "t", ids)
    guard.bind([0])
    writer = BatchWriter(store, None, guard=guard)
    event = b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1700000000}'
    assert (await writer.write("t", [(0, 0, b"u1", event)])).applied == 1
    ids.value = "c/2"
    with pytest.raises(SystemExit):
        await writer.write("t", [(0, 1, b"u1", event)])
    assert died == [agents.EXIT_LOG_CHANGED] and store.counters()["events_ingested"] == 1
    writer.close()


def _events(user: str, n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [
        (user.encode(), json.dumps({"user_id": user, "item_id": f"i{start + k}",
                                    "behavior": "view", "ts": 1_700_000_000 + start + k}).encode())
        for k in range(n)
    ]  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_events_after_a_broker_restart_are_applied_not_skipped(
    tmp_path, redis_client, redis_url, keys
):
    """The embedded broker comes back empty (offsets from 0 again) while Redis keeps
    the old offsets: the new events are applied, none counted as a duplicate."""
    port = free_port()
    broker = start_broker(port, tmp_path / "broker.log")
    s = Settings(
        data_dir=tmp_path, kafka_bootstrap_servers=f"127.0.0.1:{port}", redis_url=redis_url,
        redis_prefix=keys.prefix, stream_app_id=f"logs-{uuid.uuid4().hex[:8]}",
        topic_partitions=1, stream_batch_within_s=0.05,
    )  # fmt: skip
    store = RedisSequenceStore(redis_client, keys, s.sequence_length)
    workers = []
    try:
        ensure_topics(s.effective_kafka, s)
        workers.append(Worker(s, tmp_path / "w0.log"))
        wait_ready(workers[0], redis_client, s)
        asyncio.run(_send_raw(s, _events("u1", 30)))
        wait_until(lambda: store.counters()["events_ingested"] == 30, 60, "30 applied")
        before = store.log_of(s.events_topic, 0)

        broker.kill()  # memory storage: topics, offsets and the group are gone
        broker.wait(10)
        workers[0].proc.kill()  # as the supervisor stops the broker's followers
        workers[0].proc.wait(10)
        broker = start_broker(port, tmp_path / "broker.log")
        ensure_topics(s.effective_kafka, s)
        workers.append(Worker(s, tmp_path / "w1.log"))
        wait_ready(workers[1], redis_client, s)
        asyncio.run(_send_raw(s, _events("u1", 20, start=30)))
        wait_until(lambda: store.counters()["events_ingested"] == 50, 60, "the 20 new events")
        c = store.counters()
        assert c["events_duplicate_skipped"] == 0 and c["offset_log_resets"] == 1
        assert store.log_of(s.events_topic, 0) != before
        assert [b.item_id for b in store.read_many(["u1"])[0]] == [f"i{k}" for k in range(50)]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        broker.kill()
        broker.wait(10)


@pytest.mark.integration
@pytest.mark.slow
def test_a_recreated_topic_is_a_new_log(tmp_path, redis_client, redis_url, keys, broker):
    """Deleting and creating the topic again while the worker runs: it exits (75)
    instead of applying, and started again it reads the new topic from offset 0
    (the broker kept the group's committed offset of the old topic)."""
    s = Settings(
        data_dir=tmp_path, kafka_bootstrap_servers=broker, redis_url=redis_url,
        redis_prefix=keys.prefix, stream_app_id=f"logs-{uuid.uuid4().hex[:8]}",
        events_topic=f"ev-{uuid.uuid4().hex[:6]}", dlq_topic=f"dlq-{uuid.uuid4().hex[:6]}",
        topic_partitions=1, stream_batch_within_s=0.05,
    )  # fmt: skip
    store = RedisSequenceStore(redis_client, keys, s.sequence_length)
    ensure_topics(broker, s)
    first = Worker(s, tmp_path / "w0.log")
    second = None
    try:
        wait_ready(first, redis_client, s)
        asyncio.run(_send_raw(s, _events("u2", 10)))
        wait_until(lambda: store.counters()["events_ingested"] == 10, 60, "10 applied")
        delete_topics(broker, [s.events_topic])
        ensure_topics(broker, s)
        asyncio.run(_send_raw(s, _events("u2", 5, start=10)))
        code = wait_until(lambda: first.proc.poll(), 90, "the worker to notice the new log")
        assert code in (agents.EXIT_LOG_CHANGED, 0), first.tail()
        second = Worker(s, tmp_path / "w1.log")
        wait_ready(second, redis_client, s)
        wait_until(lambda: store.counters()["events_ingested"] == 15, 60, "the new topic's 5")
        assert store.counters()["events_duplicate_skipped"] == 0
    finally:
        for w in (first, second):
            if w is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
