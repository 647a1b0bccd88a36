"""Prequential (test-then-train) evaluation of the live learner: PROTOCOL section 2.

:func:`run_prequential` replays events in timestamp order through the SAME
code path as the live system, in one process:

* events are validated by ``stream.events.validate_event`` (what the stream
  worker does) and appended, one at a time with increasing offsets, to a
  :class:`~model.memory_stores.MemorySequenceStore` (SequenceStore's
  semantics in dicts; see that module for why not Redis). That is the default
  :class:`MemoryFeed`; :class:`model.prequential_kafka.KafkaFeed` sends the
  same events through the real broker, stream worker and Redis instead
  (``bench prequential --via-kafka``), so the two can be compared;
* an unchanged :class:`~model.worker.TrainingWorker` runs a cycle (dirty users
  + reservoir replay, ``train_steps`` optimizer steps, checkpoint, re-embed)
  whenever ``run_forever`` would: ``train_interval_s`` seconds of STREAM time
  or ``train_every_events`` ingested events since the last cycle, checked
  before every event (the live worker checks every 0.2 s of wall time);
* the incremental model's prediction for event t uses the encoder as the last
  completed cycle left it and the user's sequence in the store just before t;
  cycles are instantaneous in stream time (the live delay is the cadence plus
  the cycle's wall time, seconds, small against these streams' gaps).

For each event (u, i, t) whose user has an earlier event, every model FIRST
ranks all items that occurred in the stream before t (the user's earlier items
excluded; expected-value tie handling, see :mod:`model.ranking`), THEN the event
reaches every learner. Models:

* ``popular``, ``cooccurrence``, ``river_mf``: :mod:`model.baselines`;
* ``incremental``: the encoder under the training worker; next-item scores
  are the logits of the causal pass at the last position
  (``encoder.forward(causal=True)`` then ``item_logits``). Items not admitted
  to the item table yet score as their shared hash-bucket row, as live;
* ``frozen``: the same model frozen at the end of the warm-up prefix (the
  latest checkpoint then, optionally trained ``frozen_steps`` more steps on all
  warm-up sequences). During the warm-up it IS the incremental model, so its
  warm-up scores are the incremental ones.

A :class:`~model.drift.DriftMonitor` shared with the worker watches the cycle
loss and the incremental model's prequential hits; a drift arms a catch-up
cycle. Scores of the encoder models are computed in batches just before the
model changes (a cycle) or at the end: the same numbers as one at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from model.baselines import CoOccurrence, Popular, RiverMF, RiverMFConfig
from model.batching import make_batch
from model.drift import Drift, DriftMonitor
from model.memory_stores import MemoryEmbeddingStore, MemorySequenceStore
from model.ranking import rank_metrics
from model.trainer import Trainer
from model.worker import TrainingWorker
from userstream.settings import Settings
from userstream.types import Behavior, Event

__all__ = [
    "MODELS",
    "Cadence",
    "Feed",
    "MemoryFeed",
    "PrequentialConfig",
    "PrequentialResult",
    "run_prequential",
]

LOG = logging.getLogger(__name__)

MODELS = ("popular", "river_mf", "cooccurrence", "frozen", "incremental")
TOPIC = "prequential"


@dataclass(frozen=True)
class PrequentialConfig:
    k: int = 10
    window: int = 5000  # events per point of the windowed curve
    warmup: float = 0.2  # fraction of events (< 1) or a number of events: `frozen` freezes after
    frozen_steps: int = 0  # extra steps on all warm-up sequences before freezing
    river: tuple[RiverMFConfig, ...] = (RiverMFConfig(),)  # >1: a grid; best one is river_mf
    cooccurrence_window: int = 10
    models: tuple[str, ...] = MODELS
    drift: bool = True  # DriftMonitor on loss + hits; drifts arm a catch-up cycle
    drift_delta: float = 0.002
    catchup_factor: int = 4
    score_batch: int = 256
    exclude_seen: bool = True  # False: the user's earlier items stay rankable (repeats count)
    seed: int = 0


class Cadence:
    """``TrainingWorker.run_forever``'s trigger on a stream clock: a cycle is due
    every ``interval_s`` seconds or after ``every_events`` new events (the first
    check is always due)."""

    def __init__(self, interval_s: float, every_events: int) -> None:
        self.interval_s = interval_s
        self.every_events = every_events
        self.last_t = -math.inf
        self.last_events = 0

    def due(self, now: float, events: int) -> bool:
        if now - self.last_t >= self.interval_s or events - self.last_events >= self.every_events:
            self.last_t, self.last_events = now, events
            return True
        return False


# --- where the events go: the sequence state the training worker reads ---------
class Feed(Protocol):
    """Ingest path of a run: ``add`` every event after it was scored, ``tail`` for
    the state before the next one, ``sync`` before a cycle reads ``store``."""

    store: Any  # a SequenceStore (duck type): what the TrainingWorker reads
    embeddings: Any  # an EmbeddingStore (duck type): what it writes

    def tail(self, user: str, n: int) -> list[Behavior]:
        """The last ``n`` behaviors of ``user`` given every event added so far."""
        ...

    def add(self, pos: int, raw: Any, ev: Event) -> None:
        """Event ``pos`` (``raw`` as given, ``ev`` validated) after it was scored."""
        ...

    def sync(self) -> None:
        """Return once ``store`` holds every added event."""
        ...


class MemoryFeed:
    """The in-process path: each event goes at once to a MemorySequenceStore."""

    def __init__(self, max_len: int) -> None:
        self.store = MemorySequenceStore(max_len)
        self.embeddings = MemoryEmbeddingStore()

    def tail(self, user: str, n: int) -> list[Behavior]:
        return self.store.read_tail(user, n)

    def add(self, pos: int, raw: Any, ev: Event) -> None:
        self.store.apply_many(TOPIC, [(0, pos, ev)])

    def sync(self) -> None:
        pass


# --- evaluation state shared by all models ------------------------------------
class _Catalogue:
    """Items in order of first appearance (dense indices) and each user's items."""

    def __init__(self, exclude_seen: bool = True) -> None:
        self.exclude_seen = exclude_seen
        self.index: dict[str, int] = {}
        self.items: list[str] = []
        self.user_items: dict[str, list[int]] = {}  # distinct, in order of first interaction
        self.user_sets: dict[str, set[int]] = {}

    def add(self, user: str, item: str) -> int:
        idx = self.index.get(item)
        if idx is None:
            idx = self.index[item] = len(self.items)
            self.items.append(item)
        seen = self.user_sets.setdefault(user, set())
        if idx not in seen:
            seen.add(idx)
            self.user_items.setdefault(user, []).append(idx)
        return idx

    def exclude(self, user: str, n: int) -> np.ndarray | None:
        """The first ``n`` distinct items of ``user`` (its items before some event)."""
        if not self.exclude_seen:
            return None
        return np.asarray(self.user_items.get(user, [])[:n], dtype=np.int64)


@dataclass
class _Request:
    pos: int  # event index
    seq: list[Behavior]  # the user's most recent behaviors before the event
    user: str
    n_items: int  # catalogue size before the event
    target: int | None  # None: the item's first appearance
    n_seen: int  # distinct items of the user before the event


class _EncoderScorer:
    """Next-item scores of a Trainer's encoder, batched between model changes."""

    def __init__(self, trainer: Trainer, batch: int) -> None:
        self.trainer = trainer
        self.batch = batch
        self.pending: list[_Request] = []
        self.seconds = 0.0

    def flush(self, cat: _Catalogue, k: int, hr: np.ndarray, ndcg: np.ndarray) -> list[int]:
        """Score every pending request; returns their event indices in order."""
        if not self.pending:
            return []
        t0 = time.perf_counter()
        tr = self.trainer
        enc, cfg = tr.encoder, tr.config
        enc.eval()
        rows = torch.as_tensor(tr.items.rows_for(cat.items), dtype=torch.long)  # (n_cat,)
        n_valid = len(tr.items)
        done = []
        for start in range(0, len(self.pending), self.batch):
            chunk = self.pending[start : start + self.batch]
            b = make_batch(
                [r.seq for r in chunk], tr.items, tr.behaviors, cfg.max_len, cfg.n_gap_buckets
            ).to(tr.device)
            with torch.inference_mode():
                h = enc(b.items, b.behaviors, b.gaps, causal=True)[:, -1]  # (B, H)
                logits = enc.item_logits(h, n_valid)  # (B, n_valid)
                scores = logits[:, rows.to(logits.device)].float().cpu().numpy()  # (B, n_cat)
            for r, s in zip(chunk, scores, strict=True):
                hr[r.pos], ndcg[r.pos] = rank_metrics(
                    s[: r.n_items], r.target, cat.exclude(r.user, r.n_seen), k
                )
                done.append(r.pos)
        self.pending.clear()
        self.seconds += time.perf_counter() - t0
        return done


@dataclass
class PrequentialResult:
    config: PrequentialConfig
    settings: Settings
    n_events: int
    warmup_events: int
    hr: dict[str, np.ndarray]  # model -> (n_events,) NaN where not scored
    ndcg: dict[str, np.ndarray]
    seconds: dict[str, float]  # model -> seconds spent in its scoring + learning
    scored: np.ndarray  # (n_events,) bool
    repeat: np.ndarray  # (n_events,) bool: scored, target already seen by the user
    new_item: np.ndarray  # (n_events,) bool: scored, target never seen in the stream
    drifts: list[tuple[int, Drift]]  # (event index, drift)
    cycles: list[dict[str, Any]]  # per training cycle that ran
    wall_s: float
    invalid: int = 0
    river_grid: list[dict[str, Any]] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return list(self.hr)

    def mean(self, name: str, metric: str = "hr", mask: np.ndarray | None = None) -> float:
        arr = (self.hr if metric == "hr" else self.ndcg)[name]
        sel = self.scored if mask is None else (self.scored & mask)
        return float(arr[sel].mean()) if sel.any() else math.nan

    def events_per_s(self, name: str) -> float:
        s = self.seconds.get(name, 0.0)
        return self.n_events / s if s > 0 else math.inf

    def curve(self, name: str, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(window end event index, mean HR@k of the scored events in the window)."""
        w = window or self.config.window
        ends, vals = [], []
        h = self.hr[name]
        for start in range(0, self.n_events, w):
            sel = self.scored[start : start + w]
            if sel.any():
                ends.append(min(start + w, self.n_events))
                vals.append(float(h[start : start + w][sel].mean()))
        return np.asarray(ends), np.asarray(vals)


def _parse(obj: Any):
    from stream.events import validate_event

    return validate_event(obj, now=math.inf)  # historical data: no "future" bound


def run_prequential(
    events: Sequence[dict[str, Any]],
    settings: Settings,
    config: PrequentialConfig = PrequentialConfig(),
    progress: Callable[[int, int], None] | None = None,
    extra_models: Mapping[str, Any] | None = None,
    feed: Feed | None = None,
) -> PrequentialResult:
    """Test-then-train over ``events`` (dicts in timestamp order); see the module doc.

    ``extra_models``: more per-event models (``scores`` / ``learn_one``, as in
    :mod:`model.baselines`) evaluated in the same loop under their key.
    ``feed``: where the events go (default: a new :class:`MemoryFeed`); every
    valid event is added to it, and it is synced before each cycle and at the end.
    Torch's global RNG (dropout) is seeded with ``config.seed`` for the run and
    restored after, so two runs on the same events train the same way.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _run(events, settings, config, progress, extra_models, feed)


def _run(
    events: Sequence[dict[str, Any]],
    settings: Settings,
    c: PrequentialConfig,
    progress: Callable[[int, int], None] | None,
    extra_models: Mapping[str, Any] | None,
    feed: Feed | None,
) -> PrequentialResult:
    t_start = time.perf_counter()
    n = len(events)
    unknown = set(c.models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; expected some of {MODELS}")
    warmup_events = int(c.warmup * n) if c.warmup < 1 else int(c.warmup)
    use_encoder = "incremental" in c.models or "frozen" in c.models

    # immediate (per-event) baselines, by report name
    baselines: dict[str, Any] = {}
    if "popular" in c.models:
        baselines["popular"] = Popular()
    if "cooccurrence" in c.models:
        baselines["cooccurrence"] = CoOccurrence(window=c.cooccurrence_window)
    river_names: dict[str, RiverMFConfig] = {}
    if "river_mf" in c.models:
        for rc in c.river:
            name = "river_mf" if len(c.river) == 1 else f"river_mf:{rc.label}"
            river_names[name] = rc
            baselines[name] = RiverMF(rc, seed=c.seed)
    baselines.update(extra_models or {})
    names = list(baselines) + [m for m in ("frozen", "incremental") if m in c.models]
    hr = {m: np.full(n, np.nan) for m in names}
    ndcg = {m: np.full(n, np.nan) for m in names}
    seconds = dict.fromkeys(names, 0.0)
    scored = np.zeros(n, dtype=bool)
    repeat = np.zeros(n, dtype=bool)
    new_item = np.zeros(n, dtype=bool)

    cat = _Catalogue(c.exclude_seen)
    feed = feed if feed is not None else MemoryFeed(settings.sequence_length)
    ingested = 0  # valid events added to the feed
    drift = DriftMonitor(delta=c.drift_delta, catchup_factor=c.catchup_factor) if c.drift else None
    drifts: list[tuple[int, Drift]] = []
    cycles: list[dict[str, Any]] = []
    invalid = 0
    tmp = tempfile.TemporaryDirectory(prefix="prequential-")
    frozen: _EncoderScorer | None = None
    if use_encoder:
        run_settings = Settings(**{**settings.model_dump(), "data_dir": tmp.name})
        worker = TrainingWorker(
            run_settings,
            feed.store,
            feed.embeddings,
            Trainer(run_settings),
            drift=drift if drift is not None else DriftMonitor(catchup_factor=1),
        )
        cadence = Cadence(settings.train_interval_s, settings.train_every_events)
        live = _EncoderScorer(worker.trainer, c.score_batch)
    T = settings.max_len + 1  # the encoder reads max_len behaviors (+1 for the first gap)
    inc_hr = hr.get("incremental", np.full(n, np.nan))
    inc_ndcg = ndcg.get("incremental", np.full(n, np.nan))
    cycle_s = warm_cycle_s = 0.0

    def flush_live() -> None:
        done = live.flush(cat, c.k, inc_hr, inc_ndcg)
        if drift is None:
            return
        for pos in done:
            d = drift.update("hit_rate", inc_hr[pos])
            if d is not None:
                drifts.append((pos, d))

    try:
        for pos, obj in enumerate(events):
            try:
                ev = _parse(obj)
            except ValueError:
                invalid += 1
                continue
            user = ev.user_id
            # --- the training worker's cycle, when due --------------------------
            if use_encoder:
                due = cadence.due(ev.ts, ingested)
                if due:
                    feed.sync()  # waiting for the ingest path is not the model's time
                t0 = time.perf_counter()
                if due:
                    flush_live()
                    n_drifts = len(worker.drift.drifts)
                    dirty = _digest(feed.store.dirty_users())  # what the cycle will take
                    rep = worker.run_cycle()
                    for d in worker.drift.drifts[n_drifts:]:
                        drifts.append((pos, d))
                    if rep.ran:
                        cycles.append(
                            {"event": pos, "version": rep.version, "loss": rep.loss,
                             "dirty": rep.dirty_users, "dirty_digest": dirty,
                             "replay": rep.replay_users, "train_s": rep.train_s,
                             "total_s": rep.total_s}
                        )  # fmt: skip
                dt = time.perf_counter() - t0
                cycle_s += dt
                if pos < warmup_events:
                    warm_cycle_s += dt
                if frozen is None and pos >= warmup_events and "frozen" in c.models:
                    frozen = _EncoderScorer(
                        _freeze(run_settings, feed, c.frozen_steps), c.score_batch
                    )
            # --- test ---------------------------------------------------------------
            seen = cat.user_sets.get(user)
            if seen:
                scored[pos] = True
                n_items = len(cat.items)
                target = cat.index.get(ev.item_id)
                new_item[pos] = target is None
                repeat[pos] = target is not None and target in seen
                exclude = cat.exclude(user, len(seen)) if baselines else None
                for name, model in baselines.items():
                    t0 = time.perf_counter()
                    s = model.scores(user, n_items)
                    hr[name][pos], ndcg[name][pos] = rank_metrics(s, target, exclude, c.k)
                    seconds[name] += time.perf_counter() - t0
                if use_encoder:
                    t0 = time.perf_counter()
                    req = _Request(pos, feed.tail(user, T), user, n_items, target, len(seen))
                    live.pending.append(req)
                    if frozen is not None:
                        frozen.pending.append(req)
                    cycle_s += time.perf_counter() - t0
            # --- then train -------------------------------------------------------------
            t0 = time.perf_counter()
            feed.add(pos, obj, ev)
            ingested += 1
            if use_encoder:
                cycle_s += time.perf_counter() - t0
            idx = cat.add(user, ev.item_id)
            for name, model in baselines.items():
                t0 = time.perf_counter()
                model.learn_one(user, idx)
                seconds[name] += time.perf_counter() - t0
            if progress is not None and (pos + 1) % 1000 == 0:
                progress(pos + 1, n)
        feed.sync()
        if use_encoder:
            flush_live()
            if frozen is not None:
                frozen.flush(cat, c.k, hr["frozen"], ndcg["frozen"])
    finally:
        tmp.cleanup()

    if "incremental" in c.models:
        seconds["incremental"] = cycle_s + live.seconds
    if "frozen" in c.models:
        # during the warm-up the frozen model IS the incremental one
        w = np.arange(n) < warmup_events
        hr["frozen"][w] = inc_hr[w]
        ndcg["frozen"][w] = inc_ndcg[w]
        inc_warm_share = live.seconds * float(w[scored].mean()) if scored.any() else 0.0
        seconds["frozen"] = warm_cycle_s + inc_warm_share + (frozen.seconds if frozen else 0.0)
    result = PrequentialResult(
        config=c,
        settings=settings,
        n_events=n,
        warmup_events=warmup_events,
        hr=hr,
        ndcg=ndcg,
        seconds=seconds,
        scored=scored,
        repeat=repeat,
        new_item=new_item,
        drifts=drifts,
        cycles=cycles,
        wall_s=time.perf_counter() - t_start,
        invalid=invalid,
    )
    _pick_river(result, river_names)
    return result


def _digest(users: Sequence[str]) -> str:
    """A short fingerprint of a (sorted) user set, to compare runs cycle by cycle."""
    return hashlib.blake2b("\n".join(users).encode(), digest_size=8).hexdigest()


def _freeze(settings: Settings, feed: Feed, extra_steps: int) -> Trainer:
    """A separate copy of the live model as of its latest checkpoint (+ extra steps)."""
    trainer = Trainer.load_latest(settings) or Trainer(settings)
    if extra_steps > 0:
        feed.sync()
        seqs = feed.store.read_many(sorted(feed.store.iter_users()))  # sorted: any store
        trainer.learn_many(seqs, steps=extra_steps)
    LOG.info("frozen model: v%d, %d item rows", trainer.version, len(trainer.items))
    return trainer


def _pick_river(result: PrequentialResult, river_names: dict[str, RiverMFConfig]) -> None:
    """With a grid: keep every configuration's numbers, report the best as river_mf."""
    if len(river_names) <= 1:
        return
    grid = []
    for name, rc in river_names.items():
        grid.append(
            {"config": rc.label, "name": name, "hr@10": result.mean(name),
             "ndcg@10": result.mean(name, "ndcg"), "events_per_s": result.events_per_s(name)}
        )  # fmt: skip
    grid.sort(key=lambda g: -g["hr@10"])
    best = grid[0]["name"]
    result.river_grid = grid
    for table in (result.hr, result.ndcg, result.seconds):
        for name in river_names:
            value = table.pop(name)
            if name == best:
                table["river_mf"] = value
    LOG.info("river grid: best %s (HR@10 %.4f)", grid[0]["config"], grid[0]["hr@10"])
