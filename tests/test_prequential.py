"""The prequential benchmark (PROTOCOL section 2): protocol order, baselines, drift, report."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from model.live import DriftMonitor, TrainingWorker
from model.metrics import hit_and_gain, rank_of
from model.prequential import Cadence, PrequentialConfig, run_prequential
from model.prequential import models as pq
from model.prequential.baselines import CoOccurrence, Popular, RiverMF, RiverMFConfig
from model.prequential.planted import shifted_clickstream
from model.prequential.report import write_report
from tests import helpers
from userstream.settings import Settings
from userstream.stores import MemoryEmbeddingStore, MemorySequenceStore
from userstream.types import Event

torch.set_num_threads(1)


def tiny_settings(tmp_path, **kw) -> Settings:
    base = dict(
        max_len=12,
        sequence_length=24,
        train_interval_s=1e9,
        train_every_events=100,
        train_steps=8,
        train_batch_size=32,
        learning_rate=5e-3,
        contrastive_weight=0.0,
        reservoir_size=200,
        refresh_budget=16,
        embed_batch_size=64,
        keep_checkpoints=1,
    )
    return helpers.tiny_settings(tmp_path, **{**base, **kw})


def ev(user, item, ts, behavior="view"):
    return {"user_id": user, "item_id": item, "behavior": behavior, "ts": ts}


class Spy:
    """Remembers what it had learned whenever it was asked to score."""

    def __init__(self) -> None:
        self.learned: list[tuple[str, int]] = []
        self.asked: list[tuple[str, int, int]] = []  # (user, n_items, events learned)

    def scores(self, user, n_items):
        self.asked.append((user, n_items, len(self.learned)))
        out = np.zeros(n_items)
        for _u, i in self.learned:  # popularity, so the seen-item exclusion matters
            out[i] += 1.0
        return out

    def learn_one(self, user, item):
        self.learned.append((user, item))


HAND = [
    ev("a", "x", 1.0),  # a's first event: not scored
    ev("b", "x", 2.0),  # b's first event: not scored
    ev("a", "y", 3.0),  # scored; y is new to the stream -> a miss for every model
    ev("b", "y", 4.0),  # scored; x (b's own) excluded, y ranks first
    ev("a", "x", 5.0),  # scored; a repeat of a's own item -> excluded -> a miss
    ev("c", "z", 6.0),  # c's first event
    ev("c", "x", 7.0),  # scored: x most popular
]


def test_protocol_scores_before_learning_and_skips_first_events(tmp_path):
    spy = Spy()
    r = run_prequential(
        HAND,
        tiny_settings(tmp_path),
        PrequentialConfig(models=("popular",), window=2, drift=False),
        extra_models={"spy": spy},
    )
    assert r.scored.tolist() == [False, False, True, True, True, False, True]
    # the prediction for event t saw exactly the events before t, never t or later
    assert [learned for _u, _n, learned in spy.asked] == [2, 3, 4, 6]
    assert [n for _u, n, _l in spy.asked] == [1, 2, 2, 3]  # items seen before t
    assert r.new_item.tolist()[2] and r.repeat.tolist()[4]
    hr = r.hr["spy"]
    assert hr[2] == 0.0 and hr[4] == 0.0  # new item, excluded repeat
    assert hr[3] == 1.0 and hr[6] == 1.0
    # NDCG of b's target y: x is excluded, so y ranks first
    assert r.ndcg["spy"][3] == 1.0
    assert np.isnan(hr[0]) and np.isnan(hr[5])
    assert r.mean("spy") == pytest.approx(0.5)


def record_cycles(monkeypatch) -> list[tuple[int, int]]:
    """(events ingested when a cycle ran, the version after it), appended as cycles run."""
    cycles: list[tuple[int, int]] = []
    real_cycle = TrainingWorker.run_cycle

    def run_cycle(self):
        n = self.sequences.counters()["events_ingested"]
        rep = real_cycle(self)
        cycles.append((n, rep.version))
        return rep

    monkeypatch.setattr(TrainingWorker, "run_cycle", run_cycle)
    return cycles


@pytest.mark.slow
def test_encoder_prediction_uses_the_last_completed_cycle_and_no_later_event(tmp_path, monkeypatch):
    events = shifted_clickstream(600, shift_at=600, n_users=20, n_groups=2, items_per_group=8)
    cycles = record_cycles(monkeypatch)
    seen_at_flush: list[tuple[int, float, int]] = []  # (event pos, latest ts read, version)

    real_flush = pq._Scorer.flush

    def flush(self, board, name):
        for p in self.pending:
            seen_at_flush.append((p.q.pos, max(b.ts for b in p.seq), self.trainer.version))
        return real_flush(self, board, name)

    monkeypatch.setattr(pq._Scorer, "flush", flush)
    s = tiny_settings(tmp_path, train_every_events=50, train_steps=2)
    r = run_prequential(events, s, PrequentialConfig(models=("incremental",), drift=False))

    assert len(seen_at_flush) == int(r.scored.sum()) > 500
    ts = np.array([round(e["ts"], 3) for e in events])
    for pos, latest, version in seen_at_flush:
        assert latest < ts[pos]  # the sequence read for event t holds only earlier events
        # the model is the one left by the last cycle that ran before event t
        ran_before = [v for n, v in cycles if n <= pos]
        assert version == ran_before[-1]
    assert [n for n, _ in cycles] == list(range(0, 600, 50))  # every B=50 events


def test_cadence_mirrors_run_forever():
    c = Cadence(interval_s=10.0, every_events=3)
    got = [c.due(t, n) for t, n in [(0, 0), (1, 1), (2, 2), (3, 3), (14, 4), (15, 5)]]
    assert got == [True, False, False, True, True, False]


def test_rank_metrics_count_ties_against_the_target_like_the_worst_tie_break():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scores = rng.integers(0, 4, size=25).astype(float)
        target, exclude = int(rng.integers(25)), rng.choice(25, 3, replace=False)
        exclude = exclude[exclude != target]
        hr, ndcg = hit_and_gain(np.array([rank_of(scores, target, exclude)]), k=5)
        masked = scores.copy()
        masked[exclude] = -np.inf
        ranks = []
        for _ in range(300):  # brute force: random tie-breaking, the target's worst rank
            order = np.lexsort((rng.random(25), -masked))
            ranks.append(int(np.where(order == target)[0][0]) + 1)
        worst = max(ranks)
        assert rank_of(scores, target, exclude) == worst
        assert hr[0] == (worst <= 5)
        assert ndcg[0] == pytest.approx(1 / np.log2(worst + 1) if worst <= 5 else 0.0)


class Random:
    """Random scores: its HR@10 is random ranking's (~k / items)."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def scores(self, user, n_items):
        return self.rng.random(n_items)

    def learn_one(self, user, item):
        pass


@pytest.mark.slow
def test_every_model_beats_random_clearly_on_a_planted_stream(tmp_path):
    events = shifted_clickstream(
        3000, shift_at=3000, n_users=150, n_groups=6, items_per_group=40, seed=3
    )
    s = tiny_settings(tmp_path, train_every_events=150, train_steps=6)
    r = run_prequential(
        events,
        s,
        PrequentialConfig(warmup=0.5, river=(RiverMFConfig(16, 8, 0.1),), drift=False, window=1000),
        extra_models={"random": Random()},
    )
    means = {m: r.mean(m) for m in r.models}
    chance = random_ranking_hr(events, k=10)  # what a random ranking scores, exactly
    assert 0.02 < chance < 0.05 and 0.02 < means["random"] < 0.05, means  # ~10 / 240 items
    for name in ("popular", "river_mf", "cooccurrence", "frozen", "incremental"):
        assert means[name] > 2 * chance, (chance, means)
    # the planted groups are what co-occurrence and our encoder exploit: well above popularity
    assert means["cooccurrence"] > 2 * means["popular"], means
    assert means["incremental"] > 1.8 * means["popular"], means


def random_ranking_hr(events, k: int) -> float:
    """Expected HR@k of a uniformly random ranking under the protocol: over the
    items seen so far minus the user's own, a new or repeated target a miss."""
    catalogue, mine, hits = set(), {}, []
    for ev in events:
        seen = mine.setdefault(ev["user_id"], set())
        if seen:
            candidates = len(catalogue) - len(seen)
            rankable = ev["item_id"] in catalogue and ev["item_id"] not in seen
            hits.append(min(k, candidates) / candidates if rankable else 0.0)
        catalogue.add(ev["item_id"])
        seen.add(ev["item_id"])
    return float(np.mean(hits))


def test_river_mirror_matches_river_predictions():
    m = RiverMF(RiverMFConfig(8, 4, 0.1), seed=1)
    rng = random.Random(0)
    for _ in range(300):
        m.learn_one(f"u{rng.randrange(5)}", rng.randrange(30))
    s = m.scores("u1", 30)
    direct = np.array([m.model.predict_one("u1", i) for i in range(30)])
    assert np.allclose(s, direct)


def test_popular_and_cooccurrence_learn_what_they_see():
    p, c = Popular(), CoOccurrence(window=3)
    for user, item in [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 2), ("c", 2), ("d", 0)]:
        p.learn_one(user, item)
        c.learn_one(user, item)
    assert int(np.argmax(p.scores("z", 3))) == 0
    assert int(np.argmax(c.scores("d", 3))) in (0, 1)  # 0 follows itself? no: 1 co-occurs
    assert c.scores("d", 3)[1] > c.scores("d", 3)[2]


def test_drift_monitor_fires_on_an_abrupt_shift_and_not_on_a_stationary_stream():
    rng = np.random.default_rng(0)
    stationary = DriftMonitor()
    stationary.update_many("hit_rate", (rng.random(40_000) < 0.2).astype(float))
    assert stationary.count == 0
    shifted = DriftMonitor()
    before = (rng.random(20_000) < 0.2).astype(float)
    after = (rng.random(20_000) < 0.05).astype(float)
    found = shifted.update_many("hit_rate", np.concatenate([before, after]))
    assert found and 20_000 < found[0].at < 21_000  # within ~1,000 events of the shift
    assert found[0].before > found[0].after

    # the loss: falling while the model learns is no drift; a jump is one
    loss = DriftMonitor()
    assert not loss.update_many("loss", 8.0 - 0.02 * np.arange(200) + rng.normal(0, 0.1, 200))
    assert loss.update_many("loss", 7.0 + rng.normal(0, 0.1, 20))
    assert loss.catchup_steps(4) == 16 and loss.catchup_steps(4) == 4


def test_worker_publishes_drifts_and_catches_up(tmp_path):
    s = tiny_settings(tmp_path, train_steps=3)
    store, emb = MemorySequenceStore(24), MemoryEmbeddingStore()
    drift = DriftMonitor(catchup_factor=3)
    worker = TrainingWorker(s, store, emb, drift=drift)
    real = worker.trainer.learn_many

    def learn_many(seqs, steps, **kw):
        counted.append(steps)
        return real(seqs, steps, **kw)

    counted: list[int] = []
    worker.trainer.learn_many = learn_many  # type: ignore[method-assign]
    off = 0
    for cycle in range(3):
        batch = []
        for u in range(8):
            for j in range(4):
                off += 1
                batch.append((0, off, Event(f"u{u}", f"i{(u + j + cycle) % 10}", "view", off)))
        store.apply_many("t", batch)
        if cycle == 1:
            drift.count, drift._pending_catchup = 1, True  # as if the hit rate had dropped
        worker.run_cycle()
    assert counted == [3, 9, 3]
    assert emb.model_info().drifts == 1
    assert worker.trainer.extra["drifts"] == 1  # saved with the checkpoint, survives restarts


def test_report_json_and_plot(tmp_path):
    events = shifted_clickstream(1200, shift_at=600, n_users=30, n_groups=3, items_per_group=10)
    r = run_prequential(
        events,
        tiny_settings(tmp_path, train_every_events=200, train_steps=2),
        PrequentialConfig(window=300, river=(RiverMFConfig(8, 2, 0.1), RiverMFConfig(8, 4, 0.1))),
    )
    data = write_report(r, tmp_path / "out" / "r.json", shift_at=600)
    on_disk = json.loads((tmp_path / "out" / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert set(on_disk["models"]) == {
        "popular",
        "river_mf",
        "cooccurrence",
        "frozen",
        "incremental",
    }
    for m in on_disk["models"].values():
        assert 0.0 <= m["hr@10"] <= 1.0 and 0.0 <= m["ndcg@10"] <= m["hr@10"]
        assert m["events_per_s"] > 0
    assert on_disk["events"] == 1200 and on_disk["scored_events"] == int(r.scored.sum())
    assert on_disk["settings"]["train_every_events"] == 200
    assert len(on_disk["river_grid"]) == 2  # the grid, best first
    assert on_disk["river_grid"][0]["hr@10"] >= on_disk["river_grid"][1]["hr@10"]
    assert set(on_disk["recovery"]) == set(on_disk["models"])
    assert len(on_disk["curves"]["incremental"]["event"]) == 4
    png = tmp_path / "out" / "r.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and on_disk["plot"] == "r.png"


def test_scorer_shares_passes_between_a_users_nested_prefixes_and_scores_as_one_by_one(tmp_path):
    from model.trainer import Trainer
    from userstream.types import Behavior

    s = tiny_settings(tmp_path, max_len=6, sequence_length=12, dropout=0.0)
    tr = Trainer(s)
    seq = [Behavior(f"i{k % 7}", "view", float(k)) for k in range(12)]
    tr.learn_many([seq, seq[3:], seq[::-1]], steps=3)
    cat = pq.Catalogue()
    for b in seq:
        cat.add("a", b.item_id)
    # user a: prefixes of 2..5 behaviors (fit max_len: one pass), then 7..9 (one each);
    # user b's query in between does not break a's chain
    lengths = [("a", n) for n in (2, 3, 4, 5)] + [("b", 4)] + [("a", n) for n in (6, 7, 8, 9)]
    pending = []
    for pos, (user, n) in enumerate(lengths):
        q = pq.Query(pos, user, len(cat.items), cat.index[seq[n].item_id], 0, repeat=False)
        pending.append(pq._Pending(q, seq[:n][-(s.max_len + 1) :]))

    def scores_of(scorer, items):
        got = {}
        board = pq.Scoreboard(len(lengths), cat, 10)
        board.record = lambda name, q, sc: got.__setitem__(q.pos, sc.copy())
        for group in items:
            scorer.pending = list(group)
            scorer.flush(board, "m")
        return got

    together = pq._Scorer(tr, batch=4)
    shared = scores_of(together, [pending])
    alone = scores_of(pq._Scorer(tr, batch=1), [[p] for p in pending])
    # a's 2..5 and 6 share one pass (6 behaviors = max_len); 7, 8, 9 and b alone
    assert together.passes == 5
    assert sorted(shared) == sorted(alone) == list(range(len(lengths)))
    for pos in alone:
        np.testing.assert_allclose(shared[pos], alone[pos], rtol=1e-5, atol=1e-5)
    assert not np.allclose(shared[0], shared[3])  # the states differ by position


def test_bench_prequential_defaults_are_the_reported_settings(monkeypatch, tmp_path):
    from userstream.cli import build_parser
    from userstream.cli.bench import PREQUENTIAL_SETTINGS, bench_settings

    monkeypatch.delenv("USERSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    argv = ["bench", "prequential", "--data", "x", "--format", "movielens"]
    s = bench_settings(build_parser().parse_args(argv), PREQUENTIAL_SETTINGS)
    assert {k: getattr(s, k) for k in PREQUENTIAL_SETTINGS} == PREQUENTIAL_SETTINGS
    given = build_parser().parse_args([*argv, "--train-steps", "2", "--set", "max_len=20"])
    s = bench_settings(given, PREQUENTIAL_SETTINGS)
    assert (s.train_steps, s.max_len, s.train_every_events) == (2, 20, 125)


def test_warm_start_trains_on_the_backlog_and_the_stream_starts_after_it(tmp_path, monkeypatch):
    """``--warm-start``: the encoder is trained offline on the backlog; the loop applies
    the backlog without scoring it or taking a cycle on it, starts the live model from
    the checkpoint (its first cycle continues the checkpoint's version) and keeps the
    checkpoint as ``frozen``."""
    from model.prequential.warm import backlog_events, train_backlog
    from model.trainer import Trainer

    events = shifted_clickstream(900, shift_at=900, n_users=30, n_groups=2, items_per_group=10)
    s = tiny_settings(tmp_path, train_every_events=100, train_steps=2)
    n0 = backlog_events(0.4, len(events))
    assert n0 == 360
    path, summary = train_backlog(events[:n0], s, tmp_path / "warm", max_epochs=3)
    assert summary["backlog_events"] == n0 and summary["users"] > 0 and path.exists()
    ckpt = Trainer.load(path, s)

    cycles = record_cycles(monkeypatch)
    cfg = PrequentialConfig(models=("popular", "frozen", "incremental"), warmup=n0, backlog=n0,
                            warm_start=str(path), drift=False)  # fmt: skip
    r = run_prequential(events, s, cfg)
    assert not r.scored[:n0].any() and r.scored[n0:].sum() > 400
    assert cycles[0] == (n0, ckpt.version + 1)  # no cycle on the backlog; on from the checkpoint
    assert all(n >= n0 for n, _ in cycles)
    for name in ("popular", "frozen", "incremental"):
        assert np.isnan(r.ranks[name][:n0]).all() and 0 < r.mean(name) < 1
    # frozen IS the checkpoint: its score of an event equals the checkpoint's own
    board = pq.Scoreboard(len(events), pq.Catalogue(), 10)
    board.add_model("ckpt")
    scorer, store = pq._Scorer(ckpt, 64), MemorySequenceStore(s.sequence_length)
    first = next(p for p in range(n0, len(events)) if r.scored[p])
    for pos, e in enumerate(events[: first + 1]):
        parsed = Event(str(e["user_id"]), str(e["item_id"]), e["behavior"], float(e["ts"]))
        if pos == first:
            cat = board.catalogue
            target = cat.index.get(parsed.item_id)
            q = pq.Query(pos, parsed.user_id, len(cat.items), target,
                         len(cat.user_sets[parsed.user_id]), repeat=False)  # fmt: skip
            scorer.pending.append(pq._Pending(q, store.read_tail(parsed.user_id, s.max_len + 1)))
            scorer.flush(board, "ckpt")
        store.apply_many("t", [(0, pos, parsed)])
        board.catalogue.add(parsed.user_id, parsed.item_id)
    assert board.ranks["ckpt"][first] == r.ranks["frozen"][first]
    with pytest.raises(ValueError, match="must equal the backlog"):
        run_prequential(events, s, PrequentialConfig(models=("incremental",), warmup=0.2,
                                                     backlog=n0, warm_start=str(path)))  # fmt: skip
    for bad in (900, 0.0001):  # all of the stream, none of it
        with pytest.raises(ValueError, match="leaves nothing"):
            backlog_events(bad, 900)
