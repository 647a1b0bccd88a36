"""Growing vocabularies: item id -> embedding row, behavior name -> id.

Item rows are laid out as::

    0              PAD   (left padding; never a target)
    1              MASK  (cloze / augmentation mask token; never a target)
    2 .. 2+B-1     hash buckets shared by items without their own row
    2+B ..         admitted items, in admission order (rows never move)

What bounds memory
------------------
* Admission: an item gets its own row only after ``min_count`` sightings
  (:meth:`ItemVocab.observe_many`). Until then it shares a hash bucket.
* ``capacity_max``: at most that many admitted items. Later items share the
  hash buckets forever (a stable ``zlib.crc32`` hash, never Python's salted
  ``hash``, so rows survive restarts).
* Pending counts (sightings of items not yet admitted) are capped at
  ``pending_max`` entries; when full, the items seen only once are forgotten.
* NOT yet: expiry of rows unseen for a long time (Monolith-style). Admitted
  rows live forever, so a catalogue that churns fills ``capacity_max`` and
  newer items fall back to buckets. Expiry would need a last-seen stamp per row
  and a free list that the encoder re-initializes.

A "sighting" is one occurrence in a sequence handed to the trainer. The
training worker re-reads a user's whole rolling sequence each time the user is
dirty, so the same event may be counted more than once; ``min_count`` is a
soft frequency filter, not an exact event count.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

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


class ItemVocab:
    """Item id -> row map that grows as items are admitted; rows are stable."""

    def __init__(
        self,
        min_count: int = 1,
        capacity_max: int = 2_000_000,
        n_buckets: int = 64,
        pending_max: int = 1_000_000,
    ) -> None:
        if min_count < 1 or capacity_max < 1 or n_buckets < 1:
            raise ValueError("min_count, capacity_max and n_buckets must be >= 1")
        self.min_count = min_count
        self.capacity_max = capacity_max
        self.n_buckets = n_buckets
        self.pending_max = pending_max
        self._row: dict[str, int] = {}
        self._items: list[str] = []  # admitted items; row = first_item_row + index
        self._pending: dict[str, int] = {}  # sightings of items not yet admitted

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
        return len(self._items)

    def __len__(self) -> int:
        """Rows in use (reserved rows and buckets included)."""
        return self.first_item_row + len(self._items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row

    # --- learning ----------------------------------------------------------------
    def observe_many(self, item_ids: Iterable[str]) -> int:
        """Count sightings and admit items reaching ``min_count``; returns # admitted."""
        admitted = 0
        for item in item_ids:
            if item in self._row or len(self._items) >= self.capacity_max:
                continue
            n = self._pending.get(item, 0) + 1
            if n >= self.min_count:
                self._pending.pop(item, None)
                self._row[item] = self.first_item_row + len(self._items)
                self._items.append(item)
                admitted += 1
            else:
                self._pending[item] = n
                if len(self._pending) > self.pending_max:
                    self._forget_rare()
        if len(self._items) >= self.capacity_max:
            self._pending.clear()  # nothing can be admitted any more
        return admitted

    def _forget_rare(self) -> None:
        self._pending = {k: v for k, v in self._pending.items() if v > 1}
        if len(self._pending) > self.pending_max // 2:
            self._pending.clear()

    # --- lookup ----------------------------------------------------------------
    def bucket_of(self, item_id: str) -> int:
        return 2 + zlib.crc32(item_id.encode()) % self.n_buckets

    def rows_for(self, item_ids: Sequence[str]) -> list[int]:
        row = self._row
        return [row[i] if i in row else self.bucket_of(i) for i in item_ids]

    def item_of(self, row: int) -> str | None:
        """The item owning ``row``; None for PAD, MASK, buckets and unused rows."""
        k = row - self.first_item_row
        return self._items[k] if 0 <= k < len(self._items) else None

    # --- persistence ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "min_count": self.min_count,
            "capacity_max": self.capacity_max,
            "n_buckets": self.n_buckets,
            "pending_max": self.pending_max,
            "items": list(self._items),
            "pending": dict(self._pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min_count = int(state["min_count"])
        self.capacity_max = int(state["capacity_max"])
        self.n_buckets = int(state["n_buckets"])
        self.pending_max = int(state["pending_max"])
        self._items = [str(i) for i in state["items"]]
        first = self.first_item_row
        self._row = {item: first + k for k, item in enumerate(self._items)}
        self._pending = {str(k): int(v) for k, v in state["pending"].items()}


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
