"""Fine-tuning for profiling and targeting: a head on the pre-trained encoder for
a labelled user attribute (``userstream finetune``).

:func:`finetune_classifier` trains a linear head on the pooled user state
together with a COPY of the encoder (the live encoder is never modified);
:func:`predict_proba` applies it. :func:`run_finetune` is the command: it reads
a labels file (:func:`read_labels`), holds out a stratified share of the
labelled users, trains on the rest, reports accuracy / macro-F1 on the held-out
users against the majority class, and writes ``classifier.pt``, ``report.json``
and ``predictions.csv`` (one row per user with behaviors, labelled or not).

Labels file: CSV or tab-separated, a header row, one row per user; one column
names the user (``user_id``) and one the label (any text). RecBole's atomic
headers (``user_id:token``) are read as their names, so
``../shared/data/ml-100k/ml-100k.user`` works as it is::

    userstream finetune --checkpoint runs/ml100k --data ml-100k.inter --format movielens \\
        --labels ml-100k.user --label-column gender --out runs/gender
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.batching import Batch, collate, encode_sequence
from model.encoder import SequenceEncoder
from userstream.settings import FinetuneConfig

__all__ = [
    "FinetuneConfig",
    "UserClassifier",
    "finetune_classifier",
    "predict_proba",
    "read_labels",
    "run_finetune",
]

LOG = logging.getLogger(__name__)


class UserClassifier(nn.Module):
    """Encoder (bidirectional pass) -> mean over real steps -> linear head."""

    def __init__(self, encoder: SequenceEncoder, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden, n_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.encoder(batch.items, batch.behaviors, batch.gaps, causal=False)  # (B, T, H)
        return self.head(SequenceEncoder.mean_states(h, batch.items))  # (B, C)


def _batches(encoded: Sequence[np.ndarray], idx: np.ndarray, T: int, bs: int):
    for start in range(0, len(idx), bs):
        chunk = idx[start : start + bs]
        yield (
            chunk,
            collate([encoded[i] for i in chunk], min(T, max(len(encoded[i]) for i in chunk))),
        )


def finetune_classifier(
    encoder: SequenceEncoder,
    encoded: Sequence[np.ndarray],
    labels: np.ndarray,
    n_classes: int,
    config: FinetuneConfig = FinetuneConfig(),
) -> UserClassifier:
    """Train head + a copy of ``encoder`` with cross-entropy on (sequence, label) pairs.

    ``encoded``: (L, 3) arrays from ``model.batching.encode_sequence``;
    ``labels``: (N,) ints in ``[0, n_classes)``.
    """
    model = UserClassifier(copy.deepcopy(encoder), n_classes)
    opt = torch.optim.AdamW(
        [
            {"params": model.encoder.parameters(), "lr": config.encoder_lr},
            {"params": model.head.parameters(), "lr": config.head_lr},
        ],
        weight_decay=config.weight_decay,
    )
    rng = np.random.default_rng(config.seed)
    y = torch.as_tensor(labels, dtype=torch.long)
    T = encoder.config.max_len
    for epoch in range(config.epochs):
        model.train()
        total = 0.0
        for chunk, batch in _batches(encoded, rng.permutation(len(encoded)), T, config.batch_size):
            loss = F.cross_entropy(model(batch), y[chunk])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(chunk)
        LOG.debug("fine-tune epoch %d: loss %.4f", epoch + 1, total / len(encoded))
    return model


@torch.inference_mode()
def predict_proba(
    model: UserClassifier, encoded: Sequence[np.ndarray], batch_size: int = 256
) -> np.ndarray:
    """(N, C) class probabilities."""
    model.eval()
    T = model.encoder.config.max_len
    out = []
    for _, batch in _batches(encoded, np.arange(len(encoded)), T, batch_size):
        out.append(torch.softmax(model(batch), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.head.out_features), dtype=np.float32)


def read_labels(path: str | Path, user_column: str, label_column: str) -> dict[str, str]:
    """{user: label} from a CSV / tab-separated file with a header row.

    Header names are read up to a ``:`` (RecBole's ``name:type``). A missing
    column, a user labelled twice with different labels or an empty label is an
    error that names the line.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        head = fh.readline()
        delimiter = "\t" if head.count("\t") > head.count(",") else ","
        names = [h.strip().split(":", 1)[0] for h in head.rstrip("\r\n").split(delimiter)]
        for col in (user_column, label_column):
            if col not in names:
                raise ValueError(f"{path}: no column {col!r} in the header (columns: {names})")
        u, lab = names.index(user_column), names.index(label_column)
        labels: dict[str, str] = {}
        for line_no, row in enumerate(csv.reader(fh, delimiter=delimiter), start=2):
            if not row:
                continue
            if len(row) <= max(u, lab):
                raise ValueError(
                    f"{path}:{line_no}: {len(row)} columns, the header has {len(names)}"
                )
            user, label = row[u].strip(), row[lab].strip()
            if not user or not label:
                raise ValueError(f"{path}:{line_no}: empty user id or label")
            if labels.setdefault(user, label) != label:
                raise ValueError(f"{path}:{line_no}: user {user!r} has two labels")
    return labels


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator):
    """(train indices, held-out indices): ``fraction`` of each class held out,
    at least one per class with two or more members."""
    train, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.extend(idx[:n_held].tolist())
        train.extend(idx[n_held:].tolist())
    return np.array(sorted(train)), np.array(sorted(held))


def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    f1 = []
    for c in range(n_classes):
        tp = int(np.sum((pred == c) & (y == c)))
        fp, fn = int(np.sum((pred == c) & (y != c))), int(np.sum((pred != c) & (y == c)))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1)) if f1 else float("nan")


def run_finetune(
    checkpoint: str | Path,
    data: str | Path,
    fmt: str,
    labels_path: str | Path,
    out_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    user_column: str = "user_id",
    label_column: str = "label",
) -> dict[str, Any]:
    """``userstream finetune``: see the module docstring. Returns the report."""
    from model.checkpoint import latest_checkpoint
    from model.offline.datasets import load_sequences
    from model.recommend import NextItemModel

    t0 = time.perf_counter()
    path = latest_checkpoint(checkpoint)
    if path is None:
        raise ValueError(f"no checkpoint under {checkpoint}")
    base = NextItemModel.load(path)
    sequences = load_sequences(data, fmt)
    labels = read_labels(labels_path, user_column, label_column)
    users = [u for u in labels if sequences.get(u)]
    unmatched = len(labels) - len(users)
    if unmatched:
        LOG.warning("%d labelled users have no behaviors in %s and are left out", unmatched, data)
    classes = sorted({labels[u] for u in users})
    if len(classes) < 2:
        raise ValueError(
            f"{labels_path}: the labelled users with behaviors have {len(classes)} class(es) "
            f"in {label_column!r}; fine-tuning needs at least two"
        )
    n_gap = base.encoder.config.n_gap_buckets
    encode = lambda u: encode_sequence(sequences[u], base.items, base.behaviors, n_gap)  # noqa: E731
    encoded = [encode(u) for u in users]
    y = np.array([classes.index(labels[u]) for u in users])
    train, held = _stratified_split(y, config.valid_fraction, np.random.default_rng(config.seed))
    torch.manual_seed(config.seed)
    clf = finetune_classifier(
        base.encoder, [encoded[i] for i in train], y[train], len(classes), config
    )
    proba = predict_proba(clf, [encoded[i] for i in held])
    pred = proba.argmax(1) if len(held) else np.zeros(0, dtype=np.int64)
    majority = np.bincount(y[train], minlength=len(classes)).argmax()
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "labels": str(labels_path),
        "label_column": label_column,
        "classes": len(classes),
        "class_names": classes,
        "labelled_users": len(labels),
        "unmatched_users": unmatched,
        "train_users": len(train),
        "held_out_users": len(held),
        "held_out": {
            "accuracy": float(np.mean(pred == y[held])) if len(held) else float("nan"),
            "macro_f1": _macro_f1(y[held], pred, len(classes)),
            "majority_accuracy": float(np.mean(y[held] == majority)) if len(held) else float("nan"),
        },
        "config": config.model_dump(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    everyone = [u for u, s in sequences.items() if s]
    all_proba = predict_proba(clf, [encode(u) for u in everyone])
    with (out / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", label_column, "probability", "labelled"])
        for u, p in zip(everyone, all_proba, strict=True):
            w.writerow([u, classes[int(p.argmax())], f"{float(p.max()):.4f}", labels.get(u, "")])
    torch.save(
        {"head": clf.head.state_dict(), "encoder": clf.encoder.state_dict(), "classes": classes,
         "label_column": label_column, "checkpoint": str(path)},
        out / "classifier.pt",
    )  # fmt: skip
    report["predicted_users"] = len(everyone)
    report["seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2))
    LOG.info("fine-tuned %s in %.0fs: %s", label_column, report["seconds"], report["held_out"])
    return report
