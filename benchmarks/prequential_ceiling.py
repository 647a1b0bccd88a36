"""A ceiling for the prequential encoder numbers: score MovieLens 100K in PROTOCOL
section 2 order with a model trained OFFLINE on (almost) the whole stream.

    userstream train --data ../shared/data/ml-100k/ml-100k.inter --format movielens \
        --max-len 200 --max-minutes 5 --out benchmarks/out/ml100k_offline
    python benchmarks/prequential_ceiling.py --checkpoint benchmarks/out/ml100k_offline

The checkpoint has seen every event but the last two of each user before the
stream starts (leave-one-out training split), so it is NOT a fair contender: it
shows what this encoder size can score under the protocol when training data is
no object. Scoring is the prequential loop's own (``model.prequential``: same
catalogue growth, same exclusion of the user's earlier items, same tie rule,
``model.metrics.rank_of``: ties count against the target); the model never
changes.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from _common import data_path, threads, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="folder of `userstream train --out`")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-events", type=int, default=0, help="only the first N events (0 = all)")
    args = p.parse_args()
    threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from model.checkpoint import latest_checkpoint
    from model.metrics import hit_and_gain
    from model.prequential.feeds import TOPIC
    from model.prequential.loop import _parse
    from model.prequential.models import Catalogue, Query, Scoreboard, _Pending, _Scorer
    from model.trainer import Trainer
    from stream.datasets import read_dataset
    from userstream.settings import ModelSettings
    from userstream.stores import MemorySequenceStore

    t0 = time.perf_counter()
    path = data_path("ml-100k", "ml-100k.inter")
    events = read_dataset(path, "movielens").events
    if args.max_events > 0:
        events = events[: args.max_events]
    checkpoint = latest_checkpoint(args.checkpoint)
    if checkpoint is None:
        raise SystemExit(f"no checkpoint in {args.checkpoint}: run `userstream train` first")
    trainer = Trainer.load(checkpoint, ModelSettings(device="cpu"))  # its architecture wins
    T = trainer.config.max_len + 1
    store = MemorySequenceStore(T)
    cat = Catalogue(exclude_seen=True)
    n = len(events)
    board = Scoreboard(n, cat, k=10)
    board.add_model("ceiling")
    scorer = _Scorer(trainer, 256)
    for pos, obj in enumerate(events):
        ev = _parse(obj)
        seen = cat.user_sets.get(ev.user_id)
        if seen:  # test ...
            target = cat.index.get(ev.item_id)
            q = Query(pos, ev.user_id, len(cat.items), target, len(seen),
                      repeat=target is not None and target in seen)  # fmt: skip
            scorer.pending.append(_Pending(q, store.read_tail(ev.user_id, T)))
        store.apply_many(TOPIC, [(0, pos, ev)])  # ... then the event joins the state
        cat.add(ev.user_id, ev.item_id)
        if len(scorer.pending) >= 4096:
            scorer.flush(board, "ceiling")
    scorer.flush(board, "ceiling")
    ranks = board.ranks["ceiling"]  # (n,) NaN: not scored; inf: a miss (new item, repeat)
    scored = ~np.isnan(ranks)
    hit, gain = hit_and_gain(np.where(scored, ranks, np.inf), board.k)
    hr, ndcg = np.where(scored, hit, np.nan), np.where(scored, gain, np.nan)
    cuts = [(a, min(b, n)) for a, b in ((0, 20_000), (20_000, n)) if a < n]
    by_part = {f"{a}-{b}": float(hr[a:b][scored[a:b]].mean()) for a, b in cuts}
    payload = {
        "data": str(path),
        "checkpoint": str(checkpoint),
        "scored": int(scored.sum()),
        "hr@10": float(hr[scored].mean()),
        "ndcg@10": float(ndcg[scored].mean()),
        "hr@10_by_events": by_part,
        "wall_s": time.perf_counter() - t0,
    }
    out = write_json("prequential_ceiling", payload)
    print(f"ceiling: HR@10 {payload['hr@10']:.4f} NDCG@10 {payload['ndcg@10']:.4f} "
          f"over {payload['scored']} scored events ({by_part}); {out}")  # fmt: skip


if __name__ == "__main__":
    main()
