"""The self-supervised losses, each a plain function of (encoder, batch).

* :func:`cloze_loss` — masked behavior modeling (BERT4Rec): hide ~20% of the
  items, predict them from both sides.
* :func:`next_item_loss` — autoregressive next-behavior prediction (SASRec):
  causal pass, predict the item at t+1 from position t (full-softmax
  cross-entropy at every real position), plus a small term for the next
  behavior TYPE.
* :func:`contrastive_loss` — InfoNCE between two augmented views of each
  sequence on the pooled user embedding (CL4SRec), in-batch negatives.

Two opt-in tasks (weight 0 by default) for profile representations, each
riding on a pass above (docs/architecture.md):

* :func:`future_item_loss` — the causal state at t predicts a random LATER item
  of the window (PinnerFormer's dense all-action loss); next-item's pass.
* :func:`bag_loss` — the pooled state of the cloze-masked view predicts every
  item of the window (Mult-DAE's multinomial likelihood); the cloze pass.
* :func:`item_bag_loss` — the plain mean of the item vectors of a window's
  shown items predicts its hidden ones (a tied linear softmax autoencoder): no
  encoder pass at all. It trains the profile table (a table of its own when
  ``EncoderConfig.profile_items``) so that the mean of its vectors,
  ``SequenceEncoder.profile_embedding``, is a user profile.

:func:`total_loss` with both cloze and contrastive on shares one pass between
them: the cloze-masked sequence IS an augmented view (CL4SRec's item mask), so
its pooled states are the first contrastive view and only the second view costs
a forward pass (3 passes per step instead of 4).

Random choices draw from an optional CPU ``torch.Generator`` so runs are
reproducible; masks are made on CPU and moved to the batch's device.
``n_valid`` is the number of item rows in use (``len(ItemVocab)``).

A batch may be one step longer than ``max_len`` (the offline trainer feeds
windows of ``max_len + 1``): next-item prediction reads all but the last step,
the bidirectional tasks read the last ``max_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.augment import augment
from model.batching import Batch
from model.encoder import SequenceEncoder, _tied_logits
from model.vocab import MASK, PAD
from userstream.settings import ModelSettings

__all__ = [
    "ItemSoftmax",
    "LossWeights",
    "bag_loss",
    "cloze_loss",
    "contrastive_loss",
    "future_item_loss",
    "item_bag_loss",
    "item_cross_entropy",
    "last_item_loss",
    "next_item_loss",
    "total_loss",
]


@dataclass(frozen=True)
class LossWeights:
    """How much each task counts in :func:`total_loss`; a task not named is off.
    The defaults of a run are ``ModelSettings``' (:meth:`of`), not these zeros."""

    mlm: float = 0.0
    next: float = 0.0
    contrastive: float = 0.0
    future: float = 0.0
    bag: float = 0.0
    item_bag: float = 0.0
    softmax: ItemSoftmax = field(default_factory=lambda: ItemSoftmax())

    @classmethod
    def of(cls, settings: ModelSettings) -> LossWeights:
        """The weights ``settings`` give (``*_weight`` fields) and its item softmax."""
        return cls(
            mlm=settings.mlm_weight,
            next=settings.next_weight,
            contrastive=settings.contrastive_weight,
            future=settings.future_weight,
            bag=settings.bag_weight,
            item_bag=settings.item_bag_weight,
            softmax=ItemSoftmax(settings.item_softmax == "sampled", settings.sampled_negatives),
        )


@dataclass(frozen=True)
class ItemSoftmax:
    """How cloze, next- and future-item score their targets (:func:`item_cross_entropy`).

    ``sampled=False``: over every item row in use. ``sampled=True``: over the
    distinct targets of the call (in-batch negatives, each corrected by the log
    of its count there: popular items are not pushed down for being popular)
    and ``negatives`` rows drawn uniformly (corrected by the log of their
    expected count, ``negatives / rows``), accidental hits masked. The cost then
    depends on the batch, not on the catalogue; while the catalogue has no more
    rows than ``negatives`` the full softmax is used.
    """

    sampled: bool = False
    negatives: int = 1024


def item_cross_entropy(
    encoder: SequenceEncoder,
    h: torch.Tensor,
    targets: torch.Tensor,
    n_valid: int,
    softmax: ItemSoftmax,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of item ``targets`` (P,) given states ``h`` (P, H)."""
    rows = n_valid - 2  # PAD and MASK are never scored
    if not softmax.sampled or rows <= softmax.negatives:
        return _full_cross_entropy(encoder, h, targets, n_valid)
    table = encoder.item_emb.weight
    distinct, label, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    negatives = torch.randint(2, n_valid, (softmax.negatives,), generator=generator)
    negatives = negatives.to(targets.device)  # (S,)
    candidates = torch.cat([distinct, negatives])  # (U + S,)
    logits = h @ table[candidates].T  # (P, U + S)
    correction = torch.cat([
        counts.to(h.dtype).log(),
        torch.full((softmax.negatives,), math.log(softmax.negatives / rows),
                   dtype=h.dtype, device=h.device),
    ])  # fmt: skip
    hits = negatives[None, :] == targets[:, None]  # (P, S): a row's own target drawn
    hits = torch.cat([hits.new_zeros(hits.shape[0], distinct.shape[0]), hits], dim=1)
    return F.cross_entropy((logits - correction).masked_fill(hits, -torch.inf), label)


# the full softmax holds (targets, rows) logits and as much again for their gradient:
# beyond this many logits it runs in chunks of targets, each recomputed in the
# backward pass, so memory stays this bound whatever the catalogue and batch
FULL_SOFTMAX_MAX_LOGITS = 1 << 26  # 256 MB of float32 per chunk (ML-100K: one chunk)


def _chunk_loss(table: torch.Tensor, h: torch.Tensor, targets: torch.Tensor,
                n_valid: int) -> torch.Tensor:  # fmt: skip
    return F.cross_entropy(_tied_logits(table, h, n_valid), targets, reduction="sum")


def _full_cross_entropy(
    encoder: SequenceEncoder, h: torch.Tensor, targets: torch.Tensor, n_valid: int
) -> torch.Tensor:
    """Mean cross-entropy over every item row; in chunks of targets (each
    recomputed in the backward) once the logits exceed ``FULL_SOFTMAX_MAX_LOGITS``.
    The same loss and gradients either way (up to float rounding)."""
    P = h.shape[0]
    chunk = max(1, FULL_SOFTMAX_MAX_LOGITS // max(n_valid, 1))
    if P <= chunk or not torch.is_grad_enabled():
        return F.cross_entropy(encoder.item_logits(h, n_valid), targets)
    from torch.utils.checkpoint import checkpoint

    table = encoder.item_emb.weight
    total = h.new_zeros(())
    for start in range(0, P, chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, table, h[part], targets[part], n_valid,
                                   use_reentrant=False)  # fmt: skip
    return total / P


def _zero(encoder: SequenceEncoder) -> torch.Tensor:
    """A zero loss that still belongs to the graph (backward is a no-op)."""
    return encoder.item_emb.weight.sum() * 0.0


def cloze_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.2,
) -> torch.Tensor:
    """Cross-entropy of masked items over item rows (bidirectional pass)."""
    return _cloze(encoder, batch, n_valid, generator, mask_prob)[0]


def bag_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Every item of the window from the pooled state of its masked view.

    A denoising bag-of-items objective (Mult-DAE's multinomial likelihood) on
    the user embedding itself: the mean of the bidirectional states, before the
    L2 normalization that serving applies, scores all item rows, and the loss is
    the mean negative log-likelihood of the window's items. It reuses the cloze
    pass (``total_loss`` shares it).
    """
    return _cloze(encoder, batch, n_valid, generator, bag=True)[2]


def _hide(
    items: torch.Tensor, prob: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, hidden) (B, T) bool masks on CPU: each real position of ``items``
    is hidden with probability ``prob``, and always at least one per non-empty row."""
    real = (items != PAD).cpu()  # (B, T)
    rand = torch.rand(items.shape, generator=generator)  # (B, T)
    hidden = (rand < prob) & real  # (B, T)
    pick = rand.masked_fill(~real, -1.0).argmax(dim=1)  # (B,)
    hidden[torch.arange(items.shape[0]), pick] |= real.any(dim=1)
    return real, hidden


def item_bag_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    generator: torch.Generator | None = None,
    hide_prob: float = 0.2,
) -> torch.Tensor:
    """The hidden items of each window from the mean item vector of its shown ones.

    About ``hide_prob`` of each window's items (at least one) are hidden; the
    mean of the profile table's rows of the others scores all rows of that
    table (a tied linear autoencoder with Mult-DAE's multinomial likelihood;
    ``encoder.profile_table`` is the shared item table unless the config gives
    the profile its own), and the loss is the mean negative log-likelihood of
    the hidden items. It learns which items go together in one history wherever
    they sit, which is what a profile is made of; next-item and cloze learn what
    comes next or between. Reads that table only (no encoder pass). Rows that
    show nothing are skipped.
    """
    items = batch.columns(-encoder.config.max_len).items  # (B, T)
    real, hidden = _hide(items, hide_prob, generator)  # (B, T) each, on CPU
    rows = (real & ~hidden).any(1)  # (B,) the windows with something shown
    if not bool(rows.any()):
        return _zero(encoder)
    items, hidden = items[rows.to(items.device)], hidden[rows].to(items.device)  # (B', T)
    shown = items.masked_fill(hidden, PAD)  # (B', T)
    profile = SequenceEncoder.mean_states(encoder.profile_table(shown), shown)  # (B', H)
    logp = F.log_softmax(encoder.profile_logits(profile, n_valid), dim=-1)  # (B', n_valid)
    picked = logp.gather(1, items).masked_fill(~hidden, 0.0)  # (B', T)
    return -(picked.sum(1) / hidden.sum(1)).mean()


def _cloze(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    generator: torch.Generator | None,
    mask_prob: float = 0.2,
    bag: bool = False,
    softmax: ItemSoftmax = ItemSoftmax(),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(cloze loss, pooled embedding of the masked view (B, H) or None if nothing
    masked, bag loss or a zero when not asked for)."""
    batch = batch.columns(-encoder.config.max_len)
    items = batch.items  # (B, T)
    real, masked = _hide(items, mask_prob, generator)  # (B, T) each, on CPU
    masked = masked.to(items.device)
    if not bool(masked.any()):
        return _zero(encoder), None, _zero(encoder)
    inputs = items.masked_fill(masked, MASK)  # (B, T)
    h = encoder(inputs, batch.behaviors, batch.gaps, causal=False)  # (B, T, H)
    cloze = item_cross_entropy(encoder, h[masked], items[masked], n_valid, softmax, generator)
    mean = encoder.mean_states(h, inputs)  # (B, H) pooled, not normalized
    bag_nll = _zero(encoder)
    if bag:
        real = real.to(h.device)  # (B, T)
        logp = F.log_softmax(encoder.item_logits(mean, n_valid), dim=-1)  # (B, n_valid)
        picked = logp.gather(1, items).masked_fill(~real, 0.0)  # (B, T)
        rows = real.any(1)  # (B,)
        bag_nll = -(picked.sum(1)[rows] / real.sum(1)[rows]).mean()
    return cloze, F.normalize(mean, dim=-1), bag_nll


def next_item_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    behavior_weight: float = 0.2,
) -> torch.Tensor:
    """Predict item (and behavior type) at t+1 from causal state at t.

    Only pairs of two real positions count, so sequences with fewer than two
    behaviors contribute nothing. The input drops the last step, so the state
    that predicts the most recent behavior sits in the LAST slot (position id
    ``max_len - 1``), exactly where the query sits when ranking or serving.
    """
    return _causal(encoder, batch, n_valid, None, behavior_weight, future=False)[0]


def last_item_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    behavior_weight: float = 0.2,
) -> torch.Tensor:
    """Next-item loss at the LAST step only: one target per row.

    For batches of prefixes (``OfflineConfig.examples = "prefixes"``; FMLP-Rec,
    BSARec, RecBole): every row ends in its target, so each target is
    predicted with its own dropout mask instead of sharing one with the rest of
    its window.
    """
    return _causal(encoder, batch, n_valid, None, behavior_weight, False, last_only=True)[0]


def future_item_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Predict a RANDOM later item of the window from causal state at t.

    PinnerFormer's dense all-action loss: the target of position t is drawn
    uniformly from steps t+1 .. end of the window, so the state must hold the
    user's lasting interests, not only what comes right after. Same causal pass
    and pairs as :func:`next_item_loss` (``total_loss`` shares the pass).
    """
    return _causal(encoder, batch, n_valid, generator, 0.0, future=True)[1]


def _future_columns(pair: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, T) bool pairs (real positions are a suffix) -> (B, T) long column of a
    uniformly drawn target in t .. T-1 for every position t."""
    B, T = pair.shape
    t = torch.arange(T)  # (T,)
    u = torch.rand((B, T), generator=generator)  # (B, T)
    return (t + (u * (T - t)).long()).clamp(max=T - 1).to(pair.device)  # (B, T)


def _causal(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    generator: torch.Generator | None,
    behavior_weight: float,
    future: bool,
    next_item: bool = True,
    last_only: bool = False,
    softmax: ItemSoftmax = ItemSoftmax(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-item loss, future-item loss) from ONE causal pass; a loss not asked
    for is a graph-attached zero. ``last_only``: only the last step is a target."""
    items = batch.items  # (B, T)
    pair = (items[:, :-1] != PAD) & (items[:, 1:] != PAD)  # (B, T-1)
    if last_only:
        pair[:, :-1] = False
    if not bool(pair.any()):
        return _zero(encoder), _zero(encoder)
    keep = min(items.shape[1] - 1, encoder.config.max_len)
    inputs = batch.columns(None, -1).columns(-keep)  # (B, T'): steps with a successor
    targets = batch.columns(1).columns(-keep)  # (B, T'): their successors
    pair = pair[:, -keep:]  # (B, T')
    h = encoder(inputs.items, inputs.behaviors, inputs.gaps, causal=True)  # (B, T', H)
    h_prev = h[pair]  # (P, H)
    nxt = fut = _zero(encoder)
    if next_item:
        nxt = item_cross_entropy(encoder, h_prev, targets.items[pair], n_valid, softmax,
                                 generator)  # fmt: skip
        if behavior_weight > 0:
            nxt = nxt + behavior_weight * F.cross_entropy(
                encoder.behavior_logits(h_prev), targets.behaviors[pair]
            )
    if future:
        col = _future_columns(pair, generator)  # (B, T')
        later = targets.items.gather(1, col)[pair]  # (P,)
        fut = item_cross_entropy(encoder, h_prev, later, n_valid, softmax, generator)
    return nxt, fut


def contrastive_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    generator: torch.Generator | None = None,
    temperature: float = 0.2,
    first_view: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between two augmented views; other users are negatives.

    ``first_view``: (B, H) normalized embeddings of an already computed view of
    every row of ``batch`` (the cloze pass); then only one more view is encoded.
    """
    batch = batch.columns(-encoder.config.max_len)
    keep = (batch.items != PAD).any(dim=1)  # (B,)
    if int(keep.sum()) < 2:
        return _zero(encoder)
    batch = batch.select(keep)
    if first_view is None:
        v1 = augment(batch, generator)
        z1 = encoder.user_embedding(v1.items, v1.behaviors, v1.gaps)  # (B, H)
    else:
        z1 = first_view[keep]  # (B, H)
    v2 = augment(batch, generator)
    z2 = encoder.user_embedding(v2.items, v2.behaviors, v2.gaps)  # (B, H)
    logits = z1 @ z2.T / temperature  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def total_loss(
    encoder: SequenceEncoder,
    batch: Batch,
    n_valid: int,
    weights: LossWeights,
    generator: torch.Generator | None = None,
    last_only: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the losses; tasks with weight 0 are not computed.

    ``last_only`` (batches of prefixes): the next-item target is the last step
    of each row only; the other tasks read the rows as they are.
    """
    terms: list[torch.Tensor] = []
    parts: dict[str, float] = {}

    def add(name: str, weight: float, part: torch.Tensor) -> None:
        terms.append(weight * part)
        parts[name] = float(part.detach())

    view = None
    if weights.mlm > 0 or weights.bag > 0:
        cloze, view, bag = _cloze(encoder, batch, n_valid, generator, bag=weights.bag > 0,
                                  softmax=weights.softmax)  # fmt: skip
        if weights.mlm > 0:
            add("mlm", weights.mlm, cloze)
        if weights.bag > 0:
            add("bag", weights.bag, bag)
    if weights.next > 0 or weights.future > 0:
        nxt, fut = _causal(
            encoder, batch, n_valid, generator, 0.2, weights.future > 0, weights.next > 0,
            last_only=last_only, softmax=weights.softmax,
        )  # fmt: skip
        if weights.next > 0:
            add("next", weights.next, nxt)
        if weights.future > 0:
            add("future", weights.future, fut)
    if weights.item_bag > 0:
        add("item_bag", weights.item_bag, item_bag_loss(encoder, batch, n_valid, generator))
    if weights.contrastive > 0:
        add("contrastive", weights.contrastive,
            contrastive_loss(encoder, batch, generator, first_view=view))  # fmt: skip
    loss = sum(terms, _zero(encoder))
    parts["loss"] = float(loss.detach())
    return loss, parts
