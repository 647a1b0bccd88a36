"""Produce events to the events topic: recorded data sets (:func:`replay`) or any iterable.

Messages are keyed by user id (so one user's events stay in one partition, in
order). Consecutive events of the same user may be grouped into one JSON-array
message (``group`` events at most) to cut the per-message cost of the whole
pipeline; only consecutive ones, so per-user order within the partition is
kept. ``rate`` limits events per second (0 = as fast as possible).
The report carries the highest acknowledged offset of each partition, so a
caller can wait until a consumer (the stream worker's offsets in Redis) covers
what was sent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from stream.datasets import read_dataset
from stream.events import encode_events
from stream.topics import ensure_topics_async
from userstream.settings import Settings
from userstream.types import Event

__all__ = ["ReplayReport", "new_producer", "produce_events", "produce_events_async", "replay"]

LOG = logging.getLogger(__name__)

EventLike = Event | Mapping[str, Any]


@dataclass(frozen=True)
class ReplayReport:
    events: int  # events produced
    messages: int  # Kafka messages (an array message holds several events)
    failed: int  # messages the broker did not acknowledge
    seconds: float
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> highest acked offset

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _user(ev: EventLike) -> str:
    return str(ev.user_id if isinstance(ev, Event) else ev.get("user_id", ""))


async def produce_events_async(
    settings: Settings,
    events: Iterable[EventLike],
    rate: float = 0.0,
    progress: bool | None = None,
    total: int | None = None,
    group: int = 50,
    ensure: bool = True,
    producer: AIOKafkaProducer | None = None,
) -> ReplayReport:
    """Send ``events`` in iteration order to ``settings.events_topic``; see module doc.

    ``producer``: a started producer to use (and leave running), e.g. one kept
    open across many small calls; by default one is started and stopped here.
    """
    if ensure:
        await ensure_topics_async(settings.effective_kafka, settings)
    if progress is None:
        progress = sys.stderr.isatty()
    own = producer is None
    if producer is None:
        producer = new_producer(settings)
        await producer.start()
    n_events = n_messages = 0
    failed: list[BaseException] = []
    offsets: dict[int, int] = {}
    unsettled: set[asyncio.Future] = set()

    def on_done(fut: asyncio.Future) -> None:
        unsettled.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            failed.append(fut.exception() or asyncio.CancelledError())
            return
        meta = fut.result()
        offsets[meta.partition] = max(meta.offset, offsets.get(meta.partition, -1))

    bar = tqdm(total=total, unit="ev", disable=not progress, smoothing=0.1, mininterval=0.5)
    t0 = time.perf_counter()
    pending: list[EventLike] = []
    pending_user = ""

    async def flush() -> None:
        nonlocal n_events, n_messages
        if rate > 0:
            ahead = t0 + (n_events + len(pending)) / rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
        fut = await producer.send(
            settings.events_topic, value=encode_events(pending), key=pending_user.encode()
        )
        unsettled.add(fut)
        fut.add_done_callback(on_done)
        n_events += len(pending)
        n_messages += 1
        bar.update(len(pending))
        pending.clear()

    try:
        for ev in events:
            user = _user(ev)
            if pending and (user != pending_user or len(pending) >= group):
                await flush()
            pending_user = user
            pending.append(ev)
        if pending:
            await flush()
        await producer.flush()
        if unsettled:  # every on_done has run once this returns
            await asyncio.wait(list(unsettled))
    finally:
        if own:
            await producer.stop()
        bar.close()
    seconds = time.perf_counter() - t0
    if failed:
        LOG.error("%d of %d messages failed, first: %r", len(failed), n_messages, failed[0])
    report = ReplayReport(n_events, n_messages, len(failed), seconds, offsets)
    LOG.log(
        logging.INFO if own else logging.DEBUG,
        "produced %d events in %d messages to %s in %.2fs (%.0f events/s)",
        n_events,
        n_messages,
        settings.events_topic,
        seconds,
        report.events_per_s,
    )
    return report


def new_producer(settings: Settings) -> AIOKafkaProducer:
    """The producer :func:`produce_events_async` uses (start it in the loop that sends)."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.effective_kafka,
        linger_ms=5,
        max_batch_size=256 * 1024,
        acks=1,
    )


def produce_events(
    settings: Settings,
    events: Iterable[EventLike],
    rate: float = 0.0,
    progress: bool | None = None,
    total: int | None = None,
    group: int = 50,
    ensure: bool = True,
) -> ReplayReport:
    """Blocking :func:`produce_events_async` (not for use inside a running event loop)."""
    return asyncio.run(produce_events_async(settings, events, rate, progress, total, group, ensure))


def replay(
    path: str | Path,
    fmt: str,
    settings: Settings,
    rate: float = 0.0,
    batch: int = 50,
    progress: bool | None = None,
) -> ReplayReport:
    """Produce a recorded data set in timestamp order; ``batch`` = most events per message."""
    data = read_dataset(path, fmt)
    return produce_events(
        settings, data, rate=rate, progress=progress, total=data.count, group=batch
    )
