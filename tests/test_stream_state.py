"""stream.state.SequenceStore against the real Redis (fixtures give a private key prefix)."""

from __future__ import annotations

import pytest

from stream.state import SequenceStore
from userstream.types import Behavior, Event

pytestmark = pytest.mark.integration

T = "behavior-events"


def e(user: str, item: str, ts: float, behavior: str = "view") -> Event:
    return Event(user, item, behavior, ts)


@pytest.fixture
def store(redis_client, keys) -> SequenceStore:
    return SequenceStore(redis_client, keys, max_len=3)


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


def test_redelivered_batch_has_exactly_once_effect(store, redis_client, keys):
    batch = [
        (0, 0, e("u1", "a", 1.0)),
        (1, 0, e("u2", "b", 1.0)),
        (0, 1, e("u1", "c", 2.0)),
        (0, 1, e("u1", "d", 2.0)),  # two events of one array message share its offset
    ]
    first = store.apply_many(T, batch, dead=[(1, 1)])
    assert (first.applied, first.skipped, first.dead_lettered) == (4, 0, 1)
    seqs = store.read_many(["u1", "u2"])
    behaviors = redis_client.hgetall(keys.behaviors)

    again = store.apply_many(T, batch, dead=[(1, 1)])
    assert (again.applied, again.skipped, again.dead_lettered) == (0, 4, 0)
    assert store.read_many(["u1", "u2"]) == seqs
    assert redis_client.hgetall(keys.behaviors) == behaviors == {b"view": b"4"}
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
    got = store.take_dirty(3)
    assert len(got) == 3 and all(isinstance(u, str) for u in got)
    rest = store.take_dirty(10)
    assert sorted(got + rest) == [f"u{i}" for i in range(5)]
    assert store.take_dirty(10) == [] and store.dirty_count() == 0
    store.apply_many(T, [(0, 9, e("u1", "b", 2.0))])
    assert store.take_dirty(10) == ["u1"]
    store.mark_dirty(["u3"])
    assert store.take_dirty(10) == ["u3"]
    assert sorted(store.iter_users()) == [f"u{i}" for i in range(5)]


def test_long_batches_of_one_user_keep_order_and_bound(redis_client, keys):
    # more entries than one Lua unpack() takes, and more than the window
    store = SequenceStore(redis_client, keys, max_len=2500)
    store.apply_many(T, [(0, i, e("u1", f"i{i}", float(i))) for i in range(2100)])
    assert [b.item_id for b in store.read_many(["u1"])[0]] == [f"i{i}" for i in range(2100)]
    store.apply_many(T, [(0, i, e("u1", f"i{i}", float(i))) for i in range(2100, 5200)])
    assert [b.item_id for b in store.read_many(["u1"])[0]] == [f"i{i}" for i in range(2700, 5200)]
    assert store.counters()["events_ingested"] == 5200


def test_plan_batch_drops_applied_offsets_and_keeps_order():
    from stream.state import plan_batch
    from userstream.types import Event

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
