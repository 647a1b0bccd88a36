"""Why two users are similar, by the model: leave-one-out attribution of the cosine.

Served by ``GET /users/{id}/similar?explain=true``. For a pair of users u, v
with embeddings z_u, z_v (the encoder's user embedding, ``user_embedding``:
recomputed by one checkpoint from the stored sequences), the weight of an item
i in u's history is how much the pair's similarity drops without it::

    w_u(i) = cos(z_u, z_v) - cos(z_u without i, z_v)

"without i" leaves out every behavior of u on item i from the window the
encoder reads (the last ``max_len`` behaviors): the other behaviors keep their
order, the time gap of a behavior after a removed one is taken again from the
timestamps, and nothing older enters the window. The same for v's items
against z_u. An item u viewed three times and carted once is one unit with
``behaviors={"view": 3, "cart": 1}``: its weight is that of the whole interaction.

Why leave-one-out and not gradient x input: it is exact for the model (the
similarity the encoder gives when the behavior is absent, through attention,
LayerNorm and pooling; no linearization, so a weight is never an artefact of a
saturated softmax or a LayerNorm's scale), and it is cheap here. The query
user's variants do not depend on the neighbour, so k neighbours cost one
encoder pass (in ``batch_size`` chunks) over ``(k + 1) * (1 + U)`` sequences,
U the distinct items of a window (<= ``max_len``), then one (U, H) x (H,)
product per side and pair; the cost is linear in k (timings:
benchmarks/README.md, "Session 13: explanations").

Weights are drops of the RECOMPUTED cosine (``PairExplanation.similarity``),
which can differ a little from the index's score: the index holds the last
embeddings the training worker wrote, possibly from an older version or
before the newest events. Only items whose removal lowers the similarity
(weight > 0) are returned, the largest ``top`` per user, so a list can be
shorter than ``top``. ``shared`` says whether the other user has behaviors on
the same item (string overlap, reported beside the weight, never used for it):
two users of one interest group are often close through different items of
the group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.batching import Batch, collate, encode_sequence
from model.encoder import SequenceEncoder
from model.vocab import BehaviorVocab, ItemVocab
from userstream.types import Behavior

__all__ = ["Contribution", "PairExplanation", "explain_similar", "explain_similar_with"]

# (B, T) left-padded batch -> (B, H) L2-normalized user embeddings (zero rows for empty ones)
Embed = Callable[[Batch], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One item of one user's window and how much of the pair's similarity it carries."""

    item_id: str
    behaviors: dict[str, int]  # the user's behaviors on the item in the window: type -> count
    weight: float  # cos(full) - cos(without the item)
    shared: bool  # the other user has behaviors on the item too (not used for the weight)


@dataclass(frozen=True, slots=True)
class PairExplanation:
    similarity: float  # cos of the two recomputed embeddings: what each weight is a drop of
    user: list[Contribution]  # the query user's items, largest weight first
    other: list[Contribution]  # the other user's items, largest weight first


@dataclass(frozen=True, slots=True)
class _Window:
    """One user's window as the encoder reads it, and its leave-one-item-out variants."""

    items: list[str]  # distinct item ids, in order of first behavior in the window
    kinds: list[dict[str, int]]  # per item: behavior type -> count
    rows: list[
        np.ndarray
    ]  # (L_j, 3) encoded variants: [0] the whole window, [1 + n] without item n


def _window(
    seq: Sequence[Behavior],
    items: ItemVocab,
    behaviors: BehaviorVocab,
    max_len: int,
    n_gap_buckets: int,
) -> _Window:
    ctx = seq[-(max_len + 1) :]  # the behavior before the window sets the first gap
    window = ctx[-max_len:]
    lead = len(ctx) - len(window)  # 0 or 1
    where: dict[str, list[int]] = {}
    kinds: dict[str, dict[str, int]] = {}
    for j, x in enumerate(window):
        where.setdefault(x.item_id, []).append(j)
        counts = kinds.setdefault(x.item_id, {})
        counts[x.behavior] = counts.get(x.behavior, 0) + 1

    def encoded(keep: np.ndarray) -> np.ndarray:  # (L,) bool -> (L', 3), as make_batch would
        kept = [*ctx[:lead], *(x for x, k in zip(window, keep.tolist(), strict=True) if k)]
        return encode_sequence(kept, items, behaviors, n_gap_buckets)[lead:]

    everything = np.ones(len(window), dtype=bool)
    rows = [encoded(everything)]
    for positions in where.values():
        keep = everything.copy()
        keep[positions] = False
        rows.append(encoded(keep))
    return _Window(list(where), [kinds[i] for i in where], rows)


def _top(window: _Window, drops: np.ndarray, other: set[str], top: int) -> list[Contribution]:
    order = np.argsort(-drops, kind="stable")[:top]
    return [
        Contribution(window.items[n], window.kinds[n], float(drops[n]), window.items[n] in other)
        for n in order.tolist()
        if drops[n] > 0
    ]


def explain_similar_with(
    embed: Embed,
    items: ItemVocab,
    behaviors: BehaviorVocab,
    max_len: int,
    n_gap_buckets: int,
    user: Sequence[Behavior],
    others: Sequence[Sequence[Behavior]],
    top: int,
    batch_size: int = 512,
) -> list[PairExplanation | None]:
    """The pair explanation of ``user`` with each of ``others`` (module docstring),
    embeddings by ``embed``; None where either sequence is empty (nothing to explain)."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    out: list[PairExplanation | None] = [None] * len(others)
    if not user:
        return out
    todo = [j for j, s in enumerate(others) if s]
    windows = [_window(s, items, behaviors, max_len, n_gap_buckets) for s in [user]]
    windows += [_window(others[j], items, behaviors, max_len, n_gap_buckets) for j in todo]
    flat = [r for w in windows for r in w.rows]
    z = torch.cat(
        [
            embed(collate(flat[start : start + batch_size])).float().cpu()
            for start in range(0, len(flat), batch_size)
        ]
    ).numpy()  # (sum of 1 + U, H)
    starts = np.cumsum([0] + [len(w.rows) for w in windows])
    zs = [z[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]  # per window (1 + U, H)
    mine, my_items = zs[0], set(windows[0].items)
    for j, w, theirs in zip(todo, windows[1:], zs[1:], strict=True):
        similarity = float(mine[0] @ theirs[0])
        out[j] = PairExplanation(
            similarity,
            _top(windows[0], similarity - mine[1:] @ theirs[0], set(w.items), top),  # (U_u,)
            _top(w, similarity - theirs[1:] @ mine[0], my_items, top),  # (U_v,)
        )
    return out


@torch.inference_mode()
def explain_similar(
    encoder: SequenceEncoder,
    items: ItemVocab,
    behaviors: BehaviorVocab,
    user: Sequence[Behavior],
    others: Sequence[Sequence[Behavior]],
    top: int,
    batch_size: int = 512,
) -> list[PairExplanation | None]:
    """:func:`explain_similar_with` the encoder's user embedding (eval mode)."""
    encoder.eval()
    device = encoder.item_emb.weight.device
    c = encoder.config

    def embed(batch: Batch) -> torch.Tensor:
        b = batch.to(device)
        return encoder.user_embedding(b.items, b.behaviors, b.gaps)  # (B, H)

    return explain_similar_with(
        embed, items, behaviors, c.max_len, c.n_gap_buckets, user, others, top, batch_size
    )
