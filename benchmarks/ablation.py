"""Which self-supervised task helps next-item ranking? Each task alone and every
combination, on Amazon Beauty, PROTOCOL section 1.

    python benchmarks/ablation.py [--max-epochs 6] [--threads 1]

Every row trains the same encoder with ``model.offline`` for at most
``--max-epochs`` epochs (FEWER than the full run: rows are comparable with each
other, not with ``beauty_quality.py``), keeps the epoch with the best valid
NDCG@10 and reads the test split once for that checkpoint. Ranking always uses
the next-item scorer (causal last state x item table), so rows without the
next-item task measure how well their representations transfer to it. Rows
with the next-item task train on one prefix per target (the default), the
others on the users' windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from _common import OUT, data_path, threads, write_json

ROWS = {
    "next": (1.0, 0.0, 0.0),
    "mlm": (0.0, 1.0, 0.0),
    "contrastive": (0.0, 0.0, 1.0),
    "next+mlm": (1.0, 0.1, 0.0),
    "next+contrastive": (1.0, 0.0, 0.05),
    "mlm+contrastive": (0.0, 1.0, 0.1),
    "next+mlm+contrastive": (1.0, 0.1, 0.05),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--out", default=str(OUT / "ablation"))
    args = p.parse_args()
    threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from model.datasets import load_sequences
    from model.evaluate import evaluate_split
    from model.offline import OfflineConfig, train_offline
    from model.split import leave_one_out
    from model.trainer import Trainer
    from userstream.settings import Settings

    path = data_path("beauty", "Beauty.txt")
    split = leave_one_out(load_sequences(path, "amazon-seq"))
    rows = []
    for name in args.rows:
        nxt, mlm, con = ROWS[name]
        config = OfflineConfig(
            max_epochs=args.max_epochs,
            patience=args.max_epochs,
            next_weight=nxt,
            mlm_weight=mlm,
            contrastive_weight=con,
            # prefixes feed the next-item task; rows without it read the windows only
            examples="prefixes" if nxt else "windows",
        )
        t0 = time.perf_counter()
        result = train_offline(split, config, f"{args.out}/{name}", progress=False)
        trainer = Trainer.load(result.checkpoint, Settings(device="cpu"))
        test = evaluate_split(trainer, split, "test")  # once, for the selected epoch
        rows.append(
            {
                "tasks": name,
                "weights": {"next": nxt, "mlm": mlm, "contrastive": con},
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "valid_NDCG@10": result.best_valid["NDCG@10"],
                "valid_HR@10": result.best_valid["HR@10"],
                "test": test,
                "seconds": time.perf_counter() - t0,
                "mean_epoch_train_s": sum(h["train_s"] for h in result.history)
                / len(result.history),
                "config": dataclasses.asdict(result.config),
            }
        )
        print(f"{name}: valid NDCG@10 {rows[-1]['valid_NDCG@10']:.4f}, test NDCG@10 {test['NDCG@10']:.4f}", flush=True)  # fmt: skip
        out = write_json(
            "ablation", {"data": str(path), "max_epochs": args.max_epochs, "rows": rows}
        )
    _plot(rows, f"{args.out}/ablation.png")
    print(f"\nAblation on Beauty, at most {args.max_epochs} epochs per row; {out}")
    print(f"{'tasks':<22} {'epoch':>5} {'vNDCG@10':>9} {'HR@10':>7} {'NDCG@10':>8} {'HR@20':>7} {'NDCG@20':>8} {'s/ep':>6}")  # fmt: skip
    for r in rows:
        t = r["test"]
        print(f"{r['tasks']:<22} {r['best_epoch']:>5} {r['valid_NDCG@10']:>9.4f} {t['HR@10']:>7.4f} "
              f"{t['NDCG@10']:>8.4f} {t['HR@20']:>7.4f} {t['NDCG@20']:>8.4f} {r['mean_epoch_train_s']:>6.1f}")  # fmt: skip


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["tasks"] for r in rows]
    ax.barh(names, [r["test"]["NDCG@10"] for r in rows], label="test NDCG@10")
    ax.barh(names, [r["valid_NDCG@10"] for r in rows], alpha=0.4, label="valid NDCG@10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
