"""A planted clickstream with ONE abrupt concept shift, for the drift demo and tests.

The first ``shift_at`` events come from :class:`stream.generator.ClickstreamGenerator`
(users in interest groups, popular items more often). At ``shift_at`` two things
change at once:

* every user moves to another interest group (the generator's own drift with
  ``drift_prob=1``), and
* the catalogue is relabelled by a fixed random permutation of the item ids,
  so which items belong together (the item-to-item structure every model has
  learned) changes too, and so do the popular items.

A model frozen before the shift knows all item ids but their old relations; a
model that keeps learning can pick up the new ones.

>>> evs = shifted_clickstream(2000, shift_at=1000, n_users=50, seed=1)
>>> len(evs), evs[0]["ts"] < evs[-1]["ts"]
(2000, True)
"""

from __future__ import annotations

import random
from typing import Any

from stream.generator import ClickstreamGenerator

__all__ = ["shifted_clickstream"]


def shifted_clickstream(
    n_events: int,
    shift_at: int | None = None,
    n_users: int = 500,
    n_groups: int = 8,
    items_per_group: int = 60,
    noise: float = 0.05,
    seed: int = 0,
    mean_gap_s: float = 0.01,
) -> list[dict[str, Any]]:
    """``n_events`` event dicts in time order; the shift happens at ``shift_at``
    (default: half way; ``shift_at >= n_events`` gives a stationary stream)."""
    shift_at = n_events // 2 if shift_at is None else shift_at
    gen = ClickstreamGenerator(
        n_users=n_users,
        n_groups=n_groups,
        items_per_group=items_per_group,
        seed=seed,
        drift_every=shift_at if 0 < shift_at < n_events else 0,
        drift_prob=1.0,
        noise=noise,
        mean_gap_s=mean_gap_s,
    )
    events = list(gen.events(n_events))
    ids = [gen.item_id(g, i) for g in range(n_groups) for i in range(items_per_group)]
    shuffled = ids[:]
    random.Random(seed + 1).shuffle(shuffled)
    relabel = dict(zip(ids, shuffled, strict=True))
    for ev in events[shift_at:]:
        ev["item_id"] = relabel[ev["item_id"]]
    return events
