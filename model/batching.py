"""Behavior sequences -> left-padded id tensors the encoder reads.

Each sequence (oldest first) keeps its most recent ``max_len`` behaviors and is
LEFT-padded with 0, so the most recent behavior sits at the last position.
Time gaps (seconds since the previous behavior) are bucketed on a log2 scale:

    0  PAD
    1  no previous behavior (the user's first one we know of)
    2  gap < 1 s (also clock skew: negative gaps)
    k  2**(k-3) <= gap < 2**(k-2) seconds, capped at n_gap_buckets - 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.vocab import BehaviorVocab, ItemVocab
from userstream.types import Behavior

__all__ = ["Batch", "collate", "encode_sequence", "gap_buckets", "make_batch"]


@dataclass(frozen=True)
class Batch:
    items: torch.Tensor  # (B, T) long, item rows, 0 = PAD
    behaviors: torch.Tensor  # (B, T) long, behavior ids, 0 = PAD
    gaps: torch.Tensor  # (B, T) long, gap buckets, 0 = PAD

    def __len__(self) -> int:
        return self.items.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.items.to(device), self.behaviors.to(device), self.gaps.to(device))

    def select(self, index: torch.Tensor) -> Batch:
        return Batch(self.items[index], self.behaviors[index], self.gaps[index])

    def columns(self, start: int | None = None, stop: int | None = None) -> Batch:
        """Time slice ``[:, start:stop]`` (left padding: ``columns(-n)`` = the last n)."""
        cut = slice(start, stop)
        return Batch(self.items[:, cut], self.behaviors[:, cut], self.gaps[:, cut])


def gap_buckets(ts: np.ndarray, n_buckets: int) -> np.ndarray:
    """(L,) timestamps, oldest first -> (L,) gap bucket ids (see module docstring)."""
    out = np.empty(len(ts), dtype=np.int64)
    if len(ts) == 0:
        return out
    out[0] = 1
    gap = np.maximum(np.diff(ts), 0.0)  # (L-1,)
    k = np.where(gap < 1.0, 2, 3 + np.floor(np.log2(np.maximum(gap, 1.0))))
    out[1:] = np.minimum(k, n_buckets - 1)
    return out


def make_batch(
    sequences: Sequence[Sequence[Behavior]],
    items: ItemVocab,
    behaviors: BehaviorVocab,
    max_len: int,
    n_gap_buckets: int,
    trim: bool = False,
) -> Batch:
    """Left-padded (B, max_len) tensors of the most recent ``max_len`` behaviors;
    with ``trim``, (B, T) with T the longest of them (the encoder counts positions
    from the end and masks padding, so its outputs do not change: inference on
    short sequences then costs what they hold)."""
    B = len(sequences)
    if trim:
        max_len = max(1, min(max_len, max((len(q) for q in sequences), default=1)))
    item_ids = np.zeros((B, max_len), dtype=np.int64)
    behavior_ids = np.zeros((B, max_len), dtype=np.int64)
    gap_ids = np.zeros((B, max_len), dtype=np.int64)
    for b, seq in enumerate(sequences):
        if not seq:
            continue
        # the gap of the first kept behavior uses the one before it, when we have it
        ctx = seq[-(max_len + 1) :]
        ts = np.fromiter((x.ts for x in ctx), dtype=np.float64, count=len(ctx))
        gaps = gap_buckets(ts, n_gap_buckets)
        kept = ctx[-max_len:]
        L = len(kept)
        item_ids[b, max_len - L :] = items.rows_for([x.item_id for x in kept])
        behavior_ids[b, max_len - L :] = behaviors.ids_for([x.behavior for x in kept])
        gap_ids[b, max_len - L :] = gaps[-L:]
    return Batch(
        torch.from_numpy(item_ids), torch.from_numpy(behavior_ids), torch.from_numpy(gap_ids)
    )


def encode_sequence(
    seq: Sequence[Behavior], items: ItemVocab, behaviors: BehaviorVocab, n_gap_buckets: int
) -> np.ndarray:
    """A whole sequence -> (L, 3) int64 rows of (item row, behavior id, gap bucket).

    Slicing the result and :func:`collate` give the same tensors as
    :func:`make_batch` on the same behaviors (gaps use the step before a slice).
    """
    out = np.empty((len(seq), 3), dtype=np.int64)
    if not seq:
        return out
    out[:, 0] = items.rows_for([x.item_id for x in seq])
    out[:, 1] = behaviors.ids_for([x.behavior for x in seq])
    ts = np.fromiter((x.ts for x in seq), dtype=np.float64, count=len(seq))
    out[:, 2] = gap_buckets(ts, n_gap_buckets)
    return out


def collate(rows: Sequence[np.ndarray], length: int | None = None) -> Batch:
    """(L_b, 3) arrays from :func:`encode_sequence` -> a Batch left-padded to the
    longest one (or to ``length``, keeping the last ``length`` steps of longer ones)."""
    T = length if length is not None else max((len(r) for r in rows), default=1)
    out = np.zeros((len(rows), max(T, 1), 3), dtype=np.int64)  # (B, T, 3)
    for b, r in enumerate(rows):
        r = r[-T:] if T else r[:0]
        if len(r):
            out[b, out.shape[1] - len(r) :] = r
    t = torch.from_numpy(out)
    return Batch(t[..., 0].contiguous(), t[..., 1].contiguous(), t[..., 2].contiguous())
