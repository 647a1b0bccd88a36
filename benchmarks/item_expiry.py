"""Item expiry on a churning stream: item rows and checkpoint size per day, with
and without ``ITEM_TTL_S``, through the unchanged training worker.

    python benchmarks/item_expiry.py [--days 30] [--ttl-days 3] [--threads 1]

A synthetic clickstream on memory stores: each day ``--active`` of ``--users``
users make ``--events`` behaviors each; 20% of them pick from an evergreen
catalogue of ``--evergreen`` items, the rest from that day's ``--new`` new items
(Zipf-like), a third of which are still seen the next day and never after. One
training cycle per day at the live defaults, with the sampled softmax (what a
large catalogue runs). Reports per day: items with a row, free rows, table rows
and the checkpoint's MB, for the TTL run and for a run with ``ITEM_TTL_S=0``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import threads, write_json

DAY = 86_400.0
T0 = 1_700_000_000.0


def day_events(rng: np.random.Generator, d: int, args: argparse.Namespace) -> list:
    from userstream.types import Event

    users = rng.choice(args.users, size=args.active, replace=False)
    zipf = 1.0 / np.arange(1, args.new + 1) ** 0.8
    zipf /= zipf.sum()
    out = []
    for u in users.tolist():
        ts = T0 + d * DAY + np.sort(rng.uniform(0, DAY, args.events))
        for t in ts.tolist():
            r = rng.random()
            if r < 0.2:
                item = f"e{rng.integers(args.evergreen)}"
            elif r < 0.3 and d > 0:  # yesterday's items, a third of them
                item = f"d{d - 1}-{rng.choice(args.new // 3, p=None)}"
            else:
                item = f"d{d}-{rng.choice(args.new, p=zipf)}"
            out.append(Event(f"u{u}", item, "view", t))
    out.sort(key=lambda e: e.ts)
    return out


def run(ttl_s: float, args: argparse.Namespace, folder: Path) -> list[dict]:
    from model.live import TrainingWorker
    from userstream.settings import Settings
    from userstream.stores import MemoryEmbeddingStore, MemorySequenceStore

    s = Settings(data_dir=folder, device="cpu", item_softmax="sampled", item_ttl_s=ttl_s,
                 refresh_budget=0, keep_checkpoints=1)  # fmt: skip
    store = MemorySequenceStore(s.sequence_length)
    worker = TrainingWorker(s, store, MemoryEmbeddingStore())
    rng = np.random.default_rng(args.seed)
    offsets = itertools.count()
    rows = []
    for d in range(args.days):
        store.apply_many("events", [(0, next(offsets), e) for e in day_events(rng, d, args)])
        t0 = time.perf_counter()
        r = worker.run_cycle()
        mb = Path(r.checkpoint).stat().st_size / 1e6
        rows.append({"day": d, "items_live": r.items_live, "item_rows_free": r.item_rows_free,
                     "item_rows": r.item_rows, "items_expired_total": r.items_expired_total,
                     "checkpoint_mb": round(mb, 2), "cycle_s": round(time.perf_counter() - t0, 2)})  # fmt: skip
        print(f"ttl={ttl_s / DAY:g}d day {d:2d}: {r.items_live:6d} live, {r.item_rows_free:6d} "
              f"free, {r.item_rows:6d} rows, {mb:6.1f} MB, cycle {rows[-1]['cycle_s']:.1f}s",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--ttl-days", type=float, default=3.0)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--active", type=int, default=400)
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--evergreen", type=int, default=500)
    p.add_argument("--new", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        with_ttl = run(args.ttl_days * DAY, args, Path(tmp) / "ttl")
        without = run(0.0, args, Path(tmp) / "never")
    path = write_json("item_expiry", {"args": vars(args), "ttl": with_ttl, "no_ttl": without})
    a, b = with_ttl[-1], without[-1]
    print(f"after {args.days} days: TTL {args.ttl_days:g} d: {a['item_rows']} rows, "
          f"{a['checkpoint_mb']} MB; no TTL: {b['item_rows']} rows, {b['checkpoint_mb']} MB "
          f"({path})")  # fmt: skip


if __name__ == "__main__":
    main()
