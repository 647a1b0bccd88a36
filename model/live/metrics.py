"""The training worker's Prometheus metrics (served on ``TRAIN_METRICS_PORT``).

The worker records each training cycle from its
:class:`~model.live.worker.CycleReport` (:meth:`TrainMetrics.observe_cycle`),
the embedder each batch of changed users it wrote
(:meth:`TrainMetrics.observe_embedded`: the event time -> embedding written
histogram), and both loops beat a heartbeat. Totals that a checkpoint carries
over restarts (drifts detected, items expired) are exported as counters of
their stored values. Every label value comes from a closed set: ``phase`` from
:data:`PHASES`, ``task`` from :data:`TASKS` (``total`` is the weighted sum),
``loop`` from :data:`LOOPS`, ``reason`` from ``changed`` / ``refresh``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from userstream.metrics import new_registry

if TYPE_CHECKING:
    from model.live.worker import CycleReport

__all__ = ["LOOPS", "PHASES", "TASKS", "TrainMetrics"]

PHASES = ("claim", "train", "checkpoint", "embed")
"""Parts of a cycle: take and read the dirty users and the replay sample; the
optimizer steps and item expiry; the checkpoint write; handing the weights to
the embedder and trimming the feed."""
TASKS = ("total", "mlm", "next", "contrastive", "future", "bag", "item_bag")
"""``model.tasks.total_loss``'s parts (``loss`` there is ``total`` here)."""
LOOPS = ("trainer", "embedder")

_CYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# event time -> embedding written: tens of ms when idle, seconds under load, minutes
# behind a backlog; an event replayed with its historical time lands in +Inf
_FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class _Totals(Collector):
    """The values a cycle leaves behind, read at scrape time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            v = dict(self.values)
        yield GaugeMetricFamily(
            "userstream_train_model_version", "Model version of the newest checkpoint",
            value=v.get("version", 0),
        )  # fmt: skip
        yield CounterMetricFamily(
            "userstream_train_drifts_detected",
            "Concept drifts detected (ADWIN on the cycle loss), over the checkpoint's life",
            value=v.get("drifts", 0),
        )
        yield CounterMetricFamily(
            "userstream_train_items_expired",
            "Item rows freed by expiry, over the checkpoint's life",
            value=v.get("items_expired_total", 0),
        )
        for name, key, doc in (
            ("userstream_train_items_live", "items_live", "Items with an embedding row"),
            ("userstream_train_item_rows_free", "item_rows_free", "Freed rows awaiting new items"),
            ("userstream_train_item_rows", "item_rows", "Item rows allocated"),
        ):
            yield GaugeMetricFamily(name, doc, value=v.get(key, 0))
        if "learning_rate" in v:
            yield GaugeMetricFamily(
                "userstream_train_learning_rate", "AdamW learning rate of the encoder",
                value=v["learning_rate"],
            )  # fmt: skip


class TrainMetrics:
    """The registry of one training worker process and what it records."""

    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.cycles = Counter(
            "userstream_train_cycles", "Training cycles that trained and checkpointed",
            registry=r,
        )  # fmt: skip
        self.failed_cycles = Counter(
            "userstream_train_cycle_failures", "Training cycles that raised (retried)",
            registry=r,
        )  # fmt: skip
        self.cycle_seconds = Histogram(
            "userstream_train_cycle_duration_seconds", "Wall time of one training cycle",
            buckets=_CYCLE_BUCKETS, registry=r,
        )  # fmt: skip
        self.phase_seconds = Histogram(
            "userstream_train_cycle_phase_duration_seconds",
            "Wall time of each part of a training cycle",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.steps = Counter("userstream_train_steps", "Optimizer steps taken", registry=r)
        self.users = Counter(
            "userstream_train_users", "Users trained on, by where they came from",
            ["source"], registry=r,
        )  # fmt: skip
        self.loss = Gauge(
            "userstream_train_loss", "Mean loss of the last cycle's steps, per task",
            ["task"], registry=r,
        )  # fmt: skip
        self.embedded = Counter(
            "userstream_embedder_users", "Users embedded, because they changed or to refresh",
            ["reason"], registry=r,
        )  # fmt: skip
        self.embed_failures = Counter(
            "userstream_embedder_failures", "Embedding batches that raised (retried)",
            registry=r,
        )  # fmt: skip
        self.freshness = Histogram(
            "userstream_embedding_freshness_seconds",
            "From a changed user's newest event time to its embedding written",
            buckets=_FRESHNESS_BUCKETS,
            registry=r,
        )
        self.heartbeat = Gauge(
            "userstream_train_heartbeat_timestamp_seconds",
            "Unix time each loop of the training worker last went round",
            ["loop"],
            registry=r,
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        for source in ("dirty", "replay"):
            self.users.labels(source)
        for reason in ("changed", "refresh"):
            self.embedded.labels(reason)
        for loop in LOOPS:
            self.heartbeat.labels(loop).set_to_current_time()
        self._totals = _Totals()
        r.register(self._totals)

    def observe_state(self, **values: float) -> None:
        """Set what :class:`_Totals` exports: ``version``, ``drifts``,
        ``learning_rate``, and the item counts of ``Trainer.item_stats``."""
        with self._totals.lock:
            self._totals.values.update(values)

    def observe_cycle(self, report: CycleReport, losses: Mapping[str, float]) -> None:
        """One cycle that trained; ``losses`` as ``Trainer.learn_many`` returns them.
        The report's ``train_s`` includes its ``checkpoint_s``; the ``train`` phase
        here does not."""
        self.cycles.inc()
        self.cycle_seconds.observe(report.total_s)
        parts = (report.claim_s, report.train_s - report.checkpoint_s, report.checkpoint_s,
                 report.embed_s)  # fmt: skip
        for phase, seconds in zip(PHASES, parts, strict=True):
            self.phase_seconds.labels(phase).observe(max(0.0, seconds))
        self.steps.inc(report.steps)
        self.users.labels("dirty").inc(report.dirty_users)
        self.users.labels("replay").inc(report.replay_users)
        for key, value in losses.items():
            task = "total" if key == "loss" else key
            if task in TASKS and math.isfinite(value):
                self.loss.labels(task).set(value)

    def observe_embedded(
        self, reason: str, event_ts: Iterable[float], now: float | None = None
    ) -> None:
        """Embeddings written for ``reason`` (``changed`` or ``refresh``), with the
        newest event time of each; only changed users say anything about freshness."""
        now = time.time() if now is None else now
        n = 0
        for ts in event_ts:
            n += 1
            if reason == "changed":
                self.freshness.observe(max(0.0, now - ts))
        self.embedded.labels(reason).inc(n)

    def beat(self, loop: str) -> None:
        self.heartbeat.labels(loop).set_to_current_time()
