"""PROTOCOL section 1 for a trained encoder: full ranking, history masked, pessimistic ties.

:func:`evaluate_split` ranks the validation or test target of every user of a
:class:`~model.offline.split.LeaveOneOut` split against ALL catalogue items;
:func:`evaluate_checkpoint` is the ``userstream evaluate`` command's body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.batching import collate, encode_sequence
from model.metrics import KS, metric_sums, pessimistic_ranks
from model.offline.split import LeaveOneOut
from model.recommend import NextItemModel, catalogue_rows, next_item_scores
from userstream.types import Behavior

__all__ = ["evaluate_checkpoint", "evaluate_split", "format_table", "rank_encoded"]

LOG = logging.getLogger(__name__)


def rank_encoded(
    model: Any,
    inputs: Sequence[np.ndarray],
    targets: np.ndarray,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Pessimistic ranks of target item rows given encoded input histories.

    ``inputs``: (L_u, 3) arrays from ``encode_sequence`` (the WHOLE input
    history: its last ``max_len`` steps are read, all of it is masked);
    ``targets``: (U,) item rows. A target outside the catalogue (never seen in
    the training data of the checkpoint) gets the worst rank. ``model``: a
    :class:`~model.trainer.Trainer` or a :class:`~model.recommend.NextItemModel`.
    """
    encoder, items = model.encoder, model.items
    first, stop = catalogue_rows(items)
    n = stop - first
    T = encoder.config.max_len
    device = encoder.item_emb.weight.device
    ranks = torch.empty(len(inputs), dtype=torch.long)
    order = np.argsort([min(len(x), T) for x in inputs], kind="stable")  # similar lengths together
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([inputs[i] for i in idx], min(T, max(len(inputs[i]) for i in idx)))
        scores = next_item_scores(encoder, batch.to(device), items).float().cpu()  # (B, N)
        cols = torch.from_numpy(targets[idx] - first)  # (B,)
        known = (cols >= 0) & (cols < n)
        exclude = torch.zeros(scores.shape, dtype=torch.bool)  # (B, N)
        for b, i in enumerate(idx):
            hist = torch.from_numpy(inputs[i][:, 0] - first)
            exclude[b, hist[(hist >= 0) & (hist < n)]] = True
        r = pessimistic_ranks(scores, cols.clamp(0, max(n - 1, 0)), exclude)  # (B,)
        ranks[torch.from_numpy(idx)] = torch.where(known, r, torch.full_like(r, n))
    return ranks


def evaluate_split(
    model: Any,
    split: LeaveOneOut,
    part: str,
    ks: Sequence[int] = KS,
    batch_size: int = 1024,
    encoded: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean HR@k / NDCG@k of ``part`` ("valid" or "test") over the split's users.

    ``encoded``: each user's FULL sequence already encoded (saves re-encoding
    every epoch); the inputs are its first n-2 (valid) or n-1 (test) steps.
    """
    if part not in ("valid", "test"):
        raise ValueError(f"part must be 'valid' or 'test', not {part!r}")
    if encoded is None:
        encoded = encode_many(model, split.full)
    cut = 2 if part == "valid" else 1
    inputs = [e[:-cut] for e in encoded]
    targets = np.fromiter((e[-cut, 0] for e in encoded), dtype=np.int64, count=len(encoded))
    ranks = rank_encoded(model, inputs, targets, batch_size)
    sums = metric_sums(ranks, ks)
    return {k: v / max(len(ranks), 1) for k, v in sums.items()}


def encode_many(model: Any, sequences: Sequence[Sequence[Behavior]]) -> list[np.ndarray]:
    """(L, 3) arrays of ``sequences`` with ``model``'s vocabularies (a Trainer or a
    NextItemModel)."""
    n_gap = model.encoder.config.n_gap_buckets
    return [encode_sequence(s, model.items, model.behaviors, n_gap) for s in sequences]


def format_table(results: dict[str, dict[str, float]], ks: Sequence[int] = KS) -> str:
    """A small fixed-width table: one row per part, HR@k and NDCG@k columns."""
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    lines = ["part   " + " ".join(f"{c:>8}" for c in cols)]
    for part, m in results.items():
        lines.append(f"{part:<6} " + " ".join(f"{m.get(c, float('nan')):8.4f}" for c in cols))
    return "\n".join(lines)


def evaluate_checkpoint(
    data: str | Path,
    fmt: str,
    checkpoint: str | Path,
    report: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Load the latest checkpoint under ``checkpoint`` (a folder, or one ``.pt``
    file), rank the validation and test targets of ``data``, print a table and
    optionally write the JSON report of PROTOCOL section 1."""
    import json

    from model.checkpoint import latest_checkpoint
    from model.offline.datasets import load_sequences
    from model.offline.split import leave_one_out

    ckpt = latest_checkpoint(checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint}")
    model = NextItemModel.load(ckpt, device=device)
    t0 = time.perf_counter()
    split = leave_one_out(load_sequences(data, fmt))
    encoded = encode_many(model, split.full)
    results = {
        "valid": evaluate_split(model, split, "valid", encoded=encoded),
        "test": evaluate_split(model, split, "test", encoded=encoded),
    }
    out: dict[str, Any] = {
        **results,
        "users": len(split),
        "items": model.items.num_admitted,
        "checkpoint": str(ckpt),
        "seconds": time.perf_counter() - t0,
    }
    print(format_table(results))
    print(f"users {out['users']}, items {out['items']}, checkpoint {ckpt}")
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(out, indent=2))
    return out
