"""Offline training over epochs: the SAME encoder and losses as the live worker.

:func:`train_offline` builds a :class:`~model.trainer.Trainer` whose vocabulary
holds every item of the data set, then trains the self-supervised objective
(next-behavior + masked behavior + contrastive, weights in
:class:`OfflineConfig`) on every prefix of each user's training sequence,
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

The weights' moving average (``ema_decay``; :mod:`model.averaging`) is what is
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
from torch import nn

from model.averaging import WeightAverage
from model.batching import Batch, collate
from model.evaluate import encode_many, evaluate_split
from model.split import LeaveOneOut
from model.tasks import LossWeights, total_loss

__all__ = [
    "OfflineConfig",
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


@dataclass(frozen=True)
class OfflineConfig:
    max_epochs: int = 200
    patience: int = 10  # epochs without a better valid NDCG@10 before stopping
    lr_patience: int = 3  # epochs without a better valid NDCG@10 before the lr is cut
    lr_decay: float = 0.5  # factor applied to the learning rate at each cut
    batch_size: int | None = None  # windows per step; None: derived (derive_batch_size)
    learning_rate: float = 1e-3
    max_len: int = 50
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float | None = None  # None: derived from the data (derive_dropout)
    lowpass_alpha: float = 0.7  # share of the low-pass branch beside attention (MixerBlock)
    lowpass_window: int = 10
    post_norm: bool = True
    positions: str = "relative"  # or "absolute" (EncoderConfig.positions)
    weight_decay: float = 0.0
    # evaluate and keep an exponential moving average of the weights (model.averaging);
    # 0 = the raw weights
    ema_decay: float = 0.999
    next_weight: float = 1.0
    mlm_weight: float = 0.1
    contrastive_weight: float = 0.05
    future_weight: float = 0.0  # dense all-action: a random later item (model.tasks)
    bag_weight: float = 0.0  # the pooled user state predicts every item of the window
    item_bag_weight: float = 0.0  # profile vector (own item table) predicts hidden items
    # "windows": next-item loss at every step of each window, other tasks on the windows;
    # "prefixes": one example per target (the prefix ending in it), next-item loss at its
    # last step only (the FMLP-Rec / BSARec / RecBole regime), the other tasks on the
    # windows in the same steps (on Beauty ~2x the epoch time of windows, next-item alone);
    # None: derived from the data (derive_examples)
    examples: str | None = None
    seed: int = 0
    eval_batch_size: int = 1024
    max_minutes: float | None = None  # wall-clock budget; stops after the epoch that passes it
    # "valid": keep the epoch with the best valid NDCG@10 (early stop, lr cuts); "last": keep
    # the last epoch of a fixed budget (representations for other tasks, e.g. profiles, where
    # next-item NDCG is not what is wanted and labels must not choose)
    select: str = "valid"


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
        out["config"] = dataclasses.asdict(self.config)
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
    windows. Short sequences (Beauty: ~6 targets per window) get ~64 windows, so
    an epoch takes enough steps; long ones (MovieLens) get 32 full windows.
    Measured on Beauty: 64 windows reach valid NDCG@10 0.0123 after one epoch,
    256 windows 0.0092 (and 0.0087 at lr 3e-3), for the same epoch time."""
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
    side = windows(train, config.max_len)
    side_lengths = np.array([len(x) for x in side])
    if config.examples == "prefixes":
        rows = prefixes(train, config.max_len)
        return Examples(rows, np.array([len(x) for x in rows]), len(rows), side, side_lengths)
    return Examples(side, side_lengths, int((side_lengths - 1).sum()), side, side_lengths)


def train_step(
    trainer: Any, batch: Batch, config: OfflineConfig, side: Batch | None = None
) -> dict[str, float]:
    """One optimizer step; returns the loss parts. Windows: every task on
    ``batch``. Prefixes: next-item at the last step of each row of ``batch``,
    the other tasks on the windows in ``side``."""
    encoder, n_valid, w = trainer.encoder, len(trainer.items), trainer.weights
    if config.examples == "windows":
        loss, parts = total_loss(encoder, batch, n_valid, w, trainer.generator)
    else:
        next_only = LossWeights(mlm=0.0, next=w.next, contrastive=0.0)
        loss, parts = total_loss(encoder, batch, n_valid, next_only, last_only=True)
        if side is not None:  # total_loss skips the tasks whose weight is 0
            others = dataclasses.replace(w, next=0.0)
            side_loss, side_parts = total_loss(encoder, side, n_valid, others, trainer.generator)
            loss = loss + side_loss
            parts = {**side_parts, "next": parts["next"], "loss": float(loss.detach())}
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    encoder.clip_gradients(1.0)
    trainer.optimizer.step()
    return parts


def _evaluated(average: WeightAverage | None, encoder: nn.Module):
    """The weights that are evaluated and saved: the average when one is kept."""
    return average.applied(encoder) if average is not None else contextlib.nullcontext()


def _make_trainer(split: LeaveOneOut, config: OfflineConfig, settings: Any, out_dir: Path):
    from model.trainer import Trainer, encoder_config
    from model.vocab import ItemVocab

    catalogue = split.items()
    s = settings.model_copy(
        update={
            "max_len": config.max_len,
            "sequence_length": max(settings.sequence_length, config.max_len),
            "hidden_size": config.hidden,
            "num_layers": config.layers,
            "num_heads": config.heads,
            "dropout": float(config.dropout or 0.0),
            "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay,
            "lowpass_alpha": config.lowpass_alpha,
            "lowpass_window": config.lowpass_window,
            "post_norm": config.post_norm,
            "positions": config.positions,
            "train_batch_size": config.batch_size or settings.train_batch_size,
            "mlm_weight": config.mlm_weight,
            "next_weight": config.next_weight,
            "contrastive_weight": config.contrastive_weight,
            "future_weight": config.future_weight,
            "bag_weight": config.bag_weight,
            "item_bag_weight": config.item_bag_weight,
            "item_min_count": 1,  # every item of the data set gets its own row
            "item_capacity_max": max(settings.item_capacity_max, len(catalogue)),
            "keep_checkpoints": 1,
            "seed": config.seed,
            "data_dir": out_dir,
        }
    )
    rows = ItemVocab(1, s.item_capacity_max).first_item_row + len(catalogue)
    enc = encoder_config(s, rows)
    trainer = Trainer(s, config=enc)
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
    """``config`` with the fields left to the data (dropout, examples) derived from
    the training sequence lengths, and checked."""
    if config.dropout is None:
        config = dataclasses.replace(config, dropout=derive_dropout(train_lengths))
    if config.examples is None:
        config = dataclasses.replace(
            config, examples=derive_examples(train_lengths, config.next_weight)
        )
    if config.examples not in ("windows", "prefixes"):
        raise ValueError(
            f"OfflineConfig.examples must be 'windows' or 'prefixes', not {config.examples!r}"
        )
    if config.examples == "prefixes" and not config.next_weight:
        raise ValueError(
            "examples='prefixes' feeds the prefixes to the next-item task only, and its weight "
            "is 0: use examples='windows' (--examples windows) to train without it"
        )
    return config


def train_offline(
    split: LeaveOneOut,
    config: OfflineConfig = OfflineConfig(),
    out_dir: str | Path = "benchmarks/out/train",
    settings: Any = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train on ``split.train`` with early stopping on validation NDCG@10.

    Writes to ``out_dir``: the best checkpoint (``ckpt-*.pt`` + ``latest``),
    ``train_log.json`` (config, data properties, per-epoch history) and
    ``curves.png``. Returns the :class:`TrainResult`; the checkpoint's trainer
    is restored with ``Trainer.load``.
    """
    from tqdm import tqdm

    if config.select not in ("valid", "last"):
        raise ValueError(f"OfflineConfig.select must be 'valid' or 'last', not {config.select!r}")
    if settings is None:
        from userstream.settings import Settings

        settings = Settings()
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
    trainer = _make_trainer(split, config, settings, out)
    encoded = encode_many(trainer, split.full)  # (n_u, 3) each: the whole sequence
    examples = training_examples(encoded, config)
    data["train_windows"] = len(examples.side)
    data["train_examples"] = len(examples.rows)  # windows or prefixes
    data["train_targets"] = examples.targets
    if config.batch_size is None:
        per_example = data["train_targets"] / max(len(examples.rows), 1)
        config = dataclasses.replace(config, batch_size=derive_batch_size(per_example))
    result = TrainResult(config, data, best_epoch=0, best_valid={})
    LOG.info(
        "offline training: %s, dropout %.2f, batch %d", data, config.dropout, config.batch_size
    )

    rng = np.random.default_rng(config.seed)
    device = trainer.device
    encoder = trainer.encoder
    average = WeightAverage(encoder, config.ema_decay) if config.ema_decay else None
    best = -math.inf
    bar = tqdm(range(1, config.max_epochs + 1), desc="epochs", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        encoder.train()
        sums: dict[str, float] = {}
        batches = examples.epoch(config.batch_size, rng)
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
                path = trainer.save(out, extra={"offline": {"epoch": epoch, "valid": valid}})
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
