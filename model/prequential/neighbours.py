"""Neighbour usefulness on the stream: PROTOCOL section 3, scored inside the prequential loop.

For every scored event (u, i, t) (u has earlier events), each neighbour source
names u's top-``k`` similar users (20) as its state stands just before t; every
item seen so far scores the number of those neighbours whose history up to t
holds it; the rank of i follows the loop's one tie rule (ties against the
target, u's own earlier items excluded, :class:`~model.prequential.models.Scoreboard`),
so HR@10 and NDCG@10 are comparable with the next-item models of the same run.

The sources, side by side in one run:

* ``ours``: the similar-user index over the embeddings the training worker's
  embedder wrote to the feed's embedding store. Live, the embedder thread
  embeds every changed user with the current weights within a moment of its
  event, between training cycles; in the loop's one thread it runs
  (``Embedder.drain``) every ``embed_every`` events and at each cycle, and the
  index is rebuilt after each run that embedded someone (with the Kafka feed,
  at cycles only: a drain there waits for the stream worker). A user not
  embedded yet gets no answer (a miss). The index comes from
  ``index_factory``: ``bench prequential`` passes the API's own
  (``serving.index.UserIndex.build``; this layer may not import it); without
  one, :class:`ExactIndex` (exact inner product, what the API's index is below
  its IVF size).
* ``user_knn``: exact cosine between the users' item sets so far
  (|A and B| / sqrt(|A| |B|)), current at t.
* ``river_mf``: cosine between River MF user factors, current at t (a copy of
  each user's factors after every update; with a River grid, one source per
  configuration and the loop keeps the one its model pick keeps).
* ``frozen``: the frozen encoder's embeddings (the model frozen at the end of
  the warm-up), re-embedded at the same points as ``ours`` for the users whose
  sequence changed since: the same pipeline and delay with weights that stop
  learning. During the warm-up it IS ``ours``.
* ``random``: ``k`` users drawn uniformly from those with history.

:func:`same_group_precision` scores a source against known groups (a planted
stream): the share of each user's top-10 neighbours in the user's own group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.prequential.baselines import RiverMF, _grown
from model.prequential.feeds import Feed
from model.prequential.models import Catalogue, PrequentialModel, Query, Scoreboard
from userstream.stores import feed_covers
from userstream.types import Event

__all__ = [
    "NEIGHBOUR_SOURCES",
    "ExactIndex",
    "FrozenSource",
    "IndexSource",
    "NeighbourContext",
    "NeighbourFactory",
    "NeighbourModels",
    "RandomSource",
    "RiverSource",
    "UserKNN",
    "UserRows",
    "neighbour_scores",
    "same_group_precision",
]

LOG = logging.getLogger(__name__)

NEIGHBOUR_SOURCES = ("ours", "user_knn", "river_mf", "frozen", "random")


class UserRows:
    """Dense rows for users (in order of first event) and their items so far: a
    0/1 matrix (users x items, float32) the sources share. With
    :meth:`track_overlap`, also every pair's count of items in common (users x
    users), kept current per event: ``user_knn`` reads a row of it instead of
    intersecting item sets per query."""

    def __init__(self) -> None:
        self.row: dict[str, int] = {}
        self.users: list[str] = []
        self.matrix = np.zeros((64, 64), dtype=np.float32)
        self.sizes = np.zeros(64, dtype=np.float32)  # distinct items per user
        self.overlap: np.ndarray | None = None  # (users, users) |A and B|, when tracked

    def __len__(self) -> int:
        return len(self.users)

    def track_overlap(self) -> None:
        """Keep :attr:`overlap` from now on (counted from the rows held so far)."""
        if self.overlap is None:
            n = len(self.users)
            held = self.matrix[:n]
            self.overlap = np.zeros((max(64, n), max(64, n)), dtype=np.float32)
            self.overlap[:n, :n] = held @ held.T

    def add(self, user: str, item: int) -> int:
        r = self.row.get(user)
        if r is None:
            r = self.row[user] = len(self.users)
            self.users.append(user)
        self.matrix = _grown(self.matrix, max(r, item) + 1, axes=(0, 1))
        self.sizes = _grown(self.sizes, r + 1)
        if not self.matrix[r, item]:
            if self.overlap is not None:  # r now shares ``item`` with everyone holding it
                n = len(self.users)
                self.overlap = _grown(self.overlap, n, axes=(0, 1))
                holders = self.matrix[:n, item]  # (n,) before r holds it
                self.overlap[r, :n] += holders
                self.overlap[:n, r] += holders
                self.overlap[r, r] += 1.0
            self.matrix[r, item] = 1.0
            self.sizes[r] += 1.0
        return r


def neighbour_scores(neighbours: Sequence[int], rows: UserRows, n_items: int) -> np.ndarray:
    """(n_items,) how many of ``neighbours`` (row numbers) hold each item so far."""
    if not len(neighbours):
        return np.zeros(n_items, dtype=np.float32)
    return rows.matrix[np.asarray(neighbours, dtype=np.int64), :n_items].sum(axis=0)


def _top(sims: np.ndarray, exclude: int, k: int, valid: np.ndarray | None = None) -> list[int]:
    """Rows of the ``k`` highest ``sims`` (ties: the earlier row), ``exclude`` and
    rows not ``valid`` left out."""
    s = sims.astype(np.float64, copy=True)
    s[exclude] = -np.inf
    if valid is not None:
        s[~valid] = -np.inf
    n_ok = int(np.isfinite(s).sum())
    k = min(k, n_ok)
    if k <= 0:
        return []
    order = np.lexsort((np.arange(len(s)), -s))[:k]  # by score, then row: deterministic
    return order.tolist()


class NeighbourSource(Protocol):
    """Who is similar to a user: rows of :class:`UserRows`, best first."""

    name: str

    def neighbours(self, user: str, k: int) -> list[int] | None:
        """The top ``k`` other users (rows), or None where the source has no answer."""
        ...

    def learn(self, user: str, item: int) -> None:
        """The event reached the baselines (rows already updated)."""
        ...

    def refresh(self) -> None:
        """A training cycle ran: embeddings changed."""
        ...


class UserKNN:
    """Exact cosine over the users' item sets so far, from the item-overlap counts
    that :class:`UserRows` keeps per event (``track_overlap``)."""

    name = "user_knn"

    def __init__(self, rows: UserRows) -> None:
        self.rows = rows
        rows.track_overlap()

    def neighbours(self, user: str, k: int) -> list[int] | None:
        rows = self.rows
        r = rows.row.get(user)
        if r is None or rows.overlap is None:
            return None
        n = len(rows)
        overlap = rows.overlap[r, :n]  # |A and B|
        denom = np.sqrt(rows.sizes[:n] * rows.sizes[r])
        sims = np.divide(overlap, denom, out=np.zeros(n, dtype=np.float32), where=denom > 0)
        return _top(sims, r, k)

    def learn(self, user: str, item: int) -> None:
        pass

    def refresh(self) -> None:
        pass


class _UnitRows:
    """Unit vectors by user row, with which rows have one: cosine neighbours."""

    def __init__(self, dim: int) -> None:
        self.vectors = np.zeros((64, dim), dtype=np.float32)
        self.known = np.zeros(64, dtype=bool)

    def set(self, rows: np.ndarray, vectors: np.ndarray, known: np.ndarray) -> None:
        """Rows ``rows`` (R,) hold ``vectors`` (R, dim), which count where ``known``."""
        if self.vectors.shape[1] != vectors.shape[1]:  # the dimension, known now
            self.vectors = np.zeros((len(self.vectors), vectors.shape[1]), np.float32)
        n = int(rows.max()) + 1
        self.vectors = _grown(self.vectors, n)
        self.known = _grown(self.known, n)
        self.vectors[rows] = vectors
        self.known[rows] = known

    def neighbours(self, r: int | None, n_users: int, k: int) -> list[int] | None:
        """The ``k`` rows (of the first ``n_users``) nearest row ``r``, or None
        where ``r`` has no vector."""
        n = min(n_users, len(self.known))  # rows beyond have none yet
        if r is None or r >= n or not self.known[r]:
            return None
        return _top(self.vectors[:n] @ self.vectors[r], r, k, self.known[:n])


class RiverSource:
    """Cosine between River MF user factors, a copy of each refreshed after its
    user's every update."""

    def __init__(self, name: str, river: RiverMF, rows: UserRows) -> None:
        self.name, self.river, self.rows = name, river, rows
        self.factors = _UnitRows(river.config.n_factors)

    def learn(self, user: str, item: int) -> None:
        latent = self.river.model.u_latents.get(user)
        if latent is None:
            return
        v = np.asarray(latent, dtype=np.float32)
        norm = float(np.linalg.norm(v))
        unit = v / norm if norm > 0 else np.zeros_like(v)
        self.factors.set(np.asarray([self.rows.row[user]]), unit[None], np.asarray([norm > 0]))

    def neighbours(self, user: str, k: int) -> list[int] | None:
        return self.factors.neighbours(self.rows.row.get(user), len(self.rows), k)

    def refresh(self) -> None:
        pass


class SearchIndex(Protocol):
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k), nums (Q, k)) best first; num -1 where fewer than k."""
        ...

    def upsert(self, nums: Sequence[int], vectors: np.ndarray) -> None:
        """Insert or replace the vectors (N, H) of ``nums`` (N,)."""
        ...

    def delete(self, nums: Sequence[int]) -> int:
        """Drop ``nums``; how many were there."""
        ...


IndexFactory = Callable[[Sequence[int], np.ndarray], SearchIndex]


class ExactIndex:
    """Exact inner-product search over ``vectors`` (N, H) under ``nums``; an
    upsert replaces a num's row in place and appends new nums (ties go to the
    earlier row, so the order is that of first insertion)."""

    def __init__(self, nums: Sequence[int], vectors: np.ndarray) -> None:
        self.nums = np.array(nums, dtype=np.int64)  # copies: upserts write in place
        self.vectors = np.array(vectors, dtype=np.float32)
        self._at = {int(n): i for i, n in enumerate(self.nums.tolist())}

    def upsert(self, nums: Sequence[int], vectors: np.ndarray) -> None:
        ids = np.asarray(nums, dtype=np.int64).tolist()
        vecs = np.asarray(vectors, dtype=np.float32)
        latest = dict(zip(ids, vecs, strict=True))  # an id given twice: the last one wins
        new = [n for n in latest if n not in self._at]
        for n, v in latest.items():
            if n in self._at:
                self.vectors[self._at[n]] = v
        if new:
            for j, n in enumerate(new):
                self._at[n] = len(self.nums) + j
            added = np.stack([latest[n] for n in new])
            held = self.vectors if len(self.nums) else np.zeros((0, added.shape[1]), np.float32)
            self.nums = np.concatenate([self.nums, np.asarray(new, dtype=np.int64)])
            self.vectors = np.concatenate([held, added])

    def delete(self, nums: Sequence[int]) -> int:
        drop = {int(n) for n in nums} & set(self._at)
        if drop:
            keep = np.asarray([int(n) not in drop for n in self.nums.tolist()])
            self.nums, self.vectors = self.nums[keep], self.vectors[keep]
            self._at = {int(n): i for i, n in enumerate(self.nums.tolist())}
        return len(drop)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        sims = q @ self.vectors.T  # (Q, N)
        k_ = min(k, sims.shape[1])
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k_]
        scores = np.take_along_axis(sims, order, axis=1)
        nums = self.nums[order]
        if k_ < k:  # as FAISS: -1 where the index holds fewer than k
            pad = k - k_
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            nums = np.pad(nums, ((0, 0), (0, pad)), constant_values=-1)
        return scores, nums


class IndexSource:
    """``ours``: the similar-user index over the feed's embedding store, kept as
    the API keeps its own: built from every stored embedding once, then following
    the store's update feed (upserts, tombstones) at each refresh (after an
    embedder run that embedded someone, or a cycle). It registers as a feed
    follower, so the worker trims only what it has applied; if the feed was
    trimmed past that anyway, it builds again from the stored embeddings."""

    name = "ours"
    follower = "prequential-ours"

    def __init__(self, feed: Feed, rows: UserRows, index_factory: IndexFactory = ExactIndex):
        self.feed, self.rows, self.index_factory = feed, rows, index_factory
        self.index: SearchIndex | None = None
        self.num_row: dict[int, int] = {}
        self.vector: dict[str, np.ndarray] = {}
        self.applied: str | None = None  # the last feed entry in the index
        self.builds = 0  # times the index was built from every stored embedding

    def refresh(self) -> None:
        store = self.feed.embeddings
        if (self.applied is None or self.index is None
                or not feed_covers(store.feed_state(), self.applied)):  # fmt: skip
            self._build()
        else:
            self._follow()
        store.register_follower(self.follower, self.applied, time.time())

    def _build(self) -> None:
        store = self.feed.embeddings
        self.applied = store.feed_head()  # read_all covers the feed up to here
        users, vecs, nums, _ = store.read_all()
        self.num_row = {num: self.rows.row[u] for u, num in zip(users, nums, strict=True)
                        if u in self.rows.row}  # fmt: skip
        self.vector = dict(zip(users, vecs, strict=True))
        self.index = self.index_factory(nums, vecs) if len(users) else None
        self.builds += 1

    def _follow(self) -> None:
        assert self.index is not None and self.applied is not None
        while True:
            updates = self.feed.embeddings.read_updates(self.applied, count=10_000)
            if not updates:
                return
            nums, vecs, gone = [], [], []
            for up in updates:
                if up.deleted:
                    gone.append(up.num)
                    self.num_row.pop(up.num, None)
                    continue
                nums.append(up.num)
                vecs.append(up.vector)
                self.vector[up.user_id] = up.vector
                if up.user_id in self.rows.row:
                    self.num_row[up.num] = self.rows.row[up.user_id]
            if gone:
                self.index.delete(gone)
                self.vector = {u: v for u, v in self.vector.items()
                               if self.feed.embeddings.num_of(u) is not None}  # fmt: skip
            if nums:
                self.index.upsert(nums, np.stack(vecs))
            self.applied = updates[-1].stream_id

    def neighbours(self, user: str, k: int) -> list[int] | None:
        v = self.vector.get(user)
        if v is None or self.index is None:
            return None
        _, nums = self.index.search(v, k + 1)
        me = self.rows.row.get(user)
        out = [self.num_row[n] for n in nums[0].tolist() if n in self.num_row]
        return [r for r in out if r != me][:k]

    def learn(self, user: str, item: int) -> None:
        pass


class FrozenSource:
    """The frozen encoder's embeddings, refreshed at each refresh for the users
    whose sequence changed since the last one (no answer before the freeze)."""

    name = "frozen"

    def __init__(self, feed: Feed, rows: UserRows, trainer: Callable[[], object | None]) -> None:
        self.feed, self.rows, self.trainer = feed, rows, trainer
        self.changed: dict[str, None] = {}
        self.vectors = _UnitRows(1)  # the dimension comes with the first embeddings
        self.started = False

    def learn(self, user: str, item: int) -> None:
        self.changed[user] = None

    def refresh(self) -> None:
        trainer = self.trainer()
        if trainer is None:
            return
        if not self.started:  # the first refresh after the freeze: everyone
            self.changed = dict.fromkeys(self.rows.users)
            self.started = True
        users = list(self.changed)
        self.changed.clear()
        if users:
            seqs = self.feed.store.read_many(users)
            vecs = trainer.embed_many(seqs)  # (N, H) L2-normalized
            rr = np.asarray([self.rows.row[u] for u in users], dtype=np.int64)
            self.vectors.set(rr, vecs, np.asarray([len(q) > 0 for q in seqs]))

    def neighbours(self, user: str, k: int) -> list[int] | None:
        if not self.started:
            return None
        return self.vectors.neighbours(self.rows.row.get(user), len(self.rows), k)


class RandomSource:
    """``k`` users with history, uniformly at random (seeded)."""

    name = "random"

    def __init__(self, rows: UserRows, seed: int = 0) -> None:
        self.rows = rows
        self.rng = np.random.default_rng(seed)

    def neighbours(self, user: str, k: int) -> list[int] | None:
        me = self.rows.row.get(user)
        others = len(self.rows) - (me is not None)
        if others <= 0:
            return []
        picks = self.rng.choice(others, size=min(k, others), replace=False)
        if me is not None:
            picks = np.where(picks >= me, picks + 1, picks)
        return picks.tolist()

    def learn(self, user: str, item: int) -> None:
        pass

    def refresh(self) -> None:
        pass


@dataclass(frozen=True)
class NeighbourContext:
    """What a neighbour source made outside this module (``run_prequential``'s
    ``extra_neighbours``) may read: the shared user rows, the feed (its sequence
    and embedding stores), the loop's catalogue and the live encoder's trainer
    (None without the encoder models)."""

    rows: UserRows
    feed: Feed
    catalogue: Catalogue
    live_trainer: Callable[[], object | None]


NeighbourFactory = Callable[[NeighbourContext], NeighbourSource]


class NeighbourModels(PrequentialModel):
    """Every neighbour source scored on every query of the loop (see the module doc).

    ``cycles`` tells how many training cycles have run (the encoder's), and
    ``embed_changed`` (every ``embed_every`` events) runs the live embedder; the
    sources refresh after each cycle and each run that embedded someone.
    ``frozen_trainer`` gives the
    frozen model once the warm-up is over (None before). Ranks go to ``board``,
    a Scoreboard of its own over the loop's catalogue, one row per source.
    """

    def __init__(
        self,
        sources: Sequence[str],
        feed: Feed,
        catalogue: Catalogue,
        n_events: int,
        k_eval: int,
        cycles: Callable[[], int],
        frozen_trainer: Callable[[], object | None],
        rivers: Mapping[str, RiverMF],
        warmup_events: int,
        k: int = 20,
        seed: int = 0,
        index_factory: IndexFactory | None = None,
        embed_changed: Callable[[], int] | None = None,
        embed_every: int = 0,
        extra: Mapping[str, NeighbourFactory] | None = None,
        live_trainer: Callable[[], object | None] = lambda: None,
    ) -> None:
        self.rows = UserRows()
        made: list[NeighbourSource] = []
        for name in sources:
            if name == "ours":
                made.append(IndexSource(feed, self.rows, index_factory or ExactIndex))
            elif name == "user_knn":
                made.append(UserKNN(self.rows))
            elif name == "frozen":
                made.append(FrozenSource(feed, self.rows, frozen_trainer))
            elif name == "random":
                made.append(RandomSource(self.rows, seed))
            elif name == "river_mf":
                if not rivers:
                    raise ValueError(
                        "neighbour source river_mf needs the river_mf model in the run"
                    )
                for row, river in rivers.items():
                    made.append(RiverSource(row, river, self.rows))
            else:
                raise ValueError(
                    f"unknown neighbour source {name!r}; expected some of {list(NEIGHBOUR_SOURCES)}"
                )
        context = NeighbourContext(self.rows, feed, catalogue, live_trainer)
        for name, factory in (extra or {}).items():
            if name in {s.name for s in made}:
                raise ValueError(f"extra neighbour source {name!r} has the name of another source")
            source = factory(context)
            source.name = name
            made.append(source)
        self.sources = made
        self.names = tuple(s.name for s in made)
        super().__init__()
        self.board = Scoreboard(n_events, catalogue, k_eval)
        for name in self.names:
            self.board.add_model(name)
        self.cycles = cycles
        self.embed_changed = embed_changed  # the live embedder's drain: changed users
        self.embed_every = embed_every if embed_changed is not None else 0
        self.k = k
        self.warmup_events = warmup_events
        self._seen_cycles = 0

    def advance(self, pos: int, ev: Event, ingested: int) -> None:
        n = self.cycles()
        cycled = n != self._seen_cycles
        self._seen_cycles = n
        if not cycled and self.embed_every and ingested and ingested % self.embed_every == 0:
            cycled = self.embed_changed() > 0  # what the embedder thread did meanwhile
        for s in self.sources:
            # embeddings changed, or the frozen model just appeared (its first embedding)
            if cycled or (isinstance(s, FrozenSource) and not s.started):
                t0 = time.perf_counter()
                s.refresh()
                self.seconds[s.name] += time.perf_counter() - t0

    def test(self, q: Query) -> None:
        for s in self.sources:
            t0 = time.perf_counter()
            nbrs = s.neighbours(q.user, self.k)
            if nbrs is None:  # no answer: a miss
                self.board.ranks[s.name][q.pos] = np.inf
            else:
                self.board.record(s.name, q, neighbour_scores(nbrs, self.rows, q.n_items))
            self.seconds[s.name] += time.perf_counter() - t0

    def learn(self, q: Query | None, ev: Event, item: int) -> None:
        self.rows.add(ev.user_id, item)
        for s in self.sources:
            s.learn(ev.user_id, item)

    def flush(self) -> None:
        ranks = self.board.ranks
        if "frozen" in ranks and "ours" in ranks:  # during the warm-up frozen IS ours
            warm = np.arange(self.board.n_events) < self.warmup_events
            ranks["frozen"][warm] = ranks["ours"][warm]

    def precision(self, groups: Mapping[str, int], k: int = 10) -> dict[str, float]:
        """:func:`same_group_precision` of every source at the end of the stream."""
        for s in self.sources:  # the state after the last event
            s.refresh()
        return {s.name: same_group_precision(s, self.rows, groups, k) for s in self.sources}


def same_group_precision(
    source: NeighbourSource, rows: UserRows, groups: Mapping[str, int], k: int = 10
) -> float:
    """Mean over users with a known group of the share of their top-``k``
    neighbours (from ``source``) in their own group; a user without an answer
    counts 0."""
    shares = []
    for user in rows.users:
        g = groups.get(user)
        if g is None:
            continue
        nbrs = source.neighbours(user, k) or []
        same = sum(groups.get(rows.users[r]) == g for r in nbrs)
        shares.append(same / k)
    return float(np.mean(shares)) if shares else float("nan")
