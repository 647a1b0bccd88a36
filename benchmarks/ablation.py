"""Which self-supervised task helps next-item ranking? Each task alone and every
combination, on Amazon Beauty, PROTOCOL section 1.

    python benchmarks/ablation.py [--rows next mlm ...] [--threads 1]
    python benchmarks/ablation.py --table      # the table of every finished row

Every row trains the same encoder with ``model.offline`` defaults to
convergence (early stopping on valid NDCG@10, as ``beauty_quality.py``; or at
most ``--max-epochs`` / ``--max-minutes`` for a quick look), keeps the epoch
with the best valid NDCG@10 and reads the test split once for that checkpoint.
Ranking always uses the next-item scorer (causal last state x item table), so
rows without the next-item task measure how well their representations
transfer to it. Rows with the next-item task train on one prefix per target
(the default), the others on the users' windows.

Each finished row writes ``OUT/ablation/<row>/row.json``; the table (JSON,
PNG, printout) is built from every row file there, so rows can run in separate
processes, one per core, and fill one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from _common import OUT, data_path, machine, threads, write_json

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
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--max-epochs", type=int, default=None, help="cap (default: to convergence)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock cap per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print the table of finished rows")
    p.add_argument("--out", default=str(OUT / "ablation"))
    args = p.parse_args()
    if not args.table:
        threads(args.threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        from model.offline.datasets import load_sequences
        from model.offline.split import leave_one_out

        split = leave_one_out(load_sequences(data_path("beauty", "Beauty.txt"), "amazon-seq"))
        for name in args.rows:
            row = train_row(name, split, args)
            Path(args.out, name).mkdir(parents=True, exist_ok=True)
            Path(args.out, name, "row.json").write_text(json.dumps(row, indent=2, default=str))
            print(f"{name}: valid NDCG@10 {row['valid_NDCG@10']:.4f}, test NDCG@10 {row['test']['NDCG@10']:.4f}", flush=True)  # fmt: skip
    table(Path(args.out))


def train_row(name: str, split, args) -> dict:
    """Train one row on the Beauty ``split`` to convergence; its figures and config."""
    from model.offline.evaluate import evaluate_split
    from model.offline.train import train_offline
    from model.recommend import NextItemModel
    from userstream.settings import OfflineConfig

    nxt, mlm, con = ROWS[name]
    config = OfflineConfig(
        max_minutes=args.max_minutes,
        # prefixes feed the next-item task; rows without it read the windows only
        examples="prefixes" if nxt else "windows",
    ).with_model(next_weight=nxt, mlm_weight=mlm, contrastive_weight=con, seed=args.seed)
    if args.max_epochs is not None:
        config = config.replace(max_epochs=args.max_epochs)
    t0 = time.perf_counter()
    result = train_offline(split, config, f"{args.out}/{name}", progress=False)
    model = NextItemModel.load(result.checkpoint, device="cpu")
    test = evaluate_split(model, split, "test")  # once, for the selected epoch
    return {
        "tasks": name,
        "weights": {"next": nxt, "mlm": mlm, "contrastive": con},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped": result.stopped,
        "valid_NDCG@10": result.best_valid["NDCG@10"],
        "valid_HR@10": result.best_valid["HR@10"],
        "test": test,
        "seconds": time.perf_counter() - t0,
        "mean_epoch_train_s": sum(h["train_s"] for h in result.history) / len(result.history),
        "config": result.config.model_dump(mode="json"),
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(folder: Path) -> None:
    found = {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/row.json")}
    rows = [found[name] for name in ROWS if name in found]
    if not rows:
        raise SystemExit(f"no finished rows under {folder}: run without --table first")
    out = write_json("ablation", {"data": "beauty/Beauty.txt", "rows": rows})
    _plot(rows, folder / "ablation.png")
    print(f"\nAblation on Beauty, {len(rows)} of {len(ROWS)} rows; {out}")
    print(f"{'tasks':<22} {'epoch':>9} {'vNDCG@10':>9} {'HR@10':>7} {'NDCG@10':>8} {'HR@20':>7} {'NDCG@20':>8} {'s/ep':>6} {'min':>5}")  # fmt: skip
    for r in rows:
        t = r["test"]
        print(f"{r['tasks']:<22} {r['best_epoch']:>4}/{r['epochs_run']:<4} {r['valid_NDCG@10']:>9.4f} {t['HR@10']:>7.4f} "
              f"{t['NDCG@10']:>8.4f} {t['HR@20']:>7.4f} {t['NDCG@20']:>8.4f} {r['mean_epoch_train_s']:>6.1f} {r['seconds'] / 60:>5.1f}")  # fmt: skip


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
