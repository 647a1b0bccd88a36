"""How fresh the served embeddings are: event time -> embedding written, over
the last feed entries this replica applied.

A feed entry's id is the Redis Stream id, whose first part is the unix time in
ms when the training worker wrote it, and the entry carries the ts of the newest
behavior the embedding saw; their difference is the freshness of that write.
(A replay of old data gives large figures: they are the data's age, and true.)

>>> w = FreshnessWindow(maxlen=3)
>>> w.observe([("1700000002000-0", 1700000001.0), ("1700000003500-0", 1700000001.0),
...            ("1700000004000-1", None)])
>>> w.quantiles()
{'n': 2, 'p50_s': 1.75, 'p99_s': 2.485}
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

import numpy as np

__all__ = ["FreshnessWindow"]


class FreshnessWindow:
    def __init__(self, maxlen: int = 2000) -> None:
        self._seconds: deque[float] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def observe(self, entries: Iterable[tuple[str, float | None]]) -> None:
        """(feed entry id, event ts) of applied entries; those without a ts are skipped."""
        got = [int(sid.partition("-")[0]) / 1000.0 - ts for sid, ts in entries if ts is not None]
        with self._lock:
            self._seconds.extend(got)

    def quantiles(self) -> dict[str, float | int | None]:
        with self._lock:
            values = np.fromiter(self._seconds, dtype=np.float64)
        if not len(values):
            return {"n": 0, "p50_s": None, "p99_s": None}
        p50, p99 = np.quantile(values, [0.5, 0.99])
        return {"n": len(values), "p50_s": round(float(p50), 3), "p99_s": round(float(p99), 3)}
