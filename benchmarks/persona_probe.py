"""PROTOCOL section 3 persona probe on MovieLens 100K: gender, age bucket and
occupation from FROZEN user embeddings (logistic regression, 5-fold CV),
against a bag-of-items SVD baseline of the same dimension; plus a fine-tuned
classifier (``model.finetune``: a head on a copy of the encoder), same folds.

The 5-fold CV is repeated ``--cv-repeats`` times (shuffle seeds 0..R-1) with
the SAME folds for every method: one shuffle moves SVD's age accuracy by
+-0.01 and its age AUC from 0.727 (seed 0) to 0.741 (mean of 5), as much as
the gaps between methods, so rows report means with the sd over repeats and
the comparison with SVD is paired, repeat by repeat.

    python benchmarks/persona_probe.py [--threads 1] [--max-minutes 28]

The encoder is pre-trained self-supervised with ``model.offline`` on the
ratings with the PROFILE objective (``PROFILE_WEIGHTS``: cloze, future items,
bag, contrastive and item bag, no next-item term; docs/architecture.md) for a fixed
budget, keeping the last epoch, so attributes never choose anything.
``--max-len 200`` (default here) lets it read most of a MovieLens history
(median ~65 ratings), as the SVD reads all of it. Representations probed: the
served embedding (``Trainer.embed_many``, what ``/users/{id}/embedding``
returns), the causal state of the last step (the next-item query), the plain
mean of the learned item vectors over the whole history, and the profile vector
(``model.profile``, what ``/users/{id}/profile`` returns: the normalized mean of
the profile table's rows, a table of its own when ``--item-bag-weight`` > 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from _common import OUT, data_path, threads, write_json

METRICS = ("accuracy", "macro_f1", "auc")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens 1M buckets: <18, 18-24, ..., 56+
# the profile objective (docs/architecture.md): no next-item term; cloze, future items,
# the bag, the contrastive term and the item bag, a fixed budget, last epoch kept
PROFILE_WEIGHTS = {
    "next": 0.0,
    "mlm": 1.0,
    "contrastive": 1.0,
    "future": 1.0,
    "bag": 2.0,
    "item_bag": 1.0,  # trains the profile vector's own table (model.profile)
}


def read_users(path) -> dict[str, dict[str, str]]:
    rows = path.read_text(encoding="utf-8").splitlines()
    header = [h.split(":")[0] for h in rows[0].split("\t")]
    return {r.split("\t")[0]: dict(zip(header, r.split("\t"), strict=True)) for r in rows[1:] if r}


def scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = proba.argmax(1)
    if proba.shape[1] == 2:
        auc = roc_auc_score(y, proba[:, 1])
    else:
        auc = roc_auc_score(
            y, proba, multi_class="ovr", average="macro", labels=np.arange(proba.shape[1])
        )
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
        "auc": float(auc),
    }


def probe(X: np.ndarray, y: np.ndarray, folds) -> dict[str, float]:
    """Out-of-fold probabilities of a standardized logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_classes = int(y.max()) + 1
    proba = np.zeros((len(y), n_classes))
    for train, test in folds:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
        clf.fit(X[train], y[train])
        proba[np.ix_(test, clf[-1].classes_)] = clf.predict_proba(X[test])
    return scores(y, proba)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=28.0, help="pre-training budget")
    p.add_argument("--seed", type=int, default=0, help="pre-training seed")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--finetune-epochs", type=int, default=4, help="0: no fine-tuned rows")
    p.add_argument("--cv-repeats", type=int, default=5,
                   help="repeats of the 5-fold CV (shuffles 0..R-1, shared by every method)")  # fmt: skip
    p.add_argument("--finetune-repeats", type=int, default=1,
                   help="CV repeats for the fine-tuned head (the first ones; it is slow)")  # fmt: skip
    p.add_argument("--select", choices=("valid", "last"), default="last",
                   help="pre-training checkpoint: best valid NDCG@10, or the last of the budget")  # fmt: skip
    for task, weight in PROFILE_WEIGHTS.items():
        p.add_argument(f"--{task.replace('_', '-')}-weight", type=float, default=weight,
                       help="pre-training weight")  # fmt: skip
    p.add_argument(
        "--pretrained", help="reuse the checkpoint folder of an earlier run (skips pre-training)"
    )
    p.add_argument("--out", default=str(OUT / "persona_probe"))
    args = p.parse_args()
    threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from sklearn.decomposition import TruncatedSVD
    from sklearn.model_selection import StratifiedKFold

    from model.batching import collate
    from model.checkpoint import latest_checkpoint
    from model.finetune import FinetuneConfig, finetune_classifier, predict_proba
    from model.offline.datasets import load_sequences
    from model.offline.evaluate import encode_many
    from model.offline.split import leave_one_out
    from model.offline.train import train_offline
    from model.profile import profile_many
    from model.trainer import Trainer
    from userstream.settings import ModelSettings, OfflineConfig

    t_start = time.perf_counter()
    seqs = load_sequences(data_path("ml-100k", "ml-100k.inter"), "movielens")
    people = read_users(data_path("ml-100k", "ml-100k.user"))
    users = [u for u in seqs if u in people]
    split = leave_one_out({u: seqs[u] for u in users})

    # --- self-supervised pre-training (no attributes involved) ------------------
    if args.pretrained:
        log = json.loads((Path(args.pretrained) / "train_log.json").read_text())
        checkpoint = latest_checkpoint(args.pretrained)
        if checkpoint is None:
            raise SystemExit(f"no checkpoint in {args.pretrained}")
        pretrain = {k: log[k] for k in ("config", "best_epoch", "best_valid", "seconds", "stopped")}
        pretrain["reused_from"] = str(checkpoint)
    else:
        weights = {f"{t}_weight": getattr(args, f"{t}_weight") for t in PROFILE_WEIGHTS}
        config = OfflineConfig(
            max_minutes=args.max_minutes,
            patience=8,
            select=args.select,
            examples="windows",  # no next-item term: nothing for prefixes to feed
        ).with_model(max_len=args.max_len, seed=args.seed, **weights)
        result = train_offline(split, config, args.out, progress=False)
        checkpoint = result.checkpoint
        pretrain = {"config": result.config.model_dump(mode="json"), "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history), "best_valid": result.best_valid,
                    "seconds": result.seconds, "stopped": result.stopped}  # fmt: skip
    trainer = Trainer.load(checkpoint, ModelSettings(device="cpu"))  # its architecture wins
    full = [seqs[u] for u in users]
    served = trainer.embed_many(full)  # (U, H): what /users/{id}/embedding returns
    encoded = encode_many(trainer, full)
    with torch.inference_mode():
        trainer.encoder.eval()
        T = trainer.config.max_len
        last = np.concatenate([
            trainer.encoder(*(lambda b: (b.items, b.behaviors, b.gaps))(collate(encoded[i : i + 256], T)), causal=True)[:, -1].numpy()
            for i in range(0, len(encoded), 256)
        ])  # fmt: skip
    H = served.shape[1]
    with torch.inference_mode():  # plain mean of the learned item vectors, whole history
        table = trainer.encoder.item_emb.weight.float().numpy()  # (rows, H)
        item_mean = np.stack([table[e[:, 0]].mean(0) for e in encoded])  # (U, H)
    profile = profile_many(trainer.encoder, trainer.items, trainer.behaviors, full)  # /profile

    # --- bag-of-items SVD baseline, same dimension ------------------------------
    items = sorted({b.item_id for s in full for b in s})
    col = {i: k for k, i in enumerate(items)}
    bag = np.zeros((len(users), len(items)), dtype=np.float32)
    for r, s in enumerate(full):
        bag[r, [col[b.item_id] for b in s]] = 1.0
    svd = TruncatedSVD(n_components=H, random_state=0).fit_transform(bag)  # (U, H)

    # --- labels -----------------------------------------------------------------
    gender = np.array([people[u]["gender"] == "F" for u in users], dtype=np.int64)
    age = np.digitize([int(people[u]["age"]) for u in users], AGE_EDGES)
    occ_names = sorted({people[u]["occupation"] for u in users})
    occupation = np.array([occ_names.index(people[u]["occupation"]) for u in users])
    attrs = {"gender": gender, "age_bucket": age, "occupation": occupation}

    rows = []
    # FinetuneConfig wants epochs >= 1: none at all when there are no fine-tuned rows
    ft_config = FinetuneConfig(epochs=args.finetune_epochs) if args.finetune_epochs > 0 else None
    frozen = {
        f"SVD bag-of-items ({H})": svd,
        f"ours: served embedding ({H})": served,
        f"ours: last causal state ({H})": last,
        f"ours: mean item vector ({H})": item_mean,
        f"ours: profile vector ({H})": profile,
    }
    for name, y in attrs.items():
        # repeated 5-fold CV: shuffle r = 0..R-1, the SAME folds for every method (paired)
        splits = [
            list(StratifiedKFold(5, shuffle=True, random_state=r).split(np.zeros(len(y)), y))
            for r in range(args.cv_repeats)
        ]
        majority = np.bincount(y).argmax()
        base = scores(
            y, np.eye(int(y.max()) + 1)[np.full(len(y), majority)] * 0.999 + 0.001 / (y.max() + 1)
        )
        rows.append({"attribute": name, "method": "majority class", **base, "repeats": [base]})
        for method, X in frozen.items():
            rows.append(summarize(name, method, [probe(X, y, folds) for folds in splits]))
        if args.finetune_epochs > 0:
            t0 = time.perf_counter()
            n_classes = int(y.max()) + 1
            per_repeat = []
            for folds in splits[: args.finetune_repeats]:
                proba = np.zeros((len(y), n_classes))
                for train, test in folds:
                    clf = finetune_classifier(
                        trainer.encoder, [encoded[i] for i in train], y[train], n_classes, ft_config
                    )
                    proba[test] = predict_proba(clf, [encoded[i] for i in test])
                per_repeat.append(scores(y, proba))
            rows.append(summarize(name, "ours: fine-tuned encoder + head", per_repeat))
            rows[-1]["seconds"] = time.perf_counter() - t0
        for r in rows:
            if r["attribute"] == name:
                print(f"{name:<11} {r['method']:<34} acc {r['accuracy']:.3f} macroF1 {r['macro_f1']:.3f} AUC {r['auc']:.3f}", flush=True)  # fmt: skip
    against_svd = paired(rows, f"SVD bag-of-items ({H})")

    payload = {
        "data": "ml-100k",
        "users": len(users),
        "dim": H,
        "pretrain": pretrain,
        "finetune": ft_config.model_dump() if ft_config is not None else None,
        "cv": f"StratifiedKFold(5, shuffle, seeds 0..{args.cv_repeats - 1}, the same folds for "
        "every method); LogisticRegression(C=0.1) on standardized features; metrics are means "
        "over the repeats (sd beside them)",
        "rows": rows,
        "against_svd": against_svd,
        "wall_s": time.perf_counter() - t_start,
    }
    out = write_json("persona_probe", payload)
    _plot(rows, f"{args.out}/persona_probe.png")
    print(f"\nPersona probe, MovieLens 100K, {len(users)} users, 5-fold CV; {out}")
    print(f"means over {args.cv_repeats} repeats of 5-fold CV (sd over repeats)")
    print(f"{'attribute':<11} {'method':<34} {'acc':>13} {'macroF1':>13} {'AUC':>13}")
    for r in rows:
        cells = " ".join(f"{r[m]:>6.3f} ±{r.get('sd', {}).get(m, 0.0):.3f}" for m in METRICS)
        print(f"{r['attribute']:<11} {r['method']:<34} {cells}")
    print("\nours - SVD, paired over the repeats: mean (sd), repeats won")
    for c in against_svd:
        cells = "  ".join(
            f"{m} {c[m]['mean']:+.3f} ({c[m]['sd']:.3f}) {c[m]['won']}/{c[m]['repeats']}"
            for m in METRICS
        )
        print(f"{c['attribute']:<11} {c['method']:<34} {cells}")


def summarize(attribute: str, method: str, per_repeat: list[dict[str, float]]) -> dict:
    """A row: each metric's mean over the CV repeats, its sd, and every repeat."""
    row = {"attribute": attribute, "method": method}
    row.update({m: float(np.mean([r[m] for r in per_repeat])) for m in METRICS})
    row["sd"] = {m: float(np.std([r[m] for r in per_repeat])) for m in METRICS}
    row["repeats"] = per_repeat
    return row


def paired(rows: list[dict], baseline: str) -> list[dict]:
    """Each of our rows minus the baseline's, repeat by repeat (the folds are shared):
    mean and sd of the difference and how many repeats ours won, per metric."""
    out = []
    for r in rows:
        if not r["method"].startswith("ours"):
            continue
        base = next(b for b in rows if b["attribute"] == r["attribute"] and b["method"] == baseline)
        n = len(r["repeats"])  # the fine-tuned row may have fewer repeats: the first n
        diff = {
            m: np.array(
                [a[m] - b[m] for a, b in zip(r["repeats"], base["repeats"][:n], strict=True)]
            )
            for m in METRICS
        }
        out.append(
            {"attribute": r["attribute"], "method": r["method"]}
            | {
                m: {
                    "mean": float(d.mean()),
                    "sd": float(d.std()),
                    "won": int((d > 0).sum()),
                    "repeats": n,
                }
                for m, d in diff.items()
            }
        )
    return out


def _plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = list(dict.fromkeys(r["attribute"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    w = 0.8 / len(methods)
    for k, m in enumerate(methods):
        vals = [
            next(r["auc"] for r in rows if r["attribute"] == a and r["method"] == m) for a in attrs
        ]
        ax.bar(np.arange(len(attrs)) + k * w, vals, w, label=m)
    ax.set_xticks(np.arange(len(attrs)) + 0.4 - w / 2, attrs)
    ax.set_ylabel("AUC (5-fold CV)")
    ax.set_ylim(0.4, None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
