"""Full-ranking metrics of PROTOCOL section 1: pessimistic ranks, HR@k, NDCG@k.

>>> import torch
>>> scores = torch.tensor([[0.9, 0.5, 0.5, 0.1]])
>>> exclude = torch.tensor([[True, False, False, False]])  # item 0 is in the history
>>> pessimistic_ranks(scores, torch.tensor([2]), exclude).tolist()  # tie with item 1 counts
[2]
>>> ranking_metrics(torch.tensor([1, 2, 11]), ks=(10,))["HR@10"]
0.6666666666666666
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["KS", "pessimistic_ranks", "ranking_metrics", "metric_sums"]

KS = (5, 10, 20)


def pessimistic_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N) scores, (B,) target columns, optional (B, N) bool mask -> (B,) ranks >= 1.

    rank = 1 + #items scoring >= the target (ties count against the target),
    not counting the target itself nor the excluded items (history). The
    target is never excluded, even when it is in the history.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)  # (B,)
    target_score = scores[rows, targets]  # (B,)
    beats = scores >= target_score[:, None]  # (B, N)
    if exclude is not None:
        beats &= ~exclude
    beats[rows, targets] = False  # the target does not outrank itself
    return 1 + beats.sum(dim=1)  # (B,)


def metric_sums(ranks: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """Sums (not means) of HR@k and NDCG@k over the ranks, for accumulating batches."""
    r = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = float(hit.sum())
        out[f"NDCG@{k}"] = float((hit / torch.log2(r + 1)).sum())
    return out


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """HR@k = mean(rank <= k); NDCG@k = mean(1/log2(rank+1) if rank <= k else 0)."""
    n = len(ranks)
    if n == 0:
        return {f"{m}@{k}": math.nan for k in ks for m in ("HR", "NDCG")}
    return {k: v / n for k, v in metric_sums(ranks, ks).items()}
