"""What the item-bag task and its profile table cost the live trainer: the time
of ``Trainer.learn_many`` steps and the bytes of parameters plus Adam state,
with ``ITEM_BAG_WEIGHT`` 0 and 1, at the live defaults otherwise.

    python benchmarks/item_bag_cost.py [--items 12000 50000] [--rounds 3] [--threads 1]

Synthetic users (``--users`` of ``--length`` behaviors, items drawn Zipf-like
from the catalogue) so the catalogue size can be set; every item is observed
first, so the tables hold all of them. Both trainers run in the same process,
their steps interleaved round by round, and the ratio of medians is reported:
a ratio, not an absolute time, is what holds on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from _common import threads, write_json


def state_bytes(trainer) -> int:
    """Bytes of the encoder's parameters and the optimizer's state tensors."""
    import torch

    params = sum(p.numel() * p.element_size() for p in trainer.encoder.parameters())
    moments = sum(
        v.numel() * v.element_size()
        for s in trainer.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return params + moments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, nargs="+", default=[12_000])
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per round (K)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    threads(args.threads)

    from model.trainer import Trainer
    from userstream.settings import Settings
    from userstream.types import Behavior

    rows = []
    for n_items in args.items:
        rng = np.random.default_rng(0)
        ids = np.minimum(rng.zipf(1.3, size=(args.users, args.length)) - 1, n_items - 1)
        seqs = [[Behavior(str(i), "view", float(t)) for t, i in enumerate(r)] for r in ids]
        trainers = {}
        for weight in (0.0, 1.0):
            trainer = Trainer(Settings(device="cpu", item_bag_weight=weight))
            T = trainer.config.max_len  # the trainer observes the last T of a sequence
            trainer.observe_many(
                [[Behavior(str(i), "view", 0.0) for i in range(k, min(k + T, n_items))]
                 for k in range(0, n_items, T)]
            )  # fmt: skip
            trainer.learn_many(seqs, 1)  # grow the tables, create the Adam state
            trainers[weight] = trainer
        seconds: dict[float, list[float]] = {w: [] for w in trainers}
        for _ in range(args.rounds):
            for weight, trainer in trainers.items():
                seconds[weight].append(trainer.learn_many(seqs, args.steps)["seconds"])
        base, bag = (statistics.median(seconds[w]) for w in (0.0, 1.0))
        row = {
            "items": n_items,
            "step_s": {"item_bag_0": base / args.steps, "item_bag_1": bag / args.steps},
            "step_ratio": bag / base,
            "state_mb": {f"item_bag_{w:g}": state_bytes(t) / 2**20 for w, t in trainers.items()},
        }
        rows.append(row)
        print(
            f"{n_items:>9,} items: step {base / args.steps * 1e3:.1f} ms -> "
            f"{bag / args.steps * 1e3:.1f} ms ({row['step_ratio']:.2f}x); params + Adam "
            f"{row['state_mb']['item_bag_0']:.1f} MB -> {row['state_mb']['item_bag_1']:.1f} MB",
            flush=True,
        )
    out = write_json("item_bag_cost", {"args": vars(args), "rows": rows})
    print(out)


if __name__ == "__main__":
    main()
