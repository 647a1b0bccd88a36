"""Item expiry (Monolith-style): rows of items unseen for ITEM_TTL_S of event time
are freed and reused, so an endless stream of new items keeps the item table and
the checkpoints bounded. The real torch model throughout, on memory stores."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from model.batching import make_batch
from model.checkpoint import FORMAT, read_checkpoint
from model.live import TrainingWorker
from model.recommend import NextItemModel, next_item_scores, recommend_many
from model.trainer import INITIAL_ITEM_ROWS, Trainer
from model.vocab import ItemVocab
from tests.helpers import tiny_settings
from userstream.settings import Settings
from userstream.stores import MemoryEmbeddingStore, MemorySequenceStore
from userstream.types import Behavior, Event

torch.set_num_threads(1)

DAY = 86_400.0
T0 = 1_700_000_000.0
TOPIC = "behavior-events"


def settings(tmp_path, **kw) -> Settings:
    base = dict(max_len=16, sequence_length=32, train_steps=2, train_batch_size=16,
                reservoir_size=50, refresh_budget=0, embed_batch_size=64, keep_checkpoints=1,
                item_ttl_s=DAY)  # fmt: skip
    return tiny_settings(tmp_path, **{**base, **kw})


def seq(items, t0: float, step: float = 60.0) -> list[Behavior]:
    return [Behavior(i, "view", t0 + k * step) for k, i in enumerate(items)]


class ChurningFeed:
    """Each day ``n_items`` new items ("d{day}-i{k}"), never seen again after it;
    user u views 10 of them (k = 5u .. 5u+9 mod n_items), so each item is seen by
    exactly two users, all within the first hour of the day."""

    def __init__(self, store: MemorySequenceStore, n_users: int = 40, n_items: int = 200):
        self.store, self.n_users, self.n_items = store, n_users, n_items
        self.offsets = itertools.count()

    def day(self, d: int) -> None:
        batch = []
        for u in range(self.n_users):
            for j in range(10):
                item = f"d{d}-i{(5 * u + j) % self.n_items}"
                ts = T0 + d * DAY + u * 60 + j
                batch.append((0, next(self.offsets), Event(f"u{u}", item, "view", ts)))
        self.store.apply_many(TOPIC, batch)


def run_days(tmp_path, days: int, **kw):
    s = settings(tmp_path, **{"item_ttl_s": DAY / 2, **kw})
    store = MemorySequenceStore(s.sequence_length)
    worker = TrainingWorker(s, store, MemoryEmbeddingStore())
    feed = ChurningFeed(store)
    reports, sizes = [], []
    for d in range(days):
        feed.day(d)
        reports.append(worker.run_cycle())
        sizes.append(Path(reports[-1].checkpoint).stat().st_size / 1e6)  # MB
    return worker, reports, sizes


# --- (a) an endless churning stream stays bounded --------------------------------


def test_churning_stream_keeps_the_item_table_and_checkpoints_bounded(tmp_path):
    days = 12
    worker, reports, size = run_days(tmp_path / "ttl", days)
    _, grown, grown_size = run_days(tmp_path / "never", days, item_ttl_s=0)

    assert all(r.ran for r in reports)
    # day 0: 200 items; from day 1 on, the previous day's 200 expire each cycle and
    # the next day's 200 take their rows: 400 slots, 200 live, 200 free
    assert [r.items_live for r in reports] == [200] * days
    assert [r.items_expired for r in reports] == [0] + [200] * (days - 1)
    assert reports[-1].items_expired_total == 200 * (days - 1)
    assert [r.item_rows_free for r in reports] == [0] + [200] * (days - 1)
    assert {r.item_rows for r in reports} == {INITIAL_ITEM_ROWS}  # never grew
    v = worker.trainer.items
    assert len(v) == v.first_item_row + 400 and v.reused_total == 200 * (days - 2)
    assert worker.embeddings.model_info().items == 200  # ModelInfo.items: live items

    # without expiry every day's items keep their rows and the table grows
    assert [r.items_live for r in grown] == [200 * (d + 1) for d in range(days)]
    assert grown[-1].item_rows == 4096 and grown[-1].items_expired_total == 0

    assert max(size[2:]) < 1.02 * min(size[2:])  # flat once churn is steady
    assert grown_size[-1] > 2.5 * size[-1], (grown_size[-1], size[-1])  # 4096 rows vs 1024


def test_old_behaviors_re_read_from_stored_sequences_admit_nothing(tmp_path):
    """A dirty user's stored sequence still holds yesterday's expired items: the
    re-read sightings carry their old event times, so they neither re-admit the
    items nor refresh any stamp."""
    t = Trainer(settings(tmp_path))
    old = seq([f"old{k}" for k in range(5)], T0)
    t.learn_many([old], steps=1)
    t.learn_many([seq(["new"], T0 + 2 * DAY)], steps=1)
    assert t.expire_items() == 5
    t.learn_many([old + seq(["new"], T0 + 2 * DAY)], steps=1)  # re-read of the whole history
    assert t.items.num_admitted == 1 and t.expire_items() == 0
    assert t.items.rows_for(["old0"]) == [t.items.bucket_of("old0")]


# --- (b) a freed row is reused fresh, never through the old id -------------------


def test_expired_item_maps_to_its_bucket_and_its_row_is_reused_fresh(tmp_path):
    t = Trainer(settings(tmp_path))
    t.learn_many([seq(["x", "a", "b", "a"], T0)] * 4, steps=3)
    (row_x,) = t.items.rows_for(["x"])
    trained = t.encoder.item_emb.weight[row_x].detach().clone()
    moments = t.optimizer.state[t.encoder.item_emb.weight]
    assert moments["exp_avg"][row_x].abs().sum() > 0  # the old item's Adam state

    # a and b are seen again two days later, x is not: x expires
    t.learn_many([seq(["a", "b"], T0 + 2 * DAY)] * 4, steps=1)
    assert t.expire_items() == 1
    assert "x" not in t.items and t.items.item_of(row_x) is None
    assert t.items.free_rows().tolist() == [row_x]
    bucket = t.items.bucket_of("x")
    assert t.items.rows_for(["x"]) == [bucket] and bucket < t.items.first_item_row
    b = make_batch([seq(["a", "x"], T0)], t.items, t.behaviors, 16, 32)
    assert b.items[0, -2:].tolist() == [t.items.rows_for(["a"])[0], bucket]

    # a new item takes the freed row, re-initialized, with zero Adam moments
    t.observe_many([seq(["y"], T0 + 2 * DAY)])
    assert t.items.rows_for(["y"]) == [row_x] and t.items.item_of(row_x) == "y"
    fresh = t.encoder.item_emb.weight[row_x].detach()
    assert not torch.allclose(fresh, trained)
    assert fresh.std().item() == pytest.approx(0.02, rel=0.5)  # drawn like a new row
    moments = t.optimizer.state[t.encoder.item_emb.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert moments[key][row_x].eq(0).all()
        assert moments[key][t.items.rows_for(["a"])[0]].abs().sum() > 0  # others keep theirs

    # x comes back: a row of its own again, not the one y holds
    t.observe_many([seq(["x"], T0 + 2 * DAY + 60)])
    (again,) = t.items.rows_for(["x"])
    assert again not in (row_x, bucket) and t.items.rows_for(["y"]) == [row_x]
    assert t.items.num_admitted == 4 and t.items.expired_total == 1


def test_live_cap_evicts_the_least_recently_seen(tmp_path):
    t = Trainer(settings(tmp_path, item_ttl_s=0, item_live_max=3))
    t.observe_many([[Behavior(f"i{k}", "view", T0 + k) for k in (4, 0, 2, 3, 1)]])
    rows = dict(zip("01234", t.items.rows_for([f"i{k}" for k in range(5)]), strict=True))
    assert t.expire_items() == 2
    assert sorted(i for i in "01234" if f"i{i}" in t.items) == ["2", "3", "4"]
    assert t.items.free_rows().tolist() == sorted([rows["0"], rows["1"]])


# --- (c) recommendations never return an expired item ----------------------------


def test_recommendations_never_return_an_expired_item(tmp_path):
    t = Trainer(settings(tmp_path))
    catalogue = [f"i{k}" for k in range(12)]
    t.learn_many([seq(catalogue, T0)] * 4, steps=2)
    keep = catalogue[:6]
    t.learn_many([seq(keep, T0 + 2 * DAY)] * 4, steps=1)
    assert t.expire_items() == 6
    freed = t.items.free_rows()
    # make a freed row the best match for every query: unmasked, it would win
    query = [seq(["i0", "i1"], T0 + 2 * DAY)]
    b = make_batch(query, t.items, t.behaviors, 16, 32)
    t.encoder.eval()
    with torch.no_grad():
        h = t.encoder(b.items, b.behaviors, b.gaps, causal=True)[:, -1]  # (1, H)
        t.encoder.item_emb.weight[torch.from_numpy(freed)] = 50 * h / h.norm()

    scores = next_item_scores(t.encoder, b, t.items)  # (1, slots)
    first = t.items.first_item_row
    assert scores.shape == (1, 12) and len(freed) == 6
    assert torch.isinf(scores[0, freed - first]).all()
    assert torch.isfinite(scores[0, np.array(t.items.rows_for(keep)) - first]).all()
    recs = recommend_many(t.encoder, t.items, t.behaviors, query, k=50)[0]
    assert sorted(r.item_id for r in recs) == keep[2:]  # live, not seen; nothing else
    recs = recommend_many(t.encoder, t.items, t.behaviors, query, k=50, exclude_seen=False)[0]
    assert sorted(r.item_id for r in recs) == keep

    path = t.save(tmp_path / "ckpt")  # the API's model: the same from the checkpoint
    served = NextItemModel.load(path).recommend_many(query, k=50, exclude_seen=False)[0]
    assert sorted(r.item_id for r in served) == keep


# --- compaction: memory follows the live items, not their peak -------------------


def test_compaction_after_a_burst_shrinks_the_table_and_keeps_every_live_row(tmp_path):
    t = Trainer(settings(tmp_path))
    burst = [f"b{k}" for k in range(3000)]
    t.learn_many([seq(burst[k : k + 16], T0) for k in range(0, 3000, 16)], steps=1)
    stay = [f"s{k}" for k in range(100)]
    t.learn_many([seq(stay[k : k + 10], T0 + 2 * DAY) for k in range(0, 100, 10)], steps=2)
    assert t.config.n_items == 4096
    path_before = t.save(tmp_path / "before")
    assert t.expire_items() == 3000 and t.config.n_items == 4096  # expiry alone frees
    rows = t.items.rows_for(stay)
    weight = t.encoder.item_emb.weight
    vectors, moments = weight[rows].detach().clone(), t.optimizer.state[weight]["exp_avg"][rows]
    query = [seq(stay[:5], T0 + 2 * DAY)]
    before = recommend_many(t.encoder, t.items, t.behaviors, query, k=10)[0]

    assert t.compact_items()  # 3000 free rows > 2 x 100 live: the rule compacts
    assert t.items.num_free == 0 and len(t.items) == t.items.first_item_row + 100
    assert t.config.n_items == INITIAL_ITEM_ROWS
    new_rows = t.items.rows_for(stay)
    assert new_rows == list(range(t.items.first_item_row, t.items.first_item_row + 100))
    weight = t.encoder.item_emb.weight
    assert weight.shape[0] == INITIAL_ITEM_ROWS
    assert torch.equal(weight[new_rows].detach(), vectors)
    assert torch.equal(t.optimizer.state[weight]["exp_avg"][new_rows], moments)
    after = recommend_many(t.encoder, t.items, t.behaviors, query, k=10)[0]
    assert [r.item_id for r in after] == [r.item_id for r in before]
    assert [r.score for r in after] == pytest.approx([r.score for r in before], abs=1e-5)
    path_after = t.save(tmp_path / "after")
    assert path_after.stat().st_size < 0.4 * path_before.stat().st_size
    assert np.isfinite(t.learn_many(query * 4, steps=1)["loss"])  # still trains


def test_steady_churn_reuses_rows_and_does_not_compact(tmp_path):
    t = Trainer(settings(tmp_path))
    for name, ts in (("a", T0), ("b", T0 + 2 * DAY)):  # 2000 items a day, 16 per sequence
        t.observe_many([seq([f"{name}{k}" for k in range(j, j + 16)], ts, step=0.0)
                        for j in range(0, 2000, 16)])  # fmt: skip
    assert t.expire_items() == 2000
    assert not t.compact_items()  # 2000 free beside 2000 live: reuse, not compaction
    assert t.config.n_items == 4096 and t.items.num_free == 2000


# --- (d) checkpoints keep stamps, the free list and the vocabulary ---------------


def test_checkpoint_round_trip_keeps_stamps_free_rows_and_counters(tmp_path):
    s = settings(tmp_path)
    t = Trainer(s)
    t.learn_many([seq([f"i{k}" for k in range(8)], T0)] * 2, steps=1)
    t.learn_many([seq(["i0", "i3", "z"], T0 + 2 * DAY)] * 2, steps=1)
    assert t.expire_items() == 6
    path = t.save(tmp_path / "ckpt")
    ckpt = read_checkpoint(path)
    assert FORMAT == 2

    u = Trainer.load(path, s)
    a, b = t.items, u.items
    assert b.state_dict() == a.state_dict()
    assert b.free_rows().tolist() == a.free_rows().tolist() and len(a.free_rows()) == 6
    assert np.array_equal(b.last_seen, a.last_seen)  # inf at free slots
    assert math.isinf(b.last_seen[a.free_rows()[0] - a.first_item_row])
    assert b.clock == a.clock == T0 + 2 * DAY + 120
    assert (b.expired_total, b.ttl_s) == (6, DAY)
    assert b.rows_for(["i0", "i3", "z", "i1"]) == a.rows_for(["i0", "i3", "z", "i1"])
    assert b.rows_for(["i1"]) == [b.bucket_of("i1")]
    assert ckpt.items["items"].count(None) == 6
    # both give the lowest free rows to the next new items, and expire the same later
    lowest, first = a.free_rows()[:2].tolist(), a.first_item_row
    assert lowest == [first + k for k, i in enumerate(ckpt.items["items"]) if i is None][:2]
    for v in (a, b):
        v.observe_many(["n1", "n2"], [T0 + 4 * DAY] * 2)
    assert b.rows_for(["n1", "n2"]) == a.rows_for(["n1", "n2"]) == lowest
    gone = sorted(a.rows_for(["i0", "i3", "z"]))  # seen last two days before n1, n2
    assert a.expire().tolist() == b.expire().tolist() == gone

    # a restart with another TTL takes the new one (the policy is the run's)
    assert Trainer.load(path, s.replace(item_ttl_s=0)).items.ttl_s is None


def test_format_1_checkpoints_load_and_get_a_full_ttl(tmp_path):
    s = settings(tmp_path)
    t = Trainer(s)
    t.learn_many([seq(["a", "b"], T0)], steps=1)
    path = t.save(tmp_path / "ckpt")
    payload = torch.load(path, weights_only=True)
    payload["format"] = 1
    for key in ("last_seen", "clock", "expired_total", "reused_total"):
        del payload["items"][key]  # what format 1 wrote
    torch.save(payload, path)
    u = Trainer.load(path, s)
    assert u.items.rows_for(["a", "b"]) == t.items.rows_for(["a", "b"])
    assert np.isnan(u.items.last_seen).all()  # unknown until the clock is known
    u.items.observe_many(["c"], [T0 + 10 * DAY])
    assert u.expire_items() == 0  # stamped with the clock now, not expired at once
    u.items.observe_many(["c"], [T0 + 11.5 * DAY])
    assert u.expire_items() == 2

    payload["format"] = 3
    torch.save(payload, path)
    with pytest.raises(ValueError, match="format 1 or 2"):
        read_checkpoint(path)


def test_vocab_state_is_json_safe_with_free_slots():
    v = ItemVocab(ttl_s=10)
    v.observe_many(["a", "b", "c"], [0.0, 5.0, 8.0])
    v.observe_many(["d"], [20.0])
    v.expire()
    w = ItemVocab()
    w.load_state_dict(json.loads(json.dumps(v.state_dict(), allow_nan=False)))
    assert w.rows_for(list("abcd")) == v.rows_for(list("abcd"))
    assert w.free_rows().tolist() == v.free_rows().tolist() == [66, 67, 68]  # a, b, c
