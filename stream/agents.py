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

With ``PSEUDONYM_KEY`` set, each valid event's ``user_id`` becomes its
pseudonym (:mod:`userstream.pseudonyms`) before ``apply_many``, so no raw id
reaches Redis; Kafka keys and dead letters (the raw payload) stay as Kafka
holds them.

Dead letters go out before the batch is applied. No message can fail the
batch: decoding never raises, and a dead-letter value is bounded
(:data:`stream.events.DEAD_LETTER_MAX_BYTES`). Should the broker still refuse
one record (too large for its own limit, say), a shorter record with the
reason and the payload's size replaces it, since a redelivery would only be
refused again. Any other send failure (a broker outage) fails the batch as a
Redis error at stop does: exit 70, no commit, the batch redelivered, so no
dead letter is lost silently.
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
from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from stream.events import DeadLetter, dead_letter_value, split_batch
from stream.logs import LogChanged, LogGuard
from stream.metrics import StreamMetrics
from userstream.pseudonyms import Pseudonymizer
from userstream.settings import Settings
from userstream.stores import AppliedBatch, SequenceStore

__all__ = [
    "BatchWriter",
    "EXIT_LOG_CHANGED",
    "EXIT_UNAPPLIED",
    "RawSchema",
    "attach_ingest_agent",
    "die",
    "events_topic",
]

LOG = logging.getLogger(__name__)

EXIT_UNAPPLIED = 70  # EX_SOFTWARE: stopped with a batch that is not in Redis
EXIT_LOG_CHANGED = 75  # EX_TEMPFAIL: the topic became a new log; start again to bind it
_RETRY_MAX_S = 5.0
_FALLBACK_BYTES = 4096  # the record sent when the broker refused the full dead letter
# The broker refused this record itself: a retry or a redelivery would be refused too.
_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, CorruptRecordException)
T = TypeVar("T")


def _refused(exc: BaseException) -> bool:
    # Faust wraps what aiokafka raises in send() in ProducerSendError (the cause).
    return isinstance(exc, _REFUSED) or isinstance(exc.__cause__, _REFUSED)


def die(reason: str, code: int = EXIT_UNAPPLIED) -> None:
    LOG.critical("%s; exiting without committing Kafka offsets", reason)
    logging.shutdown()
    os._exit(code)


def _once(records: Sequence[tuple[int, int, Any, Any]]) -> Sequence[tuple[int, int, Any, Any]]:
    """One (partition, offset) is one record of the log: a record delivered twice in
    one batch (a seek while messages were buffered) counts once."""
    if len({(r[0], r[1]) for r in records}) == len(records):
        return records
    seen: set[tuple[int, int]] = set()
    return [r for r in records if (r[0], r[1]) not in seen and not seen.add((r[0], r[1]))]


class BatchWriter:
    """Applies one taken batch: dead letters first, then the Redis transaction."""

    def __init__(
        self,
        store: SequenceStore,
        dlq: faust.TopicT,
        stopping: Callable[[], bool] = lambda: False,
        stop_grace_s: float = 10.0,
        guard: LogGuard | None = None,
        metrics: StreamMetrics | None = None,
        pseudonyms: Pseudonymizer | None = None,
    ) -> None:
        self.store = store
        self.pseudonyms = pseudonyms or Pseudonymizer(None)
        self.metrics = metrics
        self.dlq = dlq
        self.guard = guard
        self.stopping = stopping
        self.stop_grace_s = stop_grace_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-apply")

    async def write(self, topic: str, records: Sequence[tuple[int, int, Any, Any]]) -> AppliedBatch:
        t0 = time.perf_counter()
        if self.guard is not None:
            await self._check_log()
        records = _once(records)
        events, dead = split_batch(records)
        events = self.pseudonyms.events_many(events)
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
        if self.metrics is not None:
            self.metrics.observe_batch(len(records), result.applied, result.skipped,
                                       [d[3].reason for d in dead], time.perf_counter() - t0)  # fmt: skip
        return result

    async def _check_log(self) -> None:
        """The batch's offsets count the log bound at assignment, or the worker exits
        before applying it (:mod:`stream.logs`); retried while the broker does not
        answer the metadata request."""
        delay = 0.1
        while self.guard.bound is None:  # the assignment has not bound the log yet
            await asyncio.sleep(0.05)
        while True:
            try:
                await self._in_thread(self.guard.check)
                return
            except LogChanged as exc:
                die(f"{exc}: restarting binds the new log", EXIT_LOG_CHANGED)
            except Exception as exc:  # the broker does not answer (yet)
                LOG.error("could not read the topic's log id (%r); retrying in %.1fs", exc, delay)
                if self.stopping():
                    die("stopping while the broker does not answer")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)

    async def _not_yet_applied(self, topic: str, dead: list[DeadLetter]) -> list[DeadLetter]:
        # A redelivered batch must not dead-letter the same message twice.
        done = await self._redis(self.store.applied_offsets, topic)
        return [d for d in dead if d[1] > done.get(d[0], -1)]

    async def _send_dead_letters(self, topic: str, dead: list[DeadLetter]) -> None:
        now = time.time()
        pending = []
        for letter in dead:
            partition, offset, key, invalid = letter
            value = dead_letter_value(invalid, topic, partition, offset, now)
            try:
                fut = await self.dlq.send(key=key, value=value, force=True)
            except Exception as exc:
                if not _refused(exc):
                    raise  # an outage: the batch fails and is redelivered (module doc)
                fut = await self._send_short(topic, letter, now, exc)
            pending.append((letter, fut))
        for letter, fut in pending:  # delivered before the offsets move on
            try:
                await fut
            except Exception as exc:
                if not _refused(exc):
                    raise
                # a broker that refuses even the short record fails the batch: loudly
                await (await self._send_short(topic, letter, now, exc))

    async def _send_short(
        self, topic: str, letter: DeadLetter, now: float, exc: BaseException
    ) -> asyncio.Future:
        """The dead letter again, without the key and with the payload cut to a few KiB."""
        partition, offset, _, invalid = letter
        LOG.warning(
            "the broker refused the dead letter of %s:%d offset %d (%r); sending a shorter one",
            topic,
            partition,
            offset,
            exc,
        )
        value = dead_letter_value(invalid, topic, partition, offset, now, _FALLBACK_BYTES)
        return await self.dlq.send(key=None, value=value, force=True)

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
                    die(f"stopping while Redis is unavailable for {self.stop_grace_s:.0f}s")
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
            die(f"stopping with a batch of {n_messages} messages not applied")

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class RawSchema(faust.Schema):
    """Keys and values exactly as Kafka holds them, with no codec call per message.

    The agent decodes a whole batch itself (:func:`stream.events.split_batch`),
    so malformed JSON reaches the dead-letter topic instead of crashing Faust's
    decoding; skipping Faust's serializer lookup per message saves ~4% of its
    per-message path (issue 17).
    """

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None):
        return message.key

    def loads_value(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None):
        return message.value


def events_topic(app: faust.App, settings: Settings) -> faust.TopicT:
    """The events topic as the ingest agent reads it: raw bytes (:class:`RawSchema`)."""
    return app.topic(
        settings.events_topic,
        partitions=settings.topic_partitions,
        schema=RawSchema(key_serializer="raw", value_serializer="raw"),
    )


def attach_ingest_agent(
    app: faust.App,
    settings: Settings,
    store: SequenceStore,
    guard: LogGuard | None = None,
    metrics: StreamMetrics | None = None,
) -> BatchWriter:
    """Register the ingest agent on ``app``; returns its writer (for shutdown).
    ``guard`` checks before every batch that the topic is still the bound log;
    ``metrics`` records every applied batch (:mod:`stream.metrics`)."""
    source = events_topic(app, settings)
    dlq = app.topic(
        settings.dlq_topic,
        partitions=settings.topic_partitions,
        key_serializer="raw",
        value_serializer="raw",
    )
    writer = BatchWriter(store, dlq, stopping=lambda: bool(app.should_stop), guard=guard,
                         metrics=metrics,
                         pseudonyms=Pseudonymizer.of_settings(settings))  # fmt: skip
    if writer.pseudonyms.on:
        LOG.info("PSEUDONYM_KEY is set: user ids are stored as their keyed hashes")

    @app.agent(source, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(
            settings.stream_batch_max, within=settings.stream_batch_within_s
        ):
            messages = [e.message for e in batch]
            records = [(m.partition, m.offset, m.key, m.value) for m in messages]
            task = asyncio.ensure_future(writer.write(messages[0].topic, records))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await writer.finish(task, len(records))
                raise
            except Exception as exc:
                LOG.exception("batch failed")
                die(f"a batch of {len(records)} messages was not applied: {exc!r}")

    return writer
