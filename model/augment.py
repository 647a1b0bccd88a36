"""Sequence augmentations for the contrastive task (CL4SRec-style crop/mask/reorder).

Each row of a left-padded :class:`~model.batching.Batch` gets ONE augmentation
chosen at random; calling :func:`augment` twice gives two views of each user.
Work happens on CPU row by row (B is a training minibatch, T <= max_len), then
the result moves back to the batch's device.
"""

from __future__ import annotations

import torch

from model.batching import Batch
from model.vocab import MASK, PAD

__all__ = ["augment", "crop", "mask", "reorder"]


def _randint(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def crop(row: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """(L, 3) -> (L', 3): a random contiguous window of about ``ratio * L`` steps."""
    L = row.shape[0]
    keep = max(1, round(ratio * L))
    start = _randint(L - keep + 1, generator)
    return row[start : start + keep]


def mask(row: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """(L, 3) -> (L, 3): items replaced by MASK with probability ``prob`` (one kept)."""
    L = row.shape[0]
    if L < 2:
        return row
    hit = torch.rand(L, generator=generator) < prob  # (L,)
    hit[_randint(L, generator)] = False
    out = row.clone()
    out[hit, 0] = MASK
    return out


def reorder(row: torch.Tensor, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """(L, 3) -> (L, 3): a random window of about ``ratio * L`` steps shuffled."""
    L = row.shape[0]
    span = min(L, max(2, round(ratio * L)))
    if L < 2:
        return row
    start = _randint(L - span + 1, generator)
    perm = torch.randperm(span, generator=generator) + start  # (span,)
    out = row.clone()
    out[start : start + span] = row[perm]
    return out


def augment(
    batch: Batch,
    generator: torch.Generator | None = None,
    crop_ratio: float = 0.6,
    mask_prob: float = 0.3,
    reorder_ratio: float = 0.3,
) -> Batch:
    """One randomly augmented view of every sequence, left-padded like the input."""
    device = batch.items.device
    rows = torch.stack([batch.items, batch.behaviors, batch.gaps], dim=-1).cpu()  # (B, T, 3)
    B, T, _ = rows.shape
    out = torch.zeros_like(rows)  # (B, T, 3) all PAD
    choice = torch.randint(3, (B,), generator=generator)  # (B,)
    for b in range(B):
        real = rows[b][rows[b, :, 0] != PAD]  # (L, 3)
        if real.shape[0] == 0:
            continue
        if choice[b] == 0:
            real = crop(real, crop_ratio, generator)
        elif choice[b] == 1:
            real = mask(real, mask_prob, generator)
        else:
            real = reorder(real, reorder_ratio, generator)
        out[b, T - real.shape[0] :] = real
    out = out.to(device)
    return Batch(out[..., 0], out[..., 1], out[..., 2])
