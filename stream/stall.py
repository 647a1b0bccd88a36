"""The stream worker's watchdog: a consumer that stopped consuming exits, so the
supervisor starts it again.

A Faust consumer can stop fetching while its event loop keeps running: seen in
the soak (``userstream bench soak``) after the embedded broker restarted, where
the new worker joined, applied events for half a minute, and then applied none
for five minutes while the topic kept filling. Nothing in the process fails, so
nothing restarts it; the only symptom is a lag that grows while the applied
offsets stand still.

:class:`StallWatch` keeps that symptom from successive samples of the assigned
partitions' end offsets and the offsets applied in Redis (which move for every
record, dead letters included): while some partition has records not applied and
no applied offset moved, the stall grows; progress, or nothing to consume,
resets it; a sample that fails (the consumer no longer reaches the broker)
shows no progress either. :func:`attach_watchdog` samples every few seconds on the worker's
event loop and exits with :data:`EXIT_STALLED` once the stall passes
``stream_stall_s``; started again, the worker rejoins and reads on from the
offsets in Redis (nothing is lost or applied twice).

>>> w = StallWatch()
>>> w.observe({0: 10}, {0: 4}, now=100.0)  # 5 behind: the clock starts
0.0
>>> w.observe({0: 12}, {0: 4}, now=130.0)  # still behind, nothing applied
30.0
>>> w.observe({0: 12}, {0: 8}, now=131.0)  # progress
0.0
>>> w.observe({0: 12}, {0: 11}, now=200.0)  # caught up
0.0
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from stream.agents import die
from stream.metrics import events_behind, sample_offsets
from userstream.stores import SequenceStore

__all__ = ["EXIT_STALLED", "STALL_CHECK_S", "StallWatch", "attach_watchdog"]

LOG = logging.getLogger(__name__)

EXIT_STALLED = 76  # EX_PROTOCOL: records waiting, none applied for stream_stall_s
STALL_CHECK_S = 5.0  # how often the watchdog samples
SAMPLE_TIMEOUT_S = 10.0  # a sample that takes longer counts as no progress


class StallWatch:
    """How long the worker has had records waiting without applying any."""

    def __init__(self) -> None:
        self.applied: dict[int, int] | None = None
        self.clear_at: float | None = None  # last seen caught up or moving (None: never)
        self.behind = 0  # records waiting at the last sample
        self.warned = False  # the half-way warning of the current stall was logged

    def observe(self, ends: Mapping[int, int], applied: Mapping[int, int], now: float) -> float:
        """One sample: ``ends`` {partition: end offset} of the assigned partitions,
        ``applied`` {partition: highest applied offset}; returns the stall's seconds."""
        current = {p: int(applied.get(p, -1)) for p in ends}
        moved = self.applied is not None and any(
            current[p] > self.applied.get(p, -1) for p in current
        )
        self.applied = current
        self.behind = sum(events_behind(int(end), current[p]) for p, end in ends.items())
        if self.behind == 0 or moved or self.clear_at is None:
            self.clear_at = now
            return 0.0
        return now - self.clear_at

    def unknown(self, now: float) -> float:
        """A sample that failed (the consumer cannot reach the broker, say): no
        progress seen, so a worker that has sampled before keeps stalling; before
        its first sample (starting, joining) there is nothing to time."""
        return 0.0 if self.clear_at is None else now - self.clear_at

    def reset(self) -> None:
        """A new assignment: the clock starts again."""
        self.applied, self.clear_at, self.behind = None, None, 0


def attach_watchdog(app: Any, topic: str, store: SequenceStore, stall_s: float) -> StallWatch:
    """Sample ``app``'s partitions of ``topic`` every :data:`STALL_CHECK_S` and exit
    (:data:`EXIT_STALLED`) after ``stall_s`` seconds of records waiting and none
    applied. ``stall_s`` 0 attaches nothing."""
    watch = StallWatch()
    if stall_s <= 0:
        return watch

    @app.on_partitions_assigned.connect
    async def _assigned(sender: Any, assigned: set, **_: Any) -> None:
        watch.reset()

    @app.timer(STALL_CHECK_S)
    async def _watch() -> None:
        now = time.monotonic()
        try:
            ends, applied = await asyncio.wait_for(
                sample_offsets(app, topic, store), SAMPLE_TIMEOUT_S
            )
            stalled = watch.observe(ends, applied, now)
            failed = ""
        except Exception as exc:  # not started, rebalancing, the broker or Redis away
            stalled = watch.unknown(now)
            failed = f"; the last sample failed: {exc!r}"
            LOG.debug("watchdog sample failed: %r", exc)
        if stalled >= stall_s:
            die(
                f"stalled: {watch.behind} records waiting at the last sample and none applied "
                f"for {stalled:.0f}s (stream_stall_s={stall_s:g}){failed}; exiting so the "
                "supervisor starts the worker again, which rejoins and reads on from the "
                "offsets in Redis",
                EXIT_STALLED,
            )
        if stalled >= stall_s / 2 and not watch.warned:
            LOG.warning("no records applied for %.0fs with %d waiting%s", stalled, watch.behind,
                        failed)  # fmt: skip
            watch.warned = True
        elif stalled == 0:
            watch.warned = False

    return watch
