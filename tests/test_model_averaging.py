"""The moving average of the weights that offline training evaluates and keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.offline.averaging import WeightAverage


def test_update_follows_the_ramped_decay_by_hand():
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    avg = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    avg.update(layer)  # decay min(0.5, 1/10) = 0.1: shadow = 0.1*0 + 0.9*1
    assert avg.shadow["weight"].item() == pytest.approx(0.9)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    avg.update(layer)  # decay min(0.5, 2/11) = 2/11
    assert avg.shadow["weight"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11 * 2.0)
    for _ in range(50):
        avg.update(layer)  # decay capped at 0.5 from here: converges to the constant
    assert avg.current_decay() == 0.5
    assert avg.shadow["weight"].item() == pytest.approx(2.0, abs=1e-6)


def test_applied_swaps_the_average_in_and_the_raw_weights_back():
    layer = nn.Linear(3, 2)
    avg = WeightAverage(layer, decay=0.9)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    raw = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with avg.applied(layer):
        for n, p in layer.named_parameters():
            assert torch.equal(p, before[n])  # no update yet: the average is the start
    for n, p in layer.named_parameters():
        assert torch.equal(p, raw[n])
    with pytest.raises(RuntimeError), avg.applied(layer):
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, raw[n]) for n, p in layer.named_parameters())  # restored anyway


def test_a_grown_parameter_restarts_its_average():
    table = nn.Embedding(4, 2)
    avg = WeightAverage(table, decay=0.99)
    table.weight = nn.Parameter(torch.ones(6, 2))  # the item table grew
    avg.update(table)
    assert avg.shadow["weight"].shape == (6, 2) and torch.equal(
        avg.shadow["weight"], torch.ones(6, 2)
    )


def test_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        WeightAverage(nn.Linear(1, 1), decay=1.0)


def test_live_trainer_serves_its_average_and_restarts_it_with_the_item_rows(tmp_path):
    from model.trainer import Trainer
    from tests.helpers import tiny_settings
    from userstream.types import Behavior

    s = tiny_settings(tmp_path, average_decay=0.9, learning_rate=1e-2, max_len=8)
    tr = Trainer(s)
    seqs = [[Behavior(f"i{(u + k) % 9}", "view", float(k)) for k in range(8)] for u in range(6)]
    tr.learn_many(seqs, steps=4)
    raw = {n: p.detach().clone() for n, p in tr.encoder.named_parameters()}
    with tr.averaged():
        inside = {n: p.detach().clone() for n, p in tr.encoder.named_parameters()}
    assert all(torch.equal(p, raw[n]) for n, p in tr.encoder.named_parameters())  # back
    assert all(torch.equal(inside[n], tr.average.shadow[n]) for n in inside)
    assert not torch.equal(inside["item_emb.weight"], raw["item_emb.weight"])
    # a compaction moves rows: the average of the item table restarts from the rows
    tr.items.ttl_s = 1.0
    assert tr.expire_items() > 0 and tr.compact_items(force=True)
    w = tr.encoder.item_emb.weight
    assert torch.equal(tr.average.shadow["item_emb.weight"], w.detach())
    assert Trainer(tiny_settings(tmp_path)).average is None  # off by default
