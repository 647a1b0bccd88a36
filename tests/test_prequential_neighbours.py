"""Neighbour usefulness on the stream (PROTOCOL section 3) inside the prequential loop:
the computation on a hand-made stream, every source on a planted one, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model.prequential import NEIGHBOUR_SOURCES, PrequentialConfig, run_prequential
from model.prequential.neighbours import UserRows, neighbour_scores, same_group_precision
from model.prequential.report import table, write_report
from stream.generator import ClickstreamGenerator
from tests import helpers

torch.set_num_threads(1)


def ev(user, item, ts):
    return {"user_id": user, "item_id": item, "behavior": "view", "ts": ts}


# a: x y . . z       b: . . x y z       c: x . w y   (in time order below)
HAND = [
    ev("a", "x", 1), ev("a", "y", 2), ev("b", "x", 3), ev("b", "y", 4), ev("b", "z", 5),
    ev("c", "x", 6), ev("a", "z", 7), ev("c", "w", 8), ev("c", "y", 9),
]  # fmt: skip


def test_user_knn_neighbour_ranks_on_a_hand_made_stream(tmp_path):
    """Ranks worked out by hand, one nearest neighbour (cosine over item sets):

    * e1 a->y: y is new to the stream: a miss.
    * e3 b->y: b has {x}; its neighbour a has {x, y}; x is b's own: y ranks 1.
    * e4 b->z: new item: a miss.
    * e6 a->z: a has {x, y}; b {x, y, z} (cos 2/sqrt(6)) beats c {x} (1/sqrt(2)):
      z ranks 1 (x, y excluded).
    * e7 c->w: new item: a miss.
    * e8 c->y: c has {x, w}; a and b both {x, y, z} (cos 1/sqrt(6) each): the
      earlier user a; y and z tie at 1 neighbour each: y ranks 2 (ties count
      against the target).
    """
    settings = helpers.tiny_settings(tmp_path)
    cfg = PrequentialConfig(models=("popular",), neighbours=("user_knn", "random"),
                            neighbour_k=1, drift=False)  # fmt: skip
    r = run_prequential(HAND, settings, cfg)
    ranks = r.neighbour_ranks["user_knn"]
    want = [np.nan, math.inf, np.nan, 1, math.inf, np.nan, 1, math.inf, 2]
    np.testing.assert_array_equal(ranks, np.asarray(want, dtype=float))
    hits = [0, 1, 0, 1, 0, 1]  # the six scored events
    gains = [0, 1, 0, 1, 0, 1 / math.log2(3)]
    assert r.neighbour_mean("user_knn") == pytest.approx(np.mean(hits))
    assert r.neighbour_mean("user_knn", "ndcg") == pytest.approx(np.mean(gains))
    assert set(r.neighbour_ranks) == {"user_knn", "random"}
    # the next-item models are unchanged by the neighbour scoring
    plain = run_prequential(HAND, settings, PrequentialConfig(models=("popular",), drift=False))
    np.testing.assert_array_equal(plain.ranks["popular"], r.ranks["popular"])


def test_neighbour_scores_count_the_neighbours_holding_each_item():
    rows = UserRows()
    for user, item in [("a", 0), ("a", 2), ("b", 2), ("b", 3), ("c", 1)]:
        rows.add(user, item)
    np.testing.assert_array_equal(neighbour_scores([0, 1], rows, 4), [1, 0, 2, 1])
    np.testing.assert_array_equal(neighbour_scores([], rows, 4), [0, 0, 0, 0])


def test_a_source_without_an_answer_scores_precision_zero():
    rows = UserRows()
    rows.add("a", 0)
    rows.add("b", 0)

    class Silent:
        name = "silent"

        def neighbours(self, user, k):
            return None

    assert same_group_precision(Silent(), rows, {"a": 0, "b": 0}) == 0.0


def test_every_source_against_a_planted_stream(tmp_path):
    """Users in 4 interest groups: the item-set and model sources find the user's
    own group, random ones do not; neighbours' items predict the next item."""
    gen = ClickstreamGenerator(n_users=120, n_groups=4, items_per_group=30, seed=2,
                               noise=0.05, mean_gap_s=0.01)  # fmt: skip
    events = list(gen.events(2400))
    groups = {u: gen.group_of(u) for u in gen.user_ids}
    settings = helpers.tiny_settings(
        tmp_path, train_every_events=300, train_interval_s=1e9, train_steps=3, hidden_size=32,
        max_len=30, sequence_length=30, contrastive_weight=0.0,
    )  # fmt: skip
    cfg = PrequentialConfig(warmup=0.3, models=("river_mf", "frozen", "incremental"),
                            neighbours=NEIGHBOUR_SOURCES)  # fmt: skip
    r = run_prequential(events, settings, cfg, groups=groups)
    p = r.precision
    assert set(p) == set(NEIGHBOUR_SOURCES), p
    assert p["random"] < 0.4, p  # about 1 in 4
    for name in ("ours", "user_knn", "river_mf"):
        assert p[name] >= 0.9, (name, p)
    assert p["frozen"] >= 0.6, p
    hr = {n: r.neighbour_mean(n) for n in NEIGHBOUR_SOURCES}
    for name in ("ours", "user_knn", "river_mf", "frozen"):
        assert hr[name] > 2 * hr["random"], hr
    # the embedder runs every 10 events, as the live thread would: a user waits at
    # most that long for a vector, so ours misses few queries the others answer
    unanswered = np.isinf(r.neighbour_ranks["ours"]) & ~np.isinf(r.neighbour_ranks["user_knn"])
    assert unanswered[r.scored].mean() < 0.03, unanswered[r.scored].mean()
    warm = np.arange(r.n_events) < r.warmup_events  # during the warm-up frozen IS ours
    np.testing.assert_array_equal(
        r.neighbour_ranks["frozen"][warm], r.neighbour_ranks["ours"][warm]
    )

    report = write_report(r, tmp_path / "pq.json")
    on_disk = json.loads((tmp_path / "pq.json").read_text())
    assert on_disk["neighbours"]["ours"]["hr@10"] == pytest.approx(hr["ours"], abs=1e-6)
    assert set(on_disk["neighbours"]) == set(NEIGHBOUR_SOURCES)
    assert on_disk["neighbours_precision@10"]["ours"] == pytest.approx(p["ours"], abs=1e-6)
    ratio = report["neighbours_ratio"]
    best = max((n for n in hr if n != "ours"), key=hr.get)
    assert ratio["best_other"] == best
    assert ratio["ours_over_best_other"] == pytest.approx(hr["ours"] / hr[best], abs=1e-5)
    assert (tmp_path / "pq.png").stat().st_size > 0
    assert "ours / best other" in table(r)


def test_sources_that_need_the_encoder_say_so(tmp_path):
    cfg = PrequentialConfig(models=("popular",), neighbours=("ours",))
    with pytest.raises(ValueError, match="need the encoder"):
        run_prequential(HAND, helpers.tiny_settings(tmp_path), cfg)
    with pytest.raises(ValueError, match="unknown neighbour source"):
        run_prequential(HAND, helpers.tiny_settings(tmp_path),
                        PrequentialConfig(models=("popular",), neighbours=("nope",)))  # fmt: skip


def test_the_default_index_answers_as_the_apis_own():
    from model.prequential.neighbours import ExactIndex
    from serving.index import UserIndex

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    nums = rng.permutation(10_000)[:300]
    q = vecs[:7]
    s1, n1 = ExactIndex(nums, vecs).search(q, 21)
    s2, n2 = UserIndex.build(nums, vecs).search(q, 21)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    _, few = ExactIndex(nums[:3], vecs[:3]).search(q[:1], 5)
    assert few[0, 3:].tolist() == [-1, -1]


def test_overlap_counts_kept_per_event_match_the_item_sets():
    """user_knn reads item-overlap counts that UserRows keeps per event; they are the
    counts of the item sets, whether tracking starts at once or half way."""
    rng = np.random.default_rng(3)
    early, late = UserRows(), UserRows()
    early.track_overlap()
    events = [(f"u{rng.integers(40)}", int(rng.integers(60))) for _ in range(1500)]
    for i, (user, item) in enumerate(events):
        early.add(user, item)
        late.add(user, item)
        if i == 700:
            late.track_overlap()
    n = len(early)
    held = early.matrix[:n]
    want = held @ held.T
    np.testing.assert_array_equal(early.overlap[:n, :n], want)
    np.testing.assert_array_equal(late.overlap[:n, :n], want)
    np.testing.assert_array_equal(np.diag(want), early.sizes[:n])


def test_exact_index_upserts_in_place_and_deletes():
    from model.prequential.neighbours import ExactIndex

    eye = np.eye(3, dtype=np.float32)
    ix = ExactIndex([5, 7], eye[:2])
    ix.upsert([7, 9, 9], np.stack([eye[2], eye[0], eye[1]]))  # 7 replaced; 9 twice: last wins
    assert ix.nums.tolist() == [5, 7, 9]
    _, nums = ix.search(eye[2], 1)
    assert nums[0, 0] == 7
    _, nums = ix.search(eye[1], 1)
    assert nums[0, 0] == 9
    assert ix.delete([7, 42]) == 1
    assert ix.nums.tolist() == [5, 9]
    _, nums = ix.search(eye[1], 3)
    assert nums[0].tolist() == [9, 5, -1]


def test_ours_follows_the_update_feed_as_a_rebuild_would(tmp_path):
    """``ours`` keeps its index by following the embedding store's update feed: after
    each refresh it answers exactly as an index built from every stored embedding; a
    feed trimmed past what it applied makes it build again."""
    from model.prequential.feeds import MemoryFeed
    from model.prequential.neighbours import ExactIndex, IndexSource

    feed = MemoryFeed(10)
    rows = UserRows()
    src = IndexSource(feed, rows)
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(30)]
    for i, u in enumerate(users):
        rows.add(u, i)
    for step in range(6):
        who = rng.choice(users, size=8, replace=False).tolist()
        vecs = rng.normal(size=(8, 4)).astype(np.float32)
        feed.embeddings.upsert(who, vecs / np.linalg.norm(vecs, axis=1, keepdims=True), step)
        src.refresh()
        names, all_vecs, nums, _ = feed.embeddings.read_all()
        rebuilt = ExactIndex(nums, all_vecs)
        for u in names:
            _, want = rebuilt.search(feed.embeddings.get(u), 6)
            me = feed.embeddings.num_of(u)
            others = [n for n in want[0].tolist() if n != me][:5]
            assert src.neighbours(u, 5) == [rows.row[v] for v in feed.embeddings.users_for(others)]
    assert src.builds == 1  # built once, then followed
    feed.embeddings.upsert(["u0"], np.ones((1, 4), np.float32) / 2, 9)
    feed.embeddings.upsert(["u1"], np.ones((1, 4), np.float32) / 2, 9)
    feed.embeddings.trim_feed(feed.embeddings.feed_head())  # u0's entry gone unread
    src.refresh()
    assert src.builds == 2
    assert np.allclose(src.vector["u0"], 0.5)


def test_extra_neighbour_sources_are_scored_beside_the_named_ones(tmp_path):
    """``extra_neighbours``: a source made from the loop's context is scored like the
    bench's own; one that recomputes user_knn from the shared rows ranks as it does."""
    from model.prequential.neighbours import UserKNN

    made = []

    def knn_again(ctx):
        made.append(ctx)
        return UserKNN(ctx.rows)

    cfg = PrequentialConfig(models=("popular",), neighbours=("user_knn",), neighbour_k=1,
                            drift=False)  # fmt: skip
    r = run_prequential(HAND, helpers.tiny_settings(tmp_path), cfg,
                        extra_neighbours={"knn_again": knn_again})  # fmt: skip
    assert set(r.neighbour_ranks) == {"user_knn", "knn_again"}
    np.testing.assert_array_equal(r.neighbour_ranks["knn_again"], r.neighbour_ranks["user_knn"])
    assert made[0].live_trainer() is None  # no encoder in this run
    with pytest.raises(ValueError, match="name of another source"):
        run_prequential(HAND, helpers.tiny_settings(tmp_path), cfg,
                        extra_neighbours={"user_knn": knn_again})  # fmt: skip
