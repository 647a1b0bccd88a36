"""The store contracts (``userstream.stores``), one suite for every implementation.

Each test runs on the Redis stores (real Redis, a private key prefix) and on the
in-memory ones, River-style: whatever a stage codes against the Protocol must
hold for both. ``test_same_operations_same_state`` replays a random workload on
both and compares every read.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from userstream.stores import (
    EmbeddingStore,
    MemoryEmbeddingStore,
    MemorySequenceStore,
    RedisEmbeddingStore,
    RedisSequenceStore,
    SequenceStore,
    plan_batch,
)
from userstream.types import Behavior, Event, Keys

T = "behavior-events"
# "redis-sharded": the per-user state over 4 shards (as on a Redis Cluster, whose
# own test is tests/test_redis_cluster.py)
KINDS = ["redis", "redis-sharded", "memory"]


def e(user: str, item: str, ts: float, behavior: str = "view") -> Event:
    return Event(user, item, behavior, ts)


def kind_keys(kind: str, request) -> Keys:
    keys = request.getfixturevalue("keys")
    return Keys(keys.prefix, 4) if kind == "redis-sharded" else keys


def make_sequences(kind: str, request, max_len: int) -> SequenceStore:
    if kind == "memory":
        return MemorySequenceStore(max_len)
    return RedisSequenceStore(
        request.getfixturevalue("redis_client"), kind_keys(kind, request), max_len
    )


def make_embeddings(kind: str, request, feed_maxlen: int = 1000) -> EmbeddingStore:
    if kind == "memory":
        return MemoryEmbeddingStore(feed_maxlen)
    return RedisEmbeddingStore(
        request.getfixturevalue("redis_client"), kind_keys(kind, request), feed_maxlen
    )


@pytest.fixture(params=KINDS)
def kind(request):
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    return request.param


@pytest.fixture
def store(kind, request) -> SequenceStore:
    return make_sequences(kind, request, max_len=3)


@pytest.fixture
def emb(kind, request) -> EmbeddingStore:
    return make_embeddings(kind, request)


# --- SequenceStore --------------------------------------------------------------------
def test_implementations_satisfy_the_protocols(store, emb):
    assert isinstance(store, SequenceStore) and isinstance(emb, EmbeddingStore)


def test_rolling_window_keeps_last_n_in_order(store):
    batch = [(0, i, e("u1", f"i{i}", float(i))) for i in range(5)]
    res = store.apply_many(T, batch)
    assert (res.applied, res.skipped, res.users) == (5, 0, 1)
    assert store.read_many(["u1", "nobody"]) == [
        [Behavior("i2", "view", 2.0), Behavior("i3", "view", 3.0), Behavior("i4", "view", 4.0)],
        [],
    ]
    store.apply_many(T, [(0, 5, e("u1", "i5", 5.0, "cart"))])
    assert [b.item_id for b in store.read_many(["u1"])[0]] == ["i3", "i4", "i5"]
    assert store.read_many(["u1"])[0][-1].behavior == "cart"
    assert store.num_items() == 6 and store.num_users() == 1
    assert store.read_tail("u1", 2) == store.read_many(["u1"])[0][-2:]
    assert store.read_tail("nobody", 2) == []


def test_redelivered_batch_has_exactly_once_effect(store):
    batch = [
        (0, 0, e("u1", "a", 1.0)),
        (1, 0, e("u2", "b", 1.0)),
        (0, 1, e("u1", "c", 2.0)),
        (0, 1, e("u1", "d", 2.0)),  # two events of one array message share its offset
    ]
    first = store.apply_many(T, batch, dead=[(1, 1)])
    assert (first.applied, first.skipped, first.dead_lettered) == (4, 0, 1)
    seqs = store.read_many(["u1", "u2"])
    items = store.num_items()

    again = store.apply_many(T, batch, dead=[(1, 1)])
    assert (again.applied, again.skipped, again.dead_lettered) == (0, 4, 0)
    assert store.read_many(["u1", "u2"]) == seqs and store.num_items() == items == 4
    counters = store.counters()
    assert counters["events_ingested"] == 4
    assert counters["events_dead_lettered"] == 1
    assert counters["events_duplicate_skipped"] == 4
    assert store.applied_offsets(T) == {0: 1, 1: 1}
    assert store.applied_offsets("other-topic") == {}

    # a partly redelivered batch applies only the new tail
    more = store.apply_many(T, [(0, 1, e("u1", "d", 2.0)), (0, 2, e("u1", "x", 3.0))])
    assert (more.applied, more.skipped) == (1, 1)
    assert [b.item_id for b in store.read_many(["u1"])[0]] == ["c", "d", "x"]


@pytest.mark.integration
@pytest.mark.parametrize("shards", [1, 4])
def test_a_batch_cut_short_by_a_crash_is_applied_once_when_redelivered(
    redis_client, keys, shards, monkeypatch
):
    """A large batch is several Lua calls (chunks cut at message boundaries); a
    crash after some of them leaves each shard at "everything up to its offset",
    so the redelivered batch applies exactly the rest."""
    from userstream.stores import client as client_module
    from userstream.stores import redis_sequences

    monkeypatch.setattr(redis_sequences, "CHUNK_EVENTS", 40)
    keys = Keys(keys.prefix, shards)
    store, memory = RedisSequenceStore(redis_client, keys, 50), MemorySequenceStore(50)
    # messages of 1-3 events (one offset each) over two partitions, 30 users
    batch, rng = [], random.Random(3)
    for offset in range(200):
        for k in range(rng.randrange(1, 4)):
            batch.append((offset % 2, offset, e(f"u{rng.randrange(30)}", f"i{offset}-{k}",
                                                 offset + k / 10)))  # fmt: skip
    real_run = client_module.Scripts.run

    def crash_after_three(self, calls):
        real_run(self, calls[:3])
        raise ConnectionError("killed mid-batch")

    monkeypatch.setattr(client_module.Scripts, "run", crash_after_three)
    with pytest.raises(ConnectionError):
        store.apply_many(T, batch)
    assert 0 < store.counters()["events_ingested"] < len(batch)
    monkeypatch.setattr(client_module.Scripts, "run", real_run)
    again = store.apply_many(T, batch)
    assert again.applied + again.skipped == len(batch)
    memory.apply_many(T, batch)
    users = sorted(memory.iter_users())
    assert sorted(store.iter_users()) == users
    assert store.read_many(users) == memory.read_many(users)
    assert store.counters()["events_ingested"] == len(batch)
    assert store.applied_offsets(T) == {0: 198, 1: 199}


@pytest.mark.integration
def test_offsets_moved_by_another_writer_are_re_read_not_overwritten(redis_client, keys):
    """Each Lua call advances offsets only from the value this writer read
    (compare-and-set): a writer that read stale offsets re-reads them and skips
    what the other writer applied, instead of applying it a second time."""
    store, other = (
        RedisSequenceStore(redis_client, keys, 10),
        RedisSequenceStore(redis_client, keys, 10),
    )
    first = [(0, i, e("u1", f"i{i}", float(i))) for i in range(5)]
    stale = store._shard_offsets(T)  # read before the other writer applies the batch
    other.apply_many(T, first)
    reads = iter([stale])
    real = store._shard_offsets
    store._shard_offsets = lambda topic: next(reads, None) or real(topic)
    result = store.apply_many(T, first + [(0, 5, e("u1", "i5", 5.0))])
    assert (result.applied, result.skipped) == (1, 5)
    assert [b.item_id for b in store.read_many(["u1"])[0]] == [f"i{i}" for i in range(6)]
    assert store.counters()["events_ingested"] == 6


@pytest.mark.integration
def test_redis_behavior_counts_are_applied_once(redis_client, keys):
    """Redis also keeps a count per behavior name; a redelivery does not add to it."""
    store = RedisSequenceStore(redis_client, keys, 3)
    batch = [(0, i, e("u1", f"i{i}", float(i))) for i in range(4)]
    store.apply_many(T, batch)
    store.apply_many(T, batch)
    assert store.behavior_counts() == {"view": 4}


def test_dead_letters_count_and_advance_offsets(store):
    res = store.apply_many(T, [], dead=[(2, 7), (2, 8), (2, 8)])
    assert res.dead_lettered == 3 and res.applied == 0
    assert store.applied_offsets(T) == {2: 8}
    assert store.apply_many(T, [], dead=[(2, 8)]).dead_lettered == 0
    assert store.counters()["events_dead_lettered"] == 3
    assert store.apply_many(T, []).applied == 0


def test_take_dirty_drains_changed_users(store):
    store.apply_many(T, [(0, i, e(f"u{i}", "a", 1.0)) for i in range(5)])
    assert store.dirty_count() == 5
    assert store.dirty_users() == [f"u{i}" for i in range(5)]
    got = store.take_dirty(3)
    assert got == sorted(got) and len(got) == 3 and all(isinstance(u, str) for u in got)
    rest = store.take_dirty(10)
    assert sorted(got + rest) == [f"u{i}" for i in range(5)]
    assert store.take_dirty(10) == [] and store.dirty_count() == 0
    store.apply_many(T, [(0, 9, e("u1", "b", 2.0))])
    assert store.take_dirty(10) == ["u1"]
    store.mark_dirty(["u3"])
    assert store.take_dirty(10) == ["u3"]
    assert sorted(store.iter_users()) == [f"u{i}" for i in range(5)]


def test_claimed_users_stay_claimed_until_released_or_requeued(store):
    store.apply_many(T, [(0, i, e(f"u{i}", "a", 1.0)) for i in range(4)])
    first = store.take_dirty(3)
    assert store.claimed_count() == 3 and store.dirty_count() == 1
    store.release_claimed(first[:2])  # their embeddings are written
    assert store.claimed_count() == 1
    # a cycle that never finished: its last claim goes back, with what is still dirty
    assert store.requeue_claimed() == 1
    assert store.claimed_count() == 0
    assert store.dirty_count() == 2 and first[2] in store.dirty_users()
    assert store.requeue_claimed() == 0
    # a user changed again while claimed is both dirty and claimed: requeue keeps one copy
    again = store.take_dirty(10)
    store.apply_many(T, [(0, 10, e(again[0], "b", 2.0))])
    assert store.requeue_claimed() == 2 and store.dirty_count() == 2


def test_the_embed_queue_is_claimed_on_its_own_oldest_first(store):
    """Every event marks its user in both queues; the embedder's queue gives the
    users that changed first first, and a claim left behind goes back in front."""
    store.apply_many(T, [(0, off, e(u, "a", 1.0)) for off, u in enumerate(["u3", "u1"])])
    store.apply_many(T, [(0, off, e(u, "a", 1.0)) for off, u in [(2, "u4"), (3, "u2")]])
    store.apply_many(T, [(0, 4, e("u3", "b", 2.0))])  # changed again: keeps its place
    assert store.dirty_count("embed") == 4 == store.dirty_count("train")
    assert store.dirty_users("embed") == ["u1", "u2", "u3", "u4"]
    assert store.take_dirty(2, queue="embed") == ["u1", "u3"]  # the first batch's users
    assert store.claimed_count("embed") == 2 and store.claimed_count("train") == 0
    assert store.dirty_count("train") == 4  # the training queue is untouched
    assert store.requeue_claimed("embed") == 2
    assert store.take_dirty(2, queue="embed") == ["u1", "u3"]  # back in front
    store.release_claimed(["u1", "u3"], queue="embed")
    store.mark_dirty(["u9"], queue="embed")
    age = store.oldest_change_age_s()
    assert 0.0 <= age < 60.0  # u2 and u4 changed a moment ago
    assert store.take_dirty(10, queue="embed") == ["u2", "u4", "u9"]
    assert store.oldest_change_age_s() == 0.0  # nothing waiting
    assert store.dirty_count("embed") == 0
    with pytest.raises(ValueError, match="change queue"):
        store.dirty_count("nope")


def test_offsets_belong_to_the_log_they_came_from(store):
    """A recreated topic (a new log) must not turn new events into duplicates."""
    assert store.bind_log(T, "cluster/log-1", [0, 1]) == {}  # nothing stored yet
    store.apply_many(T, [(p, i, e(f"u{p}", f"i{i}", float(i))) for i in range(5) for p in (0, 1)])
    assert store.bind_log(T, "cluster/log-1", [0, 1]) == {}
    assert store.log_of(T, 0) == store.log_of(T, 1) == "cluster/log-1"
    assert store.apply_many(T, [(0, 3, e("u0", "again", 9.0))]).skipped == 1  # same log
    store.apply_many("other", [(0, 7, e("u2", "x", 1.0))])
    # the broker came back empty: offsets start at 0 again in a new log; this worker
    # was assigned partition 0 only, partition 1 is bound by whoever gets it
    assert store.bind_log(T, "cluster/log-2", [0]) == {0: "cluster/log-1"}
    assert store.applied_offsets(T) == {1: 4} and store.applied_offsets("other") == {0: 7}
    assert store.bind_log(T, "cluster/log-2", [0, 1]) == {1: "cluster/log-1"}
    assert store.applied_offsets(T) == {} and store.counters()["offset_log_resets"] == 2
    res = store.apply_many(T, [(0, i, e("u0", f"new{i}", 10.0 + i)) for i in range(3)])
    assert (res.applied, res.skipped) == (3, 0)
    assert [b.item_id for b in store.read_many(["u0"])[0]][-3:] == ["new0", "new1", "new2"]
    # offsets stored before logs were recorded belong to no known log: dropped too
    store.apply_many("legacy", [(1, 4, e("u3", "y", 1.0))])
    assert store.bind_log("legacy", "cluster/log-9", [0, 1]) == {1: ""}
    assert store.applied_offsets("legacy") == {} and store.counters()["offset_log_resets"] == 3


def test_counters_start_at_zero_and_count(store):
    assert store.counters() == {
        "events_ingested": 0,
        "events_dead_lettered": 0,
        "events_duplicate_skipped": 0,
        "offset_log_resets": 0,
    }
    store.count("events_dead_lettered", 2)
    assert store.counters()["events_dead_lettered"] == 2


def test_long_batches_of_one_user_keep_order_and_bound(kind, request):
    # more entries than one Lua unpack() takes, and more than the window
    store = make_sequences(kind, request, max_len=2500)
    store.apply_many(T, [(0, i, e("u1", f"i{i}", float(i))) for i in range(2100)])
    assert [b.item_id for b in store.read_many(["u1"])[0]] == [f"i{i}" for i in range(2100)]
    store.apply_many(T, [(0, i, e("u1", f"i{i}", float(i))) for i in range(2100, 5200)])
    assert [b.item_id for b in store.read_many(["u1"])[0]] == [f"i{i}" for i in range(2700, 5200)]
    assert store.counters()["events_ingested"] == 5200


def test_timestamps_are_kept_to_the_millisecond(store):
    store.apply_many(T, [(0, 0, e("u1", "a", 1700000000.123456))])
    assert store.read_many(["u1"])[0][0].ts == 1700000000.123


@pytest.mark.integration
def test_same_operations_same_state(redis_client, keys):
    """A random workload on both implementations gives the same reads."""
    redis_store, memory = RedisSequenceStore(redis_client, keys, max_len=5), MemorySequenceStore(5)
    rng = random.Random(0)
    offset = 0
    batches = []
    for _ in range(12):
        batch = []
        for _ in range(rng.randrange(1, 9)):
            offset += 1
            user, item = f"u{rng.randrange(4)}", f"i{rng.randrange(7)}"
            batch.append((rng.randrange(2), offset, Event(user, item, "view", offset + 0.12345)))
        batches.append(batch)
    batches.append(batches[3])  # a redelivered batch: skipped by both
    for batch in batches:
        a = redis_store.apply_many("t", batch, dead=[(0, 10_000)] if batch is batches[5] else ())
        b = memory.apply_many("t", batch, dead=[(0, 10_000)] if batch is batches[5] else ())
        assert a == b
    users = sorted(redis_store.iter_users())
    assert users == sorted(memory.iter_users())
    assert redis_store.read_many(users + ["nobody"]) == memory.read_many(users + ["nobody"])
    assert redis_store.counters() == memory.counters()
    assert redis_store.applied_offsets("t") == memory.applied_offsets("t")
    assert (redis_store.num_users(), redis_store.num_items()) == (
        memory.num_users(),
        memory.num_items(),
    )
    for user in users:
        assert redis_store.read_tail(user, 3) == memory.read_tail(user, 3)
    assert redis_store.dirty_users() == memory.dirty_users() == users
    # the same order too: a training cycle follows it (Redis SPOP's own order is random)
    assert redis_store.take_dirty(100) == memory.take_dirty(100) == users
    assert redis_store.dirty_count() == memory.dirty_count() == 0
    memory.mark_dirty(["u1"])
    redis_store.mark_dirty(["u1"])
    assert redis_store.take_dirty(10) == memory.take_dirty(10) == ["u1"]


def test_plan_batch_drops_applied_offsets_and_keeps_order():
    evs = [
        (0, 5, Event("a", "i1", "view", 1.0)),  # applied before (stored offset 5)
        (0, 6, Event("a", "i2", "click", 2.0)),
        (1, 3, Event("b", "i3", "view", 3.0)),
        (0, 6, Event("a", "i4", "view", 4.0)),  # same message (array): same offset
    ]
    plan = plan_batch(evs, dead=[(1, 4), (0, 2)], done={0: 5, 1: 2})
    assert [e.item_id for e in plan.per_user["a"]] == ["i2", "i4"]
    assert [e.item_id for e in plan.per_user["b"]] == ["i3"]
    assert (plan.applied, plan.skipped, plan.dead) == (3, 1, 1)
    assert plan.last == {0: 6, 1: 4}
    assert plan.items == {"i2", "i3", "i4"} and plan.behaviors == {"click": 1, "view": 2}


# --- EmbeddingStore ---------------------------------------------------------------------
def _unit(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ids_are_stable_and_assigned_once(emb):
    assert emb.num_of("a") is None
    first = emb.nums_for(["a", "b", "a"])
    assert first[0] == first[2] != first[1]
    assert emb.nums_for(["b", "c"])[0] == first[1]
    assert emb.num_of("a") == first[0]
    assert emb.users_for([first[1], first[0], 10**9]) == ["b", "a", None]
    assert emb.users_for([]) == []


def test_upsert_stores_vectors_versions_and_feeds_them(emb):
    assert emb.count() == 0 and emb.read_updates("0-0") == [] and emb.feed_head() == "0-0"
    state = emb.feed_state()
    assert (state.length, state.oldest, state.last_id) == (0, None, None)
    v = _unit(3)
    emb.upsert(["a", "b", "ü-c"], v, version=2)
    assert emb.count() == 3 and emb.version_of("b") == 2 and emb.version_of("z") is None
    np.testing.assert_array_equal(emb.get("ü-c"), v[2])  # exact float32 bytes, any user id
    assert emb.get("nobody") is None
    users, mat, nums, versions = emb.read_all()
    assert sorted(users) == ["a", "b", "ü-c"] and mat.shape == (3, 8) and versions == [2, 2, 2]
    assert nums == emb.nums_for(users)
    for u, row in zip(users, mat, strict=True):
        np.testing.assert_array_equal(row, emb.get(u))
    feed = emb.read_updates("0-0")
    assert [(f.user_id, f.num) for f in feed] == list(
        zip(["a", "b", "ü-c"], emb.nums_for(["a", "b", "ü-c"]), strict=True)
    )
    np.testing.assert_array_equal(np.stack([f.vector for f in feed]), v)
    assert [f.version for f in feed] == [2, 2, 2]
    assert emb.versions_of(["b", "nobody", "a"]) == [2, None, 2]
    assert emb.feed_head() == feed[-1].stream_id
    assert emb.read_updates(feed[0].stream_id, count=1)[0].user_id == "b"  # strictly after
    emb.upsert(["a"], _unit(1, seed=1), version=3)  # an upsert replaces
    assert emb.count() == 3 and emb.version_of("a") == 3
    assert len(emb.read_updates(feed[-1].stream_id)) == 1
    assert emb.event_ts_of("a") is None and feed[0].event_ts is None
    emb.upsert(["a", "b"], _unit(2), version=3, event_ts=[1700000000.123, 5.5])
    assert emb.event_ts_of("a") == 1700000000.123 and emb.event_ts_of("b") == 5.5
    assert [f.event_ts for f in emb.read_updates(feed[-1].stream_id)] == [None, 1700000000.123, 5.5]


def test_ids_for_many_new_users_are_assigned_in_one_go(emb):
    users = [f"n{i}" for i in range(25_000)]  # more than one script call's chunk
    nums = emb.nums_for(users + users[:3])
    assert len(set(nums[:25_000])) == 25_000 and nums[25_000:] == nums[:3]
    assert emb.nums_for(users[::-1]) == nums[:25_000][::-1]
    assert emb.users_for(nums[:3]) == users[:3]


def test_feed_is_trimmed_and_says_so(kind, request):
    emb = make_embeddings(kind, request, feed_maxlen=1000)
    emb.upsert([f"u{i}" for i in range(3000)], _unit(3000), version=1)
    state = emb.feed_state()
    assert 1000 <= state.length < 3000  # Redis trims approximately
    assert state.added in (None, 3000)
    first = emb.read_updates("0-0", count=1)[0]
    assert state.oldest == first.stream_id and first.user_id != "u0"  # the oldest went first
    assert state.last_id == emb.feed_head()


def test_model_info_round_trips(emb):
    from userstream.stores import ModelInfo

    assert emb.model_info() is None
    info = ModelInfo(4, "/ckpt/ckpt-00000004.pt", 120, 1700000000.5, 3.25, drifts=2)
    emb.set_model_info(info)
    assert emb.model_info() == info


def test_followers_report_and_the_feed_trims_what_all_applied(emb):
    emb.upsert([f"u{i}" for i in range(10)], _unit(10), version=1)
    feed = emb.read_updates("0-0")
    emb.register_follower("api-a", feed[6].stream_id, 1700000000.0)
    emb.register_follower("api-b", feed[3].stream_id, 1700000001.5)
    assert emb.followers() == {
        "api-a": (feed[6].stream_id, 1700000000.0),
        "api-b": (feed[3].stream_id, 1700000001.5),
    }
    assert emb.trim_feed(feed[4].stream_id) == 4  # entries before it go; it stays
    assert [u.user_id for u in emb.read_updates("0-0")] == [f"u{i}" for i in range(4, 10)]
    assert emb.feed_state().oldest == feed[4].stream_id and emb.feed_state().added in (None, 10)
    assert emb.trim_feed(feed[4].stream_id) == 0
    emb.forget_follower("api-b")
    assert set(emb.followers()) == {"api-a"}


@pytest.mark.integration
def test_behavior_names_past_the_record_limit_are_stored_as_other(redis_client, keys, monkeypatch):
    """A record numbers behavior names in one byte: past the limit a new name is
    stored as "other" (warned, counted), never an error that stops ingest; the
    per-name counts keep the real name."""
    from userstream.stores import redis_sequences

    monkeypatch.setattr(redis_sequences, "BEHAVIOR_LIMIT", 2)
    store = RedisSequenceStore(redis_client, keys, 10)
    batch = [(0, i, e("u1", f"i{i}", float(i), behavior=b))
             for i, b in enumerate(["view", "cart", "share", "view"])]  # fmt: skip
    store.apply_many(T, batch)
    assert [b.behavior for b in store.read_many(["u1"])[0]] == ["view", "cart", "other", "view"]
    assert store.behavior_names.overflowed == 1
    assert store.behavior_counts() == {"view": 2, "cart": 1, "share": 1}


@pytest.mark.integration
def test_a_full_sequence_is_10_bytes_per_behavior(redis_client, keys):
    store = RedisSequenceStore(redis_client, keys, 200)
    store.apply_many(T, [(0, i, e("u1", f"B{i:09d}", 1.7e9 + i)) for i in range(300)])
    assert redis_client.strlen(keys.seq("u1")) == 200 * 10
    assert int(redis_client.memory_usage(keys.seq("u1"))) < 2_200


@pytest.mark.integration
def test_another_shard_count_or_stored_form_is_refused_with_what_to_do(redis_client, keys):
    RedisSequenceStore(redis_client, keys, 10).apply_many(T, [(0, 0, e("u1", "i1", 1.0))])
    with pytest.raises(ValueError, match="set REDIS_SHARDS=1"):
        RedisSequenceStore(redis_client, Keys(keys.prefix, 4), 10).read_many(["u1"])
    redis_client.hset(keys.layout, "format", "packed-0")
    with pytest.raises(ValueError, match="stored form 'packed-0'"):
        RedisEmbeddingStore(redis_client, keys).read_all()


def test_the_training_history_keeps_the_newest_cycles_oldest_first(kind, request):
    emb = make_embeddings(kind, request)
    for v in range(5):
        emb.append_cycle({"version": v, "loss": 1.0 / (v + 1), "loss_next": 2.5})
    got = emb.recent_cycles(3)
    assert [c["version"] for c in got] == [2.0, 3.0, 4.0]
    assert got[-1] == {"version": 4.0, "loss": 0.2, "loss_next": 2.5}
    assert emb.recent_cycles(0) == [] and len(emb.recent_cycles()) == 5


# --- forget (userstream.stores.forget) ------------------------------------------------
def test_forget_erases_the_sequence_and_queues_and_marks_the_user(store):
    store.apply_many(T, [(0, 0, e("u1", "a", 1.0)), (0, 1, e("u1", "b", 2.0)),
                         (0, 2, e("u2", "c", 3.0))])  # fmt: skip
    assert store.take_dirty(10) == ["u1", "u2"]  # both claimed by a training cycle
    report = store.forget("u1")
    assert report == {"behaviors": 2, "users": 1, "train_changed": 0, "train_claimed": 1,
                      "embed_changed": 1, "embed_claimed": 0}  # fmt: skip
    assert store.read_many(["u1"]) == [[]] and store.read_tail("u1", 5) == []
    assert list(store.iter_users()) == ["u2"] and store.num_users() == 1
    assert store.dirty_users("embed") == ["u2"] and store.claimed_count() == 1
    assert store.requeue_claimed() == 1 and store.dirty_users() == ["u2"]
    marks = store.forgotten()
    assert list(marks) == ["u1"]
    assert store.clear_forgotten(["u1"], before=marks["u1"] - 1) == 0  # forgotten again later
    assert store.clear_forgotten(["u1", "u2"], before=marks["u1"]) == 1
    assert store.forgotten() == {}
    # new events are a new history; an unknown user reports nothing but is marked
    store.apply_many(T, [(0, 3, e("u1", "z", 4.0))])
    assert [b.item_id for b in store.read_many(["u1"])[0]] == ["z"]
    assert store.forget("nobody") == dict.fromkeys(report, 0)
    assert list(store.forgotten()) == ["nobody"]


def test_forget_erases_the_embedding_its_id_and_feed_entries_and_leaves_a_tombstone(emb):
    vec = np.eye(2, 4, dtype=np.float32)
    emb.upsert(["u1", "u2"], vec, version=1, event_ts=[1.0, 2.0])
    emb.upsert(["u1"], vec[:1], version=2)
    num1, num2 = emb.num_of("u1"), emb.num_of("u2")
    report = emb.forget("u1")
    assert report["embedding"] == 1 and report["nums"] == [num1]
    assert report["feed_entries_deleted"] == 2 and len(report["tombstones"]) == 1
    assert emb.get("u1") is None and emb.lookup("u1") == (None, None)
    assert emb.users_for([num1, num2]) == [None, "u2"] and emb.count() == 1
    users, vectors, nums, _ = emb.read_all()
    assert users == ["u2"] and nums == [num2] and vectors.shape == (1, 4)
    feed = emb.read_updates("0-0")
    assert [(u.user_id, u.num) for u in feed if not u.deleted] == [("u2", num2)]
    assert [(u.stream_id, u.user_id, u.num, u.vector.size) for u in feed if u.deleted] == [
        (report["tombstones"][0], "", num1, 0)
    ]
    assert feed[-1].deleted and emb.feed_head() == report["tombstones"][0]
    emb.upsert(["u1"], vec[:1], version=3)  # back: a new id, never the forgotten one
    assert emb.num_of("u1") not in (num1, num2, None)
    assert emb.forget("nobody") == {"embedding": 0, "nums": [], "feed_entries_deleted": 0,
                                    "tombstones": []}  # fmt: skip
