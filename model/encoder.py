"""The sequence encoder: a small Transformer over a user's recent behaviors.

Why plain torch and not ``transformers.BertModel``: ONE stack must run both a
bidirectional pass (cloze, contrastive, user embeddings) and a causal pass
(next-behavior prediction), with a mask chosen per call. ``nn.TransformerEncoderLayer``
takes that mask directly and runs fused scaled-dot-product attention, while
BERT's attention-mask handling and internals changed between transformers v4
and v5 (we pin a range spanning both). Our inputs (item + behavior + position +
time-gap embeddings, a growing item table) are custom anyway, so BERT would only
contribute the layer stack.

Inputs are LEFT-padded with row 0: the most recent behavior is always at the
last position, so a position id means "how far back", whatever the length.
The model imports without any training code; see ``model/tasks.py`` for losses.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.vocab import MASK, PAD

__all__ = ["EncoderConfig", "SequenceEncoder"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    n_items: int = 1024  # rows allocated in the item table (capacity, grows)
    n_behaviors: int = 64  # rows of the behavior-type table (fixed)
    max_len: int = 50  # T: most recent behaviors read
    hidden: int = 64  # H
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    n_gap_buckets: int = 32  # log2-bucketed seconds since the previous behavior


class SequenceEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        if c.hidden % c.heads:
            raise ValueError(f"hidden={c.hidden} must be divisible by heads={c.heads}")
        self.config = c
        self.item_emb = nn.Embedding(c.n_items, c.hidden, padding_idx=PAD)
        self.behavior_emb = nn.Embedding(c.n_behaviors, c.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(c.max_len, c.hidden)
        self.gap_emb = nn.Embedding(c.n_gap_buckets, c.hidden, padding_idx=PAD)
        self.ln_in = nn.LayerNorm(c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=c.hidden,
                nhead=c.heads,
                dim_feedforward=4 * c.hidden,
                dropout=c.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(c.layers)
        )
        self.ln_f = nn.LayerNorm(c.hidden)
        self.behavior_head = nn.Linear(c.hidden, c.n_behaviors)  # next behavior TYPE
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    # --- masks -----------------------------------------------------------------
    def _attention_mask(self, items: torch.Tensor, causal: bool) -> torch.Tensor:
        """(B * heads, T, T) bool, True = may NOT attend.

        Real positions never see padding (nor, when causal, the future). Every
        position may see itself, so pad rows stay finite instead of NaN (a row
        with every key masked would poison later layers through 0 * NaN).
        """
        B, T = items.shape
        pad = items == PAD  # (B, T)
        blocked = pad[:, None, :].expand(B, T, T)  # (B, T, T) key is padding
        if causal:
            future = torch.ones(T, T, dtype=torch.bool, device=items.device).triu(1)
            blocked = blocked | future  # (B, T, T)
        eye = torch.eye(T, dtype=torch.bool, device=items.device)
        blocked = blocked & ~eye
        return blocked.repeat_interleave(self.config.heads, dim=0)  # (B * heads, T, T)

    # --- forward ---------------------------------------------------------------
    def forward(
        self,
        items: torch.Tensor,
        behaviors: torch.Tensor,
        gaps: torch.Tensor,
        causal: bool = False,
    ) -> torch.Tensor:
        """(B, T) long ids each -> (B, T, H) contextual states."""
        B, T = items.shape
        if T > self.config.max_len:
            raise ValueError(f"sequence length {T} > max_len {self.config.max_len}")
        pos = torch.arange(self.config.max_len - T, self.config.max_len, device=items.device)
        x = (
            self.item_emb(items)  # (B, T, H)
            + self.behavior_emb(behaviors)  # (B, T, H)
            + self.gap_emb(gaps)  # (B, T, H)
            + self.pos_emb(pos)[None]  # (1, T, H)
        )
        x = self.drop(self.ln_in(x))  # (B, T, H)
        mask = self._attention_mask(items, causal)  # (B * heads, T, T)
        for block in self.blocks:
            x = block(x, src_mask=mask)  # (B, T, H)
        return self.ln_f(x)  # (B, T, H)

    def item_logits(self, h: torch.Tensor, n_valid: int | None = None) -> torch.Tensor:
        """Scores over item rows, tied to the item table: (..., H) -> (..., n_items).

        With ``n_valid`` (rows in use, ``len(ItemVocab)``) only those rows are
        scored, (..., H) -> (..., n_valid), and PAD and MASK get -inf, so none of
        them is ever predicted. The -inf is written in place into two columns:
        masking the whole (M, n_items) matrix cost about 8% of a training step.
        """
        if n_valid is None:
            return h @ self.item_emb.weight.T  # (..., n_items)
        logits = h @ self.item_emb.weight[:n_valid].T  # (..., n_valid)
        logits[..., [PAD, MASK]] = float("-inf")  # mm keeps no output for backward
        return logits

    def behavior_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.behavior_head(h)  # (..., n_behaviors)

    def user_embedding(
        self, items: torch.Tensor, behaviors: torch.Tensor, gaps: torch.Tensor
    ) -> torch.Tensor:
        """THE user embedding: mean of bidirectional states over real positions,
        L2-normalized. (B, T) -> (B, H). An empty sequence gives the zero vector."""
        return self.pool(self(items, behaviors, gaps, causal=False), items)  # (B, H)

    @staticmethod
    def pool(h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Mean of states (B, T, H) over real positions of ``items`` (B, T),
        L2-normalized -> (B, H)."""
        return F.normalize(SequenceEncoder.mean_states(h, items), dim=-1)  # (B, H)

    @staticmethod
    def mean_states(h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Mean of states (B, T, H) over real positions of ``items`` (B, T) -> (B, H),
        not normalized (zero for an empty row)."""
        real = (items != PAD).unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * real).sum(1) / real.sum(1).clamp(min=1.0)  # (B, H)

    # --- growth ----------------------------------------------------------------
    @torch.no_grad()
    def grow_items(self, new_capacity: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Reallocate the item table to ``new_capacity`` rows, keeping learned rows.

        New rows are initialized like the originals. Returns (old, new)
        parameters so the caller can move optimizer state across.
        """
        old = self.item_emb
        n_old, H = old.weight.shape
        if new_capacity <= n_old:
            raise ValueError(f"new_capacity={new_capacity} must exceed {n_old}")
        new = nn.Embedding(
            new_capacity, H, padding_idx=PAD, device=old.weight.device, dtype=old.weight.dtype
        )
        nn.init.normal_(new.weight, std=0.02)
        new.weight[:n_old].copy_(old.weight)  # (n_old, H) learned rows
        self.item_emb = new
        self.config = dataclasses.replace(self.config, n_items=new_capacity)
        LOG.info("item table grown %d -> %d rows", n_old, new_capacity)
        return old.weight, new.weight
