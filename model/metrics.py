"""Ranking metrics: one tie rule, one HR@k / NDCG@k, for every protocol.

A target's rank is 1 + the number of other items scoring at least as high
(ties count against the target: PROTOCOL sections 1 and 3, pessimistic),
leaving out excluded items (the user's history). HR@k = 1 if rank <= k;
NDCG@k = 1 / log2(rank + 1) if rank <= k, else 0.

:func:`pessimistic_ranks` ranks a batch of targets (torch, offline
evaluation), :func:`rank_of` one target (numpy, the per-event prequential
loop); :func:`hit_and_gain` turns ranks into HR@k and NDCG@k for both.

>>> import torch
>>> scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
>>> exclude = torch.tensor([[True, False, False, False]])  # item 0 is in the history
>>> pessimistic_ranks(scores, torch.tensor([2]), exclude).tolist()  # tie with item 1 counts
[2]
>>> rank_of(np.array([0.9, 0.5, 0.5, 0.1]), 2, np.array([0]))
2.0
>>> ranking_metrics(torch.tensor([1, 2, 11]), ks=(10,))["HR@10"]
0.6666666666666666
>>> hr, ndcg = hit_and_gain(np.array([1, 2, 11, np.inf]), k=10)
>>> hr.tolist(), ndcg.round(4).tolist()
([1.0, 1.0, 0.0, 0.0], [1.0, 0.6309, 0.0, 0.0])
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["KS", "hit_and_gain", "metric_sums", "pessimistic_ranks", "rank_of", "ranking_metrics"]

KS = (5, 10, 20)


def pessimistic_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N) scores, (B,) target columns, optional (B, N) bool mask -> (B,) ranks >= 1.

    Excluded items do not count; the target itself is never excluded, even
    when it is in the history (PROTOCOL section 1).
    """
    rows = torch.arange(scores.shape[0], device=scores.device)  # (B,)
    target_score = scores[rows, targets]  # (B,)
    beats = scores >= target_score[:, None]  # (B, N)
    if exclude is not None:
        beats &= ~exclude
    beats[rows, targets] = False  # the target does not outrank itself
    return 1 + beats.sum(dim=1)  # (B,)


def rank_of(scores: np.ndarray, target: int, exclude: np.ndarray | None = None) -> float:
    """The rank of item ``target`` under ``scores`` (n,): :func:`pessimistic_ranks`
    for one row, ``exclude`` holding item indices to leave out. A target whose
    score is not finite has no rank (``inf``, a miss at every k)."""
    t = scores[target]
    if not np.isfinite(t):
        return math.inf
    beats = scores >= t  # (n,)
    if exclude is not None and len(exclude):
        beats[exclude] = False
    beats[target] = False
    return float(1 + np.count_nonzero(beats))


def hit_and_gain(ranks: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-target (HR@k, NDCG@k) of ``ranks`` (float array; ``inf`` = never ranked)."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = r <= k
    gain = np.zeros_like(r)
    gain[hit] = 1.0 / np.log2(r[hit] + 1.0)
    return hit.astype(np.float64), gain


def metric_sums(ranks: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """Sums (not means) of HR@k and NDCG@k over the ranks, for accumulating batches."""
    r = ranks.cpu().numpy()
    out: dict[str, float] = {}
    for k in ks:
        hit, gain = hit_and_gain(r, k)
        out[f"HR@{k}"] = float(hit.sum())
        out[f"NDCG@{k}"] = float(gain.sum())
    return out


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """Means of HR@k and NDCG@k over ``ranks`` (NaN when there are none)."""
    n = len(ranks)
    if n == 0:
        return {f"{m}@{k}": math.nan for k in ks for m in ("HR", "NDCG")}
    return {k: v / n for k, v in metric_sums(ranks, ks).items()}
