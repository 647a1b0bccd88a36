"""Unit tests of model/: vocabularies, batching, encoder, losses, trainer, checkpoints.

Everything runs on CPU with a tiny encoder and one thread; the Redis-backed
worker is tested in tests/test_model_worker.py.
"""

from __future__ import annotations

import json
import math
import random
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from model.batching import gap_buckets, make_batch
from model.checkpoint import latest_checkpoint
from model.encoder import EncoderConfig, MixerBlock, SequenceEncoder, moving_mean
from model.live import load_trainer
from model.tasks import (
    ItemSoftmax,
    LossWeights,
    _future_columns,
    bag_loss,
    cloze_loss,
    contrastive_loss,
    future_item_loss,
    item_bag_loss,
    item_cross_entropy,
    last_item_loss,
    next_item_loss,
    total_loss,
)
from model.trainer import PROFILE_LR_SCALE, Trainer
from model.vocab import MASK, PAD, UNKNOWN_BEHAVIOR, BehaviorVocab, ItemVocab
from tests.helpers import tiny_settings
from userstream.settings import Settings
from userstream.types import Behavior

torch.set_num_threads(1)

T = 16  # max_len in these tests


def planted(n_users: int = 64, groups: int = 4, per_group: int = 12, length: int = T, seed=0):
    """Users walk a cycle of their group's items with a stride of 1 or 2: the
    next item, a masked item and the user's group are all learnable."""
    rng = random.Random(seed)
    seqs, labels = [], []
    for u in range(n_users):
        g = u % groups
        stride, start = rng.choice([1, 2]), rng.randrange(per_group)
        seqs.append(
            [
                Behavior(
                    f"g{g}-i{(start + stride * t) % per_group}",
                    "click" if t % 3 == 0 else "view",
                    1000.0 + 60.0 * t,
                )
                for t in range(length)
            ]
        )
        labels.append(g)
    return seqs, labels


def small_settings(tmp_path, **kw) -> Settings:
    base = dict(
        max_len=T,
        sequence_length=50,
        train_batch_size=32,
        learning_rate=3e-3,
        embed_batch_size=16,
        seed=0,
    )
    return tiny_settings(tmp_path, **{**base, **kw})


def tiny_encoder(
    n_items: int = 128, dropout: float = 0.0, seed: int = 0, **mixing
) -> SequenceEncoder:
    torch.manual_seed(seed)
    return SequenceEncoder(
        EncoderConfig(
            n_items=n_items, max_len=T, hidden=32, layers=1, heads=2, dropout=dropout, **mixing
        )
    )


# the block variants every structural test runs on: plain pre-LN attention (the
# block before MixerBlock), the low-pass branch beside attention with pre- and
# post-LN, relative positions alone and with the low-pass branch, and the
# combination Settings and `userstream train` default to
MIXINGS = {
    "attention": {},
    "lowpass": {"lowpass_alpha": 0.7, "lowpass_window": 4},
    "lowpass-post-norm": {"lowpass_alpha": 0.7, "lowpass_window": 4, "post_norm": True},
    "relative": {"positions": "relative"},
    "relative-lowpass": {"positions": "relative", "lowpass_alpha": 0.7, "lowpass_window": 4},
    "default": {
        "positions": "relative",
        "lowpass_alpha": 0.7,
        "lowpass_window": 4,
        "post_norm": True,
    },
}


def vocab_batch(seqs):
    items, behaviors = ItemVocab(), BehaviorVocab()
    items.observe_many(b.item_id for s in seqs for b in s)
    behaviors.observe_many(b.behavior for s in seqs for b in s)
    return items, behaviors, make_batch(seqs, items, behaviors, T, 32)


# --- vocabularies ----------------------------------------------------------------


def test_item_vocab_min_count_admission_and_stable_rows():
    v = ItemVocab(min_count=2, capacity_max=100, n_buckets=8)
    first = v.first_item_row
    assert first == 2 + 8 and len(v) == first
    assert v.observe_many(["a"]) == 0
    (row_a,) = v.rows_for(["a"])
    assert row_a == v.bucket_of("a") == 2 + zlib.crc32(b"a") % 8  # not admitted yet: a bucket
    assert v.observe_many(["a", "b", "b", "c"]) == 2  # a (2nd sighting) and b admitted
    assert v.rows_for(["a", "b"]) == [first, first + 1]
    assert v.item_of(first) == "a" and v.item_of(first + 1) == "b"
    assert v.item_of(PAD) is None and v.item_of(MASK) is None and v.item_of(first + 2) is None
    v.observe_many([f"x{i}" for i in range(20)] * 2)
    assert v.rows_for(["a", "b"]) == [first, first + 1]  # rows never move
    assert len(v) == first + 22 and v.num_admitted == 22
    assert 2 <= v.rows_for(["c"])[0] < first  # one sighting: still a bucket


def test_item_vocab_capacity_cap_sends_new_items_to_hash_buckets():
    v = ItemVocab(min_count=1, capacity_max=3, n_buckets=4)
    v.observe_many([f"i{k}" for k in range(10)])
    assert v.num_admitted == 3 and len(v) == v.first_item_row + 3 == v.max_rows
    rows = v.rows_for([f"i{k}" for k in range(10)])
    assert rows[:3] == [6, 7, 8]
    assert all(2 <= r < 6 for r in rows[3:])
    # the bucket hash is stable across instances (and processes: crc32, not hash())
    assert ItemVocab(capacity_max=3, n_buckets=4).rows_for(["i7"]) == [rows[7]]


def test_item_vocab_pending_counts_are_bounded():
    v = ItemVocab(min_count=3, pending_max=10)
    v.observe_many([f"once{k}" for k in range(50)])
    assert len(v.state_dict()["pending"]) <= 10
    assert v.num_admitted == 0


def test_item_vocab_state_round_trips_through_json():
    v = ItemVocab(min_count=2, capacity_max=50, n_buckets=8)
    v.observe_many(["a", "a", "b", "c", "c", "d"])
    w = ItemVocab()
    w.load_state_dict(json.loads(json.dumps(v.state_dict())))
    ids = ["a", "b", "c", "d", "zzz"]
    assert w.rows_for(ids) == v.rows_for(ids) and len(w) == len(v)
    assert w.observe_many(["b"]) == 1  # the pending count of b survived
    assert w.rows_for(["b"]) == [w.first_item_row + 2]


def test_behavior_vocab_open_set_with_capacity():
    v = BehaviorVocab(capacity=5)
    v.observe_many(["view", "click", "view", "cart", "fav", "purchase"])
    assert v.ids_for(["view", "click", "cart"]) == [2, 3, 4]
    assert v.ids_for(["fav", "never"]) == [UNKNOWN_BEHAVIOR, UNKNOWN_BEHAVIOR]
    assert len(v) == 5 and v.name_of(3) == "click" and v.name_of(0) is None
    w = BehaviorVocab()
    w.load_state_dict(json.loads(json.dumps(v.state_dict())))
    assert w.ids_for(["view", "click", "cart", "fav"]) == v.ids_for(
        ["view", "click", "cart", "fav"]
    )


# --- batching --------------------------------------------------------------------


def test_gap_buckets_are_log2_seconds():
    ts = np.array([0.0, 0.5, 1.5, 3.5, 1e9, 0.0])
    # first, <1s, [1,2), [2,4), capped, negative (clock skew) -> <1s
    assert gap_buckets(ts, 32).tolist() == [1, 2, 3, 4, 31, 2]


def test_make_batch_left_pads_and_keeps_the_most_recent():
    items, behaviors = ItemVocab(), BehaviorVocab()
    long_seq = [Behavior(f"i{k}", "view", float(k)) for k in range(T + 5)]
    short_seq = [Behavior("i3", "cart", 10.0), Behavior("i4", "view", 12.0)]
    items.observe_many(b.item_id for b in long_seq)
    behaviors.observe_many(["view", "cart"])
    b = make_batch([long_seq, short_seq, []], items, behaviors, T, 32)
    assert b.items.shape == b.behaviors.shape == b.gaps.shape == (3, T)
    assert b.items.dtype == torch.long
    assert b.items[0].tolist() == items.rows_for([f"i{k}" for k in range(5, T + 5)])
    assert b.gaps[0, 0] == 3  # the gap of the first KEPT behavior uses the one before it
    assert b.items[1, : T - 2].eq(PAD).all() and b.items[1, -1] == items.rows_for(["i4"])[0]
    assert b.behaviors[1, -2:].tolist() == behaviors.ids_for(["cart", "view"])
    assert b.gaps[1, -2:].tolist() == [1, 4]  # first known behavior; 2 s later
    assert b.items[2].eq(PAD).all() and b.gaps[2].eq(PAD).all()


# --- encoder ---------------------------------------------------------------------


@pytest.mark.parametrize("mixing", MIXINGS)
def test_causal_pass_cannot_see_the_future(mixing):
    seqs, _ = planted(n_users=4)
    _, _, b = vocab_batch(seqs)
    enc = tiny_encoder(**MIXINGS[mixing]).eval()
    changed = b.items.clone()
    t = 10
    changed[:, t] = torch.where(changed[:, t] == 20, 21, 20)  # another real item row
    with torch.no_grad():
        h = enc(b.items, b.behaviors, b.gaps, causal=True)  # (B, T, H)
        h2 = enc(changed, b.behaviors, b.gaps, causal=True)
        bi = enc(b.items, b.behaviors, b.gaps, causal=False)
        bi2 = enc(changed, b.behaviors, b.gaps, causal=False)
    assert torch.equal(h[:, :t], h2[:, :t])  # the past ignores a later change...
    assert not torch.allclose(h[:, t:], h2[:, t:])  # ...the present and future see it
    assert not torch.allclose(bi[:, :t], bi2[:, :t])  # bidirectional sees both ways


@pytest.mark.parametrize("mixing", MIXINGS)
def test_user_embeddings_are_l2_normalized_and_batch_independent(mixing):
    seqs, _ = planted(n_users=6)
    seqs[1] = seqs[1][:3]  # heavy padding
    _, _, b = vocab_batch(seqs + [[]])
    enc = tiny_encoder(**MIXINGS[mixing]).eval()
    with torch.no_grad():
        z = enc.user_embedding(b.items, b.behaviors, b.gaps)  # (7, H)
        alone = enc.user_embedding(b.items[1:2], b.behaviors[1:2], b.gaps[1:2])
    norms = z.norm(dim=1)
    assert torch.allclose(norms[:6], torch.ones(6), atol=1e-5)
    assert torch.isfinite(z).all() and norms[6] == 0  # empty sequence -> zero vector
    assert torch.allclose(alone[0], z[1], atol=1e-5)  # padding/other users do not leak in


@pytest.mark.parametrize("mixing", MIXINGS)
def test_eval_fast_path_matches_the_training_path(mixing):
    seqs, _ = planted(n_users=8)
    seqs[0] = seqs[0][:4]
    _, _, b = vocab_batch(seqs)
    enc = tiny_encoder(dropout=0.0, **MIXINGS[mixing])
    enc.train()
    slow = enc.user_embedding(b.items, b.behaviors, b.gaps).detach()
    enc.eval()
    with torch.inference_mode():  # nn.MultiheadAttention's fused fast path
        fast = enc.user_embedding(b.items, b.behaviors, b.gaps)
    assert torch.allclose(slow, fast, atol=1e-5)


@pytest.mark.parametrize("mixing", ["relative", "relative-lowpass", "default"])
def test_relative_positions_make_every_causal_state_a_last_slot_state(mixing):
    """With relative positions the causal state at t is the state the same
    prefix gets in the LAST slot (where ranking and serving query), so training
    on every position trains the query the way it is used."""
    seqs, _ = planted(n_users=3)
    _, _, b = vocab_batch(seqs)
    enc = tiny_encoder(**MIXINGS[mixing]).eval()
    with torch.no_grad():
        h = enc(b.items, b.behaviors, b.gaps, causal=True)  # (B, T, H)
        for t in (5, 11, T - 1):
            prefix = b.columns(None, t + 1)  # (B, t+1): the window cut after t
            last = enc(prefix.items, prefix.behaviors, prefix.gaps, causal=True)[:, -1]
            assert torch.allclose(h[:, t], last, atol=1e-5), t
    absolute = tiny_encoder().eval()
    with torch.no_grad():
        h = absolute(b.items, b.behaviors, b.gaps, causal=True)
        last = absolute(*(x[:, :6] for x in (b.items, b.behaviors, b.gaps)), causal=True)
    assert not torch.allclose(h[:, 5], last[:, -1], atol=1e-3)  # slot ids differ there


@pytest.mark.parametrize("mixing", ["relative-lowpass", "default"])
def test_last_step_loss_over_all_prefixes_is_the_every_step_loss(mixing):
    """The prefix regime (one example per target, loss at its last step) scores
    the same targets from the same states as the every-step loss on the window;
    only dropout (off here) differs. Prefixes of different lengths share a
    left-padded batch."""
    from model.batching import collate
    from model.offline.train import prefixes

    seqs, _ = planted(n_users=4)
    _, _, b = vocab_batch(seqs)
    enc = tiny_encoder(**MIXINGS[mixing]).eval()
    rows = [torch.stack([b.items[i], b.behaviors[i], b.gaps[i]], -1).numpy() for i in range(4)]
    examples = prefixes(rows, max_len=T)
    assert len(examples) == 4 * (T - 1) and {len(e) for e in examples} == set(range(2, T + 1))
    with torch.no_grad():
        every = next_item_loss(enc, b, 128, behavior_weight=0.2)
        last = last_item_loss(enc, collate(examples), 128, behavior_weight=0.2)
    assert float(last) == pytest.approx(float(every), rel=1e-5)


def test_relative_position_bias_is_learned():
    seqs, _ = planted(n_users=32)
    items, _, b = vocab_batch(seqs)
    enc = tiny_encoder(positions="relative")
    weights = LossWeights(mlm=0.0, next=1.0, contrastive=0.0)
    fit(enc, b, len(items), weights, torch.Generator().manual_seed(0), steps=5)
    assert enc.rel_bias.abs().sum() > 0 and enc.pos_emb is None


def test_plain_block_is_the_transformer_layer_it_replaced():
    """lowpass_alpha 0, pre-LN: the same function and parameter names as the
    nn.TransformerEncoderLayer used before, so older checkpoints load as they were."""
    c = EncoderConfig(hidden=32, heads=2, dropout=0.0)
    torch.manual_seed(0)
    old = nn.TransformerEncoderLayer(32, 2, 128, 0.0, "gelu", batch_first=True, norm_first=True)
    block = MixerBlock(c)
    block.load_state_dict(old.state_dict())  # strict: every name matches
    x = torch.randn(3, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1).repeat(6, 1, 1)  # (B * heads, T, T)
    real = torch.ones(3, 7, 1)
    assert torch.allclose(block(x, mask, real, True), old(x, src_mask=mask), atol=1e-5)


def test_moving_mean_reads_only_real_positions_of_its_window():
    x = torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 4.0]]).unsqueeze(-1)  # (1, 6, 1), 2 pads
    real = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]]).unsqueeze(-1)
    x[0, :2] = 99.0  # whatever a padded position holds must not count
    causal = moving_mean(x, real, window=3, causal=True)[0, :, 0]
    centred = moving_mean(x, real, window=3, causal=False)[0, :, 0]
    assert causal[2:].tolist() == [1.0, 1.5, 2.0, 3.0]  # (1), (1,2), (1,2,3), (2,3,4)
    assert causal[:2].tolist() == [0.0, 0.0]  # no real position in the window
    assert centred[2:].tolist() == [1.5, 2.0, 3.0, 3.5]  # (1,2), (1,2,3), (2,3,4), (3,4)


def test_lowpass_block_learns_a_planted_problem_like_the_plain_block():
    seqs, _ = planted(n_users=64)
    items, _, b = vocab_batch(seqs)
    losses = {}
    for name in ("attention", "lowpass"):
        enc = tiny_encoder(**MIXINGS[name])
        gen = torch.Generator().manual_seed(0)
        weights = LossWeights(mlm=0.0, next=1.0, contrastive=0.0)
        first = total_loss(enc, b, len(items), weights, gen)[1]["next"]
        fit(enc, b, len(items), weights, gen, steps=60)
        losses[name] = (first, total_loss(enc, b, len(items), weights, gen)[1]["next"])
    for name, (first, last) in losses.items():
        assert last < 0.3 * first, (name, first, last)
    beta = tiny_encoder(**MIXINGS["lowpass"]).blocks[0].sqrt_beta
    assert beta.shape == (1, 1, 32)  # a learned per-channel weight of the high frequencies


def test_item_logits_exclude_pad_mask_and_unused_rows():
    enc = tiny_encoder(n_items=64)
    h = torch.randn(5, 32, requires_grad=True)
    logits = enc.item_logits(h, n_valid=40)  # (5, 40): unused rows are not scored
    assert logits.shape == (5, 40)
    assert torch.isinf(logits[:, [PAD, MASK]]).all() and torch.isfinite(logits[:, 2:]).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([2, 5, 9, 39, 20])).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(enc.item_emb.weight.grad).all()
    assert enc.item_emb.weight.grad[40:].abs().sum() == 0  # rows not in use: no gradient
    assert enc.item_logits(h).shape == (5, 64)  # without n_valid: every row


@pytest.mark.parametrize("profile_items", [False, True])
def test_grow_items_keeps_learned_rows(profile_items):
    enc = tiny_encoder(n_items=16, profile_items=profile_items)
    tables = ["item_emb", "profile_emb"] if profile_items else ["item_emb"]
    before = [getattr(enc, t).weight.detach().clone() for t in tables]
    pairs = enc.grow_items(40)
    assert len(pairs) == len(tables) and enc.config.n_items == 40
    for table, (old, new), rows in zip(tables, pairs, before, strict=True):
        assert old is not new and new is getattr(enc, table).weight
        assert new.shape == (40, 32) and torch.equal(new[:16].detach(), rows)
        assert new[16:].std() > 0.005 and torch.equal(new[PAD].detach(), torch.zeros(32))


# --- losses ----------------------------------------------------------------------


@pytest.mark.parametrize(("task", "factor"), [("cloze", 0.6), ("next", 0.3), ("contrastive", 0.6)])
def test_each_loss_decreases_on_a_planted_problem(task, factor):
    seqs, _ = planted()
    items, _, batch = vocab_batch(seqs)
    n_valid = len(items)
    enc = tiny_encoder()
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)

    def loss(gen):
        if task == "cloze":
            return cloze_loss(enc, batch, n_valid, gen)
        if task == "next":
            return next_item_loss(enc, batch, n_valid)
        return contrastive_loss(enc, batch, gen)

    def evaluate() -> float:  # same masks/views each time, no dropout
        enc.eval()
        with torch.no_grad():
            return float(loss(torch.Generator().manual_seed(123)))

    initial = evaluate()
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        enc.train()
        value = loss(gen)
        opt.zero_grad()
        value.backward()
        opt.step()
    final = evaluate()
    assert np.isfinite(initial) and final < initial * factor, (initial, final)


@torch.no_grad()
def test_sampled_softmax_estimates_the_full_one_and_falls_back_on_small_catalogues():
    torch.manual_seed(0)
    enc = tiny_encoder(n_items=4096)
    n_valid = 4000
    h = torch.randn(6, 32)
    targets = torch.randint(2, n_valid, (6,))
    full = float(item_cross_entropy(enc, h, targets, n_valid, ItemSoftmax()))
    # a catalogue no larger than the sample: the full softmax itself
    small = item_cross_entropy(enc, h, targets % 500 + 2, 502, ItemSoftmax(True, 1024))
    assert float(small) == float(item_cross_entropy(enc, h, targets % 500 + 2, 502,
                                                    ItemSoftmax()))  # fmt: skip
    # logQ-corrected uniform negatives: an estimate of the full loss, near it on average
    gen = torch.Generator().manual_seed(1)
    draws = [float(item_cross_entropy(enc, h, targets, n_valid, ItemSoftmax(True, 2048), gen))
             for _ in range(20)]  # fmt: skip
    assert abs(np.mean(draws) - full) < 0.02 * full, (np.mean(draws), full)
    # the corrections and the accidental hits, worked by hand: all scores 0, every
    # target item 7 (count 6: -log 6), 4 uniform draws over 8 rows (-log(4/8) each),
    # a draw of item 7 itself masked; the loss is then log(1 + 12 m), m draws not 7
    zero = torch.zeros(6, 32)
    sevens = torch.full((6,), 7)
    for seed in range(6):
        drawn = torch.randint(2, 10, (4,), generator=torch.Generator().manual_seed(seed))
        m = int((drawn != 7).sum())
        got = item_cross_entropy(enc, zero, sevens, 10, ItemSoftmax(True, 4),
                                 torch.Generator().manual_seed(seed))  # fmt: skip
        assert float(got) == pytest.approx(math.log(1 + 12 * m), rel=1e-5), (seed, m)


def test_the_sampled_softmax_learns_a_planted_problem_about_as_well_as_the_full_one():
    seqs, _ = planted(per_group=200)  # 800 items: more rows than the 128 negatives
    items, _, batch = vocab_batch(seqs)
    n_valid = len(items)
    full = LossWeights(next=1.0, mlm=1.0)

    def train(softmax: ItemSoftmax) -> tuple[float, float]:
        enc = tiny_encoder(n_items=1024)
        opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
        weights = LossWeights(next=1.0, mlm=1.0, softmax=softmax)

        def evaluate() -> float:  # always scored with the full softmax
            enc.eval()
            with torch.no_grad():
                gen = torch.Generator().manual_seed(5)
                return total_loss(enc, batch, n_valid, full, gen)[1]["loss"]

        initial = evaluate()
        gen = torch.Generator().manual_seed(1)
        for _ in range(50):
            enc.train()
            loss, _ = total_loss(enc, batch, n_valid, weights, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return initial, evaluate()

    start, with_full = train(ItemSoftmax())
    _, with_sampled = train(ItemSoftmax(True, 128))
    assert with_full < 0.7 * start and with_sampled < 0.75 * start, (start, with_full, with_sampled)
    assert with_sampled < 1.15 * with_full, (with_full, with_sampled)


def test_losses_handle_degenerate_batches():
    enc = tiny_encoder()
    items, behaviors = ItemVocab(), BehaviorVocab()
    items.observe_many(["a"])
    one = make_batch([[Behavior("a", "view", 0.0)], []], items, behaviors, T, 32)
    assert next_item_loss(enc, one, len(items)).item() == 0.0  # no (t, t+1) pair
    assert contrastive_loss(enc, one).item() == 0.0  # fewer than two users
    assert cloze_loss(enc, one, len(items)).item() > 0  # the single item is masked
    loss, parts = total_loss(enc, one, len(items), LossWeights(mlm=1.0, next=1.0, contrastive=0.1))
    loss.backward()
    assert set(parts) == {"mlm", "next", "contrastive", "loss"}
    assert np.isfinite(parts["loss"])


def fit(enc, batch, n_valid, weights, gen, steps: int) -> None:
    """``steps`` AdamW steps (lr 3e-3) of ``total_loss`` on one batch."""
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = total_loss(enc, batch, n_valid, weights, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture
def encoder_passes(monkeypatch) -> list[bool]:
    """Records every SequenceEncoder forward pass (its ``causal`` flag), in order."""
    calls: list[bool] = []
    original = SequenceEncoder.forward

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("causal", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SequenceEncoder, "forward", counting)
    return calls


def test_future_targets_are_drawn_from_the_rest_of_the_window():
    """Position t's target column is uniform over t .. T-1: never earlier, never
    past the window, and every later column is drawn."""
    pair = torch.ones(3, 6, dtype=torch.bool)
    cols = torch.stack(
        [_future_columns(pair, torch.Generator().manual_seed(k)) for k in range(400)]
    )
    t = torch.arange(6)
    assert bool((cols >= t).all()) and bool((cols <= 5).all())
    for pos in range(6):
        assert set(cols[:, :, pos].unique().tolist()) == set(range(pos, 6))


def test_future_item_loss_shares_the_causal_pass_and_learns_the_users_items(encoder_passes):
    """The dense all-action task rides on next-item's causal pass (still 3 passes
    with all four tasks) and learns: its loss falls toward log(items per group),
    the entropy of a uniformly drawn later item of the user's group."""
    seqs, _ = planted()
    items, _, batch = vocab_batch(seqs)
    enc = tiny_encoder()
    calls = encoder_passes
    every = LossWeights(mlm=1.0, next=1.0, contrastive=1.0, future=1.0)
    _, parts = total_loss(enc, batch, len(items), every, torch.Generator().manual_seed(0))
    assert sorted(calls) == [False, False, True] and "future" in parts
    calls.clear()
    only = LossWeights(mlm=0.0, next=0.0, contrastive=0.0, future=1.0)
    _, parts = total_loss(enc, batch, len(items), only)
    assert calls == [True] and set(parts) == {"future", "loss"}

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        initial = float(future_item_loss(enc, batch, len(items), torch.Generator().manual_seed(9)))
    fit(enc, batch, len(items), only, gen, steps=150)
    with torch.no_grad():
        final = float(future_item_loss(enc, batch, len(items), torch.Generator().manual_seed(9)))
    assert initial > math.log(40) and final < math.log(12) + 0.3, (initial, final)


def test_bag_loss_shares_the_cloze_pass_and_learns_the_users_items(encoder_passes):
    """The bag task scores all items from the pooled masked view (the cloze pass:
    still 3 passes with every task on) and learns the user's items: its loss
    falls from about log(items) toward the entropy of the user's window."""
    seqs, _ = planted()
    items, _, batch = vocab_batch(seqs)
    enc = tiny_encoder()
    calls = encoder_passes
    every = LossWeights(mlm=1.0, next=1.0, contrastive=1.0, future=1.0, bag=1.0)
    _, parts = total_loss(enc, batch, len(items), every, torch.Generator().manual_seed(0))
    assert sorted(calls) == [False, False, True] and {"bag", "mlm", "future"} <= set(parts)
    calls.clear()
    only = LossWeights(mlm=0.0, next=0.0, contrastive=0.0, bag=1.0)
    _, parts = total_loss(enc, batch, len(items), only)
    assert calls == [False] and set(parts) == {"bag", "loss"}

    def measured() -> float:
        with torch.no_grad():
            return float(bag_loss(enc, batch, len(items), torch.Generator().manual_seed(9)))

    initial = measured()
    gen = torch.Generator().manual_seed(1)
    fit(enc, batch, len(items), only, gen, steps=150)
    final = measured()
    assert initial > math.log(40) and final < math.log(12) + 0.3, (initial, final)


@pytest.mark.parametrize("profile_items", [False, True])
def test_item_bag_trains_a_profile_table_without_an_encoder_pass(encoder_passes, profile_items):
    """The item-bag task reads the profile table only (its own with
    ``profile_items``, else the shared item table; no encoder pass, no gradient
    anywhere else), its loss falls from about log(items) toward log(items per
    group), and afterwards the profile vector puts every user nearest to a user
    of its own group."""
    seqs, labels = planted()
    items, _, batch = vocab_batch(seqs)
    enc = tiny_encoder(profile_items=profile_items)
    only = LossWeights(mlm=0.0, next=0.0, contrastive=0.0, item_bag=1.0)
    loss, parts = total_loss(enc, batch, len(items), only)
    assert encoder_passes == [] and set(parts) == {"item_bag", "loss"}
    loss.backward()
    touched = {
        n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert touched == {"profile_emb.weight" if profile_items else "item_emb.weight"}

    def measured() -> float:
        with torch.no_grad():
            return float(item_bag_loss(enc, batch, len(items), torch.Generator().manual_seed(9)))

    initial = measured()
    fit(enc, batch, len(items), only, torch.Generator().manual_seed(1), steps=150)
    final = measured()
    assert initial > math.log(40) and final < math.log(12) + 0.3, (initial, final)
    with torch.no_grad():
        z = enc.profile_embedding(batch.items)  # (U, H)
    assert torch.allclose(z.norm(dim=1), torch.ones(len(seqs)), atol=1e-5)
    sim = (z @ z.T).fill_diagonal_(-2.0)
    nearest = sim.argmax(1).tolist()
    assert all(labels[u] == labels[v] for u, v in enumerate(nearest))

    items.observe_many(["a"])
    one = make_batch([[Behavior("a", "view", 0.0)], []], items, BehaviorVocab(), T, 32)
    assert item_bag_loss(enc, one, len(items)).item() == 0.0  # nothing left to show


def test_profile_many_reads_the_whole_history_and_ignores_order():
    """A profile averages every behavior, also those beyond ``max_len`` (T), in
    any order; an empty sequence gives a zero row."""
    from model.profile import profile_many

    seqs, _ = planted(n_users=4, length=3 * T)
    items, behaviors, _ = vocab_batch(seqs)
    enc = tiny_encoder()
    z = profile_many(enc, items, behaviors, [seqs[0], seqs[0][::-1], seqs[0][-T:], []])
    rows = torch.as_tensor(items.rows_for([b.item_id for b in seqs[0]]))
    whole = enc.profile_table.weight.detach()[rows].mean(0)
    assert np.allclose(z[0], (whole / whole.norm()).numpy(), atol=1e-6)
    assert np.allclose(z[0], z[1], atol=1e-6) and not np.allclose(z[0], z[2], atol=1e-3)
    assert z.shape == (4, 32) and not z[3].any()


def test_total_loss_shares_the_cloze_pass_with_the_contrastive_task(encoder_passes):
    """All three tasks: 3 encoder passes (causal, masked view, one augmented view),
    and the contrastive part still learns (lower after training on its own)."""
    seqs, _ = planted()
    items, _, batch = vocab_batch(seqs)
    enc = tiny_encoder()
    calls = encoder_passes
    weights = LossWeights(mlm=1.0, next=1.0, contrastive=1.0)
    _, parts = total_loss(enc, batch, len(items), weights, torch.Generator().manual_seed(0))
    assert sorted(calls) == [False, False, True] and set(parts) >= {"mlm", "contrastive"}
    calls.clear()
    total_loss(enc, batch, len(items), LossWeights(0.0, 0.0, 1.0))
    assert calls == [False, False]  # without cloze: two augmented views

    def contrastive_part(gen) -> float:
        return total_loss(enc, batch, len(items), weights, gen)[1]["contrastive"]

    enc.eval()
    with torch.no_grad():
        initial = contrastive_part(torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(1)
    enc.train()
    fit(enc, batch, len(items), weights, gen, steps=100)
    enc.eval()
    with torch.no_grad():
        final = contrastive_part(torch.Generator().manual_seed(123))
    assert final < initial * 0.7, (initial, final)


# --- trainer ---------------------------------------------------------------------


def test_trainer_growth_keeps_rows_extends_adam_state_and_keeps_learning(tmp_path):
    s = small_settings(tmp_path)
    seqs, _ = planted(n_users=48, groups=2)
    trainer = Trainer(
        s,
        config=EncoderConfig(n_items=100, max_len=T, hidden=32, layers=1, heads=2, dropout=0.0),
    )
    first = trainer.learn_many(seqs, steps=30)
    assert trainer.version == 1 and trainer.config.n_items == 100
    old = trainer.encoder.item_emb.weight
    rows, moments = old.detach().clone(), dict(trainer.optimizer.state[old])
    n_old = len(trainer.items)

    new_seqs, _ = planted(n_users=48, groups=8, per_group=12, seed=1)
    new_seqs = [[Behavior("new-" + b.item_id, b.behavior, b.ts) for b in q] for q in new_seqs]
    trainer.observe_many(new_seqs)  # 96 new items: the table must grow
    new = trainer.encoder.item_emb.weight
    new_items = {b.item_id for q in new_seqs for b in q}
    grown_rows = [r for r in trainer.items.rows_for(sorted(new_items)) if r >= 100]
    assert len(grown_rows) == n_old + 96 - 100  # the items that needed the new rows
    fresh = new[grown_rows].detach().clone()
    assert len(trainer.items) == n_old + 96 > 100
    assert trainer.config.n_items == 256  # next power of two over 1.5x
    assert torch.equal(new[:100].detach(), rows)
    assert old not in trainer.optimizer.state
    assert any(p is new for p in trainer.optimizer.param_groups[0]["params"])
    state = trainer.optimizer.state[new]
    assert torch.equal(state["step"], moments["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == new.shape
        assert torch.equal(state[key][:100], moments[key]) and state[key][100:].eq(0).all()

    after = trainer.learn_many(seqs + new_seqs, steps=30)
    assert np.isfinite(after["loss"]) and trainer.version == 2
    assert not torch.allclose(new[grown_rows].detach(), fresh)  # grown rows are trained
    old_only = trainer.learn_many(seqs, steps=1)
    assert old_only["loss"] < first["loss"]  # no reset: the old users stay learned


def test_the_profile_table_is_clipped_on_its_own():
    """A huge item-bag gradient is clipped within the profile table and leaves
    the sequence tasks' gradients as they were (and the reverse)."""
    enc = tiny_encoder(profile_items=True)
    for p in enc.parameters():
        p.grad = torch.full_like(p, 1e-4)
    enc.profile_emb.weight.grad.fill_(10.0)
    enc.clip_gradients(1.0)
    assert float(enc.profile_emb.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    assert float(enc.item_emb.weight.grad.abs().max()) == pytest.approx(1e-4)


def test_trainer_with_the_item_bag_task_grows_and_saves_its_profile_table(tmp_path):
    """ITEM_BAG_WEIGHT > 0 gives the encoder a profile table that grows with the
    item table (Adam state moved across), learns, and comes back from a checkpoint."""
    from model.profile import profile_many

    trainer = Trainer(small_settings(tmp_path, item_bag_weight=1.0))
    assert trainer.config.profile_items and trainer.encoder.profile_emb is not None
    seqs, _ = planted(n_users=48, groups=4)
    trainer.learn_many(seqs, steps=3)
    old = trainer.encoder.profile_emb.weight
    wide, _ = planted(n_users=160, groups=160, per_group=16, seed=1)  # >= 1280 items
    wide = [[Behavior("new-" + b.item_id, b.behavior, b.ts) for b in q] for q in wide]
    trainer.observe_many(wide)  # more items than the first allocation: both tables grow
    new = trainer.encoder.profile_emb.weight
    assert new.shape[0] == trainer.config.n_items == trainer.encoder.item_emb.weight.shape[0]
    assert new is not old and old not in trainer.optimizer.state
    assert trainer.optimizer.state[new]["exp_avg"].shape == new.shape
    parts = trainer.learn_many(seqs + wide, steps=3)
    assert np.isfinite(parts["item_bag"])
    trainer.save(tmp_path / "checkpoints")
    back = Trainer.load(latest_checkpoint(tmp_path / "checkpoints"), trainer.settings)
    assert back.config.profile_items
    lr = trainer.settings.learning_rate  # the profile table learns PROFILE_LR_SCALE x faster
    for t in (trainer, back):
        assert [g["lr"] for g in t.optimizer.param_groups] == [lr, lr * PROFILE_LR_SCALE]
        assert t.optimizer.param_groups[1]["params"] == [t.encoder.profile_emb.weight]
    ours = profile_many(trainer.encoder, trainer.items, trainer.behaviors, seqs[:3])
    theirs = profile_many(back.encoder, back.items, back.behaviors, seqs[:3])
    assert np.allclose(ours, theirs, atol=1e-6)


def test_trainer_embed_many_shapes_and_norms(tmp_path):
    trainer = Trainer(small_settings(tmp_path, embed_batch_size=5))
    seqs, _ = planted(n_users=12)
    trainer.learn_many(seqs, steps=2)
    z = trainer.embed_many(seqs + [[]])
    assert z.shape == (13, 32) and z.dtype == np.float32
    assert np.allclose(np.linalg.norm(z[:12], axis=1), 1.0, atol=1e-5)
    assert not z[12].any()
    assert trainer.learn_many([[], []], steps=3) == {} and trainer.version == 1


def test_checkpoint_round_trip_restores_everything(tmp_path):
    s = small_settings(tmp_path)
    seqs, _ = planted(n_users=40)
    trainer = Trainer(s)
    trainer.learn_many(seqs, steps=5)
    path = trainer.save(s.checkpoint_dir, extra={"reservoir": {"users": ["u1", "u2"], "seen": 2}})
    assert path == s.checkpoint_dir / "ckpt-00000001.pt"
    assert (s.checkpoint_dir / "latest").read_text() == "ckpt-00000001.pt"
    assert not [p for p in s.checkpoint_dir.iterdir() if ".tmp" in p.name]

    restored = load_trainer(s)
    assert restored.version == 1
    assert restored.extra == {"reservoir": {"users": ["u1", "u2"], "seen": 2}}
    assert restored.items.state_dict() == trainer.items.state_dict()
    assert np.array_equal(restored.embed_many(seqs), trainer.embed_many(seqs))
    # a restarted worker continues exactly where the old one would have
    a = trainer.learn_many(seqs, steps=3)
    b = restored.learn_many(seqs, steps=3)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert np.allclose(restored.embed_many(seqs), trainer.embed_many(seqs), atol=1e-5)


def test_checkpoints_are_pruned_and_writes_are_atomic(tmp_path, monkeypatch):
    s = small_settings(tmp_path, keep_checkpoints=2)
    seqs, _ = planted(n_users=8)
    trainer = Trainer(s)
    for _ in range(4):
        trainer.learn_many(seqs, steps=1)
        trainer.save(s.checkpoint_dir, keep=s.keep_checkpoints)
    names = sorted(p.name for p in s.checkpoint_dir.iterdir())
    assert names == ["ckpt-00000003.pt", "ckpt-00000004.pt", "latest"]
    assert latest_checkpoint(s.checkpoint_dir).name == "ckpt-00000004.pt"

    def crash(obj, f, *args, **kwargs):  # half a file, then the process "dies"
        f.write(b"partial")
        raise OSError("disk full")

    trainer.learn_many(seqs, steps=1)
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        trainer.save(s.checkpoint_dir, keep=s.keep_checkpoints)
    monkeypatch.undo()
    names = sorted(p.name for p in s.checkpoint_dir.iterdir())
    assert names == ["ckpt-00000003.pt", "ckpt-00000004.pt", "latest"]  # no partial file
    assert load_trainer(s).version == 4  # the previous checkpoint still loads
    assert latest_checkpoint(small_settings(tmp_path / "empty").checkpoint_dir) is None


def test_package_exports_resolve_without_importing_torch_for_the_stores():
    import subprocess
    import sys

    import model

    assert all(getattr(model, name) is not None for name in model.__all__)
    code = "import sys, userstream.stores, serving; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)  # serving/ stays light


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_on_cuda_matches_cpu_after_reload(tmp_path):
    seqs, _ = planted(n_users=64)
    gpu = Trainer(small_settings(tmp_path, device="cuda"))
    assert gpu.device.type == "cuda"
    stats = gpu.learn_many(seqs, steps=20)
    assert np.isfinite(stats["loss"])
    z_gpu = gpu.embed_many(seqs)
    gpu.save(tmp_path / "checkpoints")
    cpu = load_trainer(small_settings(tmp_path, device="cpu"))
    assert cpu.device.type == "cpu" and cpu.version == 1
    assert np.allclose(cpu.embed_many(seqs), z_gpu, atol=1e-4)
    assert np.isfinite(cpu.learn_many(seqs, steps=2)["loss"])  # optimizer state moved too


def test_full_softmax_in_chunks_gives_the_same_loss_and_gradients(monkeypatch):
    import model.tasks as tasks

    torch.manual_seed(0)
    enc = tiny_encoder(n_items=600)
    h = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(2, 580, (50,))

    def loss_and_grads():
        enc.zero_grad()
        h.grad = None
        loss = item_cross_entropy(enc, h, targets, 580, ItemSoftmax())
        loss.backward()
        return float(loss.detach()), h.grad.clone(), enc.item_emb.weight.grad.clone()

    whole = loss_and_grads()
    calls = []
    real = tasks._chunk_loss
    monkeypatch.setattr(tasks, "_chunk_loss", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(tasks, "FULL_SOFTMAX_MAX_LOGITS", 580 * 8)  # chunks of 8 targets
    chunked = loss_and_grads()
    assert len(calls) >= 7  # 7 chunks forward (and again in the backward)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    for a, b in zip(chunked[1:], whole[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
