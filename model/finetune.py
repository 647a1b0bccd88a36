"""Supervised fine-tuning of the encoder for a per-user label (e.g. a persona
attribute): a linear head on the pooled user state, trained together with a
COPY of the encoder (the live encoder is never modified).

>>> clf = finetune_classifier(trainer.encoder, encoded, labels, n_classes=2)  # doctest: +SKIP
>>> proba = predict_proba(clf, encoded_test)                                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.batching import Batch, collate
from model.encoder import SequenceEncoder
from model.vocab import PAD

__all__ = ["FinetuneConfig", "UserClassifier", "finetune_classifier", "predict_proba"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 15
    batch_size: int = 64
    encoder_lr: float = 3e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


class UserClassifier(nn.Module):
    """Encoder (bidirectional pass) -> mean over real steps -> linear head."""

    def __init__(self, encoder: SequenceEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden, n_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.encoder(batch.items, batch.behaviors, batch.gaps, causal=False)  # (B, T, H)
        real = (batch.items != PAD).unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * real).sum(1) / real.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled)  # (B, C)


def _batches(encoded: Sequence[np.ndarray], idx: np.ndarray, T: int, bs: int):
    for start in range(0, len(idx), bs):
        chunk = idx[start : start + bs]
        yield (
            chunk,
            collate([encoded[i] for i in chunk], min(T, max(len(encoded[i]) for i in chunk))),
        )


def finetune_classifier(
    encoder: SequenceEncoder,
    encoded: Sequence[np.ndarray],
    labels: np.ndarray,
    n_classes: int,
    config: FinetuneConfig = FinetuneConfig(),
) -> UserClassifier:
    """Train head + a copy of ``encoder`` with cross-entropy on (sequence, label) pairs.

    ``encoded``: (L, 3) arrays from ``model.batching.encode_sequence``;
    ``labels``: (N,) ints in ``[0, n_classes)``.
    """
    model = UserClassifier(copy.deepcopy(encoder), n_classes)
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": config.encoder_lr},
            {"params": model.head.parameters(), "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    rng = np.random.default_rng(config.seed)
    y = torch.as_tensor(labels, dtype=torch.long)
    T = encoder.config.max_len
    for epoch in range(config.epochs):
        model.train()
        total = 0.0
        for chunk, batch in _batches(encoded, rng.permutation(len(encoded)), T, config.batch_size):
            loss = F.cross_entropy(model(batch), y[chunk])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(chunk)
        LOG.debug("fine-tune epoch %d: loss %.4f", epoch + 1, total / len(encoded))
    return model


@torch.inference_mode()
def predict_proba(
    model: UserClassifier, encoded: Sequence[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """(N, C) class probabilities."""
    model.eval()
    T = model.encoder.config.max_len
    out = []
    for _, batch in _batches(encoded, np.arange(len(encoded)), T, batch_size):
        out.append(torch.softmax(model(batch), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), dtype=np.float32)
