"""Next-item scores from the encoder: the ranking used by ``evaluate`` and by the API.

The query is the causal state of the LAST slot (the most recent behavior), the
same state :func:`model.tasks.next_item_loss` trains to predict what comes next.
Scores are inner products with the item table, restricted to the catalogue
(admitted items; PAD, MASK and hash buckets are never recommended, nor the free
rows of expired items, which score -inf).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.batching import Batch, collate, encode_sequence
from model.checkpoint import read_checkpoint
from model.encoder import SequenceEncoder
from model.explain import PairExplanation, explain_similar
from model.profile import profile_many
from model.vocab import BehaviorVocab, ItemVocab
from userstream.types import Behavior

__all__ = [
    "NextItemModel",
    "Recommendation",
    "catalogue_rows",
    "next_item_scores",
    "recommend_many",
]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Recommendation:
    item_id: str
    score: float


def catalogue_rows(items: ItemVocab) -> tuple[int, int]:
    """[first, stop) rows of the admitted items: column j of the scores is row first + j."""
    return items.first_item_row, len(items)


@torch.inference_mode()
def next_item_scores(encoder: SequenceEncoder, batch: Batch, items: ItemVocab) -> torch.Tensor:
    """(B, T) left-padded batch -> (B, N) scores of the N catalogue rows; a free
    row (an expired item's, not reused yet) scores -inf."""
    encoder.eval()
    h = encoder(batch.items, batch.behaviors, batch.gaps, causal=True)[:, -1]  # (B, H)
    first, stop = catalogue_rows(items)
    scores = h @ encoder.item_emb.weight[first:stop].T  # (B, N)
    free = items.free_rows()
    if len(free):
        scores[:, torch.from_numpy(free - first).to(scores.device)] = float("-inf")
    return scores


@torch.inference_mode()
def recommend_many(
    encoder: SequenceEncoder,
    items: ItemVocab,
    behaviors: BehaviorVocab,
    sequences: Sequence[Sequence[Behavior]],
    k: int,
    exclude_seen: bool = True,
) -> list[list[Recommendation]]:
    """Top-``k`` next items per sequence, best first (items already in the
    sequence left out when ``exclude_seen``). Empty sequences get ``[]``."""
    c = encoder.config
    device = encoder.item_emb.weight.device
    encoded = [encode_sequence(s, items, behaviors, c.n_gap_buckets) for s in sequences]
    out: list[list[Recommendation]] = [[] for _ in sequences]
    todo = [i for i, e in enumerate(encoded) if len(e)]
    if not todo:
        return out
    batch = collate([encoded[i] for i in todo], min(c.max_len, max(len(encoded[i]) for i in todo)))
    scores = next_item_scores(encoder, batch.to(device), items).float().cpu()  # (B, N)
    first, _ = catalogue_rows(items)
    if exclude_seen:
        for b, i in enumerate(todo):
            cols = torch.from_numpy(encoded[i][:, 0]) - first
            cols = cols[(cols >= 0) & (cols < scores.shape[1])]
            scores[b, cols] = float("-inf")
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    for b, i in enumerate(todo):
        for score, col in zip(top.values[b].tolist(), top.indices[b].tolist(), strict=True):
            if score == float("-inf"):
                break
            out[i].append(Recommendation(str(items.item_of(first + col)), float(score)))
    return out


@dataclass(frozen=True)
class NextItemModel:
    """Just what ranking, profiles and explanations need from a ``Trainer`` checkpoint (no
    optimizer state is kept): the encoder in eval mode, the vocabularies, the
    version."""

    encoder: SequenceEncoder
    items: ItemVocab
    behaviors: BehaviorVocab
    version: int
    path: str

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> NextItemModel:
        """The model of one checkpoint file (``device`` "auto": cuda when present)."""
        from model.trainer import resolve_device

        t0 = time.perf_counter()
        ckpt = read_checkpoint(path)
        encoder = SequenceEncoder(ckpt.config)
        encoder.load_state_dict(ckpt.model)
        encoder.to(resolve_device(device)).eval()
        items, behaviors = ckpt.vocabularies()
        LOG.info("next-item model v%d loaded from %s in %.3fs", ckpt.version, path,
                 time.perf_counter() - t0)  # fmt: skip
        return cls(encoder, items, behaviors, ckpt.version, str(path))

    def recommend_many(
        self, sequences: Sequence[Sequence[Behavior]], k: int, exclude_seen: bool = True
    ) -> list[list[Recommendation]]:
        return recommend_many(self.encoder, self.items, self.behaviors, sequences, k, exclude_seen)

    def profile_many(self, sequences: Sequence[Sequence[Behavior]]) -> np.ndarray:
        """(N, H) profile vectors (``model.profile``) of the same checkpoint."""
        return profile_many(self.encoder, self.items, self.behaviors, sequences)

    def explain_similar(
        self, user: Sequence[Behavior], others: Sequence[Sequence[Behavior]], top: int
    ) -> list[PairExplanation | None]:
        """Why ``user`` is similar to each of ``others`` (``model.explain``), by the
        same checkpoint; None where either sequence is empty."""
        return explain_similar(self.encoder, self.items, self.behaviors, user, others, top)
