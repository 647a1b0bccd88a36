"""The sequence encoder: a small Transformer over a user's recent behaviors.

Why plain torch and not ``transformers.BertModel``: ONE stack must run both a
bidirectional pass (cloze, contrastive, user embeddings) and a causal pass
(next-behavior prediction), with a mask chosen per call, and its blocks mix
attention with a low-pass branch (:class:`MixerBlock`). ``nn.MultiheadAttention``
takes a per-call mask (boolean, or a float one carrying relative-position
biases) directly, while BERT's attention-mask handling and internals changed
between transformers v4 and v5 (we pin a range spanning both). Our inputs (item +
behavior + time-gap embeddings, a growing item table) are custom anyway.

Inputs are LEFT-padded with row 0: the most recent behavior is always at the
last position, so a slot id (``positions="absolute"``) means "how far back from
the end", whatever the length; ``positions="relative"`` uses distances instead.
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

__all__ = ["EncoderConfig", "MixerBlock", "SequenceEncoder", "moving_mean"]

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
    attention_dropout: float | None = None  # on the attention weights; None: ``dropout``
    n_gap_buckets: int = 32  # log2-bucketed seconds since the previous behavior
    # The defaults below are the block as it was before these options (plain
    # pre-LN attention, slot embeddings), so a checkpoint whose saved config lacks
    # them loads as written. Settings and OfflineConfig choose the current block.
    # BSARec-style inductive bias beside attention (see MixerBlock): share of a
    # low-pass branch (moving mean over ``lowpass_window`` real behaviors, causal
    # in the causal pass) in each block's token mixing; 0 = plain attention
    lowpass_alpha: float = 0.0
    lowpass_window: int = 10
    post_norm: bool = False  # LayerNorm after each residual (SASRec/RecBole) instead of before
    # "absolute": a learned embedding per slot counted from the END of the input,
    # added to the inputs (SASRec). "relative": no slot embedding; attention gets a
    # learned bias per head and distance query - key instead (T5), so the causal
    # state at t is computed exactly as if t were the last slot, as it is when
    # ranking or serving (see SequenceEncoder.forward)
    positions: str = "absolute"
    # a second item table, read only by the profile vector and trained only by the
    # item-bag task (model.tasks.item_bag_loss); without it both use item_emb
    profile_items: bool = False


def moving_mean(x: torch.Tensor, real: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """Mean of ``x`` (B, T, H) over the real positions (``real`` (B, T, 1), 1/0)
    of a window of ``window`` steps: the ``window`` steps ending at t when
    ``causal`` (nothing later is read), else centred on t. -> (B, T, H); zero
    where the window holds no real position. Two cumulative sums, O(T)."""
    B, T, H = x.shape
    zero = x.new_zeros(B, 1, H + 1)
    sums = torch.cat([zero, torch.cat([x * real, real], -1).cumsum(1)], 1)  # (B, T+1, H+1)
    t = torch.arange(T, device=x.device)
    if causal:
        hi, lo = t + 1, (t + 1 - window).clamp(min=0)
    else:
        half = window // 2
        hi, lo = (t + half + 1).clamp(max=T), (t - half).clamp(min=0)
    inside = sums[:, hi] - sums[:, lo]  # (B, T, H+1): sum of x, count
    return inside[..., :H] / inside[..., H:].clamp(min=1.0)  # (B, T, H)


class MixerBlock(nn.Module):
    """One Transformer block whose token mixing is attention, optionally mixed
    with a low-pass branch (BSARec, Shin et al. AAAI 2024: an attentive
    inductive bias beside self-attention).

    The low-pass branch splits its input into the moving mean over the last
    ``lowpass_window`` real behaviors (the low frequencies: what the user has
    been doing lately) and the rest (the high frequencies), and re-weights the
    rest by a learned per-channel ``beta ** 2``. BSARec filters with an FFT
    over the whole sequence, which would let position t read t+1 in our
    every-position next-item pass; the moving mean is its causal counterpart
    (centred in bidirectional passes). Mixing: ``alpha * lowpass + (1 - alpha)
    * attention``, alpha = ``lowpass_alpha``; alpha 0 is a plain block.

    ``post_norm``: LayerNorm after each residual sum (SASRec, RecBole, BSARec)
    instead of before each sublayer (pre-LN, the default).
    """

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.config = c
        H = c.hidden
        # the names of nn.TransformerEncoderLayer's parts, which this block replaced,
        # so checkpoints written before it still load
        p_attn = c.dropout if c.attention_dropout is None else c.attention_dropout
        self.self_attn = nn.MultiheadAttention(H, c.heads, dropout=p_attn, batch_first=True)
        self.linear1 = nn.Linear(H, 4 * H)
        self.linear2 = nn.Linear(4 * H, H)
        self.norm1 = nn.LayerNorm(H)  # before (or, post_norm, after) the token mixing
        self.norm2 = nn.LayerNorm(H)  # before (after) the feed-forward
        self.drop = nn.Dropout(c.dropout)
        if c.lowpass_alpha > 0:
            self.sqrt_beta = nn.Parameter(torch.ones(1, 1, H))
            self.norm_low = nn.LayerNorm(H) if c.post_norm else None

    def _attend(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.drop(self.self_attn(x, x, x, attn_mask=mask, need_weights=False)[0])

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear2(self.drop(F.gelu(self.linear1(x)))))  # (B, T, H)

    def _lowpass(self, x: torch.Tensor, real: torch.Tensor, causal: bool) -> torch.Tensor:
        low = moving_mean(x, real, self.config.lowpass_window, causal)  # (B, T, H)
        return self.drop(low + self.sqrt_beta**2 * (x - low))  # (B, T, H)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, real: torch.Tensor, causal: bool
    ) -> torch.Tensor:
        """(B, T, H) -> (B, T, H); ``mask`` (B * heads, T, T) True = blocked."""
        alpha = self.config.lowpass_alpha
        if self.config.post_norm:
            mixed = self.norm1(x + self._attend(x, mask))  # (B, T, H)
            if alpha > 0:
                low = self.norm_low(x + self._lowpass(x, real, causal))  # (B, T, H)
                mixed = alpha * low + (1 - alpha) * mixed
            return self.norm2(mixed + self._feed_forward(mixed))  # (B, T, H)
        y = self.norm1(x)  # (B, T, H)
        delta = self._attend(y, mask)  # (B, T, H)
        if alpha > 0:
            delta = alpha * self._lowpass(y, real, causal) + (1 - alpha) * delta
        x = x + delta
        return x + self._feed_forward(self.norm2(x))  # (B, T, H)


class SequenceEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        if c.hidden % c.heads:
            raise ValueError(f"hidden={c.hidden} must be divisible by heads={c.heads}")
        self.config = c
        self.item_emb = nn.Embedding(c.n_items, c.hidden, padding_idx=PAD)
        self.profile_emb = (
            nn.Embedding(c.n_items, c.hidden, padding_idx=PAD) if c.profile_items else None
        )
        self.behavior_emb = nn.Embedding(c.n_behaviors, c.hidden, padding_idx=PAD)
        if c.positions not in ("absolute", "relative"):
            raise ValueError(f"positions must be 'absolute' or 'relative', not {c.positions!r}")
        self.pos_emb = nn.Embedding(c.max_len, c.hidden) if c.positions == "absolute" else None
        # (heads, 2 * max_len - 1): bias of distance d = query - key at column d + max_len - 1
        self.rel_bias = (
            nn.Parameter(torch.zeros(c.heads, 2 * c.max_len - 1))
            if c.positions == "relative"
            else None
        )
        self.gap_emb = nn.Embedding(c.n_gap_buckets, c.hidden, padding_idx=PAD)
        self.ln_in = nn.LayerNorm(c.hidden)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(MixerBlock(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.hidden) if not c.post_norm else nn.Identity()
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
        """(B * heads, T, T): bool, True = may NOT attend; with relative positions
        a float mask instead, the distance bias where allowed and -inf where not.

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
        if self.rel_bias is None:
            return blocked.repeat_interleave(self.config.heads, dim=0)  # (B * heads, T, T)
        t = torch.arange(T, device=items.device)
        distance = t[:, None] - t[None, :] + self.config.max_len - 1  # (T, T) column
        bias = self.rel_bias[:, distance]  # (heads, T, T)
        bias = bias[None].masked_fill(blocked[:, None], float("-inf"))  # (B, heads, T, T)
        return bias.reshape(B * self.config.heads, T, T)  # (B * heads, T, T)

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
        x = (
            self.item_emb(items)  # (B, T, H)
            + self.behavior_emb(behaviors)  # (B, T, H)
            + self.gap_emb(gaps)  # (B, T, H)
        )
        if self.pos_emb is not None:
            pos = torch.arange(self.config.max_len - T, self.config.max_len, device=items.device)
            x = x + self.pos_emb(pos)[None]  # (1, T, H)
        x = self.drop(self.ln_in(x))  # (B, T, H)
        mask = self._attention_mask(items, causal)  # (B * heads, T, T)
        real = (items != PAD).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        for block in self.blocks:
            x = block(x, mask, real, causal)  # (B, T, H)
        return self.ln_f(x)  # (B, T, H)

    def item_logits(self, h: torch.Tensor, n_valid: int | None = None) -> torch.Tensor:
        """Scores over item rows, tied to the item table: (..., H) -> (..., n_items).

        With ``n_valid`` (rows in use, ``len(ItemVocab)``) only those rows are
        scored, (..., H) -> (..., n_valid), and PAD and MASK get -inf, so none of
        them is ever predicted. The -inf is written in place into two columns:
        masking the whole (M, n_items) matrix was a measurable share of a step.
        """
        return _tied_logits(self.item_emb.weight, h, n_valid)

    @property
    def profile_table(self) -> nn.Embedding:
        """The item table the profile vector reads: ``profile_emb`` when the
        config has one (``profile_items``), else the shared ``item_emb``."""
        return self.profile_emb if self.profile_emb is not None else self.item_emb

    def profile_logits(self, z: torch.Tensor, n_valid: int) -> torch.Tensor:
        """Scores of profile vectors over the profile table's item rows, as
        :meth:`item_logits`: (..., H) -> (..., n_valid)."""
        return _tied_logits(self.profile_table.weight, z, n_valid)

    def behavior_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.behavior_head(h)  # (..., n_behaviors)

    def user_embedding(
        self, items: torch.Tensor, behaviors: torch.Tensor, gaps: torch.Tensor
    ) -> torch.Tensor:
        """THE user embedding: mean of bidirectional states over real positions,
        L2-normalized. (B, T) -> (B, H). An empty sequence gives the zero vector."""
        return self.pool(self(items, behaviors, gaps, causal=False), items)  # (B, H)

    def profile_embedding(self, items: torch.Tensor) -> torch.Tensor:
        """The PROFILE vector: the mean of the item vectors (``profile_table``)
        of the history, L2-normalized, no encoder pass. (B, T) -> (B, H).
        Order-free and long-term; trained as a user representation by the
        item-bag task (``model.tasks.item_bag_loss``). An empty sequence gives
        the zero vector."""
        return self.pool(self.profile_table(items), items)  # (B, H)

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

    def split_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(everything but the profile table, the profile table's; empty without one)."""
        profile = list(self.profile_emb.parameters()) if self.profile_emb is not None else []
        return [p for p in self.parameters() if all(p is not q for q in profile)], profile

    def clip_gradients(self, max_norm: float) -> None:
        """Clip the gradient norm to ``max_norm``: the profile table on its own,
        everything else together, so the item-bag task never rescales the
        gradients of the sequence tasks (nor they its)."""
        for params in self.split_parameters():
            if params:
                nn.utils.clip_grad_norm_(params, max_norm)

    # --- growth ----------------------------------------------------------------
    @torch.no_grad()
    def grow_items(self, new_capacity: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Reallocate the item table(s) to ``new_capacity`` rows, keeping learned rows.

        New rows are initialized like the originals. Returns an (old, new)
        parameter pair per table so the caller can move optimizer state across.
        """
        n_old = self.item_emb.num_embeddings
        if new_capacity <= n_old:
            raise ValueError(f"new_capacity={new_capacity} must exceed {n_old}")
        pairs = self._replace_item_tables(new_capacity, torch.arange(n_old))
        LOG.info("item table grown %d -> %d rows", n_old, new_capacity)
        return pairs

    @torch.no_grad()
    def remap_items(
        self, rows: torch.Tensor, new_capacity: int
    ) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """New item table(s) of ``new_capacity`` rows whose row j is old row
        ``rows[j]`` (``rows`` (n,) long, n <= new_capacity); the rest are
        initialized like new rows. Compaction after expiry; pairs as :meth:`grow_items`."""
        n_old = self.item_emb.num_embeddings
        pairs = self._replace_item_tables(new_capacity, rows)
        LOG.info("item table remapped: %d of %d rows kept, %d rows now", len(rows), n_old,
                 new_capacity)  # fmt: skip
        return pairs

    def _replace_item_tables(
        self, new_capacity: int, rows: torch.Tensor
    ) -> list[tuple[nn.Parameter, nn.Parameter]]:
        pairs = []
        for name in ("item_emb", "profile_emb"):
            old = getattr(self, name)
            if old is None:
                continue
            new = nn.Embedding(
                new_capacity,
                old.embedding_dim,
                padding_idx=PAD,
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
            nn.init.normal_(new.weight, std=0.02)
            new.weight[: len(rows)].copy_(old.weight[rows.to(old.weight.device)])  # (n, H)
            setattr(self, name, new)
            pairs.append((old.weight, new.weight))
        self.config = dataclasses.replace(self.config, n_items=new_capacity)
        return pairs

    @torch.no_grad()
    def reset_item_rows(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialize item rows ``rows`` (n,) again, as a new row is (N(0, 0.02)),
        in every item table: a freed row given to a new item keeps nothing of
        the old one. ``generator`` (CPU) makes it reproducible."""
        for table in (self.item_emb, self.profile_emb):
            if table is None:
                continue
            w = table.weight
            fresh = torch.randn((len(rows), w.shape[1]), generator=generator) * 0.02  # (n, H)
            w[rows.to(w.device)] = fresh.to(device=w.device, dtype=w.dtype)


def _tied_logits(table: torch.Tensor, h: torch.Tensor, n_valid: int | None) -> torch.Tensor:
    """``h`` (..., H) against the rows of ``table`` (rows, H). With ``n_valid``
    (rows in use) only those rows are scored and PAD and MASK get -inf."""
    if n_valid is None:
        return h @ table.T  # (..., rows)
    logits = h @ table[:n_valid].T  # (..., n_valid)
    logits[..., [PAD, MASK]] = float("-inf")  # mm keeps no output for backward
    return logits
