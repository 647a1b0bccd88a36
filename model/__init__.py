"""model: the incremental self-supervised learner of user embeddings.

Start reading at ``model/encoder.py`` (the Transformer, ~170 lines), then
``model/tasks.py`` (the three losses: cloze, next-item, contrastive),
``model/trainer.py`` (vocabulary growth, optimizer steps, checkpoints) and
``model/worker.py`` (the loop: dirty users -> train -> checkpoint -> embed ->
Redis). ``model/vocab.py`` explains what bounds memory as items keep arriving;
``model/batching.py`` turns behavior sequences into left-padded tensors and
``model/augment.py`` makes the contrastive views; ``model/embedding_store.py``
is the Redis side that ``serving/`` reads.

Offline (``userstream train`` / ``evaluate``): ``model/split.py`` (leave-one-out),
``model/offline.py`` (epochs, prefixes or windows, early stopping on
validation; ``model/averaging.py``, the weights' moving average), ``model/evaluate.py``
and ``model/metrics.py`` (PROTOCOL section 1), ``model/recommend.py`` (the
next-item ranking the API serves), ``model/profile.py`` (profile vectors for
``/users/{id}/profile``), ``model/finetune.py`` (a supervised head).

The names below are imported lazily (PEP 562): ``serving/`` imports
``model.embedding_store`` and should not pay for importing torch (~1.5 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.batching import Batch, make_batch
    from model.embedding_store import EmbeddingStore, EmbeddingUpdate, ModelInfo
    from model.encoder import EncoderConfig, SequenceEncoder
    from model.tasks import (
        LossWeights,
        cloze_loss,
        contrastive_loss,
        next_item_loss,
        total_loss,
    )
    from model.trainer import Trainer
    from model.vocab import BehaviorVocab, ItemVocab
    from model.worker import CycleReport, TrainingWorker, main

__all__ = [
    "Batch",
    "BehaviorVocab",
    "CycleReport",
    "EmbeddingStore",
    "EmbeddingUpdate",
    "EncoderConfig",
    "ItemVocab",
    "LossWeights",
    "ModelInfo",
    "SequenceEncoder",
    "Trainer",
    "TrainingWorker",
    "cloze_loss",
    "contrastive_loss",
    "main",
    "make_batch",
    "next_item_loss",
    "total_loss",
]

_HOME = {
    "Batch": "batching",
    "make_batch": "batching",
    "EmbeddingStore": "embedding_store",
    "EmbeddingUpdate": "embedding_store",
    "ModelInfo": "embedding_store",
    "EncoderConfig": "encoder",
    "SequenceEncoder": "encoder",
    "LossWeights": "tasks",
    "cloze_loss": "tasks",
    "contrastive_loss": "tasks",
    "next_item_loss": "tasks",
    "total_loss": "tasks",
    "Trainer": "trainer",
    "BehaviorVocab": "vocab",
    "ItemVocab": "vocab",
    "CycleReport": "worker",
    "TrainingWorker": "worker",
    "main": "worker",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"model.{_HOME[name]}"), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
