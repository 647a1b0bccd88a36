"""Full-ranking metrics of one target among all items, with expected-value ties.

A model's scores for all ``n`` items are compared with the target's score:
``g`` items score strictly higher, ``e`` other items score exactly the same.
Breaking the ties uniformly at random puts the target at a rank uniform on
``g+1 .. g+e+1``; HR@k and NDCG@k are the expectations over that draw
(so a model that scores everything equal gets HR@k = k/n, not 0 or 1).
Items the user has already interacted with are excluded (score -inf); a
target the user already has (a repeat) or that no model could know (its first
appearance in the stream) counts as a miss.

>>> s = np.array([3.0, 1.0, 2.0, 2.0])
>>> hr, ndcg = rank_metrics(s, target=2, exclude=np.array([0]), k=1)
>>> float(hr), round(float(ndcg), 4)   # tie with item 3 for rank 1
(0.5, 0.5)
>>> rank_metrics(s, target=0, exclude=np.array([0]), k=10)   # a repeat: excluded
(0.0, 0.0)
"""

from __future__ import annotations

import numpy as np

__all__ = ["rank_metrics"]

_DISCOUNT = {}  # k -> (k,) 1/log2(r+1) for r = 1..k


def _discount(k: int) -> np.ndarray:
    d = _DISCOUNT.get(k)
    if d is None:
        d = _DISCOUNT[k] = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    return d


def rank_metrics(
    scores: np.ndarray, target: int | None, exclude: np.ndarray | None, k: int = 10
) -> tuple[float, float]:
    """Expected (HR@k, NDCG@k) of ``target`` under ``scores`` (n,), ``exclude`` masked.

    ``scores`` is not modified. ``target`` None (an item never seen before) or
    in ``exclude`` gives (0.0, 0.0).
    """
    if target is None or target >= len(scores):
        return 0.0, 0.0
    if exclude is not None and len(exclude):
        if np.any(exclude == target):
            return 0.0, 0.0
        scores = scores.copy()
        scores[exclude] = -np.inf
    t = scores[target]
    if not np.isfinite(t):
        return 0.0, 0.0
    g = int(np.count_nonzero(scores > t))
    if g >= k:
        return 0.0, 0.0
    e = int(np.count_nonzero(scores == t)) - 1  # other items tied with the target
    last = min(k, g + e + 1)  # ranks g+1..last are inside the top k
    d = _discount(k)
    hr = (last - g) / (e + 1)
    ndcg = float(d[g:last].sum()) / (e + 1)
    return hr, ndcg
