"""Applied offsets tied to the log they came from.

The exactly-once effect skips every event at or below the offset stored for
its partition. That offset only means something in the log it was read from:
after the embedded broker restarts (memory storage: its topics come back
empty, offsets from 0 again), after a topic is deleted and created again, or
on another cluster, the stored offsets count a log that no longer exists, and
new events would be skipped as duplicates.

:class:`LogGuard` binds the offsets of the assigned partitions to the identity
of the current log (:class:`stream.topics.LogIds`) on every assignment
(:meth:`SequenceStore.bind_log` drops offsets of another log, counts them in
``offset_log_resets`` and the guard logs a warning; a partition that belonged
to another *recorded* log is also read again from its start, since the
consumer group's committed offsets, when the broker kept them, count the old
log too), and checks it again before every batch is applied and every few
seconds: a log that changed under a running consumer (the broker restarted
without a rebalance, a topic recreated) cannot be told apart for the batch in
hand, so :meth:`LogGuard.check` raises :class:`LogChanged` and the worker exits
without applying or committing it; started again, it binds the new log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from userstream.stores import SequenceStore

__all__ = ["LogChanged", "LogGuard"]

LOG = logging.getLogger(__name__)


class LogChanged(RuntimeError):
    """The topic's log is not the one the worker bound at start or assignment."""


class LogGuard:
    def __init__(
        self,
        store: SequenceStore,
        topic: str,
        read_ids: Callable[[Iterable[str]], dict[str, str]],
    ) -> None:
        self.store = store
        self.topic = topic
        self.read_ids = read_ids
        self.bound: str | None = None

    def current(self) -> str:
        return self.read_ids([self.topic])[self.topic]

    def bind(self, partitions: Iterable[int]) -> dict[int, str]:
        """Bind the offsets of ``partitions`` to the topic's current log; returns
        {partition: previous log id} of those whose offsets were dropped."""
        log_id = self.current()
        dropped = self.store.bind_log(self.topic, log_id, partitions)
        for p, old in sorted(dropped.items()):
            LOG.warning(
                "%s:%d is a new log (%s; its stored offset belonged to %s): dropped, so its "
                "events are applied, not skipped as duplicates",
                self.topic, p, log_id, old or "no recorded log",
            )  # fmt: skip
        self.bound = log_id
        return dropped

    def check(self) -> None:
        """Raise :class:`LogChanged` when the topic's log is not the bound one."""
        log_id = self.current()
        if log_id != self.bound:
            raise LogChanged(
                f"topic {self.topic} changed from log {self.bound} to {log_id} while consuming"
            )
