"""Topic administration (kafka-python, a synchronous client) and a topic reader.

Topics are created explicitly (never left to broker auto-creation, which may
pick another partition count and crash a Faust agent) and then polled until
metadata shows a leader for every partition, so callers do not sleep.
:func:`ensure_topics` blocks; code inside an event loop awaits
:func:`ensure_topics_async`, which runs it in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from userstream.settings import Settings

__all__ = [
    "LogIds",
    "admin_client",
    "delete_topics",
    "ensure_topics",
    "ensure_topics_async",
    "read_topic_async",
]

LOG = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def admin_client(bootstrap: str, timeout_s: float = 60.0) -> KafkaAdminClient:
    """An admin client for ``bootstrap``, retried until the broker answers or
    ``timeout_s`` passes (a broker that is still starting refuses connections)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(
                bootstrap_servers=bootstrap,
                request_timeout_ms=int(min(timeout_s, 30.0) * 1000),
                client_id="userstream-admin",
            )
        except Exception as exc:  # NoBrokersAvailable, connection refused, ...
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"could not reach Kafka at {bootstrap} within {timeout_s:.0f}s: {exc!r}; "
                    "check KAFKA_BOOTSTRAP_SERVERS (or that the embedded broker started)"
                ) from exc
            LOG.debug("admin client failed (%r); retrying", exc)
            time.sleep(0.2)


def ensure_topics(bootstrap: str, settings: Settings, timeout_s: float = 60.0) -> dict[str, int]:
    """Create ``events_topic`` and ``dlq_topic`` (if absent) and wait for their leaders.

    Returns {topic: partition count}. Raises RuntimeError when the events topic
    already exists with another partition count than ``settings.topic_partitions``
    and TimeoutError when the partitions have no leader by the deadline.
    """
    wanted = {
        settings.events_topic: settings.topic_partitions,
        settings.dlq_topic: settings.topic_partitions,
    }
    deadline = time.monotonic() + timeout_s
    t0 = time.perf_counter()
    admin = admin_client(bootstrap, timeout_s)
    try:
        configs = {"retention.ms": str(settings.topic_retention_ms)}
        resp = admin.create_topics(
            [NewTopic(t, n, 1, topic_configs=configs) for t, n in wanted.items()],
            raise_errors=False,
        )
        for err in resp["topics"]:
            code = err["error_code"]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise RuntimeError(
                    f"could not create topic {err['name']!r}: error {code} {err.get('error_message')}"
                )
            LOG.debug("topic %s: %s", err["name"], "created" if code == 0 else "already exists")
        while True:
            counts, missing = _readiness(admin.describe_topics(list(wanted)), wanted)
            if not missing:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"topics not ready after {timeout_s:.0f}s on {bootstrap}: " + "; ".join(missing)
                )
            time.sleep(0.2)
    finally:
        admin.close()
    if counts[settings.events_topic] != settings.topic_partitions:
        raise RuntimeError(
            f"topic {settings.events_topic!r} has {counts[settings.events_topic]} partitions but "
            f"topic_partitions={settings.topic_partitions}; set topic_partitions to match or "
            "recreate the topic"
        )
    if counts[settings.dlq_topic] != settings.topic_partitions:
        LOG.warning(
            "dead-letter topic %r has %d partitions", settings.dlq_topic, counts[settings.dlq_topic]
        )
    LOG.info("topics ready in %.2fs: %s", time.perf_counter() - t0, counts)
    return counts


async def ensure_topics_async(
    bootstrap: str, settings: Settings, timeout_s: float = 60.0
) -> dict[str, int]:
    """:func:`ensure_topics` for code inside an event loop (runs in a thread)."""
    return await asyncio.to_thread(ensure_topics, bootstrap, settings, timeout_s)


class LogIds:
    """Reads the identity of the log behind a topic: ``<cluster id>/<topic id>``.

    Kafka gives every topic a new id when it is created (KIP-516), so a deleted
    and recreated topic, an embedded broker started again (memory storage: it
    comes back empty) or another cluster all show a new identity, while the
    offsets in Redis still count the old log. Keeps one admin connection;
    brokers older than 2.8 have no topic ids, and then only a new cluster is
    detected (logged once).
    """

    def __init__(self, bootstrap: str, timeout_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        self._admin: KafkaAdminClient | None = None
        self._warned = False
        self._lock = threading.Lock()  # called from the writer's thread and the timer's

    def __call__(self, topics: Iterable[str]) -> dict[str, str]:
        """{topic: log id} of ``topics`` (which must exist)."""
        names = list(topics)
        with self._lock:
            try:
                return self._read(names)
            except Exception:  # a stale connection (the broker restarted): once more, fresh
                self._close()
                return self._read(names)

    def _read(self, names: list[str]) -> dict[str, str]:
        if self._admin is None:
            self._admin = admin_client(self.bootstrap, self.timeout_s)
        cluster = self._admin.describe_cluster()["cluster_id"]
        out = {}
        for t in self._admin.describe_topics(names):
            if t["error_code"] != 0:
                raise RuntimeError(f"topic {t['name']!r}: error {t['error_code']}")
            topic_id = t.get("topic_id")
            if not topic_id or str(topic_id) == "00000000-0000-0000-0000-000000000000":
                if not self._warned:
                    LOG.warning("the broker reports no topic ids: a recreated topic cannot be "
                                "told from the old one (needs Kafka >= 2.8)")  # fmt: skip
                    self._warned = True
                topic_id = "-"
            out[t["name"]] = f"{cluster}/{topic_id}"
        return out

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._admin is not None:
            try:
                self._admin.close()
            finally:
                self._admin = None


def delete_topics(bootstrap: str, topics: Iterable[str], timeout_s: float = 30.0) -> None:
    """Delete ``topics`` (those that exist)."""
    admin = admin_client(bootstrap, timeout_s)
    try:
        present = set(admin.list_topics())
        doomed = [t for t in topics if t in present]
        if doomed:
            admin.delete_topics(doomed)
    finally:
        admin.close()


def _readiness(described: list[dict], wanted: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    missing: list[str] = []
    for topic in described:
        name = topic["name"]
        parts = topic.get("partitions") or []
        counts[name] = len(parts)
        if topic["error_code"] != 0:
            missing.append(f"{name}: error {topic['error_code']}")
        elif not parts:
            missing.append(f"{name}: no partitions yet")
        else:
            leaderless = [
                p["partition_index"] for p in parts if p["error_code"] != 0 or p["leader_id"] < 0
            ]
            if leaderless:
                missing.append(f"{name}: partitions {leaderless} have no leader")
    for name in wanted:
        if name not in counts:
            missing.append(f"{name}: absent from metadata")
    return counts, missing


async def read_topic_async(
    bootstrap: str,
    topic: str,
    min_messages: int = 0,
    timeout_s: float = 30.0,
    idle_s: float = 1.0,
) -> list:
    """Every message of ``topic`` from the beginning (e.g. to inspect the dead letters).

    Reads until at least ``min_messages`` arrived (TimeoutError after
    ``timeout_s``) and then no more came for ``idle_s``. It does not stop at the
    end offsets because the embedded broker (Tansu 0.6) reports end offsets
    below the real last offsets of busy partitions. Returns aiokafka
    ConsumerRecords ordered by (partition, offset).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # loads the cluster metadata
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            raise ValueError(f"topic {topic!r} does not exist")
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        while True:
            wait_s = idle_s if len(out) >= min_messages else min(1.0, idle_s)
            got = await consumer.getmany(timeout_ms=int(wait_s * 1000))
            for records in got.values():
                out.extend(records)
            if not got and len(out) >= min_messages:
                break
            if len(out) < min_messages and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(out)} of {min_messages} messages of {topic!r} after {timeout_s:.0f}s"
                )
        return sorted(out, key=lambda m: (m.partition, m.offset))
    finally:
        await consumer.stop()
