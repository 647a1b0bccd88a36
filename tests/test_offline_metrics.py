"""PROTOCOL section 1 metrics against hand-computed cases: ties, history masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.metrics import pessimistic_ranks, ranking_metrics
from model.offline import evaluate as ev


def ranks(scores, targets, exclude=None):
    s = torch.tensor(scores, dtype=torch.float32)
    x = None if exclude is None else torch.tensor(exclude, dtype=torch.bool)
    return pessimistic_ranks(s, torch.tensor(targets), x).tolist()


def test_ties_count_against_the_target():
    # item 1 ties with the target: pessimistic rank 3, not 2 (and not 2.5)
    assert ranks([[0.9, 0.5, 0.5, 0.1]], [2]) == [3]
    # everything tied: the target is last
    assert ranks([[0.5] * 5], [0]) == [5]
    # a strictly lower item never counts
    assert ranks([[0.1, 0.2, 0.3]], [2]) == [1]


def test_masked_history_items_do_not_count_but_the_target_is_never_masked():
    # item 0 scores above the target but is in the history: it does not count
    assert ranks([[0.9, 0.1, 0.5]], [2], [[True, False, False]]) == [1]
    # a masked item tied with the target does not count either
    assert ranks([[0.5, 0.9, 0.5]], [0], [[False, False, True]]) == [2]
    # the target is in the history too: it is still ranked (not -inf)
    assert ranks([[0.2, 0.8, 0.3]], [1], [[True, True, False]]) == [1]
    assert ranks([[0.2, 0.3, 0.8]], [1], [[True, True, False]]) == [2]


def test_batch_rows_are_independent():
    got = ranks(
        [[0.9, 0.5, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4]],
        [2, 0],
        [[False, True, False, False], [False, False, False, False]],
    )
    assert got == [2, 4]


def test_hr_and_ndcg_from_ranks():
    m = ranking_metrics(torch.tensor([1, 3, 7]), ks=(1, 5, 10))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["HR@10"] == pytest.approx(1.0)
    assert m["NDCG@1"] == pytest.approx(1 / 3)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    # rank k is in, rank k+1 is out
    m = ranking_metrics(torch.tensor([10, 11]), ks=(10,))
    assert m["HR@10"] == 0.5 and m["NDCG@10"] == pytest.approx(0.5 / math.log2(11))


def test_rank_encoded_masks_the_whole_history_not_only_what_the_encoder_reads(monkeypatch):
    """The evaluator masks every item of the input history (also steps older than
    max_len), keeps the target, and ranks unknown targets last."""

    class Items:
        first_item_row = 10

        def __len__(self):
            return 16  # catalogue rows 10..15 -> columns 0..5

    class Config:
        max_len = 2

    class Encoder:
        config = Config()
        item_emb = torch.nn.Embedding(16, 4)

    class FakeTrainer:
        encoder, items = Encoder(), Items()

    fixed = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])  # column j = row 10 + j

    def scores(encoder, batch, items):
        assert batch.items.shape[1] <= 2  # the encoder reads at most max_len steps
        return fixed.repeat(batch.items.shape[0], 1)

    monkeypatch.setattr(ev, "next_item_scores", scores)

    def seq(rows):
        return np.array([[r, 2, 1] for r in rows], dtype=np.int64)

    inputs = [
        seq([10, 11, 12]),  # history: columns 0, 1, 2 (column 0 is older than max_len)
        seq([10, 14]),  # the target (column 4) is in the history
        seq([11]),
    ]
    targets = np.array([13, 14, 99])  # column 3; column 4; not in the catalogue
    got = ev.rank_encoded(FakeTrainer(), inputs, targets).tolist()
    assert got == [1, 4, 6]  # [0,1,2 masked]; [1,2,3 beat it, 0 masked]; worst


def test_rank_encoded_matches_brute_force_on_a_real_trainer(tmp_path):
    """The fast evaluator (encode once, collate, catalogue slice) agrees with a
    plain per-user loop over the live path (make_batch + item_logits)."""
    import random

    from model.batching import make_batch
    from model.offline.evaluate import encode_many, rank_encoded
    from model.trainer import Trainer
    from userstream.settings import Settings
    from userstream.types import Behavior

    rng = random.Random(3)
    s = Settings(data_dir=tmp_path, max_len=6, hidden_size=16, num_layers=1, num_heads=2,
                 train_batch_size=16, device="cpu")  # fmt: skip
    seqs = [
        [Behavior(f"i{rng.randrange(30)}", rng.choice(["view", "buy"]), float(t)) for t in range(rng.randint(2, 12))]
        for _ in range(40)
    ]  # fmt: skip
    trainer = Trainer(s)
    trainer.learn_many(seqs, steps=20)
    trainer.encoder.eval()
    inputs, targets = [q[:-1] for q in seqs], [q[-1] for q in seqs]
    got = rank_encoded(trainer, encode_many(trainer, inputs), np.array(trainer.items.rows_for([t.item_id for t in targets])), batch_size=7)  # fmt: skip

    first, stop = trainer.items.first_item_row, len(trainer.items)
    for k, (hist, target) in enumerate(zip(inputs, targets, strict=True)):
        b = make_batch([hist], trainer.items, trainer.behaviors, 6, trainer.config.n_gap_buckets)
        with torch.no_grad():
            h = trainer.encoder(b.items, b.behaviors, b.gaps, causal=True)[0, -1]
            scores = trainer.encoder.item_logits(h, stop)[first:stop].tolist()
        t = trainer.items.rows_for([target.item_id])[0] - first
        seen = {r - first for r in trainer.items.rows_for([x.item_id for x in hist])} - {t}
        want = 1 + sum(
            1 for j, v in enumerate(scores) if j != t and j not in seen and v >= scores[t]
        )
        assert int(got[k]) == want, k
    assert any(t.item_id in {x.item_id for x in h} for h, t in zip(inputs, targets, strict=True))
