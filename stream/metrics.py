"""The stream worker's Prometheus metrics (served on ``STREAM_METRICS_PORT``).

Start reading at :class:`StreamMetrics`; the agent calls
:meth:`StreamMetrics.observe_batch` once per applied batch and a timer of the
app calls :meth:`StreamMetrics.observe_lag` every :data:`LAG_SAMPLE_S`.

Every label value comes from a closed set: dead-letter reasons are mapped
onto :data:`DEAD_LETTER_REASONS` by :func:`reason_label` (the free-text
reasons of :mod:`stream.validation` and :mod:`stream.events` are for people),
and partitions are those of the events topic assigned to this worker (their
series are removed when a rebalance takes them away).

Consumer lag is measured against what is in Redis, not what Kafka has
committed: ``end offset - (applied offset + 1)`` per partition, with the
end offsets asked of the broker (``ListOffsets``) and the applied offsets
read from the store (``SequenceStore.applied_offsets``, the lowest of the
shards'). Lag in seconds is the age of the oldest unapplied record, estimated
without reading it (:class:`PartitionLag`): the record at offset ``a + 1``
existed at the first sample whose end offset passed it, so its age is at
least the time since that sample. The estimate is exact to one sample
interval once the worker has watched the backlog form; a backlog that was
there when the worker started is counted from its first sample.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from userstream.metrics import new_registry
from userstream.settings import Settings
from userstream.stores import SequenceStore

__all__ = [
    "DEAD_LETTER_REASONS",
    "LAG_SAMPLE_S",
    "PartitionLag",
    "events_behind",
    "StreamMetrics",
    "attach_metrics",
    "reason_label",
    "sample_offsets",
]

LOG = logging.getLogger(__name__)

LAG_SAMPLE_S = 1.0  # how often the lag and the heartbeat are sampled
_HISTORY_MAX = 10_000  # end-offset samples kept per partition while it is behind

# The closed set of dead-letter labels, each with what its reasons start with (in
# order: the first match wins). The reasons are stream.validation's and
# stream.events' messages; tests/test_metrics_processes.py feeds one message of
# each kind through parse_message and checks its label, so a reworded reason
# that falls through to "other" fails a test.
_REASON_RULES: tuple[tuple[str, str], ...] = (
    ("too_deep", r"message nests |props nest "),
    ("too_large", r"message is \d+ bytes|message holds \d+ events|text is \d+ characters"),
    ("empty", r"message has no value|message is an empty JSON array"),
    ("not_json", r"message is not valid|message could not be decoded|message value is "
                 r"|message holds an integer"),
    ("missing_field", r"missing field"),
    ("unknown_field", r"unknown field"),
    ("bad_type", r"event must be a JSON object|\w+ must be a "),
    ("bad_ts", r"ts "),
    ("bad_behavior", r"behavior "),
    ("bad_id", r"(user_id|item_id|event_id) "),
)  # fmt: skip
_REASON_RES = tuple((label, re.compile(pattern)) for label, pattern in _REASON_RULES)
DEAD_LETTER_REASONS: tuple[str, ...] = (*(label for label, _ in _REASON_RULES), "other")
"""Every value of the ``reason`` label of ``userstream_stream_dead_letters_total``."""

_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000)
_APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def reason_label(reason: str) -> str:
    """The closed-set label of a dead letter's free-text reason.

    >>> reason_label("missing field 'ts'"), reason_label("ts 'x' is negative")
    ('missing_field', 'bad_ts')
    >>> reason_label("message is not valid JSON: Expecting value"), reason_label("?")
    ('not_json', 'other')
    """
    for label, pattern in _REASON_RES:
        if pattern.match(reason):
            return label
    return "other"


def events_behind(end: int, applied: int) -> int:
    """Records of a partition not applied yet: its end offset (the next offset to be
    written) minus the one after the highest applied offset (-1: none yet).

    >>> events_behind(10, 9), events_behind(15, 9), events_behind(0, -1)
    (0, 5, 0)
    """
    return max(0, end - (applied + 1))


class PartitionLag:
    """The lag of one partition from successive (time, end offset, applied) samples.

    >>> lag = PartitionLag()
    >>> lag.sample(100.0, end=10, applied=9)  # caught up: end is the next offset
    (0, 0.0)
    >>> lag.sample(101.0, end=15, applied=9)  # offsets 10..14 arrived by t=101
    (5, 0.0)
    >>> lag.sample(103.0, end=20, applied=12)  # offset 13 was there at t=101
    (7, 2.0)
    >>> lag.sample(104.0, end=20, applied=19)
    (0, 0.0)
    """

    def __init__(self) -> None:
        # (time first seen, end offset), end offsets strictly increasing
        self._seen: deque[tuple[float, int]] = deque()

    def sample(self, now: float, end: int, applied: int) -> tuple[int, float]:
        """(events, seconds) behind, given the partition's end offset (the next
        offset to be written) and the highest applied offset (-1: none yet)."""
        nxt = applied + 1  # the oldest record not applied
        if self._seen and end < self._seen[-1][1]:
            self._seen.clear()  # a new log (the topic was recreated): start over
        if not self._seen or end > self._seen[-1][1]:
            self._seen.append((now, end))
            if len(self._seen) > _HISTORY_MAX:
                self._seen.popleft()  # the age becomes a lower bound
        behind = events_behind(end, applied)
        # samples whose end offset did not pass `nxt` say nothing about it any more
        # (the newest one, whose end offset is `end`, always stays)
        while len(self._seen) > 1 and self._seen[0][1] <= nxt:
            self._seen.popleft()
        if behind == 0:
            return 0, 0.0
        return behind, max(0.0, now - self._seen[0][0])


class StreamMetrics:
    """The registry of one stream worker process and what it records."""

    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.events_applied = Counter(
            "userstream_stream_events_applied", "Events this worker applied to user sequences",
            registry=r,
        )  # fmt: skip
        self.duplicates = Counter(
            "userstream_stream_duplicates_skipped",
            "Redelivered events skipped because their offset was already applied",
            registry=r,
        )
        self.dead_letters = Counter(
            "userstream_stream_dead_letters",
            "Invalid events or messages sent to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        for reason in DEAD_LETTER_REASONS:  # every series exists from the start
            self.dead_letters.labels(reason)
        self.batch_messages = Histogram(
            "userstream_stream_batch_messages", "Kafka messages per applied batch",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "userstream_stream_batch_apply_duration_seconds",
            "Time to apply one batch: decode, dead letters, the Redis write",
            buckets=_APPLY_BUCKETS,
            registry=r,
        )
        self.lag_events = Gauge(
            "userstream_stream_consumer_lag_events",
            "Records of the events topic not yet applied to Redis, per assigned partition",
            ["partition"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "userstream_stream_consumer_lag_seconds",
            "Age of the oldest record not yet applied, per assigned partition (0 when none)",
            ["partition"],
            registry=r,
        )
        self.lag_errors = Counter(
            "userstream_stream_lag_sample_errors",
            "Lag samples that failed (the broker or Redis did not answer)",
            registry=r,
        )
        self.assigned = Gauge(
            "userstream_stream_assigned_partitions",
            "Partitions of the events topic assigned to this worker",
            registry=r,
        )
        self.rebalances = Counter(
            "userstream_stream_rebalances",
            "Partition assignments this worker received (each rebalance ends in one)",
            registry=r,
        )
        self.heartbeat = Gauge(
            "userstream_stream_heartbeat_timestamp_seconds",
            "Unix time the worker's event loop last ran its metrics timer",
            registry=r,
        )
        self.heartbeat.set_to_current_time()
        self._lags: dict[int, PartitionLag] = {}

    def observe_batch(
        self, messages: int, applied: int, skipped: int, reasons: Iterable[str], seconds: float
    ) -> None:
        """One applied batch: its size, what it applied and skipped, the reasons
        of its new dead letters, and how long it took."""
        self.batch_messages.observe(messages)
        self.batch_seconds.observe(seconds)
        self.events_applied.inc(applied)
        self.duplicates.inc(skipped)
        for reason in reasons:
            self.dead_letters.labels(reason_label(reason)).inc()

    def observe_assignment(self, partitions: Sequence[int]) -> None:
        """A rebalance gave this worker ``partitions`` of the events topic."""
        self.rebalances.inc()
        self.assigned.set(len(partitions))
        self._forget(set(self._lags) - set(partitions))

    def observe_lag(
        self, end_offsets: Mapping[int, int], applied: Mapping[int, int], now: float | None = None
    ) -> None:
        """One lag sample of the assigned partitions: their end offsets (the
        broker's) against the applied offsets (Redis's; missing = none yet)."""
        now = time.time() if now is None else now
        self._forget(set(self._lags) - set(end_offsets))
        for partition, end in end_offsets.items():
            lag = self._lags.setdefault(partition, PartitionLag())
            events, seconds = lag.sample(now, end, applied.get(partition, -1))
            self.lag_events.labels(str(partition)).set(events)
            self.lag_seconds.labels(str(partition)).set(seconds)

    def _forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self._lags.pop(partition, None)
            for gauge in (self.lag_events, self.lag_seconds):
                try:
                    gauge.remove(str(partition))
                except KeyError:
                    pass


async def sample_offsets(
    app: faust.App, topic: str, store: SequenceStore
) -> tuple[dict[int, int], dict[int, int]]:
    """({partition: end offset} of ``app``'s assigned partitions of ``topic``,
    {partition: highest offset applied in ``store``}); both empty while it holds none."""
    mine = [tp for tp in app.consumer.assignment() if tp.topic == topic]
    if not mine:
        return {}, {}
    ends = await app.consumer.highwaters(*mine)
    applied = await asyncio.to_thread(store.applied_offsets, topic)
    return {tp.partition: end for tp, end in ends.items()}, applied


def attach_metrics(
    app: faust.App, settings: Settings, store: SequenceStore, metrics: StreamMetrics
) -> None:
    """Count ``app``'s partition assignments and sample its lag and heartbeat every
    :data:`LAG_SAMPLE_S` (on its event loop: a stuck loop stops the heartbeat)."""
    topic = settings.events_topic

    @app.on_partitions_assigned.connect
    async def _assigned(sender: faust.App, assigned: set, **_: Any) -> None:
        metrics.observe_assignment([tp.partition for tp in assigned if tp.topic == topic])

    @app.timer(LAG_SAMPLE_S)
    async def _sample_lag() -> None:
        metrics.heartbeat.set_to_current_time()
        try:
            ends, applied = await sample_offsets(app, topic, store)
        except Exception as exc:  # not started, rebalancing, the broker or Redis away
            metrics.lag_errors.inc()
            LOG.debug("lag sample failed: %r", exc)
            return
        metrics.observe_lag(ends, applied)
