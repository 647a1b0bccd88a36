"""serving.index.UserIndex against exact numpy search on seeded data (PROTOCOL.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.index import IndexBusy, UserIndex, nlist_for


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(db: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    scores = q @ db.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def _recall_at(k: int, got: np.ndarray, want: np.ndarray) -> float:
    hits = sum(len(set(g[:k]) & set(w[:k])) for g, w in zip(got, want, strict=True))
    return hits / (k * len(want))


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    n, d = 2000, 32
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)  # sparse, unordered ids
    return rng, ids, _unit(rng, n, d)


def test_search_equals_brute_force(data):
    rng, ids, vecs = data
    ix = UserIndex()
    assert ix.dim is None and len(ix) == 0
    for chunk in np.array_split(np.arange(len(ids)), 3):  # several upserts, as from the feed
        ix.upsert(ids[chunk], vecs[chunk])
    assert len(ix) == len(ids) and ix.dim == 32

    q = _unit(rng, 50, 32)
    scores, nums = ix.search(q, 10)
    want_scores, want_nums = _brute_force(vecs, ids, q, 10)
    assert nums.shape == (50, 10) and nums.dtype == np.int64
    assert _recall_at(10, nums, want_nums) == 1.0
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_upsert_replaces_and_deleted_ids_never_come_back(data):
    rng, ids, vecs = data
    ix = UserIndex(dim=32)
    ix.upsert(ids, vecs)

    changed = rng.choice(len(ids), size=300, replace=False)
    vecs2 = vecs.copy()
    vecs2[changed] = _unit(rng, 300, 32)
    ix.upsert(ids[changed], vecs2[changed])
    assert len(ix) == len(ids)  # replaced, not duplicated
    for i in changed[:20]:
        np.testing.assert_array_equal(ix.reconstruct(int(ids[i])), vecs2[i])
    # querying with a replaced vector finds that id first; the old vector is gone
    scores, nums = ix.search(vecs2[changed[:30]], 1)
    assert list(nums[:, 0]) == list(ids[changed[:30]])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    gone = rng.choice(len(ids), size=500, replace=False)
    assert ix.delete(ids[gone]) == 500
    assert ix.delete(ids[gone[:10]]) == 0  # already gone
    assert len(ix) == len(ids) - 500
    assert ix.reconstruct(int(ids[gone[0]])) is None
    keep = np.setdiff1d(np.arange(len(ids)), gone)
    assert int(ids[gone[0]]) not in ix and int(ids[keep[0]]) in ix
    ix.upsert(ids[keep[:5]], vecs2[keep[:5]])  # later writes of other ids do not resurrect them
    _, nums = ix.search(vecs[gone[:40]], len(ids))
    assert not set(nums.ravel().tolist()) & set(ids[gone].tolist())

    q = _unit(rng, 40, 32)
    _, got = ix.search(q, 10)
    _, want = _brute_force(vecs2[keep], ids[keep], q, 10)
    assert _recall_at(10, got, want) == 1.0


def test_duplicate_ids_in_one_upsert_keep_the_last():
    ix = UserIndex()
    v = np.eye(3, dtype=np.float32)
    ix.upsert([5, 6, 5], v)
    assert len(ix) == 2
    np.testing.assert_array_equal(ix.reconstruct(5), v[2])
    np.testing.assert_array_equal(ix.reconstruct(6), v[1])


def test_empty_index_and_dimension_checks():
    ix = UserIndex()
    scores, nums = ix.search(np.ones(4, dtype=np.float32), 3)
    assert nums.tolist() == [[-1, -1, -1]] and np.all(np.isneginf(scores))
    assert ix.reconstruct(1) is None and ix.delete([1]) == 0
    ix.upsert([1, 2], np.eye(2, 4, dtype=np.float32))
    assert ix.dim == 4
    with pytest.raises(ValueError, match="dimension 3 does not match"):
        ix.upsert([3], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="query dimension"):
        ix.search(np.ones((1, 5), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="expected"):
        ix.upsert([1, 2], np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="k must be"):
        ix.search(np.ones(4, dtype=np.float32), 0)
    _, nums = ix.search(np.ones(4, dtype=np.float32), 5)  # k > size: -1 padding
    assert sorted(nums[0, :2].tolist()) == [1, 2] and nums[0, 2:].tolist() == [-1, -1, -1]


def test_snapshot_round_trip(tmp_path, data):
    rng, ids, vecs = data
    ix = UserIndex()
    ix.upsert(ids, vecs)
    path = tmp_path / "snap" / "users.snapshot"
    ix.save(path, "1700000000000-5")
    assert [p.name for p in path.parent.iterdir()] == ["users.snapshot"]  # no temp files left

    back, feed_id = UserIndex.load(path)
    assert feed_id == "1700000000000-5"
    assert len(back) == len(ix) and back.dim == 32
    q = _unit(rng, 20, 32)
    s1, n1 = ix.search(q, 10)
    s2, n2 = back.search(q, 10)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(s1, s2)
    back.upsert(ids[:1], vecs[1:2])  # the loaded index is writable and keeps its id map
    assert len(back) == len(ids)
    np.testing.assert_array_equal(back.reconstruct(int(ids[0])), vecs[1])


def test_snapshot_of_empty_index_and_damaged_files(tmp_path):
    path = tmp_path / "users.snapshot"
    with pytest.raises(FileNotFoundError):
        UserIndex.load(path)
    full = UserIndex()
    full.upsert([1, 2], np.eye(2, 4, dtype=np.float32))
    full.save(path, "5-0")
    good = path.read_bytes()
    UserIndex().save(path, "0-0")  # an empty snapshot replaces it whole
    back, feed_id = UserIndex.load(path)
    assert feed_id == "0-0" and len(back) == 0 and back.dim is None

    path.write_bytes(b"something else")
    with pytest.raises(ValueError, match="not a userstream index snapshot"):
        UserIndex.load(path)
    header_end = good.index(b"\n", good.index(b"\n") + 1) + 1
    path.write_bytes(good[:header_end] + good[header_end:-20])  # truncated index bytes
    with pytest.raises(ValueError):
        UserIndex.load(path)
    path.write_bytes(good.replace(b'"size": 2', b'"size": 3'))
    with pytest.raises(ValueError, match="header says"):
        UserIndex.load(path)


def _clustered(rng: np.random.Generator, n: int, d: int, centers: int = 100) -> np.ndarray:
    """Users in interest groups: unit vectors around ``centers`` directions."""
    c = _unit(rng, centers, d)
    x = c[rng.integers(0, centers, n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_a_large_index_becomes_ivf_and_keeps_recall(tmp_path):
    """Past ivf_min the index switches to IVF (upserts during the switch are kept),
    and what it finds stays close to exact search: recall@10 >= 0.95."""
    rng = np.random.default_rng(3)
    n, d = 20_000, 32
    ids = np.arange(1, n + 1, dtype=np.int64)
    vecs = _clustered(rng, n, d)
    ix = UserIndex(ivf_min=8000, nlist=64, nprobe=16)
    for start in range(0, n, 1000):
        ix.upsert(ids[start : start + 1000], vecs[start : start + 1000])
    ix.wait_switch(60)
    assert ix.kind == "ivf" and len(ix) == n
    changed = rng.choice(n, 500, replace=False)
    vecs[changed] = _clustered(rng, 500, d)
    ix.upsert(ids[changed], vecs[changed])  # replaced, not added
    assert len(ix) == n
    np.testing.assert_array_equal(ix.reconstruct(int(ids[changed[0]])), vecs[changed[0]])
    q = vecs[:300]
    _, got = ix.search(q, 10)
    _, want = _brute_force(vecs, ids, q, 10)
    assert _recall_at(10, got, want) >= 0.95
    assert ix.delete(ids[:10]) == 10 and len(ix) == n - 10 and ix.reconstruct(1) is None
    path = tmp_path / "ivf.snapshot"
    ix.save(path, "5-0")
    back, feed_id = UserIndex.load(path, nprobe=16)
    assert feed_id == "5-0" and back.kind == "ivf" and len(back) == n - 10
    np.testing.assert_array_equal(back.search(q, 10)[1], ix.search(q, 10)[1])
    back.upsert(ids[:3], vecs[:3])  # the loaded index keeps its id map
    assert len(back) == n - 7


def test_upserts_during_searches_neither_block_them_nor_get_lost():
    import threading
    import time

    rng = np.random.default_rng(5)
    n, d = 30_000, 32
    ids = np.arange(1, n + 1, dtype=np.int64)
    vecs = _clustered(rng, n, d)
    ix = UserIndex(ivf_min=10_000, nlist=64, nprobe=8)
    ix.upsert(ids[:5000], vecs[:5000])
    stop = threading.Event()
    latencies: list[float] = []

    def searcher() -> None:
        k = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            ix.search(vecs[k % 5000], 10)
            latencies.append(time.perf_counter() - t0)
            k += 1

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    try:  # the rest arrives in batches while searches run, crossing ivf_min on the way
        for start in range(5000, n, 500):
            ix.upsert(ids[start : start + 500], vecs[start : start + 500])
        ix.wait_switch(60)
        newer = _clustered(rng, n, d)
        for start in range(0, n, 2000):  # and every vector is replaced once
            ix.upsert(ids[start : start + 2000], newer[start : start + 2000])
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert ix.kind == "ivf" and len(ix) == n
    for i in rng.choice(n, 200, replace=False):
        np.testing.assert_array_equal(ix.reconstruct(int(ids[i])), newer[i])
    assert len(latencies) > 100
    # no search waited for the IVF training (seconds): writes hold the index for one batch
    assert max(latencies) < 0.5, f"a search waited {max(latencies):.3f}s"


def test_the_user_table_travels_in_the_snapshot(tmp_path):
    """Names, versions and event times of the indexed users come back with the index."""
    from serving.follower import UserTable

    table = UserTable()
    table.set([1, 5, 2000], ["a", "b/ü", "c"], [3, None, 4], [1.5, None, 2.25])
    ix = UserIndex()
    ix.upsert([1, 5, 2000], np.eye(3, dtype=np.float32))
    ix.save(tmp_path / "s", "7-1", extra=table.to_bytes())
    back, feed_id, extra = UserIndex.read_snapshot(tmp_path / "s")
    got = UserTable.from_bytes(extra)
    assert feed_id == "7-1" and len(back) == 3 and len(got) == 3
    assert got.names_for([1, 5, 2000, 7, 10**6]) == ["a", "b/ü", "c", None, None]
    assert [got.num_of(u) for u in ("a", "b/ü", "c", "d")] == [1, 5, 2000, None]
    assert [got.version_of(n) for n in (1, 5, 2000)] == [3, None, 4]
    assert [got.event_ts(n) for n in (1, 5, 2000, 3)] == [1.5, None, 2.25, None]
    assert UserIndex.load(tmp_path / "s")[1] == "7-1"


def test_a_read_that_may_not_wait_is_refused_while_a_write_holds_the_index():
    import threading

    ix = UserIndex()
    ix.upsert([1, 2], np.eye(2, dtype=np.float32))
    q = np.array([1.0, 0.0], dtype=np.float32)
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with ix._lock.write():
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert held.wait(5)
        with pytest.raises(IndexBusy):
            ix.search(q, 1, wait=False)
        with pytest.raises(IndexBusy):
            ix.reconstruct(1, wait=False)
    finally:
        release.set()
        t.join(5)
    _, nums = ix.search(q, 1, wait=False)  # free again: answered at once
    assert int(nums[0, 0]) == 1


def test_an_ivf_index_that_grew_4x_gets_new_lists():
    rng = np.random.default_rng(9)
    n, d = 40_000, 16
    ids = np.arange(n, dtype=np.int64)
    vecs = _clustered(rng, n, d)
    ix = UserIndex(ivf_min=2_000, nlist=4096, nprobe=16)
    ix.upsert(ids[:2_000], vecs[:2_000])
    ix.wait_switch(60)
    assert ix.kind == "ivf"
    first = ix._index.nlist
    assert first == nlist_for(2_000, 4096) == 51
    for start in range(2_000, n, 1_000):
        ix.upsert(ids[start : start + 1_000], vecs[start : start + 1_000])
        ix.wait_switch(60)
    assert ix._index.nlist >= 4 * first  # retrained twice or more on the way
    assert ix.scan_size < n / 10  # a search compares a small share of the vectors
    assert len(ix) == n
    for i in rng.choice(n, 100, replace=False):  # nothing lost in the swaps
        np.testing.assert_array_equal(ix.reconstruct(int(ids[i])), vecs[i])
    exact = vecs @ vecs[:200].T
    want = np.argsort(-exact, axis=0)[:10].T
    _, got = ix.search(vecs[:200], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)])
    assert recall >= 0.95, recall
