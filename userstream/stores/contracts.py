"""What a store promises: the two Protocols every stage codes against, and the
plain data that crosses them.

:class:`SequenceStore` holds the per-user rolling sequences (the stream worker
writes them, the training worker and the API read them); :class:`EmbeddingStore`
holds user embeddings, their ids for FAISS and the update feed (the training
worker writes, API replicas read and follow). Each has a Redis implementation
(the service) and an in-memory one (the one-process benchmark loop, tests);
``tests/test_stores_contract.py`` runs both through the same checks.

:func:`plan_batch` is the pure part of ``apply_many`` that both implementations
share, so they cannot disagree on what a batch changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from userstream.types import Behavior, Event

__all__ = [
    "CHANGE_QUEUES",
    "CYCLE_HISTORY",
    "COUNTERS",
    "ChangeQueue",
    "AppliedBatch",
    "BatchPlan",
    "EmbeddingStore",
    "EmbeddingUpdate",
    "FeedState",
    "ModelInfo",
    "OffsetEvent",
    "SequenceStore",
    "feed_covers",
    "parse_stream_id",
    "plan_batch",
    "stored_behavior",
]

OffsetEvent = tuple[int, int, Event]  # (partition, offset, event)

# the two queues of changed users: the training cycle's and the embedder's
ChangeQueue = Literal["train", "embed"]
CHANGE_QUEUES: tuple[ChangeQueue, ...] = ("train", "embed")

CYCLE_HISTORY = 1000  # training cycles a store keeps for the history (status page)

# counters every store reports, zero until something happened; offset_log_resets
# counts the times a topic's stored offsets were dropped because they belonged to
# another log (a recreated topic, a restarted embedded broker, another cluster)
COUNTERS = (
    "events_ingested",
    "events_dead_lettered",
    "events_duplicate_skipped",
    "offset_log_resets",
)


@dataclass(frozen=True, slots=True)
class AppliedBatch:
    applied: int  # events written
    skipped: int  # events at or below the stored offset (already applied before)
    users: int  # distinct users touched
    dead_lettered: int = 0  # invalid events counted


@dataclass(slots=True)
class BatchPlan:
    """What one batch changes, after dropping everything already applied."""

    per_user: dict[str, list[Event]]  # new events per user, in order
    items: set[str]
    behaviors: dict[str, int]  # behavior name -> count
    last: dict[int, int]  # partition -> highest offset in the batch (events and dead)
    applied: int
    skipped: int  # at or below the stored offset: applied before
    dead: int  # dead-lettered events not counted before


@dataclass(frozen=True, slots=True)
class EmbeddingUpdate:
    stream_id: str  # feed entry id, e.g. "1732900000000-0" (ms timestamp - sequence)
    user_id: str
    num: int  # stable int64 id for FAISS
    vector: np.ndarray  # (D,) float32, L2-normalized
    event_ts: float | None = None  # ts of the newest behavior the embedding saw
    version: int | None = None  # model version that made it
    # a tombstone (EmbeddingStore.forget): drop ``num`` from the index; it carries no
    # user id (""), no vector (empty), and the id is never assigned again
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class FeedState:
    """Where the update feed stands: what a follower needs to know whether the
    entries after some id are all still there (trimming drops the oldest)."""

    length: int  # entries in the feed now
    added: int | None  # entries ever added (None where the store cannot tell)
    oldest: str | None  # id of the oldest entry still there
    last_id: str | None  # id of the newest entry ever added, trimmed or not


def parse_stream_id(stream_id: str) -> tuple[int, int]:
    """``"1732900000000-3"`` -> ``(1732900000000, 3)``, comparable in feed order."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def feed_covers(feed: FeedState, feed_id: str) -> bool:
    """True when the feed still holds every entry after ``feed_id`` (none trimmed).

    Trimming (XADD MAXLEN) removes the oldest entries, so the feed is whole
    after ``feed_id`` when its oldest entry is at or before ``feed_id``, or
    when nothing was added after ``feed_id``. From "0-0" (an empty index) it
    is also whole when nothing was ever removed. A non-empty snapshot whose
    entry is newer than nothing in the feed is not trusted: the feed may be a
    new one (Redis restored or flushed), with user numbers reassigned.
    """
    if feed.oldest is not None and parse_stream_id(feed.oldest) <= parse_stream_id(feed_id):
        return True
    if feed.last_id is None:  # no feed at all: nothing after feed_id to miss
        return True
    if feed_id == "0-0" and feed.added is not None and feed.added == feed.length:
        return True
    return parse_stream_id(feed.last_id) <= parse_stream_id(feed_id)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    version: int
    checkpoint: str
    items: int
    updated_at: float
    loss: float
    drifts: int = 0  # drifts detected by the training worker's DriftMonitor so far


def stored_behavior(ev: Event) -> Behavior:
    """The behavior a store gives back for ``ev``: ts kept to the millisecond."""
    return Behavior(ev.item_id, ev.behavior, round(ev.ts * 1000) / 1000)


def plan_batch(
    events: Sequence[OffsetEvent], dead: Sequence[tuple[int, int]], done: dict[int, int]
) -> BatchPlan:
    """What ``apply_many`` writes, given ``done``: the applied offset per partition.

    Events and dead letters at or below their partition's applied offset were
    applied before and are skipped (a redelivered batch changes nothing).
    """
    plan = BatchPlan({}, set(), {}, {}, 0, 0, 0)
    last = plan.last
    for partition, offset in dead:
        if offset > done.get(partition, -1):
            plan.dead += 1
            last[partition] = max(offset, last.get(partition, -1))
    for partition, offset, ev in events:
        if offset <= done.get(partition, -1):
            plan.skipped += 1
            continue
        last[partition] = max(offset, last.get(partition, -1))
        plan.per_user.setdefault(ev.user_id, []).append(ev)
        plan.items.add(ev.item_id)
        plan.behaviors[ev.behavior] = plan.behaviors.get(ev.behavior, 0) + 1
    plan.applied = len(events) - plan.skipped
    return plan


@runtime_checkable
class SequenceStore(Protocol):
    """The last ``max_len`` behaviors of every user, applied exactly once per offset."""

    max_len: int

    # --- writes (stream worker) ------------------------------------------------
    def applied_offsets(self, topic: str) -> dict[int, int]:
        """partition -> highest offset of ``topic`` applied so far."""
        ...

    def apply_many(
        self, topic: str, events: Sequence[OffsetEvent], dead: Sequence[tuple[int, int]] = ()
    ) -> AppliedBatch:
        """Append ``events`` (in order) to their users' sequences, all or nothing,
        together with the new applied offsets; ``dead`` (partition, offset) are
        invalid events already dead-lettered: counted, and they advance offsets."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        ...

    def bind_log(self, topic: str, log_id: str, partitions: Iterable[int]) -> dict[int, str]:
        """Tie the applied offsets of ``topic``'s ``partitions`` to the log ``log_id``.

        An offset means something only in the log it came from. A partition
        whose stored offset belongs to another log (or to no recorded log) has
        it dropped, each counted in ``offset_log_resets``; returns
        {partition: previous log id ("" for none)} of those. Atomic.
        """
        ...

    def log_of(self, topic: str, partition: int) -> str | None:
        """The log the partition's offset is bound to, if any."""
        ...

    # --- reads (training worker, API) ------------------------------------------
    def read_many(self, user_ids: Sequence[str]) -> list[list[Behavior]]:
        """Each user's sequence, oldest first (empty for unknown users)."""
        ...

    def read_tail(self, user_id: str, n: int) -> list[Behavior]:
        """The last ``n`` behaviors of one user, oldest first."""
        ...

    def take_dirty(self, max_users: int, queue: ChangeQueue = "train") -> list[str]:
        """Claim up to ``max_users`` changed users of ``queue``, sorted: they move
        from its changed set to its claimed set in one step, and stay there until
        :meth:`release_claimed` (their work is done) or :meth:`requeue_claimed`
        (the work failed or never finished).

        Every applied event marks its user in both queues: "train" (the training
        cycle learns from them) and "embed" (the embedder re-embeds them with the
        current weights); each queue is claimed on its own."""
        ...

    def release_claimed(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        """The work on these claimed users is done."""
        ...

    def requeue_claimed(self, queue: ChangeQueue = "train") -> int:
        """Put every claimed user of ``queue`` back into its changed set (at start,
        after a crash or kill); returns how many there were."""
        ...

    def claimed_count(self, queue: ChangeQueue = "train") -> int: ...

    def dirty_users(self, queue: ChangeQueue = "train") -> list[str]:
        """The changed users of ``queue``, sorted, without taking them."""
        ...

    def mark_dirty(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None: ...

    def dirty_count(self, queue: ChangeQueue = "train") -> int: ...

    def oldest_change_age_s(self) -> float:
        """Seconds the longest-waiting user of the "embed" queue has waited since it
        first changed (0.0 when the queue is empty)."""
        ...

    def iter_users(self, batch: int = 1000) -> Iterator[str]:
        """Every user with a sequence (in no promised order)."""
        ...

    def num_users(self) -> int: ...

    def num_items(self) -> int: ...

    def counters(self) -> dict[str, int]:
        """At least every name in :data:`COUNTERS`."""
        ...

    # --- erasure (userstream.stores.forget) ---------------------------------------
    def forget(self, user_id: str) -> dict[str, int]:
        """Erase the user's sequence and its membership of the users set and of both
        change queues (changed and claimed), and mark it forgotten
        (:meth:`forgotten`), in one atomic step (one Lua call in the user's slot).
        Returns what was there: ``behaviors`` (stored), and 0/1 for ``users``,
        ``train_changed``, ``train_claimed``, ``embed_changed``, ``embed_claimed``."""
        ...

    def forgotten(self) -> dict[str, float]:
        """Users erased by :meth:`forget` whose markers were not cleared yet -> unix
        time of the erase (the training worker drops them from its reservoir and
        checkpoints, then clears them)."""
        ...

    def clear_forgotten(self, user_ids: Iterable[str], before: float) -> int:
        """Remove the markers of ``user_ids`` set at or before ``before`` (a user
        forgotten again later keeps its newer marker); returns how many went."""
        ...


@runtime_checkable
class EmbeddingStore(Protocol):
    """User embeddings, their stable FAISS ids, the model info and the update feed."""

    # --- ids ---------------------------------------------------------------------
    def nums_for(self, user_ids: Sequence[str]) -> list[int]:
        """Stable int64 ids, assigned on first sight."""
        ...

    def num_of(self, user_id: str) -> int | None:
        """The user's id if it has one (assigns nothing)."""
        ...

    def lookup(self, user_id: str) -> tuple[int | None, int | None]:
        """(id, embedding version) of one user in one round trip (assigns nothing)."""
        ...

    def users_for(self, nums: Sequence[int]) -> list[str | None]: ...

    # --- writes (training worker) ----------------------------------------------------
    def upsert(
        self,
        user_ids: Sequence[str],
        vectors: np.ndarray,
        version: int,
        event_ts: Sequence[float] | None = None,
    ) -> None:
        """Store (N, D) float32 embeddings made by model ``version`` and append
        them to the update feed; ``event_ts`` is, per user, the ts of the newest
        behavior the embedding saw (how fresh it is)."""
        ...

    def set_model_info(self, info: ModelInfo) -> None: ...

    def append_cycle(self, record: dict[str, float]) -> None:
        """One training cycle's figures (version, at, loss per task, timings, ...)
        for the training history; the oldest beyond :data:`CYCLE_HISTORY` go."""
        ...

    def recent_cycles(self, n: int = CYCLE_HISTORY) -> list[dict[str, float]]:
        """The last ``n`` cycle records, oldest first."""
        ...

    # --- reads (API) -------------------------------------------------------------------
    def model_info(self) -> ModelInfo | None: ...

    def get(self, user_id: str) -> np.ndarray | None: ...

    def version_of(self, user_id: str) -> int | None: ...

    def versions_of(self, user_ids: Sequence[str]) -> list[int | None]:
        """:meth:`version_of` for many users at once."""
        ...

    def event_ts_of(self, user_id: str) -> float | None:
        """The ts of the newest behavior in the user's stored embedding."""
        ...

    def count(self) -> int:
        """Users with a stored embedding."""
        ...

    def read_all(self) -> tuple[list[str], np.ndarray, list[int], list[int]]:
        """Every stored embedding: (user ids, (N, D) float32, ids, model versions)."""
        ...

    def feed_head(self) -> str:
        """Id of the newest feed entry ("0-0" when empty): follow from here after read_all."""
        ...

    def feed_state(self) -> FeedState: ...

    def register_follower(self, name: str, applied_id: str, at: float) -> None:
        """Follower ``name`` (an API replica) has applied the feed up to ``applied_id``
        (its heartbeat at unix time ``at``); the writer trims what all have applied."""
        ...

    def followers(self) -> dict[str, tuple[str, float]]:
        """name -> (applied feed id, unix time of its last report)."""
        ...

    def forget_follower(self, name: str) -> None: ...

    def trim_feed(self, min_id: str) -> int:
        """Drop feed entries older than ``min_id``; returns how many went."""
        ...

    def read_updates(
        self, after: str, count: int = 10_000, block_ms: int | None = None
    ) -> list[EmbeddingUpdate]:
        """Feed entries strictly after id ``after``, oldest first (waiting up to
        ``block_ms`` for one when there is none)."""
        ...

    # --- erasure (userstream.stores.forget) ---------------------------------------
    def forget(self, user_id: str) -> dict[str, Any]:
        """Erase the user's embedding and FAISS id, delete the feed entries that
        name it, and append one tombstone per id it had (an :class:`EmbeddingUpdate`
        with ``deleted=True`` and no user id), so every follower drops it. Returns
        ``embedding`` (0/1), ``nums`` (its ids), ``feed_entries_deleted`` and
        ``tombstones`` (their feed ids; the last is what a follower must reach).
        Scans the feed: O(feed length), which trimming keeps short."""
        ...
