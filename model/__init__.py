"""model: the incremental self-supervised learner of user embeddings.

The learner, top to bottom:

* :mod:`model.encoder` — the Transformer over a user's recent behaviors
  (attention beside a low-pass branch, relative positions);
* :mod:`model.tasks` — the six self-supervised losses (cloze, next item,
  contrastive; future item, bag and item bag for profiles) and their sum;
* :mod:`model.trainer` — vocabulary growth, the optimizer step, embeddings,
  checkpoints (:mod:`model.checkpoint`), configured by
  :class:`userstream.settings.ModelSettings`;
* :mod:`model.vocab`, :mod:`model.batching`, :mod:`model.augment` — item
  rows that grow, left-padded batches, the contrastive views;
* what the learner is used for: :mod:`model.recommend` (next items),
  :mod:`model.profile` (profile vectors), :mod:`model.explain` (why two users
  are similar), :mod:`model.finetune` (a head for a
  labelled attribute), :mod:`model.hf` (the encoder as a Hugging Face model);
  :mod:`model.metrics` (HR / NDCG with one tie rule).

Around it, one sub-package per role: :mod:`model.live` (the training worker
process), :mod:`model.offline` (PROTOCOL section 1: ``userstream train`` /
``evaluate``) and :mod:`model.prequential` (PROTOCOL section 2, the streaming
benchmark). ``model`` imports ``stream`` and ``userstream.stores`` /
``userstream.settings``, never ``serving``.

Importing ``model`` registers the encoder with ``transformers``' Auto classes
(:mod:`model.hf`).
"""

from model import hf as _hf  # noqa: F401  (registers the Auto classes)
from model.batching import Batch, make_batch
from model.encoder import EncoderConfig, SequenceEncoder
from model.tasks import LossWeights, total_loss
from model.trainer import Trainer
from model.vocab import BehaviorVocab, ItemVocab

__all__ = [
    "Batch",
    "BehaviorVocab",
    "EncoderConfig",
    "ItemVocab",
    "LossWeights",
    "SequenceEncoder",
    "Trainer",
    "make_batch",
    "total_loss",
]
