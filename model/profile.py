"""Profile vectors: the feature-extraction side of the encoder (user profiling,
targeting), served by ``GET /users/{user_id}/profile``.

A profile vector is the plain mean of the item vectors of a user's whole
stored history, L2-normalized (:meth:`SequenceEncoder.profile_embedding`): no
encoder pass, no order, every behavior counts the same. It answers "what is
this user like" where the user embedding (the pooled bidirectional states,
``Trainer.embed_many``) answers "who behaves like this user now". The item-bag
task (``ITEM_BAG_WEIGHT``, :func:`model.tasks.item_bag_loss`) trains a table of
its own for it (``SequenceEncoder.profile_table``; without the task the shared
item table is read); the persona probe measures it (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.batching import encode_sequence
from model.encoder import SequenceEncoder
from model.vocab import BehaviorVocab, ItemVocab
from userstream.types import Behavior

__all__ = ["profile_many"]


@torch.inference_mode()
def profile_many(
    encoder: SequenceEncoder,
    items: ItemVocab,
    behaviors: BehaviorVocab,
    sequences: Sequence[Sequence[Behavior]],
) -> np.ndarray:
    """(N, H) float32 L2-normalized profile vectors of whole sequences (no
    ``max_len`` cut); zero rows for empty sequences."""
    n_gap = encoder.config.n_gap_buckets
    device = encoder.profile_table.weight.device
    out = np.zeros((len(sequences), encoder.config.hidden), dtype=np.float32)
    for i, seq in enumerate(sequences):
        if seq:
            rows = torch.from_numpy(encode_sequence(seq, items, behaviors, n_gap)[:, 0])
            z = encoder.profile_embedding(rows.to(device).unsqueeze(0))  # (1, H)
            out[i] = z[0].float().cpu().numpy()
    return out
