"""A warm start for the prequential loop: the encoder trained OFFLINE on a recorded
backlog (the first events of the stream) before the stream starts.

:func:`train_backlog` turns the backlog into per-user sequences, trains the same
encoder with the run's own model settings (architecture, losses, learning rate,
dropout; the batch size derived from the data, as ``userstream train`` does) by
:func:`model.offline.train.train_offline` (every user's last two backlog events
held out for model selection, as PROTOCOL section 1 splits), and returns the
best checkpoint. A backlog's validation split is small and noisy, so the
learning rate is never cut and only :data:`PATIENCE` epochs without a better
validation NDCG@10 stop it (the time budget usually stops it first): the
offline defaults stopped training after a few dozen steps and left a checkpoint
below popularity (benchmarks/README.md, session 14). ``bench prequential
--warm-start`` then replays the whole stream with that checkpoint as the live
model's start and as ``frozen``, the backlog applied but never scored
(:class:`~model.prequential.loop.PrequentialConfig` ``backlog``/``warm_start``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model.checkpoint import latest_checkpoint
from model.offline.datasets import sequences_from_events
from model.offline.split import leave_one_out
from model.offline.train import train_offline
from userstream.settings import ModelSettings, OfflineConfig

__all__ = ["backlog_events", "train_backlog"]

LOG = logging.getLogger(__name__)

PATIENCE = 50  # epochs without a better validation NDCG@10 before training stops


def backlog_events(fraction: float, n_events: int) -> int:
    """Events in the backlog: ``fraction`` (< 1) of ``n_events``, or a count."""
    if fraction < 0:
        raise ValueError(
            f"a backlog of {fraction} events: expected a fraction in (0, 1) or a count"
        )
    n = int(fraction * n_events) if fraction < 1 else int(fraction)
    if not 0 < n < n_events:
        raise ValueError(
            f"a backlog of {n} of {n_events} events leaves nothing to train on or to score: "
            "give a fraction in (0, 1) or a count below the stream's length"
        )
    return n


def train_backlog(
    events: Sequence[Mapping[str, Any]],
    settings: ModelSettings,
    out_dir: str | Path,
    max_minutes: float | None = None,
    max_epochs: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train the encoder of ``settings`` offline on ``events`` (timestamp order);
    returns (the best checkpoint, the training summary)."""
    split = leave_one_out(sequences_from_events(events))
    if not len(split):
        raise ValueError(
            f"the backlog ({len(events)} events) has no user with three events: nothing to "
            "train a warm start on; give a longer backlog"
        )
    model = settings.model_settings()
    extra: dict[str, Any] = {"derive": frozenset({"train_batch_size"}), "max_minutes": max_minutes,
                             "patience": PATIENCE, "lr_patience": 0}  # fmt: skip
    if max_epochs is not None:
        extra["max_epochs"] = max_epochs
    config = OfflineConfig(model=model, **extra)
    LOG.info("warm start: training on a backlog of %d events (%d users)", len(events), len(split))
    result = train_offline(split, config, out_dir)
    path = latest_checkpoint(out_dir)
    if path is None:
        raise RuntimeError(f"offline training on the backlog wrote no checkpoint in {out_dir}")
    summary = {
        "backlog_events": len(events),
        "users": len(split),
        "best_epoch": result.best_epoch,
        "best_valid": result.best_valid,
        "epochs": len(result.history),
        "seconds": result.seconds,
        "stopped": result.stopped,
        "checkpoint": str(path),
    }
    return path, summary
