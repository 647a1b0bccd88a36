"""Exponential moving average of an encoder's weights (Polyak averaging).

Offline training evaluates and saves the AVERAGED weights: with heavy dropout
on short sequences (Beauty: 0.5) the raw weights after any one step are a
noisy sample, and their running average ranks better at the same epoch. The
optimizer keeps stepping the raw weights; :meth:`WeightAverage.applied` swaps
the average in for evaluation or saving and swaps the raw weights back.

The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates,
so early averages are not dominated by the random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """``shadow <- d * shadow + (1 - d) * weights`` after every optimizer step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight-average decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        live, shadow = [], []
        for name, p in module.named_parameters():
            s = self.shadow.get(name)
            if s is None or s.shape != p.shape:  # a grown table: restart that tensor
                self.shadow[name] = p.detach().clone()
                continue
            live.append(p.detach())
            shadow.append(s)
        if shadow:
            torch._foreach_lerp_(shadow, live, weight)

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Inside the block the module holds the averaged weights."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            raw = {n: p.detach().clone() for n, p in params.items() if n in self.shadow}
            for name, saved in raw.items():
                if self.shadow[name].shape == saved.shape:
                    params[name].copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, saved in raw.items():
                    params[name].copy_(saved)
