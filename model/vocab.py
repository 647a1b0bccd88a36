"""Growing vocabularies: item id -> embedding row, behavior name -> id.

Item rows are laid out as::

    0              PAD   (left padding; never a target)
    1              MASK  (cloze / augmentation mask token; never a target)
    2 .. 2+B-1     hash buckets shared by items without their own row
    2+B ..         item slots: admitted items, and free rows of expired ones

What bounds memory
------------------
* Admission: an item gets its own row only after ``min_count`` sightings
  (:meth:`ItemVocab.observe_many`). Until then it shares a hash bucket.
* ``capacity_max``: at most that many item slots. Once they are all taken (and
  none is free) later items share the hash buckets (a stable ``zlib.crc32``
  hash, never Python's salted ``hash``, so rows survive restarts).
* Pending counts (sightings of items not yet admitted) are capped at
  ``pending_max`` entries; when full, the items seen only once are forgotten.
* Expiry (Monolith-style, :meth:`ItemVocab.expire`): every slot keeps the event
  time its item was last seen at (``last_seen``; the stream's time, never the
  wall clock, so a replay expires the same items). An item unseen for ``ttl_s``
  before the newest event seen (``clock``) is forgotten, and so are the least
  recently seen ones beyond ``live_max`` live items. Its row goes onto a free
  list, and the next admitted item takes the lowest free row (the trainer
  re-initializes it and resets its optimizer state: :meth:`take_reused`), so a
  churning catalogue stops growing the table. A forgotten id maps to its hash
  bucket again, like any unknown item: the reused row is never reachable
  through it. :meth:`compact` moves live rows down over the free ones when
  most of the table is free (the trainer shrinks its table to match).

A "sighting" is one occurrence in a sequence handed to the trainer. The
training worker re-reads a user's whole rolling sequence each time the user is
dirty, so the same event may be counted more than once; ``min_count`` is a
soft frequency filter, not an exact event count. A re-read never makes an item
look newer: its stamp is the newest *event time* it was seen at, and an old
sighting of an item already past its TTL admits nothing.
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PAD",
    "MASK",
    "UNKNOWN_BEHAVIOR",
    "ItemVocab",
    "BehaviorVocab",
]

PAD = 0
MASK = 1
UNKNOWN_BEHAVIOR = 1

_FREE = math.inf  # last_seen of a free slot: never older than a cutoff, never evicted
_UNKNOWN = math.nan  # last_seen of an item seen without a time (stamped by the next expire)


class ItemVocab:
    """Item id -> row map that grows as items are admitted and forgets expired ones.

    A live item's row never moves, except in :meth:`compact`. ``ttl_s`` and
    ``live_max`` are the expiry policy of the run (the trainer sets them from
    its settings; they are not part of the saved state): None = never.
    """

    def __init__(
        self,
        min_count: int = 1,
        capacity_max: int = 2_000_000,
        n_buckets: int = 64,
        pending_max: int = 1_000_000,
        ttl_s: float | None = None,
        live_max: int | None = None,
    ) -> None:
        if min_count < 1 or capacity_max < 1 or n_buckets < 1:
            raise ValueError("min_count, capacity_max and n_buckets must be >= 1")
        self.min_count = min_count
        self.capacity_max = capacity_max
        self.n_buckets = n_buckets
        self.pending_max = pending_max
        self.ttl_s = ttl_s or None
        self.live_max = live_max or None
        self._row: dict[str, int] = {}
        self._items: list[str | None] = []  # slot k = row first_item_row + k; None = free
        self._pending: dict[str, int] = {}  # sightings of items not yet admitted
        self._stamps = np.empty(0, dtype=np.float64)  # last_seen per slot (with headroom)
        self._free: list[int] = []  # heap of free rows: the lowest is reused first
        self._free_sorted: np.ndarray | None = None  # cache of free_rows()
        self._reused: list[int] = []  # rows handed to new items since take_reused()
        self.clock = -math.inf  # newest event time seen
        self.expired_total = 0  # items forgotten by expire()
        self.reused_total = 0  # free rows given to new items

    # --- layout ----------------------------------------------------------------
    @property
    def first_item_row(self) -> int:
        return 2 + self.n_buckets

    @property
    def max_rows(self) -> int:
        """Rows the table can ever need: reserved + buckets + capacity_max."""
        return self.first_item_row + self.capacity_max

    @property
    def num_admitted(self) -> int:
        """Items with a row of their own now (live items)."""
        return len(self._row)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def last_seen(self) -> np.ndarray:
        """(slots,) float64 event time each slot's item was last seen at (a view):
        inf for a free slot, NaN for an item seen only without a time."""
        return self._stamps[: len(self._items)]

    def __len__(self) -> int:
        """Rows in use (reserved rows, buckets and free rows included)."""
        return self.first_item_row + len(self._items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row

    def free_rows(self) -> np.ndarray:
        """(F,) int64 free rows, ascending: rows below ``len(self)`` no item owns."""
        if self._free_sorted is None:
            self._free_sorted = np.array(sorted(self._free), dtype=np.int64)
        return self._free_sorted

    # --- learning ----------------------------------------------------------------
    def observe_many(self, item_ids: Iterable[str], times: Iterable[float] | None = None) -> int:
        """Count sightings and admit items reaching ``min_count``; returns # admitted.

        ``times`` (one event time per id) advance ``clock`` and stamp the items'
        ``last_seen``; a sighting older than ``clock - ttl_s`` admits nothing.
        """
        ids = list(item_ids)
        ts = None if times is None else np.asarray(list(times), dtype=np.float64)
        if ts is not None and len(ts):
            self.clock = max(self.clock, float(ts.max()))
        cutoff = self.clock - self.ttl_s if self.ttl_s and ts is not None else -math.inf
        admitted = 0
        row = self._row
        for j, item in enumerate(ids):
            if item in row or (len(self._items) >= self.capacity_max and not self._free):
                continue
            if ts is not None and ts[j] < cutoff:
                continue  # a re-read of a behavior already past the TTL
            n = self._pending.get(item, 0) + 1
            if n >= self.min_count:
                self._pending.pop(item, None)
                self._admit(item)
                admitted += 1
            else:
                self._pending[item] = n
                if len(self._pending) > self.pending_max:
                    self._forget_rare()
        if len(self._items) >= self.capacity_max and not self._free:
            self._pending.clear()  # nothing can be admitted any more
        if ts is not None and len(ids):
            rows = np.fromiter((row.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
            own = rows >= 0
            # fmax: an unknown (NaN) stamp takes the time; a re-read never goes back
            np.fmax.at(self._stamps, rows[own] - self.first_item_row, ts[own])
        return admitted

    def _admit(self, item: str) -> None:
        if self._free:
            r = heapq.heappop(self._free)
            self._free_sorted = None
            self._items[r - self.first_item_row] = item
            self._reused.append(r)
            self.reused_total += 1
        else:
            r = self.first_item_row + len(self._items)
            self._items.append(item)
            if len(self._items) > len(self._stamps):
                grown = np.full(max(1024, 2 * len(self._stamps)), _FREE)
                grown[: len(self._stamps)] = self._stamps
                self._stamps = grown
        self._stamps[r - self.first_item_row] = _UNKNOWN
        self._row[item] = r

    def _forget_rare(self) -> None:
        self._pending = {k: v for k, v in self._pending.items() if v > 1}
        if len(self._pending) > self.pending_max // 2:
            self._pending.clear()

    def take_reused(self) -> list[int]:
        """Free rows given to new items since the last call: the caller must
        re-initialize their weights and reset their optimizer state."""
        out, self._reused = self._reused, []
        return out

    # --- expiry ------------------------------------------------------------------
    def expire(self) -> np.ndarray:
        """Forget items unseen for ``ttl_s`` before ``clock``, then the least
        recently seen beyond ``live_max``; returns their (freed) rows, ascending.

        Vectorised over ``last_seen``; the Python work is per freed item. Items
        seen without a time are stamped with ``clock`` here (a format-1
        checkpoint's items get a full TTL from the first cycle that knows the time).
        """
        n = len(self._items)
        stamps = self._stamps[:n]  # (n,) view
        if math.isfinite(self.clock):
            unknown = np.isnan(stamps)
            if unknown.any():
                stamps[unknown] = self.clock
        dead = np.empty(0, dtype=np.int64)
        if self.ttl_s and math.isfinite(self.clock):
            dead = np.flatnonzero(stamps < self.clock - self.ttl_s)
        over = len(self._row) - len(dead) - (self.live_max or len(self._row))
        if over > 0:
            order = np.where(np.isnan(stamps), -math.inf, stamps)  # unknown goes first
            order[dead] = _FREE
            dead = np.concatenate([dead, np.argpartition(order, over - 1)[:over]])
        dead.sort()
        for k in dead.tolist():
            del self._row[self._items[k]]  # type: ignore[arg-type]  # a live slot
            self._items[k] = None
            heapq.heappush(self._free, self.first_item_row + k)
        stamps[dead] = _FREE
        if len(dead):
            self._free_sorted = None
            self.expired_total += len(dead)
        return dead + self.first_item_row

    def compact(self) -> np.ndarray:
        """Move the live rows down over the free ones, in row order; the free list
        empties. Returns (live,) int64: new row ``first_item_row + j`` was row
        ``out[j]`` (the trainer moves weights and optimizer state the same way)."""
        keep = np.array([k for k, item in enumerate(self._items) if item is not None],
                        dtype=np.int64)  # fmt: skip
        first = self.first_item_row
        self._items = [self._items[k] for k in keep.tolist()]
        self._row = {item: first + j for j, item in enumerate(self._items)}  # type: ignore[misc]
        stamps = np.full(max(1024, len(keep)), _FREE)
        stamps[: len(keep)] = self._stamps[keep]
        self._stamps = stamps
        self._free, self._free_sorted, self._reused = [], None, []
        return keep + first

    # --- lookup ----------------------------------------------------------------
    def bucket_of(self, item_id: str) -> int:
        return 2 + zlib.crc32(item_id.encode()) % self.n_buckets

    def rows_for(self, item_ids: Sequence[str]) -> list[int]:
        row = self._row
        return [row[i] if i in row else self.bucket_of(i) for i in item_ids]

    def item_of(self, row: int) -> str | None:
        """The item owning ``row``; None for PAD, MASK, buckets, free and unused rows."""
        k = row - self.first_item_row
        return self._items[k] if 0 <= k < len(self._items) else None

    # --- persistence ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe: ``userstream export`` writes it as vocab.json):
        free slots are None in ``items``, and a free slot or an unknown time is
        None in ``last_seen``."""
        stamps = self.last_seen.tolist()
        return {
            "min_count": self.min_count,
            "capacity_max": self.capacity_max,
            "n_buckets": self.n_buckets,
            "pending_max": self.pending_max,
            "items": list(self._items),
            "pending": dict(self._pending),
            "last_seen": [t if math.isfinite(t) else None for t in stamps],
            "clock": self.clock if math.isfinite(self.clock) else None,
            "expired_total": self.expired_total,
            "reused_total": self.reused_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state without stamps (checkpoint format
        1) gives every item an unknown time, stamped by the next :meth:`expire`."""
        self.min_count = int(state["min_count"])
        self.capacity_max = int(state["capacity_max"])
        self.n_buckets = int(state["n_buckets"])
        self.pending_max = int(state["pending_max"])
        self._items = [None if i is None else str(i) for i in state["items"]]
        first = self.first_item_row
        self._row = {item: first + k for k, item in enumerate(self._items) if item is not None}
        self._pending = {str(k): int(v) for k, v in state["pending"].items()}
        seen = state.get("last_seen") or [None] * len(self._items)
        if len(seen) != len(self._items):
            raise ValueError(f"last_seen has {len(seen)} stamps for {len(self._items)} item slots")
        self._stamps = np.full(max(1024, len(self._items)), _FREE)
        self._stamps[: len(seen)] = [
            _FREE if item is None else (_UNKNOWN if t is None else float(t))
            for item, t in zip(self._items, seen, strict=True)
        ]
        self._free = [first + k for k, item in enumerate(self._items) if item is None]
        heapq.heapify(self._free)
        self._free_sorted, self._reused = None, []
        clock = state.get("clock")
        self.clock = -math.inf if clock is None else float(clock)
        self.expired_total = int(state.get("expired_total", 0))
        self.reused_total = int(state.get("reused_total", 0))


class BehaviorVocab:
    """The open set of behavior names (view, click, cart, ...) -> small ids.

    0 = PAD, 1 = unknown; names are admitted on first sight until ``capacity``
    ids exist, later names map to unknown. The encoder's behavior table has
    exactly ``capacity`` rows, so it never has to grow.
    """

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 3:
            raise ValueError("capacity must leave room for PAD, unknown and one name")
        self.capacity = capacity
        self._id: dict[str, int] = {}
        self._names: list[str] = []

    def __len__(self) -> int:
        return 2 + len(self._names)

    def observe_many(self, names: Iterable[str]) -> int:
        added = 0
        for name in names:
            if name not in self._id and len(self) < self.capacity:
                self._id[name] = len(self)
                self._names.append(name)
                added += 1
        return added

    def ids_for(self, names: Sequence[str]) -> list[int]:
        get = self._id.get
        return [get(n, UNKNOWN_BEHAVIOR) for n in names]

    def name_of(self, idx: int) -> str | None:
        k = idx - 2
        return self._names[k] if 0 <= k < len(self._names) else None

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "names": list(self._names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._names = [str(n) for n in state["names"]]
        self._id = {n: 2 + k for k, n in enumerate(self._names)}
