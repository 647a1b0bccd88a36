"""The training worker: a thin loop around :class:`~model.trainer.Trainer`.

One cycle (:meth:`TrainingWorker.run_cycle`):

1. take the dirty users (changed since the last cycle) and read their sequences;
2. train on them plus a replay sample of older users (a reservoir, Algorithm R),
   so the model does not forget users who are quiet right now
   (:mod:`model.live.reservoir`);
3. feed the cycle's loss to the :class:`~model.live.drift.DriftMonitor` (ADWIN): a
   significant rise is a drift, counted and answered by a catch-up cycle
   (``catchup_factor`` x the usual steps) next time;
4. expire items unseen for ``item_ttl_s`` of event time (and the least recently
   seen beyond ``item_live_max``): their rows are freed for the next new items
   (:meth:`Trainer.expire_items`), and the table is compacted when most of it
   is free (:meth:`Trainer.compact_items`), so an endless stream of new items
   keeps memory and checkpoints bounded;
5. write a versioned checkpoint (with the reservoir and the drift count);
6. hand the new weights to the :class:`~model.live.embedder.Embedder` with the
   users to re-embed (the cycle's users plus up to ``refresh_budget`` others,
   round robin over all users), and trim the update feed to what live followers
   still need. The embedder publishes the model info once they are written.

Embedding is not the cycle's job: the embedder, a thread beside the training
loop, embeds every changed user with the newest weights within a moment of its
event (``embed_poll_s``), however long a cycle takes; the cycle only decides
when the weights change. Without the thread (tests, the prequential loop) the
cycle drains the embedder itself.

The dirty users a cycle takes are *claimed* (moved to a claimed set in the
same step, :meth:`SequenceStore.take_dirty`) and released once the cycle is
done: a cycle that raises puts them back at once; one that never finished
(SIGKILL, a hung Redis, a stop) leaves them claimed, and :meth:`run_forever`
puts every claimed user back when it starts and after a failed cycle. The
embedder claims its own queue the same way. A stop (SIGTERM) interrupts a
cycle between optimizer steps.
:meth:`run_forever` runs a cycle every ``train_interval_s`` or as soon as
``train_every_events`` new events were ingested, whichever comes first.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import latest_checkpoint
from model.live.drift import DriftMonitor
from model.live.embedder import Embedder
from model.live.metrics import TrainMetrics
from model.live.reservoir import Reservoir
from model.trainer import Interrupted, Trainer
from userstream.logs import configure_logging
from userstream.metrics import serve_registry
from userstream.settings import Settings
from userstream.stores import (
    EmbeddingStore,
    ModelInfo,
    RedisEmbeddingStore,
    RedisSequenceStore,
    SequenceStore,
    connect_settings,
    parse_stream_id,
)
from userstream.types import Keys

__all__ = ["CycleReport", "TrainingWorker", "load_trainer", "main"]

LOG = logging.getLogger(__name__)

MAX_DIRTY_PER_CYCLE = 50_000
POLL_S = 0.2
ERROR_BACKOFF_S = 5.0
REDIS_TIMEOUT_S = 30.0
EMBEDDER_JOIN_S = 10.0  # a stop waits this long for the embedder's current batch


@dataclass(frozen=True)
class CycleReport:
    version: int  # model version after the cycle (unchanged when nothing ran)
    dirty_users: int  # users taken from the dirty set and trained on
    replay_users: int  # older users replayed from the reservoir
    embedded_users: int  # users handed to the embedder (embedded, in one-thread mode)
    loss: float
    train_s: float
    embed_s: float
    total_s: float
    checkpoint: str = ""
    # the item table after the cycle (Trainer.item_stats): items with a row of their
    # own, free rows, rows allocated; items expired by this cycle and ever
    items_live: int = 0
    item_rows_free: int = 0
    item_rows: int = 0
    items_expired: int = 0
    items_expired_total: int = 0
    # parts of the cycle (train_s includes checkpoint_s) and the optimizer steps taken
    claim_s: float = 0.0
    checkpoint_s: float = 0.0
    steps: int = 0

    @property
    def ran(self) -> bool:
        return self.dirty_users > 0


class TrainingWorker:
    def __init__(
        self,
        settings: Settings,
        sequences: SequenceStore,
        embeddings: EmbeddingStore,
        trainer: Trainer | None = None,
        max_dirty: int = MAX_DIRTY_PER_CYCLE,
        drift: DriftMonitor | None = None,
        metrics: TrainMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.sequences = sequences
        self.embeddings = embeddings
        self.trainer = trainer or Trainer(settings)
        self.max_dirty = max_dirty
        self.reservoir = Reservoir(settings.reservoir_size, settings.seed)
        if "reservoir" in self.trainer.extra:
            self.reservoir.load_state_dict(self.trainer.extra["reservoir"])
        self.drift = drift if drift is not None else DriftMonitor()
        self.drift.count = max(self.drift.count, int(self.trainer.extra.get("drifts", 0)))
        self._refresh_iter: Iterator[str] | None = None
        self.metrics = metrics or TrainMetrics()  # model.live.metrics
        self.embedder = Embedder(settings, sequences, embeddings, self.trainer.snapshot(),
                                 metrics=self.metrics)  # fmt: skip
        self.polls = 0  # checks of the cadence by run_forever (tests wait on it)
        self.failed_cycles = 0  # cycles (or cadence checks) that raised in run_forever
        self._stop: threading.Event | None = None  # set by run_forever
        self._observe_state()

    # --- one cycle -----------------------------------------------------------
    def run_cycle(self) -> CycleReport:
        t0 = time.perf_counter()
        forgotten = self._drop_forgotten()
        dirty = self.sequences.take_dirty(self.max_dirty)
        if not dirty:
            self._checkpoint_forgotten(forgotten)
            return self._idle_report()
        try:
            report = self._cycle(dirty, t0)
        except BaseException as exc:
            if isinstance(exc, Interrupted):
                LOG.info(
                    "cycle interrupted (%s); %d users go back to the dirty set", exc, len(dirty)
                )
            else:
                LOG.exception("cycle failed; %d users go back to the dirty set", len(dirty))
            self.sequences.mark_dirty(dirty)
            self.sequences.release_claimed(dirty)
            raise
        self.sequences.release_claimed(dirty)
        self._checkpoint_forgotten(forgotten)
        return report

    def _drop_forgotten(self) -> dict[str, float]:
        """Users forgotten since the last cycle (``SequenceStore.forgotten``, see
        userstream/stores/forget.py) leave the reservoir and the embedder's refresh;
        an embedding that an in-flight embedder batch wrote back after the erase is
        erased again (unless the user has a new history since). Returns the markers."""
        marks = self.sequences.forgotten()
        if not marks:
            return marks
        users = sorted(marks)
        dropped = self.reservoir.remove_many(users)
        self.embedder.forget_many(users)
        for u, seq in zip(users, self.sequences.read_many(users), strict=True):
            if not seq and self.embeddings.lookup(u) != (None, None):
                LOG.warning("a forgotten user's embedding was written back; erasing it again")
                self.embeddings.forget(u)
        LOG.info("%d forgotten users: %d were in the reservoir", len(users), dropped)
        return marks

    def _checkpoint_forgotten(self, marks: dict[str, float]) -> None:
        """After forgetting: the current version's checkpoint written again without
        them and the older files deleted (they hold the old reservoir); then their
        markers are cleared."""
        if not marks:
            return
        folder = self.settings.checkpoint_dir
        if self.trainer.version > 0 and latest_checkpoint(folder) is not None:
            self.trainer.save(folder, keep=1, extra=self._extra())
        self.sequences.clear_forgotten(marks, before=max(marks.values()))

    def _extra(self) -> dict:
        return {"reservoir": self.reservoir.state_dict(), "drifts": self.drift.count}

    def _announce_loaded(self) -> None:
        """A checkpoint newer than the published model info (the last run stopped
        before its refresh was done): publish it once a refresh is written."""
        info = self.embeddings.model_info()
        path = latest_checkpoint(self.settings.checkpoint_dir)
        t = self.trainer
        if path is None or t.version == 0 or (info is not None and info.version >= t.version):
            return
        LOG.info("v%d was not published yet: refreshing with it", t.version)
        refresh = self._refresh_users(self.settings.refresh_budget, exclude=set())
        self.embedder.publish(t.snapshot(), self._model_info(path), refresh)

    def _model_info(self, checkpoint: Path) -> ModelInfo:
        """What the API reads about the trainer's current version (its checkpoint)."""
        t = self.trainer
        return ModelInfo(t.version, str(checkpoint), t.items.num_admitted, time.time(),
                         t.last_loss, drifts=self.drift.count)  # fmt: skip

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _cycle(self, dirty: list[str], t0: float) -> CycleReport:
        s = self.settings
        dirty_seqs = self.sequences.read_many(dirty)
        kept = [(u, q) for u, q in zip(dirty, dirty_seqs, strict=True) if q]
        dirty_set = set(dirty)
        steps = self.drift.catchup_steps(s.train_steps)  # more steps right after a drift
        # replay: replay_ratio older users per dirty one, and (replay_fill) at least
        # enough to fill one batch (K steps on a lone dirty user would fit the model to
        # it), bounded by what K steps can use. Without the fill a cycle costs what its
        # dirty users bring: on a prequential stream the fill memorises the small early
        # reservoir and costs 3-4x the time (benchmarks/README.md, sessions 10 and 13)
        wanted = round(s.replay_ratio * len(kept))
        if s.replay_fill:
            wanted = max(wanted, s.train_batch_size - len(kept))
        n_replay = min(wanted, steps * s.train_batch_size)
        replay = self.reservoir.sample(n_replay, exclude=dirty_set)
        replay_seqs = [q for q in self.sequences.read_many(replay) if q]
        self.reservoir.add_many([u for u, _ in kept])
        if not kept:  # users whose sequences vanished: nothing to learn
            return self._idle_report()

        t_train = time.perf_counter()
        claim_s = t_train - t0
        stats = self.trainer.learn_many(
            [q for _, q in kept] + replay_seqs, steps=steps, should_stop=self._stopping
        )
        self.drift.update("loss", stats["loss"])
        expired = self.trainer.expire_items()
        self.trainer.compact_items()
        t_checkpoint = time.perf_counter()
        path = self.trainer.save(
            s.checkpoint_dir,
            keep=s.keep_checkpoints,
            extra=self._extra(),
        )
        train_s = time.perf_counter() - t_train
        checkpoint_s = time.perf_counter() - t_checkpoint

        t_embed = time.perf_counter()
        version = self.trainer.version
        info = self._model_info(path)
        # the embedder re-embeds the cycle's users and a round robin of the others
        # with the new weights, then publishes the info; changed users come first
        refresh = [u for u, _ in kept] + self._refresh_users(s.refresh_budget, exclude=dirty_set)
        threaded = self.embedder.running
        with self.trainer.averaged():  # the weights served: their moving average, if any
            self.embedder.publish(self.trainer.snapshot(frozen=threaded), info, refresh)
            n = len(refresh)
            if not threaded:  # one thread (tests, the prequential loop): no copy, embed now
                n = self.embedder.drain()
        self._trim_feed()
        embed_s = time.perf_counter() - t_embed
        report = CycleReport(
            version=version,
            dirty_users=len(kept),
            replay_users=len(replay_seqs),
            embedded_users=n,
            loss=stats["loss"],
            train_s=train_s,
            embed_s=embed_s,
            total_s=time.perf_counter() - t0,
            checkpoint=str(path),
            items_expired=expired,
            claim_s=claim_s,
            checkpoint_s=checkpoint_s,
            steps=steps,
            **self._item_counts(),
        )
        self._record(report, stats)
        self.metrics.observe_cycle(report, stats)
        self._observe_state()
        LOG.info(
            "cycle v%d: %d dirty + %d replay users, loss %.4f, train %.2fs, total %.2fs; "
            "%d users to re-embed with it; items: %d live, %d expired (%d ever), %d rows free "
            "of %d",
            version, report.dirty_users, report.replay_users, report.loss, train_s,
            report.total_s, n, report.items_live, expired, report.items_expired_total,
            report.item_rows_free, report.item_rows,
        )  # fmt: skip
        return report

    def _record(self, report: CycleReport, losses: dict[str, float]) -> None:
        """The cycle into the training history (the status page's loss curves);
        a Redis error here costs the history one point, never the cycle."""
        record = {"version": report.version, "at": time.time(), "train_s": report.train_s,
                  "total_s": report.total_s, "dirty_users": report.dirty_users,
                  "replay_users": report.replay_users, "items_live": report.items_live}  # fmt: skip
        record.update({("loss" if k == "loss" else f"loss_{k}"): v for k, v in losses.items()
                       if k != "seconds"})  # fmt: skip
        try:
            self.embeddings.append_cycle(record)
        except Exception as exc:  # noqa: BLE001 - history only
            LOG.warning("could not record cycle v%d in the history: %r", report.version, exc)

    def _trim_feed(self) -> None:
        """Keep the feed entries some live follower has not applied yet, and
        nothing older than ``feed_retention_s`` (a follower that far behind, or
        silent that long, rebuilds from the embeddings)."""
        now = time.time()
        keep = self.settings.feed_retention_s
        floor = (int((now - keep) * 1000), 0)
        live = [
            parse_stream_id(i) for i, at in self.embeddings.followers().values() if now - at <= keep
        ]
        if live:
            floor = max(floor, min(live))
        self.embeddings.trim_feed("{}-{}".format(*floor))

    def _item_counts(self) -> dict[str, int]:
        st = self.trainer.item_stats()
        return {k: st[k] for k in ("items_live", "item_rows_free", "item_rows",
                                   "items_expired_total")}  # fmt: skip

    def _observe_state(self) -> None:
        """What the metrics export between cycles: version, drifts, lr, item table."""
        t = self.trainer
        self.metrics.observe_state(version=t.version, drifts=self.drift.count,
                                   learning_rate=t.optimizer.param_groups[0]["lr"],
                                   **self._item_counts())  # fmt: skip

    def _idle_report(self) -> CycleReport:
        return CycleReport(self.trainer.version, 0, 0, 0, self.trainer.last_loss, 0.0, 0.0, 0.0,
                           **self._item_counts())  # fmt: skip

    def _refresh_users(self, budget: int, exclude: set[str]) -> list[str]:
        """Up to ``budget`` users not in ``exclude``, continuing a round robin over
        all users (restarted at most once per call, so nobody comes twice)."""
        picked: dict[str, None] = {}
        fresh = False  # the iterator was (re)started during this call
        while len(picked) < budget:
            if self._refresh_iter is None:
                self._refresh_iter, fresh = self.sequences.iter_users(), True
            try:
                u = next(self._refresh_iter)
            except StopIteration:
                self._refresh_iter = None
                if fresh:
                    break
                continue
            if u not in exclude:
                picked[u] = None
        return list(picked)

    # --- loop ------------------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        """Run cycles until ``stop`` is set: every ``train_interval_s``, or sooner
        once ``train_every_events`` new events were ingested. Polls every 0.2 s."""
        s = self.settings
        self._stop = stop
        last_t = -float("inf")  # run at once: clear any backlog left by a restart
        last_events = 0
        LOG.info("training worker started (v%d)", self.trainer.version)
        self.embedder.start(stop)
        requeue = True  # claims of a cycle that never finished go back first
        announced = False
        while not stop.is_set():
            try:
                if requeue:
                    n = self.sequences.requeue_claimed()
                    if n:
                        LOG.warning("%d users claimed by an unfinished cycle are dirty again", n)
                    if not announced:
                        self._announce_loaded()
                        announced = True
                    requeue = False
                events = self.sequences.counters()["events_ingested"]
                due = time.monotonic() - last_t >= s.train_interval_s
                if due or events - last_events >= s.train_every_events:
                    last_t, last_events = time.monotonic(), events
                    self.run_cycle()
            except Interrupted:
                break  # the stop was asked for; the cycle put its users back
            except Exception:
                LOG.exception("training cycle failed; retrying in %.0fs", ERROR_BACKOFF_S)
                self.failed_cycles += 1
                self.metrics.failed_cycles.inc()
                requeue = True  # putting them back may itself have failed (Redis down)
                stop.wait(ERROR_BACKOFF_S)
                continue
            self.polls += 1
            self.metrics.beat("trainer")
            stop.wait(POLL_S)
        self.embedder.join(EMBEDDER_JOIN_S)
        LOG.info("training worker stopped (v%d)", self.trainer.version)


def load_trainer(settings: Settings) -> Trainer:
    """The trainer of the newest checkpoint in ``settings.checkpoint_dir``, else a new one."""
    path = latest_checkpoint(settings.checkpoint_dir)
    return Trainer(settings) if path is None else Trainer.load(path, settings)


def main(settings: Settings | None = None) -> None:
    """Run the training worker against ``settings.effective_redis_url`` until
    SIGTERM/SIGINT. Continues from the latest checkpoint when there is one."""
    settings = settings or Settings()
    if not logging.getLogger().handlers:  # the CLI may have configured logging already
        configure_logging(settings.log_format)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # a hung Redis must fail a cycle (its claims are put back), not hang it forever
    client = connect_settings(settings, socket_timeout=REDIS_TIMEOUT_S,
                     socket_connect_timeout=REDIS_TIMEOUT_S)  # fmt: skip
    keys = Keys.of_settings(settings)
    sequences = RedisSequenceStore(client, keys, settings.sequence_length)
    embeddings = RedisEmbeddingStore(client, keys, settings.update_feed_maxlen)
    worker = TrainingWorker(settings, sequences, embeddings, load_trainer(settings))
    serve_registry(worker.metrics.registry, settings.metrics_host, settings.train_metrics_port,
                   "training worker")  # fmt: skip
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        LOG.info("signal %d: stopping after the current cycle", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run_forever(stop)
    finally:
        client.close()
