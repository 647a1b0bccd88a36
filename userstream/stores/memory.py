"""In-process stores with the Redis stores' semantics, for the one-process
benchmark loop and for tests.

A prequential run applies events one at a time between predictions, where a
Redis round trip per event would cost far more than the dict update here
(benchmarks/README.md), for the same state.
``tests/test_stores_contract.py`` drives these and the Redis stores through the
same operations and compares every read.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from userstream.stores.contracts import (
    CHANGE_QUEUES,
    COUNTERS,
    CYCLE_HISTORY,
    AppliedBatch,
    ChangeQueue,
    EmbeddingUpdate,
    FeedState,
    ModelInfo,
    OffsetEvent,
    plan_batch,
    stored_behavior,
)
from userstream.types import Behavior

__all__ = ["MemoryEmbeddingStore", "MemorySequenceStore"]


class MemorySequenceStore:
    """Dict-backed :class:`~userstream.stores.SequenceStore`."""

    def __init__(self, max_len: int = 200) -> None:
        self.max_len = max_len
        self._seqs: dict[str, list[Behavior]] = {}  # insertion order = users set
        # per change queue: changed users (insertion-ordered) and claimed ones
        self._changed: dict[str, dict[str, float]] = {q: {} for q in CHANGE_QUEUES}  # user: since
        self._claimed: dict[str, set[str]] = {q: set() for q in CHANGE_QUEUES}
        self._items: set[str] = set()
        self._behaviors: dict[str, int] = {}
        self._offsets: dict[str, int] = {}  # "topic:partition" -> offset
        self._logs: dict[str, str] = {}  # "topic:partition" -> log id
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._forgotten: dict[str, float] = {}  # user -> unix time of its erase

    # --- writes ----------------------------------------------------------------
    def applied_offsets(self, topic: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for k, v in self._offsets.items():
            t, _, p = k.rpartition(":")
            if t == topic:
                out[int(p)] = v
        return out

    def apply_many(
        self, topic: str, events: Sequence[OffsetEvent], dead: Sequence[tuple[int, int]] = ()
    ) -> AppliedBatch:
        if not events and not dead:
            return AppliedBatch(0, 0, 0)
        plan = plan_batch(events, dead, self.applied_offsets(topic))
        self._counters["events_duplicate_skipped"] += plan.skipped
        if plan.applied == 0 and plan.dead == 0:
            return AppliedBatch(0, plan.skipped, 0)
        for user, evs in plan.per_user.items():
            seq = self._seqs.setdefault(user, [])
            seq.extend(stored_behavior(e) for e in evs)
            if len(seq) > self.max_len:
                del seq[: len(seq) - self.max_len]
            now = time.time()
            for changed in self._changed.values():
                changed.setdefault(user, now)  # when it first changed, as on Redis
        self._items |= plan.items
        for name, n in plan.behaviors.items():
            self._behaviors[name] = self._behaviors.get(name, 0) + n
        self._counters["events_ingested"] += plan.applied
        self._counters["events_dead_lettered"] += plan.dead
        for p, o in plan.last.items():
            self._offsets[f"{topic}:{p}"] = o
        return AppliedBatch(plan.applied, plan.skipped, len(plan.per_user), plan.dead)

    def count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def bind_log(self, topic: str, log_id: str, partitions: Iterable[int]) -> dict[int, str]:
        dropped: dict[int, str] = {}
        for p in partitions:
            field = f"{topic}:{int(p)}"
            old = self._logs.get(field)
            if old == log_id:
                continue
            if self._offsets.pop(field, None) is not None:
                self.count("offset_log_resets")
                dropped[int(p)] = old or ""
            self._logs[field] = log_id
        return dropped

    def log_of(self, topic: str, partition: int) -> str | None:
        return self._logs.get(f"{topic}:{partition}")

    # --- reads -------------------------------------------------------------------
    def read_many(self, user_ids: Sequence[str]) -> list[list[Behavior]]:
        return [list(self._seqs.get(u, ())) for u in user_ids]

    def read_tail(self, user_id: str, n: int) -> list[Behavior]:
        return self._seqs.get(user_id, [])[-n:]

    def take_dirty(self, max_users: int, queue: ChangeQueue = "train") -> list[str]:
        changed, claimed = self._queue(queue)
        # the embedder takes the longest-waiting users first, as on Redis
        taken = sorted(
            list(changed)[:max_users] if queue == "embed" else sorted(changed)[:max_users]
        )
        for u in taken:
            del changed[u]
        claimed.update(taken)
        return taken

    def release_claimed(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        self._queue(queue)[1].difference_update(user_ids)

    def requeue_claimed(self, queue: ChangeQueue = "train") -> int:
        changed, claimed = self._queue(queue)
        n = len(claimed)
        back = dict.fromkeys(sorted(claimed), 0.0)  # in front, as Redis gives them score 0
        back.update(changed)
        changed.clear()
        changed.update(back)
        claimed.clear()
        return n

    def claimed_count(self, queue: ChangeQueue = "train") -> int:
        return len(self._queue(queue)[1])

    def dirty_users(self, queue: ChangeQueue = "train") -> list[str]:
        return sorted(self._queue(queue)[0])

    def mark_dirty(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        changed, now = self._queue(queue)[0], time.time()
        for u in user_ids:
            changed.setdefault(u, now)

    def dirty_count(self, queue: ChangeQueue = "train") -> int:
        return len(self._queue(queue)[0])

    def oldest_change_age_s(self) -> float:
        changed = self._changed["embed"]
        return max(0.0, time.time() - min(changed.values())) if changed else 0.0

    def _queue(self, queue: str) -> tuple[dict[str, None], set[str]]:
        if queue not in self._changed:
            raise ValueError(f"unknown change queue {queue!r}: expected 'train' or 'embed'")
        return self._changed[queue], self._claimed[queue]

    def iter_users(self, batch: int = 1000) -> Iterator[str]:
        yield from list(self._seqs)

    def num_users(self) -> int:
        return len(self._seqs)

    def num_items(self) -> int:
        return len(self._items)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    # --- erasure -------------------------------------------------------------------
    def forget(self, user_id: str) -> dict[str, int]:
        seq = self._seqs.pop(user_id, None)
        out = {"behaviors": len(seq or ()), "users": int(seq is not None)}
        for q in CHANGE_QUEUES:
            out[f"{q}_changed"] = int(self._changed[q].pop(user_id, None) is not None)
            claimed = self._claimed[q]
            out[f"{q}_claimed"] = int(user_id in claimed)
            claimed.discard(user_id)
        self._forgotten[user_id] = time.time()
        return out

    def forgotten(self) -> dict[str, float]:
        return dict(self._forgotten)

    def clear_forgotten(self, user_ids: Iterable[str], before: float) -> int:
        gone = [u for u in user_ids if self._forgotten.get(u, before + 1) <= before]
        for u in gone:
            del self._forgotten[u]
        return len(gone)


class MemoryEmbeddingStore:
    """Dict-backed :class:`~userstream.stores.EmbeddingStore`, feed included.

    Feed ids look like Redis Stream ids (``"<ms>-<seq>"``, increasing), so a
    follower computes the same lag from them. ``feed_maxlen=0`` keeps no feed
    (for a run that nobody follows: the prequential loop).
    """

    def __init__(self, feed_maxlen: int = 2_000_000) -> None:
        self.feed_maxlen = feed_maxlen
        self.vectors: dict[str, np.ndarray] = {}
        self.versions: dict[str, int] = {}
        self.event_ts: dict[str, float] = {}
        self.info: ModelInfo | None = None
        self._cycles: deque[dict[str, float]] = deque(maxlen=CYCLE_HISTORY)
        self._num: dict[str, int] = {}
        self._user: dict[int, str] = {}
        self._num_next = 0
        self._feed: list[EmbeddingUpdate] = []
        self._feed_ids: list[tuple[int, int]] = []  # parsed ids of _feed, increasing
        self._last_id = (0, 0)
        self._added = 0
        self._followers: dict[str, tuple[str, float]] = {}

    # --- ids ---------------------------------------------------------------------
    def nums_for(self, user_ids: Sequence[str]) -> list[int]:
        out = []
        for u in user_ids:
            num = self._num.get(u)
            if num is None:
                self._num_next += 1  # a counter, as on Redis: a forgotten id never returns
                num = self._num[u] = self._num_next  # Redis INCR starts at 1 too
                self._user[num] = u
            out.append(num)
        return out

    def num_of(self, user_id: str) -> int | None:
        return self._num.get(user_id)

    def lookup(self, user_id: str) -> tuple[int | None, int | None]:
        return self._num.get(user_id), self.versions.get(user_id)

    def users_for(self, nums: Sequence[int]) -> list[str | None]:
        return [self._user.get(int(n)) for n in nums]

    # --- writes --------------------------------------------------------------------
    def upsert(
        self,
        user_ids: Sequence[str],
        vectors: np.ndarray,
        version: int,
        event_ts: Sequence[float] | None = None,
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ts = list(event_ts) if event_ts is not None else [None] * len(user_ids)
        for u, num, v, t in zip(user_ids, self.nums_for(user_ids), vectors, ts, strict=True):
            self.vectors[u] = v.copy()
            self.versions[u] = version
            if t is not None:
                self.event_ts[u] = float(t)
            if self.feed_maxlen:
                t = None if t is None else float(t)
                self._feed.append(EmbeddingUpdate(self._next_id(), u, num, v.copy(), t, version))
                self._feed_ids.append(self._last_id)
                self._added += 1
        extra = len(self._feed) - self.feed_maxlen
        if extra > 0:
            del self._feed[:extra], self._feed_ids[:extra]

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, seq = self._last_id
        self._last_id = (ms, 0) if ms > last_ms else (last_ms, seq + 1)
        return "{}-{}".format(*self._last_id)

    def set_model_info(self, info: ModelInfo) -> None:
        self.info = info

    def append_cycle(self, record: dict[str, float]) -> None:
        self._cycles.append({k: float(v) for k, v in record.items()})

    def recent_cycles(self, n: int = CYCLE_HISTORY) -> list[dict[str, float]]:
        return list(self._cycles)[-n:] if n > 0 else []

    # --- reads -----------------------------------------------------------------------
    def model_info(self) -> ModelInfo | None:
        return self.info

    def get(self, user_id: str) -> np.ndarray | None:
        v = self.vectors.get(user_id)
        return None if v is None else v.copy()

    def version_of(self, user_id: str) -> int | None:
        return self.versions.get(user_id)

    def versions_of(self, user_ids: Sequence[str]) -> list[int | None]:
        return [self.versions.get(u) for u in user_ids]

    def event_ts_of(self, user_id: str) -> float | None:
        return self.event_ts.get(user_id)

    def count(self) -> int:
        return len(self.vectors)

    def read_all(self) -> tuple[list[str], np.ndarray, list[int], list[int]]:
        users = list(self.vectors)
        mat = (
            np.stack([self.vectors[u] for u in users])
            if users
            else np.zeros((0, 0), dtype=np.float32)
        )
        return users, mat, self.nums_for(users), [self.version_of(u) for u in users]

    def feed_head(self) -> str:
        return self._feed[-1].stream_id if self._feed else "0-0"

    def feed_state(self) -> FeedState:
        oldest = self._feed[0].stream_id if self._feed else None
        last = "{}-{}".format(*self._last_id) if self._added else None
        return FeedState(len(self._feed), self._added, oldest, last)

    def register_follower(self, name: str, applied_id: str, at: float) -> None:
        self._followers[name] = (applied_id, at)

    def followers(self) -> dict[str, tuple[str, float]]:
        return dict(self._followers)

    def forget_follower(self, name: str) -> None:
        self._followers.pop(name, None)

    def trim_feed(self, min_id: str) -> int:
        ms, _, seq = min_id.partition("-")
        cut = bisect.bisect_left(self._feed_ids, (int(ms), int(seq or 0)))
        del self._feed[:cut], self._feed_ids[:cut]
        return cut

    def read_updates(
        self, after: str, count: int = 10_000, block_ms: int | None = None
    ) -> list[EmbeddingUpdate]:
        # nothing can arrive while this thread waits, so block_ms is not waited out
        ms, _, seq = after.partition("-")
        start = bisect.bisect_right(self._feed_ids, (int(ms), int(seq or 0)))
        return self._feed[start : start + count]

    def forget(self, user_id: str) -> dict[str, Any]:
        named = [i for i, up in enumerate(self._feed) if up.user_id == user_id and not up.deleted]
        nums = dict.fromkeys(self._feed[i].num for i in named)
        num = self._num.pop(user_id, None)
        if num is not None:
            nums = {num: None, **nums}
        for n in nums:
            if self._user.get(n) == user_id:
                del self._user[n]
        had = self.vectors.pop(user_id, None) is not None
        self.versions.pop(user_id, None)
        self.event_ts.pop(user_id, None)
        for i in reversed(named):
            del self._feed[i], self._feed_ids[i]
        tombstones = []
        for n in nums:
            if self.feed_maxlen:
                self._feed.append(EmbeddingUpdate(self._next_id(), "", n,
                                                  np.zeros(0, np.float32), deleted=True))  # fmt: skip
                self._feed_ids.append(self._last_id)
                self._added += 1
                tombstones.append(self._feed[-1].stream_id)
        return {"embedding": int(had), "nums": list(nums), "feed_entries_deleted": len(named),
                "tombstones": tombstones}  # fmt: skip
