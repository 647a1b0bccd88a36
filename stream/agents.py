"""The ingest agent: events topic -> validation -> DLQ + Redis sequences.

The agent is a thin loop over ``stream.take_events``; the work per batch is
:class:`BatchWriter` (decode with the pure :func:`stream.events.split_batch`,
dead-letter the invalid ones, then one ``SequenceStore.apply_many`` call in a
thread so the event loop keeps serving the Kafka client).

Delivery: Faust acks a taken batch when the loop body returns, and also when
the body raises or is cancelled (the ``finally`` in ``take_events``), after
which the offsets get committed. A batch that is not in Redis must never be
committed, so transient Redis errors are retried with backoff (forever while
running; for ``stop_grace_s`` once a stop was requested), and anything that
leaves a batch unapplied (an unexpected error, a stop during a Redis outage)
ends the process at once with exit code 70 and no commit; the batch is
redelivered to the next worker and ``apply_many`` skips what was already
applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import faust
import redis

from stream.events import DeadLetter, dead_letter_value, split_batch
from userstream.settings import Settings
from userstream.stores import AppliedBatch, SequenceStore

__all__ = ["BatchWriter", "EXIT_UNAPPLIED", "attach_ingest_agent"]

LOG = logging.getLogger(__name__)

EXIT_UNAPPLIED = 70  # EX_SOFTWARE: stopped with a batch that is not in Redis
_RETRY_MAX_S = 5.0
T = TypeVar("T")


def _die(reason: str) -> None:
    LOG.critical("%s; exiting without committing Kafka offsets", reason)
    logging.shutdown()
    os._exit(EXIT_UNAPPLIED)


class BatchWriter:
    """Applies one taken batch: dead letters first, then the Redis transaction."""

    def __init__(
        self,
        store: SequenceStore,
        dlq: faust.TopicT,
        stopping: Callable[[], bool] = lambda: False,
        stop_grace_s: float = 10.0,
    ) -> None:
        self.store = store
        self.dlq = dlq
        self.stopping = stopping
        self.stop_grace_s = stop_grace_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-apply")

    async def write(self, topic: str, records: Sequence[tuple[int, int, Any, Any]]) -> AppliedBatch:
        t0 = time.perf_counter()
        events, dead = split_batch(records)
        if dead:
            dead = await self._not_yet_applied(topic, dead)
            await self._send_dead_letters(topic, dead)
        result = await self._redis(
            self.store.apply_many, topic, events, [(p, o) for p, o, _, _ in dead]
        )
        LOG.debug(
            "batch: %d messages, %d events applied, %d skipped, %d dead, %d users in %.1f ms",
            len(records),
            result.applied,
            result.skipped,
            result.dead_lettered,
            result.users,
            (time.perf_counter() - t0) * 1000,
        )
        return result

    async def _not_yet_applied(self, topic: str, dead: list[DeadLetter]) -> list[DeadLetter]:
        # A redelivered batch must not dead-letter the same message twice.
        done = await self._redis(self.store.applied_offsets, topic)
        return [d for d in dead if d[1] > done.get(d[0], -1)]

    async def _send_dead_letters(self, topic: str, dead: list[DeadLetter]) -> None:
        now = time.time()
        pending = []
        for partition, offset, key, invalid in dead:
            value = dead_letter_value(invalid, topic, partition, offset, now)
            pending.append(await self.dlq.send(key=key, value=value, force=True))
        await asyncio.gather(*pending)  # delivered before the offsets move on

    async def _redis(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the writer thread, retried with backoff while Redis is unreachable."""
        delay = 0.1
        give_up_at: float | None = None
        while True:
            try:
                return await self._in_thread(fn, *args)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                LOG.error("Redis write failed (%r); retrying in %.1fs", exc, delay)
            if self.stopping():
                # Faust waits for the batch before it stops: bound that wait.
                now = time.monotonic()
                give_up_at = give_up_at or now + self.stop_grace_s
                if now > give_up_at:
                    _die(f"stopping while Redis is unavailable for {self.stop_grace_s:.0f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    async def finish(self, task: asyncio.Future, n_messages: int, timeout_s: float = 30.0) -> None:
        """On stop: let an in-flight batch reach Redis before Faust acks it, or die."""
        try:
            done, _ = await asyncio.wait([task], timeout=timeout_s)
        except asyncio.CancelledError:
            done = set()
        if not done or task.cancelled() or task.exception() is not None:
            task.cancel()
            _die(f"stopping with a batch of {n_messages} messages not applied")

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def attach_ingest_agent(app: faust.App, settings: Settings, store: SequenceStore) -> BatchWriter:
    """Register the ingest agent on ``app``; returns its writer (for shutdown)."""
    source = app.topic(
        settings.events_topic,
        partitions=settings.topic_partitions,
        key_serializer="raw",
        value_serializer="raw",  # bytes: malformed JSON must reach the DLQ, not crash decoding
    )
    dlq = app.topic(
        settings.dlq_topic,
        partitions=settings.topic_partitions,
        key_serializer="raw",
        value_serializer="raw",
    )
    writer = BatchWriter(store, dlq, stopping=lambda: bool(app.should_stop))

    @app.agent(source, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(
            settings.stream_batch_max, within=settings.stream_batch_within_s
        ):
            records = [
                (e.message.partition, e.message.offset, e.message.key, e.message.value)
                for e in batch
            ]
            task = asyncio.ensure_future(writer.write(batch[0].message.topic, records))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await writer.finish(task, len(records))
                raise
            except Exception as exc:
                LOG.exception("batch failed")
                _die(f"a batch of {len(records)} messages was not applied: {exc!r}")

    return writer
