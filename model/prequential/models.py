"""What the prequential loop scores: every model behind one small interface.

The loop (:mod:`model.prequential.loop`) calls, for each valid event in
timestamp order, ``advance`` (stream time moved: a training cycle may be due),
``test`` (score the event before anything learns it; now, or deferred to
``flush``), then ``learn`` (the event reaches the model); ``flush`` at the end.
Scores go to a :class:`Scoreboard`, which ranks the target with the one tie
rule of :mod:`model.metrics`.

* :class:`PerEventModel` wraps a baseline with ``scores(user, n_items)`` and
  ``learn_one(user, item)`` (:mod:`model.prequential.baselines`, or any
  object with those two verbs);
* :class:`EncoderModels` is the encoder under the unchanged
  :class:`~model.live.worker.TrainingWorker`: ``incremental`` (trained on the
  cadence) and ``frozen`` (frozen at the end of the warm-up).

:func:`build_models` makes them from the names a config asks for; the only
names it knows are the keys of :data:`BASELINES` and :data:`ENCODER_MODELS`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from model.batching import make_batch
from model.checkpoint import latest_checkpoint
from model.live.drift import Drift, DriftMonitor
from model.live.worker import TrainingWorker
from model.metrics import hit_and_gain, rank_of
from model.prequential.baselines import CoOccurrence, Popular, RiverMF
from model.prequential.feeds import Feed
from model.trainer import Trainer
from userstream.settings import Settings
from userstream.types import Behavior, Event

__all__ = [
    "BASELINES",
    "ENCODER_MODELS",
    "Cadence",
    "Catalogue",
    "EncoderModels",
    "OnlineModel",
    "PerEventModel",
    "PrequentialModel",
    "Query",
    "Scoreboard",
    "build_models",
]

LOG = logging.getLogger(__name__)


# --- the evaluation state shared by all models ------------------------------------
class Catalogue:
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
class Query:
    """One event to score, as the state stood just before it."""

    pos: int  # event index
    user: str
    n_items: int  # catalogue size before the event
    target: int | None  # None: the item's first appearance in the stream
    n_seen: int  # distinct items of the user before the event
    repeat: bool  # the user had the target before


class Scoreboard:
    """The rank of every scored event's target, per model (NaN: not scored).

    Ranks follow :func:`model.metrics.rank_of`, over the items seen so far with
    the user's earlier items excluded; a new item, or a repeat while earlier
    items are excluded, counts as a miss (rank ``inf``).
    """

    def __init__(self, n_events: int, catalogue: Catalogue, k: int) -> None:
        self.n_events = n_events
        self.catalogue = catalogue
        self.k = k
        self.ranks: dict[str, np.ndarray] = {}

    def add_model(self, name: str) -> None:
        self.ranks[name] = np.full(self.n_events, np.nan)

    def record(self, name: str, q: Query, scores: np.ndarray) -> float:
        """Rank ``q``'s target under ``scores`` (n_items,) for model ``name``."""
        cat = self.catalogue
        if q.target is None or q.target >= len(scores) or (q.repeat and cat.exclude_seen):
            rank = math.inf
        else:
            rank = rank_of(scores, q.target, cat.exclude(q.user, q.n_seen))
        self.ranks[name][q.pos] = rank
        return rank

    def hit(self, name: str, pos: int) -> float:
        """HR@k of event ``pos`` for ``name`` (0 or 1)."""
        return float(hit_and_gain(self.ranks[name][pos : pos + 1], self.k)[0][0])


# --- the interface -----------------------------------------------------------------------
class PrequentialModel:
    """What the loop drives. ``names``: the result rows it writes; ``seconds``:
    time spent per row. Every hook is optional (no-op here)."""

    names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(self.names, 0.0)

    def advance(self, pos: int, ev: Event, ingested: int) -> None:
        """Event ``pos`` is next (``ingested`` valid events came before it)."""

    def test(self, q: Query) -> None:
        """Score ``q`` before it is learned: now, or in :meth:`flush`."""

    def learn(self, q: Query | None, ev: Event, item: int) -> None:
        """The event reaches the model (``q`` None: its user's first event)."""

    def flush(self) -> None:
        """Score everything :meth:`test` deferred (end of stream)."""


class OnlineModel(Protocol):
    """A per-event model: River's verbs for an item ranker."""

    def scores(self, user: str, n_items: int) -> np.ndarray:
        """(n_items,) scores of the items seen so far, higher = more likely next."""
        ...

    def learn_one(self, user: str, item: int) -> None: ...


class PerEventModel(PrequentialModel):
    """A baseline scored and taught one event at a time."""

    def __init__(self, name: str, model: OnlineModel, board: Scoreboard) -> None:
        self.names = (name,)
        super().__init__()
        self.name, self.model, self.board = name, model, board
        board.add_model(name)

    def test(self, q: Query) -> None:
        t0 = time.perf_counter()
        self.board.record(self.name, q, self.model.scores(q.user, q.n_items))
        self.seconds[self.name] += time.perf_counter() - t0

    def learn(self, q: Query | None, ev: Event, item: int) -> None:
        t0 = time.perf_counter()
        self.model.learn_one(ev.user_id, item)
        self.seconds[self.name] += time.perf_counter() - t0


# --- the encoder --------------------------------------------------------------------------
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


@dataclass
class _Pending:
    q: Query
    seq: list[Behavior]  # the user's most recent behaviors before the event


class _Scorer:
    """Next-item scores of a Trainer's encoder for pending queries, in batches:
    the same numbers as one at a time, computed just before the model changes.

    A user's queries between two model changes read nested prefixes of one
    sequence (each adds the previous query's event). While that sequence fits
    the encoder's window (``max_len``), one causal pass over the longest prefix
    gives every shorter prefix's state at its own last position, exactly: with
    relative positions a state depends on the behaviors up to it, not on its
    slot, and nothing is cut off at the left. Such queries share one pass; the
    others get one each. Passes are sorted by length and trimmed to the
    longest of their batch (padding is masked, so trimming changes nothing).
    """

    def __init__(self, trainer: Trainer, batch: int) -> None:
        self.trainer = trainer
        self.batch = batch
        self.pending: list[_Pending] = []
        self.seconds = 0.0
        self.passes = 0  # causal passes run (<= queries scored)

    def _passes(self) -> list[tuple[list[Behavior], list[tuple[_Pending, int]]]]:
        """(sequence to encode, [(query, steps back from its last position)])."""
        cfg = self.trainer.config
        shared = cfg.positions == "relative"
        out: list[tuple[list[Behavior], list[tuple[_Pending, int]]]] = []
        open_pass: dict[str, int] = {}  # user -> index in out of a pass it can still extend
        for p in self.pending:
            seq, i = p.seq, open_pass.get(p.q.user)
            if shared and i is not None and len(seq) <= cfg.max_len:
                prev_seq, members = out[i]
                # the same user's next query: one more behavior on the same prefix
                if len(seq) == len(prev_seq) + 1 and seq[:-1] == prev_seq:
                    members = [(m, back + 1) for m, back in members]
                    out[i] = (seq, [*members, (p, 0)])
                    continue
            open_pass[p.q.user] = len(out)
            out.append((seq, [(p, 0)]))
        return out

    def flush(self, board: Scoreboard, name: str) -> list[int]:
        """Score every pending query into ``board`` under ``name``; their positions."""
        if not self.pending:
            return []
        t0 = time.perf_counter()
        tr = self.trainer
        tr.encoder.eval()
        rows = torch.as_tensor(tr.items.rows_for(board.catalogue.items), dtype=torch.long)
        n_valid = len(tr.items)
        passes = sorted(self._passes(), key=lambda x: len(x[0]))
        self.passes += len(passes)
        done = []
        with tr.averaged():  # the weights the live model serves
            self._score(passes, rows, n_valid, board, name, done)
        self.pending.clear()
        self.seconds += time.perf_counter() - t0
        return sorted(done)

    def _score(self, passes: list, rows: torch.Tensor, n_valid: int, board: Scoreboard,
               name: str, done: list[int]) -> None:  # fmt: skip
        tr = self.trainer
        enc, cfg = tr.encoder, tr.config
        for start in range(0, len(passes), self.batch):
            chunk = passes[start : start + self.batch]
            b = make_batch(
                [seq for seq, _ in chunk], tr.items, tr.behaviors, cfg.max_len,
                cfg.n_gap_buckets, trim=True,
            ).to(tr.device)  # fmt: skip
            which = [(r, back, m) for r, (_, members) in enumerate(chunk) for m, back in members]
            T = b.items.shape[1]
            with torch.inference_mode():
                h = enc(b.items, b.behaviors, b.gaps, causal=True)  # (B, T, H)
                r_idx = torch.tensor([r for r, _, _ in which], device=h.device)
                t_idx = torch.tensor([T - 1 - back for _, back, _ in which], device=h.device)
                logits = enc.item_logits(h[r_idx, t_idx], n_valid)  # (Q, n_valid)
                scores = logits[:, rows.to(logits.device)].float().cpu().numpy()  # (Q, n_cat)
            for (_, _, m), s in zip(which, scores, strict=True):
                board.record(name, m.q, s[: m.q.n_items])
                done.append(m.q.pos)


class EncoderModels(PrequentialModel):
    """The encoder as the live system trains it, and the same encoder frozen.

    An unchanged :class:`TrainingWorker` reads the feed's store and runs a cycle
    whenever ``run_forever`` would (:class:`Cadence` on the stream clock,
    checked before every event). ``incremental`` scores an event with the model
    the last completed cycle left; ``frozen`` is a copy of the latest checkpoint
    at the end of the warm-up (plus ``frozen_steps`` on every warm-up
    sequence), and during the warm-up it IS the incremental model. A shared
    :class:`DriftMonitor` watches the cycle loss and the incremental hits; a
    drift arms a catch-up cycle.
    """

    def __init__(
        self,
        names: Sequence[str],
        settings: Settings,
        feed: Feed,
        board: Scoreboard,
        warmup_events: int,
        drift: DriftMonitor | None,
        frozen_steps: int = 0,
        score_batch: int = 256,
        warm_start: str | None = None,
    ) -> None:
        self.names = tuple(names)
        super().__init__()
        self.settings, self.feed, self.board = settings, feed, board
        self.warmup_events = warmup_events
        self.drift = drift
        self.frozen_steps = frozen_steps
        self.score_batch = score_batch
        trainer = Trainer(settings) if warm_start is None else Trainer.load(warm_start, settings)
        self.worker = TrainingWorker(
            settings,
            feed.store,
            feed.embeddings,
            trainer,
            drift=drift if drift is not None else DriftMonitor(catchup_factor=1),
        )
        self.cadence = Cadence(settings.train_interval_s, settings.train_every_events)
        self.live = _Scorer(self.worker.trainer, score_batch)
        self.frozen: _Scorer | None = None
        if warm_start is not None and "frozen" in self.names:  # the checkpoint, never updated
            self.frozen = _Scorer(Trainer.load(warm_start, settings), score_batch)
        self.drifts: list[tuple[int, Drift]] = []  # (event index, drift)
        self.cycles: list[dict[str, Any]] = []  # per cycle that ran
        # the incremental model is always scored: frozen's warm-up and drift read it
        self._live_name = "incremental"
        if "incremental" not in self.names:
            self._live_name = "_incremental"
        board.add_model(self._live_name)
        if "frozen" in self.names:
            board.add_model("frozen")
        self.cycle_s = self.warm_cycle_s = self.query_s = 0.0
        self._window = settings.max_len + 1  # the encoder reads max_len (+1 for the first gap)

    def advance(self, pos: int, ev: Event, ingested: int) -> None:
        if self.cadence.due(ev.ts, ingested):
            self.feed.sync()  # waiting for the ingest path is not the model's time
            if self.frozen is not None:  # it never changes; flushing bounds what is held
                self.frozen.flush(self.board, "frozen")
            t0 = time.perf_counter()
            self._flush_live()
            self._cycle(pos)
            dt = time.perf_counter() - t0
            self.cycle_s += dt
            if pos < self.warmup_events:
                self.warm_cycle_s += dt
        if self.frozen is None and pos >= self.warmup_events and "frozen" in self.names:
            self.frozen = _Scorer(self._freeze(), self.score_batch)

    def _cycle(self, pos: int) -> None:
        worker = self.worker
        n_drifts = len(worker.drift.drifts)
        dirty = _digest(self.feed.store.dirty_users())  # what the cycle will take
        rep = worker.run_cycle()
        self.drifts.extend((pos, d) for d in worker.drift.drifts[n_drifts:])
        if rep.ran:
            self.cycles.append(
                {"event": pos, "version": rep.version, "loss": rep.loss,
                 "dirty": rep.dirty_users, "dirty_digest": dirty, "replay": rep.replay_users,
                 "train_s": rep.train_s, "total_s": rep.total_s}
            )  # fmt: skip

    def _freeze(self) -> Trainer:
        """A separate copy of the live model as of its latest checkpoint (+ extra steps)."""
        path = latest_checkpoint(self.settings.checkpoint_dir)
        trainer = Trainer(self.settings) if path is None else Trainer.load(path, self.settings)
        live = self.worker.trainer
        if live.average is not None and trainer.version == live.version:
            trainer.average = copy.deepcopy(live.average)  # not in the checkpoint
        if self.frozen_steps > 0:
            self.feed.sync()
            store = self.feed.store
            seqs = store.read_many(sorted(store.iter_users()))  # sorted: any store
            trainer.learn_many(seqs, steps=self.frozen_steps)
        LOG.info("frozen model: v%d, %d item rows", trainer.version, len(trainer.items))
        return trainer

    def test(self, q: Query) -> None:
        t0 = time.perf_counter()
        pending = _Pending(q, self.feed.tail(q.user, self._window))
        self.live.pending.append(pending)
        if self.frozen is not None:
            self.frozen.pending.append(pending)
        self.query_s += time.perf_counter() - t0

    def _flush_live(self) -> None:
        done = self.live.flush(self.board, self._live_name)
        if self.drift is None:
            return
        for pos in done:
            d = self.drift.update("hit_rate", self.board.hit(self._live_name, pos))
            if d is not None:
                self.drifts.append((pos, d))

    def flush(self) -> None:
        self._flush_live()
        if self.frozen is not None:
            self.frozen.flush(self.board, "frozen")
        ranks = self.board.ranks
        live = ranks.pop("_incremental", None)
        if live is None:
            live = ranks["incremental"]
        warm = np.arange(self.board.n_events) < self.warmup_events
        if "frozen" in ranks:
            ranks["frozen"][warm] = live[warm]  # during the warm-up frozen IS incremental
        own = self.cycle_s + self.query_s + self.live.seconds
        if "incremental" in self.seconds:
            self.seconds["incremental"] = own
        if "frozen" in self.seconds:
            scored = ~np.isnan(live)
            warm_share = float(warm[scored].mean()) if scored.any() else 0.0
            self.seconds["frozen"] = (
                self.warm_cycle_s
                + warm_share * (self.query_s + self.live.seconds)
                + (self.frozen.seconds if self.frozen else 0.0)
            )


def _digest(users: Sequence[str]) -> str:
    """A short fingerprint of a (sorted) user set, to compare runs cycle by cycle."""
    return hashlib.blake2b("\n".join(users).encode(), digest_size=8).hexdigest()


# --- which models a run has -------------------------------------------------------------
# name -> factory of its per-event model(s): config -> {result row: model}; a River
# grid (several configurations) gives one row each, ``river_mf:<label>``
BASELINES: dict[str, Callable[[Any], dict[str, OnlineModel]]] = {
    "popular": lambda c: {"popular": Popular()},
    "river_mf": lambda c: {
        ("river_mf" if len(c.river) == 1 else f"river_mf:{rc.label}"): RiverMF(rc, seed=c.seed)
        for rc in c.river
    },
    "cooccurrence": lambda c: {"cooccurrence": CoOccurrence(window=c.cooccurrence_window)},
}
ENCODER_MODELS = ("frozen", "incremental")


def build_models(
    config: Any,
    settings: Settings,
    feed: Feed,
    board: Scoreboard,
    warmup_events: int,
    drift: DriftMonitor | None,
    extra: Mapping[str, OnlineModel] | None = None,
) -> list[PrequentialModel]:
    """The models ``config.models`` names (a :class:`PrequentialConfig`), baselines
    first (in the order asked), then ``extra`` per-event models, then the encoder."""
    unknown = set(config.models) - set(BASELINES) - set(ENCODER_MODELS)
    if unknown:
        known = sorted(BASELINES) + list(ENCODER_MODELS)
        raise ValueError(f"unknown model(s) {sorted(unknown)}; expected some of {known}")
    models: list[PrequentialModel] = []
    for name in config.models:
        if name in BASELINES:
            for row, model in BASELINES[name](config).items():
                models.append(PerEventModel(row, model, board))
    for row, model in (extra or {}).items():
        models.append(PerEventModel(row, model, board))
    encoders = [m for m in ENCODER_MODELS if m in config.models]
    if encoders:
        models.append(
            EncoderModels(
                encoders,
                settings,
                feed,
                board,
                warmup_events,
                drift,
                frozen_steps=config.frozen_steps,
                score_batch=config.score_batch,
                warm_start=getattr(config, "warm_start", None),
            )  # fmt: skip
        )
    return models
