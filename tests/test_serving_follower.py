"""serving.follower.IndexFollower against a real Redis (key prefix per test)."""

from __future__ import annotations

import numpy as np
import pytest
from redis.backoff import NoBackoff
from redis.retry import Retry

from serving.follower import IndexFollower, feed_lag_s, parse_stream_id
from tests.helpers import wait_until
from userstream.embedded import free_port
from userstream.stores import EmbeddingStore, RedisEmbeddingStore, connect

D = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _assert_index_matches_store(follower: IndexFollower, store: EmbeddingStore) -> None:
    users, vecs, nums, _ = store.read_all()
    assert len(follower.index) == len(users)
    for num, vec in zip(nums, vecs, strict=True):
        np.testing.assert_array_equal(follower.index.reconstruct(num), vec)


@pytest.fixture
def store(redis_client, keys) -> EmbeddingStore:
    return RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)


@pytest.fixture
def follower_factory(store, tmp_path):
    made: list[IndexFollower] = []

    def make(**kw) -> IndexFollower:
        kw.setdefault("snapshot_interval_s", 60.0)
        f = IndexFollower(store, tmp_path / "index", block_ms=50, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


def test_stream_id_helpers():
    assert parse_stream_id("1700000000000-3") == (1700000000000, 3)
    assert parse_stream_id("0-0") < parse_stream_id("1-0") < parse_stream_id("1-10")
    assert parse_stream_id("5-10") > parse_stream_id("5-9")  # numeric, not lexicographic
    assert feed_lag_s("1000-0", "3500-2") == 2.5
    assert feed_lag_s("3500-2", "3500-2") == 0.0


def test_follower_applies_feed_updates(store, follower_factory):
    rng = np.random.default_rng(1)
    f = follower_factory()
    f.start()
    assert f.ready.wait(5)
    assert len(f.index) == 0 and f.stats.rebuilds == 1  # empty store: empty index

    users = [f"u{i}" for i in range(40)]
    store.upsert(users, _unit(rng, 40), version=1)
    assert f.wait_for(store.feed_head(), timeout=5)
    _assert_index_matches_store(f, store)

    # a re-embedded user replaces its vector; new users are added
    store.upsert(["u3", "new"], _unit(rng, 2), version=2)
    assert f.wait_for(store.feed_head(), timeout=5)
    assert len(f.index) == 41
    _assert_index_matches_store(f, store)
    assert f.stats.applied_updates == 42 and f.applied_id == store.feed_head()
    assert f.stats.errors == 0
    f.stop()
    assert not f.is_alive()


def test_initial_rebuild_from_store(store, follower_factory):
    rng = np.random.default_rng(2)
    store.upsert([f"u{i}" for i in range(30)], _unit(rng, 30), version=1)
    f = follower_factory()
    f.sync_once()  # synchronous: initial load + one (empty) batch
    assert f.ready.is_set() and f.stats.rebuilds == 1 and f.stats.snapshot_loads == 0
    assert f.applied_id == store.feed_head()
    _assert_index_matches_store(f, store)


def test_restart_from_snapshot_picks_up_later_updates(store, follower_factory):
    rng = np.random.default_rng(3)
    store.upsert([f"u{i}" for i in range(20)], _unit(rng, 20), version=1)
    first = follower_factory()
    first.start()
    assert first.wait_for(store.feed_head(), timeout=5)
    first.stop()  # writes the final snapshot
    assert first.stats.snapshots_written == 1 and first.snapshot_path.exists()
    snap_id = first.applied_id

    # written while no follower runs
    store.upsert(["u0", "u20", "u21"], _unit(rng, 3), version=2)

    second = follower_factory()
    second.start()
    assert second.wait_for(store.feed_head(), timeout=5)
    assert second.stats.snapshot_loads == 1 and second.stats.rebuilds == 0
    assert second.stats.applied_updates == 3  # only the entries after the snapshot
    assert parse_stream_id(second.applied_id) > parse_stream_id(snap_id)
    _assert_index_matches_store(second, store)


def test_snapshot_is_written_on_interval(store, follower_factory):
    rng = np.random.default_rng(4)
    f = follower_factory(snapshot_interval_s=0.05)
    f.start()
    store.upsert(["a", "b"], _unit(rng, 2), version=1)
    assert f.wait_for(store.feed_head(), timeout=5)
    wait_until(lambda: f.stats.snapshots_written >= 1)
    written = f.stats.snapshots_written
    assert not f.snapshot()  # nothing changed since: no rewrite
    assert f.stats.snapshots_written == written


def test_snapshot_with_trimmed_gap_is_not_used(store, follower_factory, redis_client, keys):
    rng = np.random.default_rng(5)
    store.upsert(["a", "b"], _unit(rng, 2), version=1)
    first = follower_factory()
    first.sync_once()
    first.snapshot()

    store.upsert([f"x{i}" for i in range(10)], _unit(rng, 10), version=2)
    redis_client.xtrim(keys.updates, maxlen=3, approximate=False)  # entries after it are lost

    second = follower_factory()
    second.sync_once()
    assert second.stats.snapshot_loads == 0 and second.stats.rebuilds == 1
    _assert_index_matches_store(second, store)


def test_snapshot_past_the_feed_head_is_not_used(store, follower_factory, redis_client, keys):
    rng = np.random.default_rng(6)
    store.upsert(["a", "b"], _unit(rng, 2), version=1)
    first = follower_factory()
    first.sync_once()
    first.snapshot()
    redis_client.delete(keys.updates)  # feed reset (e.g. Redis restored without the stream)

    second = follower_factory()
    second.sync_once()
    assert second.stats.snapshot_loads == 0 and second.stats.rebuilds == 1
    _assert_index_matches_store(second, store)


def test_snapshot_from_a_previous_feed_is_not_used(
    store, follower_factory, redis_client, redis_prefix
):
    """Redis flushed and refilled: the new feed is untrimmed but user numbers restarted."""
    rng = np.random.default_rng(8)
    store.upsert(["a", "b", "c"], _unit(rng, 3), version=1)
    first = follower_factory()
    first.sync_once()
    first.snapshot()
    redis_client.delete(*redis_client.scan_iter(match=f"{redis_prefix}*"))
    store.upsert(["c", "d"], _unit(rng, 2), version=1)  # c and d now get nums 1 and 2

    second = follower_factory()
    second.sync_once()
    assert second.stats.snapshot_loads == 0 and second.stats.rebuilds == 1
    _assert_index_matches_store(second, store)


def test_falling_behind_a_trimmed_feed_rebuilds(store, tmp_path, redis_client, keys):
    rng = np.random.default_rng(7)
    f = IndexFollower(store, tmp_path / "index", batch_size=5)
    f.sync_once()
    assert f.stats.rebuilds == 1
    store.upsert([f"u{i}" for i in range(20)], _unit(rng, 20), version=1)
    redis_client.xtrim(keys.updates, maxlen=10, approximate=False)
    f.sync_once()  # a full batch after a trimmed gap: rebuild instead of applying it
    assert f.stats.rebuilds == 2
    _assert_index_matches_store(f, store)
    assert f.applied_id == store.feed_head()


def test_redis_errors_are_retried_not_fatal(keys, tmp_path):
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2,
                   retry=Retry(NoBackoff(), 0))  # fmt: skip
    f = IndexFollower(RedisEmbeddingStore(dead, keys), tmp_path / "index", block_ms=50)
    f.start()
    try:
        wait_until(lambda: f.stats.errors >= 2)
        assert f.is_alive() and not f.ready.is_set()
        assert "ConnectionError" in (f.stats.last_error or "")
    finally:
        f.stop()
    assert not f.is_alive()


def test_followers_report_their_position_and_a_silent_one_rebuilds_after_a_trim(
    store, follower_factory
):
    """The writer trims the feed to what live followers applied; a follower whose
    position was trimmed while it was silent notices at its next report."""
    rng = np.random.default_rng(4)
    f = follower_factory(name="api-test", report_interval_s=0.05)
    f.start()
    assert f.ready.wait(5)
    store.upsert([f"u{i}" for i in range(20)], _unit(rng, 20), version=1)
    assert f.wait_for(store.feed_head(), timeout=5)
    wait_until(lambda: store.followers().get("api-test", ("0-0", 0))[0] == store.feed_head())
    f.stop()
    assert "api-test" not in store.followers()  # withdrawn on stop

    # silent while the feed moved on and was trimmed past its position
    silent = f.applied_id
    store.upsert([f"v{i}" for i in range(10)], _unit(rng, 10), version=2)
    head = store.feed_head()
    store.trim_feed(head)  # everything before the head is gone, the follower's gap included
    g = follower_factory(name="api-test", report_interval_s=0.05)
    g._applied_id, g._index = silent, f.index  # as if it had kept running, silently
    g.ready.set()
    g.start()
    wait_until(lambda: g.stats.rebuilds >= 1, what="a rebuild after the trimmed gap")
    assert g.wait_for(head, timeout=5)
    _assert_index_matches_store(g, store)
