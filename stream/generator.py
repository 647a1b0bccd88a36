"""A seeded synthetic clickstream with planted interest groups, for the demo and tests.

>>> gen = ClickstreamGenerator(n_users=20, n_groups=3, items_per_group=10, seed=1)
>>> evs = list(gen.events(100))
>>> evs[0]["user_id"][:1], evs[0]["item_id"][:1], len(evs)
('u', 'g', 100)
>>> all(a["ts"] < b["ts"] for a, b in zip(evs, evs[1:]))
True

Each user belongs to one of ``n_groups`` interest groups (ground truth:
:meth:`ClickstreamGenerator.group_of`). An event picks a random user (users
are interleaved), then an item of the user's group, popular (low-numbered)
items more often; with probability ``noise`` the item comes from another
group instead. With probability ``new_items_rate`` the event's item is a brand
new one appended to its group's catalog (items appear over time). Every
``drift_every`` events, each user switches to another group with probability
``drift_prob``. Behaviors follow ``behaviors`` weights; search events carry a
query ``text``. Successive calls to :meth:`events` continue the same stream.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["DEFAULT_BEHAVIORS", "ClickstreamGenerator"]

LOG = logging.getLogger(__name__)

# Rough e-commerce funnel proportions (most events are views, few are purchases).
DEFAULT_BEHAVIORS: Mapping[str, float] = {
    "view": 0.58,
    "click": 0.20,
    "search": 0.08,
    "cart": 0.07,
    "fav": 0.04,
    "purchase": 0.03,
}

_TOPICS = (
    "shoes", "laptops", "coffee", "novels", "guitars", "tents", "lipstick", "lego",
    "cameras", "yoga", "knives", "tea", "headphones", "plants", "watches", "bikes",
)  # fmt: skip
_WORDS = ("cheap", "best", "new", "red", "pro", "mini", "gift", "sale", "2024", "review")


class ClickstreamGenerator:
    """Deterministic (per ``seed``) stream of event dicts with planted user groups."""

    def __init__(
        self,
        n_users: int = 1000,
        n_groups: int = 10,
        items_per_group: int = 100,
        seed: int = 0,
        behaviors: Mapping[str, float] = DEFAULT_BEHAVIORS,
        drift_every: int = 0,
        drift_prob: float = 0.0,
        new_items_rate: float = 0.0,
        noise: float = 0.05,
        mean_gap_s: float = 0.01,
    ) -> None:
        if n_users < 1 or n_groups < 1 or items_per_group < 1:
            raise ValueError("n_users, n_groups and items_per_group must be >= 1")
        for name, p in (
            ("drift_prob", drift_prob),
            ("new_items_rate", new_items_rate),
            ("noise", noise),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p} must be within [0, 1]")
        self.n_users = n_users
        self.n_groups = n_groups
        self.drift_every = drift_every
        self.drift_prob = drift_prob
        self.new_items_rate = new_items_rate
        self.noise = noise
        self.mean_gap_s = mean_gap_s
        self._rng = random.Random(seed)
        self._behaviors = list(behaviors)
        self._cum_weights = _cumulative([behaviors[b] for b in self._behaviors])
        self._uw = max(4, len(str(n_users)))
        self._gw = max(2, len(str(n_groups - 1)))
        self._user_ids = [f"u{i:0{self._uw}d}" for i in range(1, n_users + 1)]
        self._user_index = {u: i for i, u in enumerate(self._user_ids)}
        self._groups = [self._rng.randrange(n_groups) for _ in range(n_users)]
        self._catalog = [items_per_group] * n_groups  # items per group so far
        self._initial_items = items_per_group
        self._emitted = 0
        self._ts: float | None = None

    # --- ground truth --------------------------------------------------------
    def group_of(self, user_id: str) -> int:
        """The user's CURRENT interest group."""
        return self._groups[self._user_index[user_id]]

    @property
    def user_ids(self) -> list[str]:
        """Every user id, in order (a copy)."""
        return list(self._user_ids)

    def item_group(self, item_id: str) -> int:
        """The group an item id belongs to (``g03-i0042`` -> 3)."""
        return int(item_id[1 : item_id.index("-")])

    def items_in(self, group: int) -> int:
        """How many items group ``group`` has so far (grows with ``new_items_rate``)."""
        return self._catalog[group]

    def item_id(self, group: int, index: int) -> str:
        return f"g{group:0{self._gw}d}-i{index:04d}"

    # --- the stream ----------------------------------------------------------
    def events(self, n_events: int, start_ts: float | None = None) -> Iterator[dict[str, Any]]:
        """``n_events`` event dicts in time order, continuing the stream of earlier calls."""
        self._start(start_ts)
        for _ in range(n_events):
            yield self._event(None)

    def sessions(
        self, n_sessions: int, length: int = 5, start_ts: float | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """``n_sessions`` bursts of ``length`` consecutive events of one user each (a
        client that uploads a session at once), continuing the same stream. Users
        take turns in a seeded random order, so the first ``n_users`` sessions
        cover every user once.

        >>> gen = ClickstreamGenerator(n_users=3, n_groups=2, items_per_group=5, seed=2)
        >>> runs = list(gen.sessions(4, length=2))
        >>> len({s[0]["user_id"] for s in runs[:3]}), all(len({e["user_id"] for e in s}) == 1
        ...                                                   for s in runs)
        (3, True)
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self._start(start_ts)
        order = list(range(self.n_users))
        for i in range(n_sessions):
            if i % self.n_users == 0:
                self._rng.shuffle(order)
            u = order[i % self.n_users]
            yield [self._event(u) for _ in range(length)]

    def _start(self, start_ts: float | None) -> None:
        if start_ts is not None:
            self._ts = start_ts
        elif self._ts is None:
            self._ts = 1_700_000_000.0

    def _event(self, u: int | None) -> dict[str, Any]:
        """The stream's next event, for user number ``u`` (None: a random user)."""
        rng = self._rng
        if self.drift_every and self._emitted and self._emitted % self.drift_every == 0:
            self._drift()
        self._emitted += 1
        gap = rng.expovariate(1.0 / self.mean_gap_s) if self.mean_gap_s > 0 else 0.0
        self._ts += max(gap, 0.001)  # ts are kept to ms: stay strictly increasing
        if u is None:
            u = rng.randrange(self.n_users)
        group = self._groups[u]
        if self.n_groups > 1 and rng.random() < self.noise:
            group = (group + 1 + rng.randrange(self.n_groups - 1)) % self.n_groups
        if rng.random() < self.new_items_rate:
            index = self._catalog[group]
            self._catalog[group] += 1
        else:
            # popularity skew: low indices (older, popular items) come up more often
            index = int(self._catalog[group] * rng.random() ** 2)
        behavior = rng.choices(self._behaviors, cum_weights=self._cum_weights)[0]
        ev: dict[str, Any] = {
            "user_id": self._user_ids[u],
            "item_id": self.item_id(group, index),
            "behavior": behavior,
            "ts": round(self._ts, 3),
        }
        if behavior == "search":
            topic = _TOPICS[group % len(_TOPICS)]
            ev["text"] = f"{topic} {rng.choice(_WORDS)}"
        return ev

    def _drift(self) -> None:
        if self.n_groups < 2 or self.drift_prob <= 0:
            return
        rng = self._rng
        moved = 0
        for u, g in enumerate(self._groups):
            if rng.random() < self.drift_prob:
                self._groups[u] = (g + 1 + rng.randrange(self.n_groups - 1)) % self.n_groups
                moved += 1
        LOG.debug("drift after %d events: %d users switched group", self._emitted, moved)


def _cumulative(weights: list[float]) -> list[float]:
    out, acc = [], 0.0
    for w in weights:
        if w < 0:
            raise ValueError("behavior weights must be >= 0")
        acc += w
        out.append(acc)
    if acc <= 0:
        raise ValueError("behavior weights must not all be 0")
    return out
