"""In-process stand-ins for the Redis stores, for the one-process benchmark loop.

:class:`MemorySequenceStore` has :class:`stream.state.SequenceStore`'s
semantics (rolling sequences of the last ``max_len`` behaviors, exactly-once
per (partition, offset), the dirty set, the users/items sets and counters), so
that :class:`model.worker.TrainingWorker` runs unchanged on top of it. A test
(``tests/test_prequential_stores.py``) drives both with the same operations
and compares every read. It exists because a prequential run applies events
one at a time between predictions: about 100 µs per event through Redis
against a few µs here, for the same state.

:class:`MemoryEmbeddingStore` keeps what the worker writes (embeddings, model
info) in dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from model.embedding_store import ModelInfo
from stream.state import AppliedBatch, OffsetEvent, plan_batch, stored_behavior
from userstream.types import Behavior, Keys

__all__ = ["MemoryEmbeddingStore", "MemorySequenceStore"]


class MemorySequenceStore:
    """Dict-backed :class:`~stream.state.SequenceStore` (same method names and results)."""

    def __init__(self, max_len: int = 200) -> None:
        self.max_len = max_len
        self._seqs: dict[str, list[Behavior]] = {}  # insertion order = users set
        self._dirty: dict[str, None] = {}
        self._items: set[str] = set()
        self._behaviors: dict[str, int] = {}
        self._offsets: dict[str, int] = {}  # "topic:partition" -> offset
        self._counters = {
            "events_ingested": 0,
            "events_dead_lettered": 0,
            "events_duplicate_skipped": 0,
        }

    # --- writes ----------------------------------------------------------------
    def applied_offsets(self, topic: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for k, v in self._offsets.items():
            t, _, p = k.rpartition(":")
            if t == topic:
                out[int(p)] = v
        return out

    def apply_many(self, topic: str, events: Sequence[OffsetEvent], dead=()) -> AppliedBatch:
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
            self._dirty[user] = None
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

    # --- reads -------------------------------------------------------------------
    def read_many(self, user_ids: Sequence[str]) -> list[list[Behavior]]:
        return [list(self._seqs.get(u, ())) for u in user_ids]

    def read_tail(self, user_id: str, n: int) -> list[Behavior]:
        """The last ``n`` behaviors of one user (a cheaper ``read_many`` for scoring)."""
        return self._seqs.get(user_id, [])[-n:]

    def take_dirty(self, max_users: int) -> list[str]:
        taken = sorted(self._dirty)[:max_users]  # sorted, as SequenceStore.take_dirty
        for u in taken:
            del self._dirty[u]
        return taken

    def dirty_users(self) -> list[str]:
        return sorted(self._dirty)

    def mark_dirty(self, user_ids: Iterable[str]) -> None:
        for u in user_ids:
            self._dirty[u] = None

    def dirty_count(self) -> int:
        return len(self._dirty)

    def iter_users(self, batch: int = 1000) -> Iterator[str]:
        yield from list(self._seqs)

    def num_users(self) -> int:
        return len(self._seqs)

    def num_items(self) -> int:
        return len(self._items)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)


class MemoryEmbeddingStore:
    """What :class:`~model.embedding_store.EmbeddingStore` stores, in dicts."""

    def __init__(self, keys: Keys | None = None) -> None:
        self.keys = keys or Keys("bench:")
        self.vectors: dict[str, np.ndarray] = {}
        self.versions: dict[str, int] = {}
        self.info: ModelInfo | None = None

    def upsert(self, user_ids: Sequence[str], vectors: np.ndarray, version: int) -> None:
        for u, v in zip(user_ids, vectors, strict=True):
            self.vectors[u] = v
            self.versions[u] = version

    def set_model_info(self, info: ModelInfo) -> None:
        self.info = info

    def model_info(self) -> ModelInfo | None:
        return self.info

    def get(self, user_id: str) -> np.ndarray | None:
        return self.vectors.get(user_id)

    def count(self) -> int:
        return len(self.vectors)
