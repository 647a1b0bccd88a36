"""Which user vector makes the most useful similar users? PROTOCOL section 3
(neighbour usefulness) for many candidate neighbour sources in ONE prequential
run on MovieLens 100K, beside the bench's own sources (ours, user_knn, random).

    python benchmarks/neighbour_variants.py --max-events 20000

Candidates, all current at the event like the bench's sources:

* from the live encoder (re-embedded at the same points as ``ours``: each
  embedder run and cycle, for the users whose sequence changed):
  ``bidir_mean`` (THE user embedding: mean of bidirectional states),
  ``causal_mean``, ``last_state`` (the causal state that ranks the next item),
  ``item_mean`` (mean of the item vectors), ``recency_item_0.9`` and
  ``recency_bidir_0.9`` (means weighted 0.9 per step back), and asymmetric pairs
  with the query the user's ``last_state`` and the key a neighbour's summed item
  vectors (``asym_sum``, ``asym_sqrt`` over sqrt(n), ``asym_mean`` over n);
  ``expected`` / ``expected_sqrt``: a neighbour's score is the encoder's
  next-item probability mass on the neighbour's items (over sqrt(n)), the
  user's own items left out (a dense n_items product, no embedding index);
* from the item sets (exact, not embeddings): ``knn_a{alpha}`` (overlap over
  |B|^alpha; user_knn is alpha 0.5 with |A|^0.5), ``knn_idf``, and
  ``knn_recent{m}``: only the user's last m items count, weighted 0.9 per step
  back (``_idf``: and by inverse frequency).

Writes ``benchmarks/out/neighbour_variants-*.json`` and prints HR@10 per source.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from _common import data_path, threads, write_json

ENCODER = ("bidir_mean", "causal_mean", "last_state", "item_mean", "recency_item_0.9",
           "recency_bidir_0.9", "asym_sum", "asym_sqrt", "asym_mean", "expected", "expected_sqrt")  # fmt: skip
ITEM_SETS = {"knn_a0.25": {"alpha": 0.25}, "knn_a0.75": {"alpha": 0.75}, "knn_a1": {"alpha": 1.0},
             "knn_idf": {"idf": True}, "knn_recent10": {"recent": 10},
             "knn_recent20": {"recent": 20}, "knn_recent50": {"recent": 50},
             "knn_recent20_idf": {"recent": 20, "idf": True}}  # fmt: skip


class EncoderVectors:
    """A user's (query, key) vectors from the live encoder; cosine-free inner product."""

    def __init__(self, kind: str, ctx) -> None:
        self.kind, self.ctx = kind, ctx
        self.changed: dict[str, None] = {}
        self.query: dict[str, np.ndarray] = {}
        self.keys = np.zeros((0, 0), dtype=np.float32)  # by user row
        self.known = np.zeros(0, dtype=bool)  # rows that have a key

    def learn(self, user: str, item: int) -> None:
        self.changed[user] = None

    def refresh(self) -> None:
        import torch
        import torch.nn.functional as F

        from model.batching import make_batch

        tr = self.ctx.live_trainer()
        users = list(self.changed)
        self.changed.clear()
        if tr is None or not users:
            return
        seqs = self.ctx.feed.store.read_many(users)
        cfg, enc = tr.config, tr.encoder
        enc.eval()
        b = make_batch(seqs, tr.items, tr.behaviors, cfg.max_len, cfg.n_gap_buckets, trim=True)
        with torch.inference_mode(), tr.averaged():
            hb = enc(b.items, b.behaviors, b.gaps, causal=False)
            hc = enc(b.items, b.behaviors, b.gaps, causal=True)
            e = enc.item_emb(b.items)
            real = (b.items != 0).unsqueeze(-1).float()
            n = real.sum(1).clamp(min=1.0)
            last = hc[:, -1]
            T = real.shape[1]
            recency = (0.9 ** torch.arange(T - 1, -1, -1, dtype=torch.float32)).view(1, T, 1)
            k = self.kind
            if k.startswith("expected"):
                rows = torch.as_tensor(tr.items.rows_for(self.ctx.catalogue.items))
                p = torch.softmax(enc.item_logits(last, len(tr.items))[:, rows], -1).numpy()
                self.query.update(zip(users, p, strict=True))
                return
            q = {"bidir_mean": (hb * real).sum(1) / n, "causal_mean": (hc * real).sum(1) / n,
                 "last_state": last, "item_mean": (e * real).sum(1) / n,
                 "recency_item_0.9": (e * real * recency).sum(1),
                 "recency_bidir_0.9": (hb * real * recency).sum(1)}.get(k)  # fmt: skip
            if q is not None:
                q = key = F.normalize(q, dim=-1)
            else:  # asymmetric: the next-item state against a neighbour's items
                s = (e * real).sum(1)
                q, key = last, {"asym_sum": s, "asym_sqrt": s / n.sqrt(), "asym_mean": s / n}[k]
        from model.prequential.baselines import _grown

        self.query.update(zip(users, q.numpy(), strict=True))
        rows = np.asarray([self.ctx.rows.row[u] for u in users], dtype=np.int64)
        if self.keys.shape[1] != key.shape[1]:
            self.keys = np.zeros((len(self.known), key.shape[1]), dtype=np.float32)
        self.keys = _grown(self.keys, int(rows.max()) + 1)
        self.known = _grown(self.known, int(rows.max()) + 1)
        self.keys[rows], self.known[rows] = key.numpy(), True

    def neighbours(self, user: str, k: int) -> list[int] | None:
        from model.prequential.neighbours import _top

        rows = self.ctx.rows
        me, n = rows.row.get(user), len(rows)
        q = self.query.get(user)
        if q is None:
            return None
        if self.kind.startswith("expected"):
            p = q.copy()
            held = rows.matrix[:n, : len(p)]
            if me is not None:
                p[held[me] > 0] = 0.0  # the user's own items are never counted
            sims = held @ p
            if self.kind == "expected_sqrt":
                sims = sims / np.sqrt(np.maximum(rows.sizes[:n], 1.0))
            return _top(sims, me, k)
        m = min(n, len(self.known))  # rows beyond have no key yet
        sims = np.full(n, -np.inf, dtype=np.float32)
        sims[:m] = self.keys[:m] @ q
        return _top(sims, me, k, np.pad(self.known[:m], (0, n - m)))


class ItemSetSimilarity:
    """Exact overlap of item sets, optionally recency- and idf-weighted."""

    def __init__(self, ctx, alpha: float = 0.5, idf: bool = False, recent: int = 0) -> None:
        self.ctx, self.alpha, self.idf, self.recent = ctx, alpha, idf, recent
        self.history: dict[str, list[int]] = {}

    def learn(self, user: str, item: int) -> None:
        self.history.setdefault(user, []).append(item)

    def refresh(self) -> None:
        pass

    def neighbours(self, user: str, k: int) -> list[int] | None:
        from model.prequential.neighbours import _top

        rows = self.ctx.rows
        me = rows.row.get(user)
        if me is None:
            return None
        n = len(rows)
        held = rows.matrix[:n]
        hist = self.history[user]
        items = hist[-self.recent :] if self.recent else list(dict.fromkeys(hist))
        w = np.ones(len(items), dtype=np.float32)
        if self.idf:
            w = np.log((n + 1) / (held[:, items].sum(0) + 1)) + 1
        if self.recent:
            w = w * 0.9 ** np.arange(len(items))[::-1]
        size = np.maximum(rows.sizes[:n], 1.0)
        return _top(held[:, items] @ w / size**self.alpha, me, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-events", type=int, default=20_000, help="the first N events (0: all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from model.prequential import PrequentialConfig, run_prequential
    from serving.index import UserIndex
    from stream.datasets import read_dataset
    from userstream.cli.bench import PREQUENTIAL_SETTINGS
    from userstream.settings import Settings

    path = data_path("ml-100k", "ml-100k.inter")
    events = read_dataset(path, "movielens").events
    if args.max_events > 0:
        events = events[: args.max_events]
    extra = {k: (lambda ctx, k=k: EncoderVectors(k, ctx)) for k in ENCODER}
    extra.update({k: (lambda ctx, o=o: ItemSetSimilarity(ctx, **o)) for k, o in ITEM_SETS.items()})
    config = PrequentialConfig(models=("incremental",), neighbours=("ours", "user_knn", "random"))
    t0 = time.perf_counter()
    result = run_prequential(events, Settings(**PREQUENTIAL_SETTINGS), config,
                             index_factory=UserIndex.build, extra_neighbours=extra)  # fmt: skip
    hr = {name: result.neighbour_mean(name) for name in result.neighbour_ranks}
    payload = {"data": str(path), "events": len(events), "settings": "PREQUENTIAL_SETTINGS",
               "incremental_hr@10": result.mean("incremental"),
               "neighbours_hr@10": hr, "over_user_knn": {k: v / hr["user_knn"] for k, v in hr.items()},
               "wall_s": time.perf_counter() - t0}  # fmt: skip
    out = write_json("neighbour_variants", payload)
    for name, v in sorted(hr.items(), key=lambda x: -x[1]):
        print(f"{name:<22}{v:.4f}  {v / hr['user_knn']:.2f}x user_knn")
    print(out)


if __name__ == "__main__":
    main()
