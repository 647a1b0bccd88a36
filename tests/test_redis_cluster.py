"""The state on a real Redis Cluster: three masters (the bundled redis-server in
cluster mode on loopback ports), ``REDIS_CLUSTER_NODES`` selecting it.

Store level: every shard's keys hash to one slot (so each Lua call stays inside
one), the shards spread over the masters, and a batch, its redelivery and the
embeddings read back as on one Redis. Stack level: ``userstream up`` with only
the cluster for state ingests a replay exactly once although its stream worker
is killed (SIGKILL) mid-replay, trains, embeds and answers similar users.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import running_stack, wait_until
from userstream.embedded import free_cluster_port, start_redis_cluster
from userstream.stores import (
    MemorySequenceStore,
    RedisEmbeddingStore,
    RedisSequenceStore,
    connect,
)
from userstream.types import Event, Keys

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ports = [free_cluster_port() for _ in range(3)]
    procs = start_redis_cluster(ports, tmp_path_factory.mktemp("cluster"))
    yield ",".join(f"127.0.0.1:{p}" for p in ports)
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_a_shard_is_one_slot_and_the_shards_spread_over_the_masters(cluster, redis_prefix):
    client = connect("", cluster)
    keys = Keys(redis_prefix, 16)
    store = RedisSequenceStore(client, keys, max_len=5)
    batch = [(i % 4, i, Event(f"u{i % 50}", f"i{i % 13}", "view", 1.7e9 + i)) for i in range(600)]
    store.apply_many("t", batch)
    masters = set()
    for sk in keys.all_shards():
        names = [sk.seq("anyone"), sk.users, sk.dirty, sk.stale, sk.offsets, sk.counters,
                 sk.emb, sk.user_num, sk.user_num_next]  # fmt: skip
        slots = {client.keyslot(k) for k in names}
        assert len(slots) == 1, (sk, slots)
        masters.add(client.get_node_from_key(sk.users).name)
    assert len(masters) == 3  # 16 shards over three masters
    client.close()


def test_batches_redeliveries_and_embeddings_on_the_cluster(cluster, redis_prefix):
    client = connect("", cluster)
    keys = Keys(redis_prefix, 16)
    store, memory = RedisSequenceStore(client, keys, max_len=7), MemorySequenceStore(7)
    batch = [(i % 2, i // 2, Event(f"u{i % 37}", f"i{i % 11}", "view" if i % 3 else "cart",
                                    1.7e9 + i / 7)) for i in range(5000)]  # fmt: skip
    assert store.apply_many("t", batch) == memory.apply_many("t", batch)
    again = store.apply_many("t", batch[:3000])  # redelivered: changes nothing
    assert (again.applied, again.skipped) == (0, 3000)
    users = sorted(store.iter_users())
    assert users == sorted(memory.iter_users()) and len(users) == 37
    assert store.read_many(users) == memory.read_many(users)
    assert store.counters()["events_ingested"] == 5000
    assert store.applied_offsets("t") == {0: 2499, 1: 2499}
    assert store.behavior_counts() == {"view": 3333, "cart": 1667}
    assert sorted(store.take_dirty(100)) == users

    emb = RedisEmbeddingStore(client, keys)
    vecs = np.random.default_rng(0).normal(size=(37, 8)).astype(np.float32)
    emb.upsert(users, vecs, version=2, event_ts=[1.0] * 37)
    got_users, mat, nums, versions = emb.read_all()
    assert versions == [2] * 37
    assert sorted(got_users) == users and len(set(nums)) == 37
    assert emb.users_for(nums) == got_users
    order = [got_users.index(u) for u in users]
    np.testing.assert_array_equal(mat[order], vecs)
    assert len(emb.read_updates("0-0")) == 37
    client.close()


def test_the_stack_on_a_cluster_ingests_exactly_once_through_a_kill(tmp_path, redis_url, cluster):
    n_users, per_user = 60, 30
    events = [{"user_id": f"c{u}", "item_id": f"item{(u % 6) * 10 + k % 10}", "behavior": "view",
               "ts": 1.7e9 + k * 60 + u} for k in range(per_user) for u in range(n_users)]  # fmt: skip
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    (tmp_path / "stack").mkdir()
    with running_stack(tmp_path / "stack", redis_url, REDIS_CLUSTER_NODES=cluster,
                       STREAM_BATCH_MAX="50") as stack:  # fmt: skip
        client, env = stack["client"], stack["env"]
        replay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "userstream",
                "replay",
                str(path),
                "--format",
                "jsonl",
                "--no-progress",
                "--rate",
                "600",
            ],  # fmt: skip
            env={**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}"},
        )
        ingested = lambda: client.get("/stats").json()["events_ingested"]  # noqa: E731
        wait_until(lambda: ingested() > 0, 120, "the first events ingested", stack["proc"])
        worker = stack["state"]()["children"]["stream-worker"]["pid"]
        os.killpg(worker, signal.SIGKILL)
        assert replay.wait(180) == 0
        wait_until(lambda: ingested() == len(events), 240, f"{len(events)} events ingested",
                   stack["proc"], poll_s=0.5)  # fmt: skip
        assert stack["state"]()["children"]["stream-worker"]["restarts"] >= 1
        stats = client.get("/stats").json()
        assert stats["users"] == n_users and stats["events_dead_lettered"] == 0

        keys = Keys(env["REDIS_PREFIX"], 16)
        cl = connect("", cluster)
        seqs = RedisSequenceStore(cl, keys, 200).read_many([f"c{u}" for u in range(n_users)])
        assert all(len(s) == per_user for s in seqs)  # nothing lost or applied twice
        assert [b.ts for b in seqs[5]] == [1.7e9 + k * 60 + 5 for k in range(per_user)]

        wait_until(lambda: (s := client.get("/stats").json())["embed_pending"] == 0
                   and s["index_size"] >= n_users and s["index_applied_id"] == s["feed_head_id"],
                   240, "every user embedded and indexed", stack["proc"], poll_s=0.5)  # fmt: skip
        resp = client.get("/users/c7/similar", params={"k": 5})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["neighbors"]) == 5
        for key in cl.scan_iter(match=f"{env['REDIS_PREFIX']}*", count=1000, target_nodes="all"):
            cl.delete(key)
        cl.close()
