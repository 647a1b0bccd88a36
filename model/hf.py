"""The encoder as a Hugging Face ``transformers`` model.

:class:`UserstreamConfig` (a ``PretrainedConfig``) and :class:`UserstreamModel`
(a ``PreTrainedModel`` around :class:`~model.encoder.SequenceEncoder`) are
registered with ``AutoConfig`` / ``AutoModel`` when :mod:`model` is imported.
:func:`export_checkpoint` (``userstream export``) turns a training checkpoint
into a standard folder: ``config.json``, ``model.safetensors`` and
``vocab.json`` (the item and behavior vocabularies, which map ids to rows).
Then, in any program::

    import model                       # registers "userstream" with the Auto classes
    from transformers import AutoModel
    hf = AutoModel.from_pretrained("runs/beauty-hf")
    vectors = hf.embed_many(sequences)  # the same user embeddings as the checkpoint

Training stays on the plain :class:`SequenceEncoder` (its item table grows at
run time, which a fixed HF config does not describe); the export is a frozen
snapshot of one checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from model.batching import make_batch
from model.checkpoint import latest_checkpoint, read_checkpoint
from model.encoder import EncoderConfig, SequenceEncoder
from model.vocab import BehaviorVocab, ItemVocab
from userstream.types import Behavior

__all__ = ["UserstreamConfig", "UserstreamModel", "UserstreamOutput", "export_checkpoint"]

LOG = logging.getLogger(__name__)

VOCAB_NAME = "vocab.json"
_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))


class UserstreamConfig(PretrainedConfig):
    """:class:`~model.encoder.EncoderConfig`'s fields as a ``PretrainedConfig``."""

    model_type = "userstream"

    def __init__(self, encoder: dict[str, Any] | None = None, **kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in _FIELDS if k in kwargs}
        self.encoder = dataclasses.asdict(EncoderConfig(**{**(encoder or {}), **given}))
        super().__init__(**kwargs)

    @property
    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(**self.encoder)

    @property
    def hidden_size(self) -> int:  # the name transformers' utilities look for
        return int(self.encoder["hidden"])


@dataclass
class UserstreamOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, T, H) bidirectional states
    user_embedding: torch.Tensor | None = None  # (B, H) L2-normalized: THE user embedding


class UserstreamModel(PreTrainedModel):
    """The sequence encoder behind ``transformers``' model API.

    ``forward(items, behaviors, gaps)`` takes the left-padded id tensors of
    :func:`model.batching.make_batch`; :meth:`embed_many` takes behavior
    sequences and uses the vocabularies saved beside the weights.
    """

    config_class = UserstreamConfig
    base_model_prefix = "userstream"
    main_input_name = "items"

    def __init__(self, config: UserstreamConfig) -> None:
        super().__init__(config)
        self.encoder = SequenceEncoder(config.encoder_config)
        self.items = ItemVocab()
        self.behaviors = BehaviorVocab()
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        SequenceEncoder._init_weights(module)

    def forward(
        self, items: torch.Tensor, behaviors: torch.Tensor, gaps: torch.Tensor
    ) -> UserstreamOutput:
        h = self.encoder(items, behaviors, gaps, causal=False)  # (B, T, H)
        return UserstreamOutput(last_hidden_state=h, user_embedding=self.encoder.pool(h, items))

    @torch.inference_mode()
    def embed_many(self, sequences: Sequence[Sequence[Behavior]]) -> np.ndarray:
        """(N, H) float32 user embeddings of behavior sequences, oldest first."""
        self.eval()
        c = self.encoder.config
        batch = make_batch(sequences, self.items, self.behaviors, c.max_len, c.n_gap_buckets)
        batch = batch.to(self.device)
        return self.encoder.user_embedding(batch.items, batch.behaviors, batch.gaps).cpu().numpy()

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        vocab = {"items": self.items.state_dict(), "behaviors": self.behaviors.state_dict()}
        (Path(save_directory) / VOCAB_NAME).write_text(json.dumps(vocab))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        path = Path(pretrained_model_name_or_path) / VOCAB_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: export the folder with `userstream export`, which writes "
                "the vocabularies beside the weights"
            )
        vocab = json.loads(path.read_text())
        model.items.load_state_dict(vocab["items"])
        model.behaviors = BehaviorVocab(int(vocab["behaviors"]["capacity"]))
        model.behaviors.load_state_dict(vocab["behaviors"])
        return model


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the newest checkpoint under ``checkpoint`` (a folder or a file) as a
    Hugging Face folder ``out_dir``; returns the checkpoint file exported."""
    path = latest_checkpoint(checkpoint)
    if path is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint}")
    ckpt = read_checkpoint(path)
    config = UserstreamConfig(encoder=dataclasses.asdict(ckpt.config))
    model = UserstreamModel(config)
    model.encoder.load_state_dict(ckpt.model)
    model.items, model.behaviors = ckpt.vocabularies()
    model.save_pretrained(out_dir)
    LOG.info("exported %s (v%d) to %s", path, ckpt.version, out_dir)
    return path


AutoConfig.register(UserstreamConfig.model_type, UserstreamConfig)
AutoModel.register(UserstreamConfig, UserstreamModel)
