"""``userstream bench train``: what one live training step costs, beside a bare-torch SASRec.

Every figure is the median seconds per optimizer step over ``steps`` timed steps
(after ``warmup``), all in this process with the same torch threads
(``TORCH_THREADS``, else one per core), on synthetic users whose windows are
full (``max_len`` behaviors over a catalogue of ``items`` items):

* ``bare_s``: a bare-torch SASRec of the live model's size (item and position
  embeddings, ``num_layers`` post-LN Transformer layers of ``hidden_size`` with
  ``num_heads`` heads and a 4x feed-forward, causal mask, next-item full-softmax
  cross-entropy over tied item rows at every position, AdamW), batches made
  beforehand: the floor for this model on this machine.
* ``live_next_s``: :meth:`model.trainer.Trainer.learn_many` as the live worker
  calls it, on one batch of users per call (the vocabulary pass, the batch made
  from behaviors, the step), with next-item prediction alone: the same
  objective as the bare model. ``live_vs_bare_ratio`` is this
  over ``bare_s``.
* ``live_default_s``: the same with the service's default tasks (cloze,
  next-item, contrastive: three passes); ``live_default_vs_bare_ratio``.
* The default tasks at ``items`` and at ``large_items`` with the full and with
  the sampled item softmax (``ITEM_SOFTMAX``): ``step_ratio_100k_vs_10k`` is
  the sampled step at ``large_items`` over the one at ``items``,
  ``step_ratio_100k_vs_10k_full`` the same with the full softmax.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from typing import Any

import torch
from torch import nn

from model.trainer import Trainer, resolve_device
from userstream.bench_configs import TrainBenchConfig
from userstream.settings import ModelSettings
from userstream.types import Behavior

__all__ = ["TrainBenchConfig", "run_train_bench"]

LOG = logging.getLogger(__name__)


class BareSASRec(nn.Module):
    """SASRec in plain torch: the reference a live step is held against."""

    def __init__(self, n_items: int, max_len: int, hidden: int, layers: int, heads: int,
                 dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.items = nn.Embedding(n_items, hidden, padding_idx=0)
        self.positions = nn.Embedding(max_len, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, batch_first=True,
                                           activation="gelu")  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        mask = torch.triu(torch.ones((max_len, max_len), dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", mask)

    def loss(self, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        T = seq.shape[1]
        x = self.items(seq) + self.positions.weight[:T]
        h = self.norm(self.blocks(self.dropout(x), mask=self.causal[:T, :T],
                                  src_key_padding_mask=seq == 0))  # fmt: skip
        real = target != 0
        logits = h[real] @ self.items.weight.T
        return nn.functional.cross_entropy(logits, target[real])


def _users(cfg: TrainBenchConfig, n_items: int, length: int) -> list[list[Behavior]]:
    """Full windows over the catalogue (popular items more often), plus one
    sequence per block of the catalogue so that every item has a row."""
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.users):
        start = 1_700_000_000.0 + rng.random() * 1e6
        out.append([Behavior(f"i{int(n_items * rng.random() ** 2)}", "view", start + 60.0 * t)
                    for t in range(length)])  # fmt: skip
    return out


def _every_item(n_items: int, length: int) -> list[list[Behavior]]:
    return [[Behavior(f"i{j}", "view", 1.6e9 + t) for t, j in enumerate(range(i, min(n_items, i + length)))]
            for i in range(0, n_items, length)]  # fmt: skip


def _time_steps(step, cfg: TrainBenchConfig) -> float:
    for _ in range(cfg.warmup):
        step()
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _live(settings: ModelSettings, cfg: TrainBenchConfig, n_items: int, **changes) -> float:
    s = settings.model_copy(update=changes)
    trainer = Trainer(s)
    trainer.observe_many(_every_item(n_items, s.max_len))
    users = _users(cfg, n_items, s.max_len)
    trainer.observe_many(users)
    rng = random.Random(cfg.seed)
    # one step per call on one batch of users, as a cycle whose users fill one
    # batch: the vocabulary pass, the batch made from behaviors, the step
    return _time_steps(lambda: trainer.learn_many(rng.sample(users, s.train_batch_size), 1), cfg)


def _bare(settings: ModelSettings, cfg: TrainBenchConfig, n_items: int) -> float:
    torch.manual_seed(cfg.seed)
    device = resolve_device(settings.device)
    T, B = settings.max_len, settings.train_batch_size
    model = BareSASRec(n_items + 1, T, settings.hidden_size, settings.num_layers,
                       settings.num_heads, settings.dropout).to(device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                            weight_decay=settings.weight_decay)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    seqs = (torch.rand((cfg.users, T + 1), generator=gen) ** 2 * n_items).long() + 1
    model.train()

    def step() -> None:
        pick = torch.randperm(cfg.users, generator=gen)[:B]
        batch = seqs[pick].to(device)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _time_steps(step, cfg)


def run_train_bench(settings: ModelSettings, cfg: TrainBenchConfig) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; returns the report."""
    if getattr(settings, "torch_threads", 0):
        torch.set_num_threads(settings.torch_threads)
    t0 = time.perf_counter()
    off = {"mlm_weight": 0.0, "contrastive_weight": 0.0, "future_weight": 0.0,
           "bag_weight": 0.0, "item_bag_weight": 0.0}  # fmt: skip
    full, sampled = {"item_softmax": "full"}, {"item_softmax": "sampled"}
    figures: dict[str, float] = {}
    plan = [
        ("bare_s", lambda: _bare(settings, cfg, cfg.items)),
        ("live_next_s", lambda: _live(settings, cfg, cfg.items, **off, **full)),
        ("live_default_s", lambda: _live(settings, cfg, cfg.items, **full)),
        ("sampled_s", lambda: _live(settings, cfg, cfg.items, **sampled)),
        ("large_full_s", lambda: _live(settings, cfg, cfg.large_items, **full)),
        ("large_sampled_s", lambda: _live(settings, cfg, cfg.large_items, **sampled)),
    ]
    for name, run in plan:
        figures[name] = round(run(), 5)
        LOG.info("bench train: %s %.4f s/step", name, figures[name])
    return {
        **figures,
        "live_vs_bare_ratio": round(figures["live_next_s"] / figures["bare_s"], 3),
        "live_default_vs_bare_ratio": round(figures["live_default_s"] / figures["bare_s"], 3),
        "step_ratio_100k_vs_10k": round(figures["large_sampled_s"] / figures["sampled_s"], 3),
        "step_ratio_100k_vs_10k_full": round(
            figures["large_full_s"] / figures["live_default_s"], 3
        ),  # fmt: skip
        "items": cfg.items,
        "large_items": cfg.large_items,
        "torch_threads": torch.get_num_threads(),
        "device": str(resolve_device(settings.device)),
        "settings": {
            k: getattr(settings, k)
            for k in (
                "max_len",
                "hidden_size",
                "num_layers",
                "num_heads",
                "train_batch_size",
                "sampled_negatives",
            )
        },  # fmt: skip
        "config": cfg.model_dump(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
