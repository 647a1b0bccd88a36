"""What the API reads from Kafka itself, for the status page: consumer lag per
partition and the newest dead letters (their reasons).

Lag is the topic's end offset minus the next offset to apply
(:func:`stream.metrics.events_behind`, as the stream worker's metric), with the applied
offsets the stream worker keeps in Redis (``SequenceStore.applied_offsets``).
The dead letters are read from the dead-letter topic's tail, so the page
shows what the topic holds, not a copy. One aiokafka consumer on the API's
event loop, every call bounded by ``timeout_s`` (a broker that is down costs a
request that long, then the error is cached too); answers are cached for
``ttl_s`` so a polled page costs the broker a request every few seconds. The
embedded broker (Tansu 0.6) reports end offsets below the real ones on busy
partitions, so the lag it shows can be low by the messages still being written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.metrics import events_behind

__all__ = ["KafkaView"]

LOG = logging.getLogger(__name__)

MAX_SCAN = 5_000  # dead letters one status read scans at most


class KafkaView:
    def __init__(
        self,
        bootstrap: str,
        events_topic: str,
        dlq_topic: str,
        ttl_s: float = 3.0,
        timeout_s: float = 3.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._lock: asyncio.Lock | None = None
        self._cache: dict[str, tuple[float, Any]] = {}

    async def _client(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                enable_auto_commit=False,
                request_timeout_ms=int(self.timeout_s * 1000),
                fetch_max_wait_ms=100,
                client_id="userstream-api-status",
            )
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()
                raise
            self._consumer = consumer
        return self._consumer

    async def _cached(self, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
                return hit[1]
            try:
                value = await asyncio.wait_for(compute(), self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - the broker is down or slow
                LOG.warning("reading %s from Kafka at %s failed: %r", key, self.bootstrap, exc)
                await self.close()
                value = {"error": f"could not read {key} from Kafka at {self.bootstrap}: {exc!r}"}
            self._cache[key] = (time.monotonic(), value)
            return value

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        consumer = await self._client()
        # the whole cluster's metadata: consumer.partitions_for_topic only knows the
        # topics it is assigned or subscribed to (aiokafka keeps no public call for it)
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic) or set()
        return [TopicPartition(topic, p) for p in sorted(parts)]

    async def lag(self, applied: Callable[[], dict[int, int]]) -> dict[str, Any]:
        """{"partitions": {p: events behind}, "total": sum} (or {"error": ...});
        ``applied`` (a blocking Redis read) runs in a thread."""

        async def compute() -> dict[str, Any]:
            tps = await self._partitions(self.events_topic)
            ends = await (await self._client()).end_offsets(tps) if tps else {}
            done = await asyncio.to_thread(applied)
            behind = {tp.partition: events_behind(end, done.get(tp.partition, -1))
                      for tp, end in ends.items()}  # fmt: skip
            return {"partitions": behind, "total": sum(behind.values())}

        return await self._cached("lag", compute)

    async def dead_letters(self, n: int = 10) -> dict[str, Any]:
        """{"recent": [{reason, partition, offset, ts}, ...] newest first} (or {"error": ...})."""

        async def compute() -> dict[str, Any]:
            consumer = await self._client()
            tps = await self._partitions(self.dlq_topic)
            if not tps:
                return {"recent": []}
            ends = await consumer.end_offsets(tps)
            starts = await consumer.beginning_offsets(tps)
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, max(starts[tp], ends[tp] - n))
            # read until the partitions are quiet, not to the end offsets: the embedded
            # broker can report them low; at most MAX_SCAN records per call
            newest: dict[int, deque[dict[str, Any]]] = {tp.partition: deque(maxlen=n) for tp in tps}
            scanned, wait_ms = 0, 1500  # the first fetch after a seek takes longest
            while scanned < MAX_SCAN:
                got = await consumer.getmany(timeout_ms=wait_ms)
                if not got:
                    break
                wait_ms = 200
                for tp, records in got.items():
                    newest[tp.partition].extend(_letter(r.value) for r in records)
                    scanned += len(records)
            out = [d for part in newest.values() for d in part]
            out.sort(key=lambda d: d.get("ts") or 0, reverse=True)
            return {"recent": out[:n]}

        return await self._cached(f"dead_letters:{n}", compute)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.stop()
            except Exception:  # noqa: BLE001, S110 - closing a broken client
                pass


def _letter(raw: bytes | None) -> dict[str, Any]:
    """The fields of a dead letter the page shows (the payload stays in Kafka)."""
    try:
        rec = json.loads(raw or b"")
    except ValueError:
        return {"reason": "(not a userstream dead letter)", "ts": None}
    return {k: rec.get(k) for k in ("reason", "partition", "offset", "ts")}
