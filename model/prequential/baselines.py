"""Online next-item baselines for the prequential benchmark (PROTOCOL section 2).

Each baseline sees items as dense indices ``0..n-1`` (the benchmark assigns
them in order of first appearance in the stream) and has two verbs:

* ``scores(user, n_items)`` -> ``(n_items,)`` float array, higher = more likely
  next; called BEFORE the event is learned (test-then-train);
* ``learn_one(user, item)`` -> the event (u, i) reaches the model.

* :class:`Popular`: how often each item occurred so far.
* :class:`CoOccurrence`: item-to-item counts of items that occurred within
  ``window`` steps of each other in some user's sequence; a user's score is
  the recency-weighted sum over the user's last ``window`` items.
* :class:`RiverMF`: River's online matrix factorisation (``river.reco.FunkMF``
  or ``BiasedMF``), one positive (y=1) and ``negatives`` uniformly sampled
  items (y=0) per event. Scoring all items through ``predict_one`` would cost
  a Python call per item, so a mirror matrix of the item factors (copied after
  every update of an item) is multiplied with the user's factors instead;
  the scores equal ``predict_one`` up to the per-user constant terms, which do
  not change a ranking.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from river import optim, reco

__all__ = ["CoOccurrence", "Popular", "RiverMF", "RiverMFConfig"]


def _grown(a: np.ndarray, n: int, axes: tuple[int, ...] = (0,)) -> np.ndarray:
    """``a`` with room for index ``n - 1`` on ``axes`` (capacity doubles, zeros)."""
    if all(a.shape[ax] >= n for ax in axes):
        return a
    shape = list(a.shape)
    for ax in axes:
        shape[ax] = max(n, 2 * a.shape[ax], 64)
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


class Popular:
    """Most popular so far: score = number of earlier events of the item."""

    name = "popular"

    def __init__(self) -> None:
        self.counts = np.zeros(64, dtype=np.float64)

    def scores(self, user: str, n_items: int) -> np.ndarray:
        return _grown(self.counts, n_items)[:n_items]

    def learn_one(self, user: str, item: int) -> None:
        self.counts = _grown(self.counts, item + 1)
        self.counts[item] += 1.0


class CoOccurrence:
    """Online item-to-item co-occurrence within a sliding window of each user.

    Memory is a dense (n_items, n_items) float32 matrix: fine for catalogues
    up to ~20K items (1.6 GB at 20K); a sparse version would be needed beyond.
    Popularity breaks ties (weight ``1e-6``), so a user whose recent items have
    no co-occurrences yet gets the popular items.
    """

    name = "cooccurrence"

    def __init__(self, window: int = 10, decay: float = 0.9) -> None:
        self.window = window
        self.decay = decay
        self.counts = np.zeros((64, 64), dtype=np.float32)
        self.popular = Popular()
        self.recent: dict[str, deque[int]] = {}
        self._weights = decay ** np.arange(window, dtype=np.float32)[::-1]  # oldest..newest

    def scores(self, user: str, n_items: int) -> np.ndarray:
        self.counts = _grown(self.counts, n_items, (0, 1))
        out = 1e-6 * self.popular.scores(user, n_items)
        recent = self.recent.get(user)
        if recent:
            rows = np.fromiter(recent, dtype=np.int64, count=len(recent))
            w = self._weights[-len(rows) :]  # (L,)
            out = out + w @ self.counts[rows, :n_items]  # (n_items,)
        return out

    def learn_one(self, user: str, item: int) -> None:
        self.counts = _grown(self.counts, item + 1, (0, 1))
        self.popular.learn_one(user, item)
        recent = self.recent.setdefault(user, deque(maxlen=self.window))
        if recent:
            rows = np.fromiter(recent, dtype=np.int64, count=len(recent))
            np.add.at(self.counts, (rows, item), 1.0)
            np.add.at(self.counts, (item, rows), 1.0)
        recent.append(item)


@dataclass(frozen=True)
class RiverMFConfig:
    n_factors: int = 32
    negatives: int = 16
    lr: float = 0.1
    l2: float = 0.001
    biased: bool = False  # BiasedMF instead of FunkMF

    @property
    def label(self) -> str:
        kind = "biased" if self.biased else "funk"
        return f"{kind}(f={self.n_factors},neg={self.negatives},lr={self.lr:g},l2={self.l2:g})"


class RiverMF:
    """River FunkMF / BiasedMF on implicit feedback with uniform negative sampling."""

    name = "river_mf"

    def __init__(self, config: RiverMFConfig = RiverMFConfig(), seed: int = 0) -> None:
        self.config = c = config
        init = optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed)
        if c.biased:
            self.model = reco.BiasedMF(
                n_factors=c.n_factors,
                bias_optimizer=optim.SGD(c.lr),
                latent_optimizer=optim.SGD(c.lr),
                l2_bias=c.l2,
                l2_latent=c.l2,
                latent_initializer=init,
                seed=seed,
            )
        else:
            self.model = reco.FunkMF(
                n_factors=c.n_factors,
                optimizer=optim.SGD(c.lr),
                l2=c.l2,
                initializer=init,
                seed=seed,
            )
        self.rng = np.random.default_rng(seed)
        self.n_items = 0
        self.item_factors = np.zeros((64, c.n_factors), dtype=np.float64)  # mirror of i_latents
        self.item_bias = np.zeros(64, dtype=np.float64)  # mirror of i_biases (BiasedMF)

    def scores(self, user: str, n_items: int) -> np.ndarray:
        self._grow(n_items)
        u = self.model.u_latents.get(user)
        if u is None:  # a user never learned: no opinion beyond item biases
            return self.item_bias[:n_items].copy()
        return self.item_factors[:n_items] @ u + self.item_bias[:n_items]  # (n_items,)

    def learn_one(self, user: str, item: int) -> None:
        self.n_items = max(self.n_items, item + 1)
        self._grow(self.n_items)
        negatives = self.rng.integers(0, self.n_items, size=self.config.negatives)
        self._learn(user, item, 1.0)
        for j in negatives.tolist():
            self._learn(user, j, 0.0)

    def _learn(self, user: str, item: int, y: float) -> None:
        m = self.model
        m.learn_one(user, item, y)
        self.item_factors[item] = m.i_latents[item]
        if self.config.biased:
            self.item_bias[item] = m.i_biases[item]

    def _grow(self, n: int) -> None:
        self.item_factors = _grown(self.item_factors, n)
        self.item_bias = _grown(self.item_bias, n)
