"""Create the events and dead-letter topics and wait until they are usable.

Topics are created explicitly (never left to broker auto-creation, which may
pick another partition count and crash a Faust agent) and then polled until
metadata shows a leader for every partition, so callers do not sleep.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from userstream.settings import Settings

__all__ = ["ensure_topics", "ensure_topics_async", "read_topic_async"]

LOG = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


async def ensure_topics_async(
    bootstrap: str, settings: Settings, timeout_s: float = 60.0
) -> dict[str, int]:
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
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    await _start_with_deadline(admin, deadline)
    try:
        resp = await admin.create_topics([NewTopic(t, n, 1) for t, n in wanted.items()])
        for err in resp.to_object().get("topic_errors", []):
            code = err["error_code"]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise RuntimeError(
                    f"could not create topic {err['topic']!r}: error {code} {err.get('error_message')}"
                )
            LOG.debug("topic %s: %s", err["topic"], "created" if code == 0 else "already exists")
        while True:
            counts, missing = _readiness(await admin.describe_topics(list(wanted)), wanted)
            if not missing:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"topics not ready after {timeout_s:.0f}s on {bootstrap}: " + "; ".join(missing)
                )
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
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


async def _start_with_deadline(admin: AIOKafkaAdminClient, deadline: float) -> None:
    while True:
        try:
            await admin.start()
            return
        except Exception as exc:  # the broker may still be starting
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not reach Kafka: {exc!r}") from exc
            LOG.debug("admin client start failed (%r); retrying", exc)
            await asyncio.sleep(0.5)


def _readiness(described: list[dict], wanted: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    missing: list[str] = []
    for topic in described:
        name = topic["topic"]
        parts = topic.get("partitions") or []
        counts[name] = len(parts)
        if topic["error_code"] != 0:
            missing.append(f"{name}: error {topic['error_code']}")
        elif not parts:
            missing.append(f"{name}: no partitions yet")
        else:
            leaderless = [p["partition"] for p in parts if p["error_code"] != 0 or p["leader"] < 0]
            if leaderless:
                missing.append(f"{name}: partitions {leaderless} have no leader")
    for name in wanted:
        if name not in counts:
            missing.append(f"{name}: absent from metadata")
    return counts, missing


def ensure_topics(bootstrap: str, settings: Settings, timeout_s: float = 60.0) -> dict[str, int]:
    """Blocking wrapper of :func:`ensure_topics_async` (not for use inside a running loop)."""
    return asyncio.run(ensure_topics_async(bootstrap, settings, timeout_s))


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
