"""Prequential (test-then-train) evaluation of the live learner: PROTOCOL section 2.

:func:`run_prequential` replays events in timestamp order through the SAME
code path as the live system, in one process:

* events are validated by ``stream.events.validate_event`` (what the stream
  worker does) and appended, one at a time with increasing offsets, to a
  :class:`~userstream.stores.MemorySequenceStore` (the Redis store's
  semantics in dicts). That is the default
  :class:`~model.prequential.feeds.MemoryFeed`;
  :class:`~model.prequential.kafka_feed.KafkaFeed` sends the same events
  through the real broker, stream worker and Redis instead
  (``bench prequential --via-kafka``), so the two can be compared;
* an unchanged :class:`~model.live.worker.TrainingWorker` runs a cycle (dirty users
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
excluded; ties count against the target, :mod:`model.metrics`), THEN the event
reaches every learner. The models and their one interface are in
:mod:`model.prequential.models`:

* ``popular``, ``cooccurrence``, ``river_mf``: :mod:`model.prequential.baselines`;
* ``incremental``: the encoder under the training worker; next-item scores
  are the logits of the causal pass at the last position
  (``encoder.forward(causal=True)`` then ``item_logits``). Items not admitted
  to the item table yet score as their shared hash-bucket row, as live;
* ``frozen``: the same model frozen at the end of the warm-up prefix (the
  latest checkpoint then, optionally trained ``frozen_steps`` more steps on all
  warm-up sequences). During the warm-up it IS the incremental model, so its
  warm-up scores are the incremental ones.

With ``config.neighbours``, the same events also score the similar users
(PROTOCOL section 3, :mod:`model.prequential.neighbours`): each source's top
``neighbour_k`` users before the event, the next item ranked by how many of
them have it; the result's ``neighbour_ranks`` and, on a planted stream with
``groups``, ``precision``.

A :class:`~model.live.drift.DriftMonitor` shared with the worker watches the cycle
loss and the incremental model's prequential hits; a drift arms a catch-up
cycle. Scores of the encoder models are computed in batches just before the
model changes (a cycle) or at the end: the same numbers as one at a time.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.live.drift import Drift, DriftMonitor
from model.metrics import hit_and_gain
from model.prequential.baselines import RiverMF, RiverMFConfig
from model.prequential.feeds import Feed, MemoryFeed
from model.prequential.models import (
    BASELINES,
    ENCODER_MODELS,
    Catalogue,
    EncoderModels,
    OnlineModel,
    PerEventModel,
    Query,
    Scoreboard,
    build_models,
)
from model.prequential.neighbours import NeighbourFactory, NeighbourModels
from userstream.settings import Settings

__all__ = ["MODELS", "PrequentialConfig", "PrequentialResult", "run_prequential"]

LOG = logging.getLogger(__name__)

MODELS = (*BASELINES, *ENCODER_MODELS)


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
    neighbours: tuple[str, ...] = ()  # PROTOCOL 3 sources (NEIGHBOUR_SOURCES: all); () none
    neighbour_k: int = 20  # similar users whose items are counted
    neighbour_embed_every: int = 10  # the live embedder runs every N events (0: at cycles)
    exclude_seen: bool = True  # False: the user's earlier items stay rankable (repeats count)
    seed: int = 0
    # a recorded backlog: the first ``backlog`` events reach every model's state (the
    # store, the baselines, the neighbour rows) before the stream starts; none is
    # scored and the encoder takes no cycle on them (its first cycle, at the stream's
    # start, takes their users as dirty, as a service started on a backlog would)
    backlog: int = 0
    warm_start: str | None = None  # a checkpoint the encoder starts from (and frozen stays)


@dataclass
class PrequentialResult:
    config: PrequentialConfig
    settings: Settings
    n_events: int
    warmup_events: int
    ranks: dict[str, np.ndarray]  # model -> (n_events,) rank of the target, NaN where not scored
    seconds: dict[str, float]  # model -> seconds spent in its scoring + learning
    scored: np.ndarray  # (n_events,) bool
    repeat: np.ndarray  # (n_events,) bool: scored, target already seen by the user
    new_item: np.ndarray  # (n_events,) bool: scored, target never seen in the stream
    drifts: list[tuple[int, Drift]]  # (event index, drift)
    cycles: list[dict[str, Any]]  # per training cycle that ran
    wall_s: float
    invalid: int = 0
    river_grid: list[dict[str, Any]] = field(default_factory=list)
    neighbour_ranks: dict[str, np.ndarray] = field(default_factory=dict)  # source -> ranks
    precision: dict[str, float] = field(default_factory=dict)  # source -> same-group P@10
    neighbour_seconds: dict[str, float] = field(default_factory=dict)  # source -> its time
    hr: dict[str, np.ndarray] = field(init=False)  # model -> (n_events,) HR@k, NaN: not scored
    ndcg: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.hr, self.ndcg = {}, {}
        for name, r in self.ranks.items():
            self.hr[name], self.ndcg[name] = _hit_gain(r, self.config.k)
        self.neighbour_hr, self.neighbour_ndcg = {}, {}
        for name, r in self.neighbour_ranks.items():
            self.neighbour_hr[name], self.neighbour_ndcg[name] = _hit_gain(r, self.config.k)

    def neighbour_mean(self, source: str, metric: str = "hr") -> float:
        """Mean HR@k (or NDCG@k) of the next items from ``source``'s neighbours."""
        arr = (self.neighbour_hr if metric == "hr" else self.neighbour_ndcg)[source]
        return float(arr[self.scored].mean()) if self.scored.any() else math.nan

    @property
    def models(self) -> list[str]:
        return list(self.ranks)

    def mean(self, name: str, metric: str = "hr", mask: np.ndarray | None = None) -> float:
        arr = (self.hr if metric == "hr" else self.ndcg)[name]
        sel = self.scored if mask is None else (self.scored & mask)
        return float(arr[sel].mean()) if sel.any() else math.nan

    def events_per_s(self, name: str) -> float:
        s = self.seconds.get(name, 0.0)
        return self.n_events / s if s > 0 else math.inf

    def curve(
        self, name: str, window: int | None = None, neighbours: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(window end event index, mean HR@k of the scored events in the window) of
        model ``name``, or with ``neighbours`` of neighbour source ``name``."""
        w = window or self.config.window
        ends, vals = [], []
        h = (self.neighbour_hr if neighbours else self.hr)[name]
        for start in range(0, self.n_events, w):
            sel = self.scored[start : start + w]
            if sel.any():
                ends.append(min(start + w, self.n_events))
                vals.append(float(h[start : start + w][sel].mean()))
        return np.asarray(ends), np.asarray(vals)


def _hit_gain(ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(HR@k, NDCG@k) per event from ranks; NaN where not scored."""
    hit, gain = hit_and_gain(np.where(np.isnan(ranks), np.inf, ranks), k)
    return np.where(np.isnan(ranks), np.nan, hit), np.where(np.isnan(ranks), np.nan, gain)


def _parse(obj: Any):
    from stream.events import validate_event

    return validate_event(obj, now=math.inf)  # historical data: no "future" bound


def run_prequential(
    events: Sequence[dict[str, Any]],
    settings: Settings,
    config: PrequentialConfig = PrequentialConfig(),
    progress: Callable[[int, int], None] | None = None,
    extra_models: Mapping[str, OnlineModel] | None = None,
    feed: Feed | None = None,
    groups: Mapping[str, int] | None = None,
    index_factory: Callable[..., Any] | None = None,
    extra_neighbours: Mapping[str, NeighbourFactory] | None = None,
) -> PrequentialResult:
    """Test-then-train over ``events`` (dicts in timestamp order); see the module doc.

    ``extra_models``: more per-event models (``scores`` / ``learn_one``, as in
    :mod:`model.prequential.baselines`) evaluated in the same loop under their key.
    ``feed``: where the events go (default: a new :class:`MemoryFeed`); every
    valid event is added to it, and it is synced before each cycle and at the end.
    ``groups``: user -> group of a planted stream; the result's ``precision`` then
    holds each neighbour source's same-group precision@10 at the end.
    ``index_factory``: ``(nums, vectors) -> index`` of the ``ours`` neighbour source
    (:mod:`model.prequential.neighbours`; default exact inner product).
    ``extra_neighbours``: more neighbour sources scored beside ``config.neighbours``,
    name -> factory of a source from a :class:`~model.prequential.neighbours.NeighbourContext`
    (``benchmarks/neighbour_variants.py`` compares user vectors this way).
    Torch's global RNG (dropout) is seeded with ``config.seed`` for the run and
    restored after, so two runs on the same events train the same way.
    """
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="pq-") as tmp:
        torch.manual_seed(config.seed)
        run_settings = settings.replace(data_dir=tmp)  # the run's checkpoints
        result = _run(events, run_settings, config, progress, extra_models, feed, groups,
                      index_factory, extra_neighbours)  # fmt: skip
    result.settings = settings
    return result


def _run(
    events: Sequence[dict[str, Any]],
    settings: Settings,
    c: PrequentialConfig,
    progress: Callable[[int, int], None] | None,
    extra_models: Mapping[str, OnlineModel] | None,
    feed: Feed | None,
    groups: Mapping[str, int] | None = None,
    index_factory: Callable[..., Any] | None = None,
    extra_neighbours: Mapping[str, NeighbourFactory] | None = None,
) -> PrequentialResult:
    t_start = time.perf_counter()
    n = len(events)
    warmup_events = int(c.warmup * n) if c.warmup < 1 else int(c.warmup)
    if c.warm_start is not None and warmup_events != c.backlog:
        raise ValueError(
            f"a warm start freezes the checkpoint it starts from: warmup ({warmup_events} "
            f"events) must equal the backlog ({c.backlog})"
        )
    feed = feed if feed is not None else MemoryFeed(settings.sequence_length)
    cat = Catalogue(c.exclude_seen)
    board = Scoreboard(n, cat, c.k)
    drift = DriftMonitor(delta=c.drift_delta, catchup_factor=c.catchup_factor) if c.drift else None
    models = build_models(c, settings, feed, board, warmup_events, drift, extra_models)
    nbr = None
    if c.neighbours or extra_neighbours:
        nbr = _neighbour_models(c, models, feed, cat, n, warmup_events, index_factory,
                                extra_neighbours)  # fmt: skip
        models.append(nbr)  # last: its advance sees the cycle the encoder just ran
    scored = np.zeros(n, dtype=bool)
    repeat = np.zeros(n, dtype=bool)
    new_item = np.zeros(n, dtype=bool)
    ingested = invalid = 0
    for pos, obj in enumerate(events):
        try:
            ev = _parse(obj)
        except ValueError:
            invalid += 1
            continue
        live = pos >= c.backlog  # the recorded backlog is state, not stream
        if live:
            for m in models:
                m.advance(pos, ev, ingested)
        # --- test -----------------------------------------------------------------
        q = None
        seen = cat.user_sets.get(ev.user_id)
        if seen and live:
            target = cat.index.get(ev.item_id)
            q = Query(pos, ev.user_id, len(cat.items), target, len(seen),
                      repeat=target is not None and target in seen)  # fmt: skip
            scored[pos], new_item[pos], repeat[pos] = True, target is None, q.repeat
            for m in models:
                m.test(q)
        # --- then train -------------------------------------------------------------
        feed.add(pos, obj, ev)
        ingested += 1
        item = cat.add(ev.user_id, ev.item_id)
        for m in models:
            m.learn(q, ev, item)
        if progress is not None and (pos + 1) % 1000 == 0:
            progress(pos + 1, n)
    feed.sync()
    for m in models:
        m.flush()
    encoder = next((m for m in models if isinstance(m, EncoderModels)), None)
    precision = nbr.precision(groups) if nbr is not None and groups else {}
    result = PrequentialResult(
        config=c,
        settings=settings,
        n_events=n,
        warmup_events=warmup_events,
        ranks=board.ranks,
        seconds={name: m.seconds[name] for m in models if m is not nbr for name in m.names},
        scored=scored,
        repeat=repeat,
        new_item=new_item,
        drifts=encoder.drifts if encoder else [],
        cycles=encoder.cycles if encoder else [],
        wall_s=time.perf_counter() - t_start,
        invalid=invalid,
        neighbour_ranks=nbr.board.ranks if nbr is not None else {},
        neighbour_seconds=dict(nbr.seconds) if nbr is not None else {},
        precision=precision,
    )
    _pick_river(result)
    return result


def _neighbour_models(
    c: PrequentialConfig,
    models: list,
    feed: Feed,
    cat: Catalogue,
    n: int,
    warmup_events: int,
    index_factory: Callable[..., Any] | None,
    extra: Mapping[str, NeighbourFactory] | None = None,
) -> NeighbourModels:
    """The neighbour sources ``c.neighbours`` asks for, on the run's models."""
    encoder = next((m for m in models if isinstance(m, EncoderModels)), None)
    needs_encoder = {"ours", "frozen"} & set(c.neighbours)
    if needs_encoder and encoder is None:
        raise ValueError(
            f"neighbour source(s) {sorted(needs_encoder)} need the encoder models: add "
            "incremental (and frozen) to the models, or leave those sources out"
        )
    if "frozen" in c.neighbours and "frozen" not in c.models:
        raise ValueError("neighbour source frozen needs the frozen model in the run")
    embed_changed = None
    if encoder is not None and isinstance(feed, MemoryFeed):
        embed_changed = encoder.worker.embedder.drain  # in process: as the live thread
    rivers = {
        m.name: m.model
        for m in models
        if isinstance(m, PerEventModel) and isinstance(m.model, RiverMF)
    }
    return NeighbourModels(
        c.neighbours,
        feed,
        cat,
        n,
        c.k,
        cycles=(lambda: len(encoder.cycles)) if encoder is not None else (lambda: 0),
        frozen_trainer=lambda: encoder.frozen.trainer if encoder and encoder.frozen else None,
        rivers=rivers,
        warmup_events=warmup_events,
        k=c.neighbour_k,
        seed=c.seed,
        index_factory=index_factory,
        embed_changed=embed_changed,
        embed_every=c.neighbour_embed_every,
        extra=extra,
        live_trainer=(lambda: encoder.worker.trainer) if encoder is not None else (lambda: None),
    )


def _pick_river(result: PrequentialResult) -> None:
    """With a grid: keep every configuration's numbers, report the best as river_mf."""
    rows = [name for name in result.ranks if name.startswith("river_mf:")]
    if not rows:
        return
    grid = [
        {"config": name.partition(":")[2], "name": name, "hr@10": result.mean(name),
         "ndcg@10": result.mean(name, "ndcg"), "events_per_s": result.events_per_s(name)}
        for name in rows
    ]  # fmt: skip
    grid.sort(key=lambda g: -g["hr@10"])
    best = grid[0]["name"]
    result.river_grid = grid
    for table in (result.ranks, result.hr, result.ndcg, result.seconds, result.neighbour_ranks,
                  result.neighbour_hr, result.neighbour_ndcg, result.precision,
                  result.neighbour_seconds):  # fmt: skip
        for name in rows:
            if name not in table:
                continue
            value = table.pop(name)
            if name == best:
                table["river_mf"] = value
    LOG.info("river grid: best %s (HR@10 %.4f)", grid[0]["config"], grid[0]["hr@10"])
