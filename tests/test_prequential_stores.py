"""MemorySequenceStore (the benchmark's in-process state) has SequenceStore's semantics:
the same operations on both give the same reads, against real Redis."""

from __future__ import annotations

import random

import pytest

from model.memory_stores import MemorySequenceStore
from stream.state import SequenceStore
from userstream.types import Event

pytestmark = pytest.mark.integration


def test_same_operations_same_state(redis_client, keys):
    redis_store, memory = SequenceStore(redis_client, keys, max_len=5), MemorySequenceStore(5)
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
