"""The stream worker as a real subprocess against the real broker (Tansu) and Redis.

One scenario, end to end: start -> readiness -> valid, array and malformed
messages -> exact counters, ordered sequences, DLQ records -> SIGTERM (exit 0)
-> restart in the same consumer group -> more events -> old + new kept, nothing
counted twice -> a worker of a new group re-reads everything and changes
nothing (the redelivery path). Every wait polls with a deadline; there are no fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from stream.app import read_ready
from stream.generator import ClickstreamGenerator
from stream.replay import produce_events
from stream.topics import read_topic_async
from tests.helpers import stream_settings, wait_until
from userstream.settings import Settings
from userstream.stores import RedisSequenceStore, SequenceStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tmp_path, broker, redis_url, redis_prefix) -> Settings:
    return stream_settings(tmp_path, broker, redis_url, redis_prefix, sequence_length=200)


class Worker:
    """``userstream stream-worker`` with the test's settings in its environment."""

    def __init__(self, settings: Settings, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "USERSTREAM_CONFIG"}
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=settings.effective_kafka,
            REDIS_URL=settings.effective_redis_url,
            REDIS_PREFIX=settings.redis_prefix,
            EVENTS_TOPIC=settings.events_topic,
            DLQ_TOPIC=settings.dlq_topic,
            STREAM_APP_ID=settings.stream_app_id,
            TOPIC_PARTITIONS=str(settings.topic_partitions),
            SEQUENCE_LENGTH=str(settings.sequence_length),
            STREAM_BATCH_WITHIN_S=str(settings.stream_batch_within_s),
            DATA_DIR=str(settings.data_dir),
            BROKER_SESSION_TIMEOUT="6",  # Faust's own env var: the join takes ~3 s on Tansu
            BROKER_HEARTBEAT_INTERVAL="1",
        )
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userstream", "stream-worker"],
            cwd=ROOT,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self._fh.close()
        return self.proc.returncode


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(settings: Settings) -> Worker:
        w = Worker(settings, tmp_path / f"worker{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def wait_ready(w: Worker, client, settings: Settings) -> dict:
    try:
        return wait_until(
            lambda: read_ready(client, settings, w.proc.pid), 90, "readiness", proc=w.proc
        )
    except AssertionError:
        print(w.tail())
        raise


async def _send_raw(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.effective_kafka)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(settings.events_topic, value=value, key=key)
    finally:
        await producer.stop()


def read_dlq(settings: Settings) -> list:
    return asyncio.run(
        read_topic_async(settings.effective_kafka, settings.dlq_topic, min_messages=4)
    )


def stored(store: SequenceStore, users) -> dict[str, list[tuple[str, str, float]]]:
    seqs = store.read_many(list(users))
    return {
        u: [(b.item_id, b.behavior, round(b.ts, 3)) for b in s]
        for u, s in zip(users, seqs, strict=True)
    }


def expected(events) -> dict[str, list[tuple[str, str, float]]]:
    out: dict[str, list] = defaultdict(list)
    for ev in events:
        out[ev["user_id"]].append((ev["item_id"], ev["behavior"], round(ev["ts"], 3)))
    return out


def test_worker_end_to_end_with_restart(settings, workers, redis_client, keys):
    store = RedisSequenceStore(redis_client, keys, settings.sequence_length)
    gen = ClickstreamGenerator(n_users=10, n_groups=3, items_per_group=20, seed=3)
    t0 = time.monotonic()

    w1 = workers(settings)
    ready = wait_ready(w1, redis_client, settings)
    assert ready["partitions"] == [f"{settings.events_topic}:{p}" for p in range(2)]
    t_ready = time.monotonic() - t0

    first = list(gen.events(300))
    report = produce_events(settings, first, group=4, progress=False)
    assert (report.events, report.failed) == (300, 0)
    assert report.messages < 300  # consecutive events of a user went as one array message
    mixed_ok = {"user_id": "mixed", "item_id": "m1", "behavior": "view", "ts": 1_700_000_000}
    mixed_bad = (
        '{"user_id": "mixed", "item_id": "m2", "behavior": "view", "ts": 1, "colour": "red"}'
    )
    malformed = [
        (b"u-bad", b'{"user_id": "u-bad", "item_id": '),
        (b"u0001", b'{"user_id": "u0001", "item_id": "x", "behavior": "view"}'),
        (b"u0002", b'{"user_id": "u0002", "item_id": "x", "behavior": "buy now!", "ts": 5}'),
        (b"mixed", f"[{json.dumps(mixed_ok)}, {mixed_bad}]".encode()),
    ]
    asyncio.run(_send_raw(settings, malformed))

    def counted(ingested: int, dead: int):
        c = store.counters()
        return c if (c["events_ingested"], c["events_dead_lettered"]) == (ingested, dead) else None

    try:
        wait_until(lambda: counted(301, 4), 60, "301 ingested + 4 dead letters", proc=w1.proc)
    except AssertionError:
        print(store.counters(), w1.tail(), sep="\n")
        raise
    t_first = time.monotonic() - t0
    want = expected([*first, mixed_ok])
    assert stored(store, want) == want
    assert store.num_users() == 11

    dlq = read_dlq(settings)
    records = {m.key: json.loads(m.value) for m in dlq}
    assert len(dlq) == 4 and len(records) == 4
    assert records[b"u-bad"]["reason"].startswith("message is not valid JSON")
    assert records[b"u-bad"]["payload"] == malformed[0][1].decode()
    assert records[b"u0001"]["reason"] == "missing field 'ts'"
    assert records[b"u0001"]["payload"] == malformed[1][1].decode()
    assert records[b"u0002"]["reason"].startswith("behavior 'buy now!' is not")
    assert records[b"mixed"] == {
        **records[b"mixed"],
        "reason": "unknown field(s) 'colour'",
        "payload": mixed_bad,
        "topic": settings.events_topic,
    }
    assert all(isinstance(r["offset"], int) and r["partition"] in (0, 1) for r in records.values())

    t_dlq = time.monotonic() - t0
    rc = w1.stop()
    assert rc == 0, w1.tail()
    t_stop = time.monotonic() - t0
    assert read_ready(redis_client, settings, w1.proc.pid) is None

    w2 = workers(settings)
    wait_ready(w2, redis_client, settings)
    t_ready2 = time.monotonic() - t0
    second = list(gen.events(100))
    produce_events(settings, second, group=4, progress=False)
    try:
        wait_until(lambda: counted(401, 4), 60, "401 ingested after the restart", proc=w2.proc)
    except AssertionError:
        print(store.counters(), w2.tail(), sep="\n")
        raise
    want = expected([*first, mixed_ok, *second])
    assert stored(store, want) == want
    assert len(read_dlq(settings)) == 4
    assert w2.stop() == 0, w2.tail()
    t_second = time.monotonic() - t0

    # A worker of a new consumer group gets every message again (as after a crash
    # before the Kafka commit): the offsets in Redis make that a no-op.
    fresh = settings.replace(stream_app_id=settings.stream_app_id + "-b")
    w3 = workers(fresh)
    wait_ready(w3, redis_client, fresh)
    wait_until(
        lambda: store.counters()["events_duplicate_skipped"] == 401, 60, "redelivery", proc=w3.proc
    )
    assert counted(401, 4)
    assert stored(store, want) == want
    assert len(read_dlq(settings)) == 4
    assert w3.stop() == 0, w3.tail()
    print(
        f"ready {t_ready:.1f}s, first events in Redis {t_first:.1f}s, DLQ read {t_dlq:.1f}s, "
        f"stopped {t_stop:.1f}s, ready again {t_ready2:.1f}s, restart checked {t_second:.1f}s, total {time.monotonic() - t0:.1f}s; "
        f"counters {store.counters()}"
    )
