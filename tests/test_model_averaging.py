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
