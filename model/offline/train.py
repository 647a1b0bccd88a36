"""Offline training over epochs: the SAME encoder, losses and optimizer step as
the live worker, configured by the same :class:`~userstream.settings.ModelSettings`.

:func:`train_offline` builds a :class:`~model.trainer.Trainer` whose vocabulary
holds every item of the data set, then trains the self-supervised objective
(next-behavior + masked behavior + contrastive, weights in
``OfflineConfig.model``) on every prefix of each user's training sequence,
checks validation NDCG@10 after each epoch, keeps the best checkpoint (the
``latest`` pointer names it), multiplies the learning rate by ``lr_decay``
after every ``lr_patience`` epochs without improvement (reduce-on-plateau) and
stops after ``patience`` epochs without improvement. The test split is never
read here.

Every prefix, one of two ways (``OfflineConfig.examples``, derived from the
data by :func:`derive_examples`):

* ``windows``: a sequence is cut into windows of ``max_len + 1`` steps
  (overlapping by one) and next-item cross-entropy is taken at every real
  position of a window, so each target is predicted once per epoch from up to
  ``max_len`` previous steps, all targets of a window under one dropout mask;
* ``prefixes``: one example per target, the prefix ending in it, loss at its
  last step (each target its own dropout mask; better on Beauty); the other
  tasks read the windows, riding on the same optimizer steps.

The weights' moving average (``ema_decay``; :mod:`model.offline.averaging`) is what is
evaluated and saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.batching import Batch, collate
from model.offline.averaging import WeightAverage
from model.offline.evaluate import encode_many, evaluate_split
from model.offline.split import LeaveOneOut
from model.tasks import LossWeights, total_loss
from model.trainer import Trainer, encoder_config
from model.vocab import ItemVocab
from userstream.settings import ModelSettings, OfflineConfig

__all__ = [
    "Examples",
    "TrainResult",
    "derive_dropout",
    "derive_examples",
    "resolve_config",
    "prefixes",
    "train_offline",
    "train_step",
    "training_examples",
    "windows",
]

LOG = logging.getLogger(__name__)

SHORT_MEDIAN_LEN = 20  # median training length below this: sparse, short sequences
TARGETS_PER_BATCH = 384  # next-item targets an optimizer step should see (about)
SELECT_ON = "NDCG@10"


@dataclass
class TrainResult:
    config: OfflineConfig  # resolved (dropout filled in)
    data: dict[str, Any]  # measured properties of the training data
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: str = ""
    stopped: str = ""  # why training ended

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"] = self.config.model_dump(mode="json")
        return out


def derive_dropout(train_lengths: Sequence[int]) -> float:
    """0.5 for short, sparse sequences (median < 20 steps, e.g. Amazon 5-core
    review data), else 0.2 (long histories such as MovieLens): the settings
    SASRec found best on either kind, chosen from a MEASURED property."""
    median = float(np.median(train_lengths)) if len(train_lengths) else 0.0
    return 0.5 if median < SHORT_MEDIAN_LEN else 0.2


def derive_examples(train_lengths: Sequence[int], next_weight: float) -> str:
    """ "prefixes" for short, sparse sequences (median < 20 steps), where dropout
    is 0.5 and one mask shared by a window's targets costs quality (measured on
    Beauty), and a prefix costs little (its tokens grow with the square of the
    length); "windows" for long histories, where prefixes would cost ~max_len/2
    times the encoder work of windows, and when there is no next-item task."""
    median = float(np.median(train_lengths)) if len(train_lengths) else 0.0
    return "prefixes" if next_weight > 0 and median < SHORT_MEDIAN_LEN else "windows"


def derive_batch_size(targets_per_window: float) -> int:
    """About ``TARGETS_PER_BATCH`` next-item targets per optimizer step, 32..256
    windows: short sequences (Beauty: ~6 targets per window) get ~64 windows, so
    an epoch takes enough steps (fewer, larger steps learned less per epoch on
    Beauty; benchmarks/README.md); long ones (MovieLens) get 32 full windows."""
    return int(min(256, max(32, round(TARGETS_PER_BATCH / max(targets_per_window, 1e-9)))))


def windows(encoded: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut (L, 3) sequences into windows of at most ``max_len + 1`` steps from the
    end, consecutive windows sharing one step, so every step after the first is
    a next-item target exactly once. Windows shorter than 2 are dropped."""
    out: list[np.ndarray] = []
    span = max_len + 1
    for e in encoded:
        stop = len(e)
        while stop >= 2:
            out.append(e[max(0, stop - span) : stop])
            stop -= max_len
    return out


def prefixes(encoded: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """One example per next-item target: the prefix ending in it, at most
    ``max_len + 1`` steps (the target and up to ``max_len`` before it)."""
    span = max_len + 1
    return [e[max(0, stop - span) : stop] for e in encoded for stop in range(2, len(e) + 1)]


def _bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50
) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: shuffle, sort within pools of
    ``pool`` batches, cut, shuffle the batches (less padding, same randomness)."""
    perm = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    step = batch_size * pool
    for start in range(0, len(perm), step):
        chunk = perm[start : start + step]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


@dataclass
class Examples:
    """What one epoch reads. ``rows``: the next-item examples (windows or
    prefixes); ``side``: what the other tasks read (the windows: each user's
    sequence once, however many prefixes it has)."""

    rows: list[np.ndarray]
    lengths: np.ndarray  # (n,) steps per row
    targets: int  # next-item targets per epoch
    side: list[np.ndarray]
    side_lengths: np.ndarray

    def epoch(
        self, batch_size: int, rng: np.random.Generator
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Shuffled (row indices, side indices or None) per optimizer step. With
        prefixes the windows are spread over the same number of steps, so the
        other tasks also see every user once per epoch."""
        batches = _bucketed_batches(self.lengths, batch_size, rng)
        if self.side is self.rows:
            return [(idx, None) for idx in batches]
        per_step = max(1, math.ceil(len(self.side) / max(len(batches), 1)))
        side = _bucketed_batches(self.side_lengths, per_step, rng)
        return [(idx, side[i] if i < len(side) else None) for i, idx in enumerate(batches)]


def training_examples(encoded: Sequence[np.ndarray], config: OfflineConfig) -> Examples:
    """The training part of whole encoded sequences (all but the last two
    steps) cut per ``config.examples``."""
    train = [e[:-2] for e in encoded]
    max_len = config.model.max_len
    side = windows(train, max_len)
    side_lengths = np.array([len(x) for x in side])
    if config.examples == "prefixes":
        rows = prefixes(train, max_len)
        return Examples(rows, np.array([len(x) for x in rows]), len(rows), side, side_lengths)
    return Examples(side, side_lengths, int((side_lengths - 1).sum()), side, side_lengths)


def train_step(
    trainer: Trainer, batch: Batch, config: OfflineConfig, side: Batch | None = None
) -> dict[str, float]:
    """One optimizer step; returns the loss parts. Windows: every task on
    ``batch``. Prefixes: next-item at the last step of each row of ``batch``,
    the other tasks on the windows in ``side``."""
    encoder, n_valid, w = trainer.encoder, len(trainer.items), trainer.weights
    if config.examples == "windows":
        loss, parts = total_loss(encoder, batch, n_valid, w, trainer.generator)
    else:
        next_only = LossWeights(next=w.next, softmax=w.softmax)
        loss, parts = total_loss(encoder, batch, n_valid, next_only, last_only=True)
        if side is not None:  # total_loss skips the tasks whose weight is 0
            others = dataclasses.replace(w, next=0.0)
            side_loss, side_parts = total_loss(encoder, side, n_valid, others, trainer.generator)
            loss = loss + side_loss
            parts = {**side_parts, "next": parts["next"], "loss": float(loss.detach())}
    trainer.step(loss)
    return parts


def _evaluated(average: WeightAverage | None, encoder: nn.Module):
    """The weights that are evaluated and saved: the average when one is kept."""
    return average.applied(encoder) if average is not None else contextlib.nullcontext()


def _make_trainer(split: LeaveOneOut, model: ModelSettings) -> Trainer:
    catalogue = split.items()
    m = model.replace(
        item_min_count=1,  # every item of the data set gets its own row
        item_capacity_max=max(model.item_capacity_max, len(catalogue)),
    )
    rows = ItemVocab(1, m.item_capacity_max).first_item_row + len(catalogue)
    trainer = Trainer(m, config=encoder_config(m, rows))
    trainer.items.observe_many(catalogue)
    trainer.behaviors.observe_many(sorted({b.behavior for seq in split.full for b in seq}))
    trainer.observe_many([])  # grows the table if the layout ever needs more rows
    return trainer


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ("loss", "next", "mlm", "contrastive", "future", "bag"):
        if any(key in h for h in history):
            a.plot(epochs, [h.get(key, math.nan) for h in history], label=key)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    a.legend()
    for key in ("valid_HR@10", "valid_NDCG@10"):
        b.plot(epochs, [h.get(key, math.nan) for h in history], marker=".", label=key)
    b.set_xlabel("epoch")
    b.set_ylabel("validation")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve_config(config: OfflineConfig, train_lengths: Sequence[int]) -> OfflineConfig:
    """``config`` with what is left to the data derived from the training sequence
    lengths: dropout (when in ``config.derive``) and ``examples`` (when None).
    The batch size needs the examples, so :func:`train_offline` derives it."""
    if "dropout" in config.derive:
        config = config.with_model(dropout=derive_dropout(train_lengths))
    if config.examples is None:
        config = config.replace(examples=derive_examples(train_lengths, config.model.next_weight))
    return config


def train_offline(
    split: LeaveOneOut,
    config: OfflineConfig = OfflineConfig(),
    out_dir: str | Path = "benchmarks/out/train",
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on ``split.train`` with early stopping on validation NDCG@10.

    Writes to ``out_dir``: the best checkpoint (``ckpt-*.pt`` + ``latest``),
    ``train_log.json`` (config, data properties, per-epoch history) and
    ``curves.png``. Returns the :class:`TrainResult`; the checkpoint's trainer
    is restored with ``Trainer.load``. Torch's global RNG (dropout) is seeded
    with ``config.model.seed`` for the run and restored after, so a run is
    reproducible on the same machine.
    """
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.model.seed)
        return _train_offline(split, config, out_dir, progress, on_epoch)


def _train_offline(
    split: LeaveOneOut,
    config: OfflineConfig,
    out_dir: str | Path,
    progress: bool,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> TrainResult:
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_lengths = split.train_lengths
    config = resolve_config(config, train_lengths)
    data = {
        "users": len(split),
        "items": len(split.items()),
        "interactions": int(sum(len(s) for s in split.full)),
        "median_train_len": float(np.median(train_lengths)) if train_lengths else 0.0,
        "mean_train_len": float(np.mean(train_lengths)) if train_lengths else 0.0,
    }
    trainer = _make_trainer(split, config.model)
    encoded = encode_many(trainer, split.full)  # (n_u, 3) each: the whole sequence
    examples = training_examples(encoded, config)
    data["train_windows"] = len(examples.side)
    data["train_examples"] = len(examples.rows)  # windows or prefixes
    data["train_targets"] = examples.targets
    if "train_batch_size" in config.derive:
        per_example = data["train_targets"] / max(len(examples.rows), 1)
        config = config.with_model(train_batch_size=derive_batch_size(per_example))
    batch_size = config.model.train_batch_size
    result = TrainResult(config, data, best_epoch=0, best_valid={})
    LOG.info("offline training: %s, dropout %.2f, batch %d", data, config.model.dropout, batch_size)

    rng = np.random.default_rng(config.model.seed)
    device = trainer.device
    encoder = trainer.encoder
    average = WeightAverage(encoder, config.ema_decay) if config.ema_decay else None
    best = -math.inf
    bar = tqdm(range(1, config.max_epochs + 1), desc="epochs", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        encoder.train()
        sums: dict[str, float] = {}
        batches = examples.epoch(batch_size, rng)
        for idx, side_idx in batches:
            batch = collate([examples.rows[i] for i in idx]).to(device)
            side = None
            if side_idx is not None:
                side = collate([examples.side[i] for i in side_idx]).to(device)
            parts = train_step(trainer, batch, config, side)
            if average is not None:
                average.update(encoder)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        train_s = time.perf_counter() - t0
        with _evaluated(average, encoder):
            valid = evaluate_split(
                trainer, split, "valid", batch_size=config.eval_batch_size, encoded=encoded
            )
        row = {"epoch": epoch, **{k: v / len(batches) for k, v in sums.items()}}
        row.update({f"valid_{k}": v for k, v in valid.items()})
        row["lr"] = trainer.optimizer.param_groups[0]["lr"]
        row["train_s"] = train_s
        row["valid_s"] = time.perf_counter() - t0 - train_s
        row["windows_per_s"] = len(examples.side) / train_s
        row["examples_per_s"] = len(examples.rows) / train_s
        row["targets_per_s"] = data["train_targets"] / train_s
        result.history.append(row)
        if valid[SELECT_ON] > best or config.select == "last":
            best = valid[SELECT_ON]  # the kept checkpoint's
            result.best_epoch, result.best_valid = epoch, valid
            trainer.version = epoch
            trainer.last_loss = row.get("loss", math.nan)
            with _evaluated(average, encoder):
                path = trainer.save(
                    out, keep=1, extra={"offline": {"epoch": epoch, "valid": valid}}
                )
            result.checkpoint = str(path)
        bar.set_postfix(loss=f"{row.get('loss', math.nan):.3f}", ndcg10=f"{valid[SELECT_ON]:.4f}",
                        best=f"{best:.4f}@{result.best_epoch}")  # fmt: skip
        LOG.info(
            "epoch %d: loss %.4f, valid NDCG@10 %.4f HR@10 %.4f (best %.4f @ %d), %.1fs train, %.1fs valid",
            epoch, row.get("loss", math.nan), valid["NDCG@10"], valid["HR@10"], best,
            result.best_epoch, train_s, row["valid_s"],
        )  # fmt: skip
        result.seconds = time.perf_counter() - t_start
        if on_epoch is not None:
            on_epoch(row)
        (out / "train_log.json").write_text(json.dumps(result.to_json(), indent=2))
        stale = epoch - result.best_epoch  # always 0 with select="last"
        if stale and config.lr_patience and stale % config.lr_patience == 0:
            for group in trainer.optimizer.param_groups:
                group["lr"] *= config.lr_decay
            LOG.info("no better valid %s for %d epochs: lr -> %.2e", SELECT_ON, stale,
                     trainer.optimizer.param_groups[0]["lr"])  # fmt: skip
        if stale >= config.patience:
            result.stopped = f"no better valid {SELECT_ON} for {config.patience} epochs"
            break
        if config.max_minutes is not None and result.seconds > 60 * config.max_minutes:
            result.stopped = f"wall-clock budget of {config.max_minutes} min reached"
            break
    else:
        result.stopped = f"max_epochs={config.max_epochs} reached"
    bar.close()
    result.seconds = time.perf_counter() - t_start
    (out / "train_log.json").write_text(json.dumps(result.to_json(), indent=2))
    _plot(result.history, out / "curves.png")
    kept = "best" if config.select == "valid" else "last"
    LOG.info("%s epoch %d (valid %s %.4f) after %.0fs: %s", kept, result.best_epoch, SELECT_ON,
             best, result.seconds, result.stopped)  # fmt: skip
    return result
