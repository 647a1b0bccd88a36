"""Forgetting a user (issue 18): the API replica's index and snapshot, the training
worker's reservoir and checkpoints, and the whole stack proven clean afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from model.live import TrainingWorker, load_trainer
from serving import create_app
from serving.follower import UserTable
from serving.index import UserIndex
from tests.helpers import running_stack, tiny_settings, wait_until
from userstream.settings import Settings
from userstream.stores import (
    RedisEmbeddingStore,
    RedisSequenceStore,
    forget_user,
)
from userstream.tokens import hash_line, new_token
from userstream.types import Event

pytestmark = pytest.mark.integration

VICTIM = "victim-9Qz"  # distinctive: no other key, value or item holds this text


def holds(obj: Any, text: str) -> bool:
    """Whether ``text`` occurs anywhere in ``obj`` (nested containers, str, bytes)."""
    if isinstance(obj, str):
        return text in obj
    if isinstance(obj, bytes):
        return text.encode() in obj
    if isinstance(obj, dict):
        return any(holds(k, text) or holds(v, text) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return any(holds(v, text) for v in obj)
    return False


def redis_holdings(client, prefix: str, text: str) -> list[str]:
    """Every key under ``prefix`` whose name or any member/value holds ``text``."""
    r = client  # a raw (bytes) client
    found = []
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        kind = r.type(key).decode()
        if kind == "none":  # deleted since the scan saw it (the worker clears markers)
            continue
        if kind == "string":
            content: Any = r.get(key)
        elif kind == "hash":
            content = r.hgetall(key)
        elif kind == "set":
            content = r.smembers(key)
        elif kind == "zset":
            content = r.zrange(key, 0, -1)
        elif kind == "list":
            content = r.lrange(key, 0, -1)
        elif kind == "stream":
            content = r.xrange(key)
        else:
            raise AssertionError(f"{key!r}: unexpected type {kind}")
        if holds(key, text) or holds(content, text):
            found.append(f"{key.decode()} ({kind})")
    return found


# --- one API replica: its index, user table, snapshot and neighbour lists ------------
def test_delete_drops_the_user_from_this_replicas_index_and_snapshot(
    tmp_path, redis_prefix, redis_url, redis_client, keys
):
    emb = RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)
    seqs = RedisSequenceStore(redis_client, keys)
    seqs.apply_many("t", [(0, 0, Event(VICTIM, "i1", "view", 1.7e9))])
    rng = np.random.default_rng(0)
    users = [VICTIM] + [f"o{i}" for i in range(20)]
    vecs = rng.standard_normal((len(users), 8)).astype(np.float32)
    emb.upsert(users, vecs / np.linalg.norm(vecs, axis=1, keepdims=True), version=1)
    settings = Settings(data_dir=tmp_path, redis_prefix=redis_prefix, redis_url=redis_url)
    with TestClient(create_app(settings, redis_client=redis_client)) as c:
        follower = c.app.state.ctx.follower
        assert follower.wait_for(emb.feed_head(), 10)
        follower.snapshot()
        assert VICTIM.encode() in follower.snapshot_path.read_bytes()
        before = c.get("/users/o1/similar", params={"k": 25}).json()["neighbors"]
        assert VICTIM in [n["user_id"] for n in before]

        r = c.delete(f"/users/{VICTIM}")
        assert r.status_code == 200
        report = r.json()
        assert report["found"] and report["sequences"]["behaviors"] == 1
        assert report["embeddings"]["embedding"] == 1 and len(report["embeddings"]["nums"]) == 1
        assert report["index_applied"] == {follower.name: True}  # waited for this replica
        num = report["embeddings"]["nums"][0]
        assert num not in follower.index and follower.users.num_of(VICTIM) is None
        for u in users[1:]:
            got = c.get(f"/users/{u}/similar", params={"k": 25}).json()["neighbors"]
            assert VICTIM not in [n["user_id"] for n in got] and len(got) == 19
        for path in ("similar", "embedding", "recommendations", "profile"):
            assert c.get(f"/users/{VICTIM}/{path}").status_code in (404, 503), path
        # the snapshot written on applying the tombstone no longer holds it
        index, _, extra = UserIndex.read_snapshot(follower.snapshot_path)
        assert num not in index and UserTable.from_bytes(extra).num_of(VICTIM) is None
        assert VICTIM.encode() not in follower.snapshot_path.read_bytes()
        again = c.delete(f"/users/{VICTIM}").json()  # idempotent
        assert not again["found"] and again["embeddings"]["tombstones"] == []


# --- the training worker: reservoir and checkpoints --------------------------------
def test_the_next_checkpoint_no_longer_holds_a_forgotten_user(tmp_path, redis_client, keys):
    settings = tiny_settings(tmp_path, redis_prefix=keys.prefix, max_len=8, sequence_length=16,
                             train_steps=2, train_batch_size=8, keep_checkpoints=3)  # fmt: skip
    seqs = RedisSequenceStore(redis_client, keys, settings.sequence_length)
    emb = RedisEmbeddingStore(redis_client, keys)
    users = [VICTIM] + [f"o{i}" for i in range(7)]
    offset = 0

    def feed() -> None:
        nonlocal offset
        batch = []
        for k in range(3):
            for u in users:
                batch.append(
                    (0, offset, Event(u, f"item{(k + len(u)) % 5}", "view", 1.7e9 + offset))
                )
                offset += 1
        seqs.apply_many("t", batch)

    worker = TrainingWorker(settings, seqs, emb, load_trainer(settings))
    for _ in range(2):
        feed()
        assert worker.run_cycle().ran
    ckpts = sorted(settings.checkpoint_dir.glob("ckpt-*.pt"))
    assert len(ckpts) == 2 and all(VICTIM.encode() in p.read_bytes() for p in ckpts)
    assert VICTIM in worker.reservoir.users

    forget_user(seqs, emb, VICTIM)
    assert list(seqs.forgotten()) == [VICTIM]
    report = worker.run_cycle()  # nothing dirty: the checkpoint is rewritten anyway
    assert not report.ran and VICTIM not in worker.reservoir.users
    ckpts = sorted(settings.checkpoint_dir.glob("ckpt-*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-00000002.pt"]  # older files held it
    payload = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert not holds(payload, VICTIM) and VICTIM.encode() not in ckpts[0].read_bytes()
    assert len(payload["extra"]["reservoir"]["users"]) == len(users) - 1
    assert seqs.forgotten() == {}  # the marker lives until this checkpoint
    assert load_trainer(settings).version == 2


# --- the whole stack ------------------------------------------------------------------
def _produce(port: str, messages: list[tuple[str, list[dict]]]) -> None:
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{port}")
        await producer.start()
        try:
            for user, events in messages:
                await producer.send(
                    "behavior-events", json.dumps(events).encode(), key=user.encode()
                )
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def test_forget_erases_a_user_from_a_running_stack(tmp_path, redis_url):
    admin = new_token()
    auth = {"Authorization": f"Bearer {admin}"}
    others = [f"other-{i:03d}" for i in range(100)]
    env = {"API_TOKENS": hash_line(admin, "admin"), "TRAIN_STEPS": "2", "TRAIN_INTERVAL_S": "1",
           "HIDDEN_SIZE": "32", "NUM_LAYERS": "1", "RESERVOIR_SIZE": "1000",
           "TORCH_THREADS": "1"}  # fmt: skip
    t_start = time.monotonic()
    with running_stack(tmp_path, redis_url, **env) as stack:
        c, data_dir = stack["client"], Path(stack["data_dir"])
        prefix = stack["env"]["REDIS_PREFIX"]
        now = time.time()
        messages = [
            (
                u,
                [
                    {
                        "user_id": u,
                        "item_id": f"sku-{(k * 7 + i) % 40}",
                        "behavior": "view",
                        "ts": now - 60 + k,
                    }
                    for k in range(5)
                ],
            )  # fmt: skip
            for i, u in enumerate([VICTIM, *others])
        ]
        _produce(stack["env"]["EMBEDDED_KAFKA_PORT"], messages)

        def settled() -> bool:
            s = c.get("/stats", headers=auth).json()
            return (s["embedded_users"] == 101 and s["model_version"] is not None
                    and s["index_size"] == 101 and s["embed_pending"] == 0
                    and s["refresh_pending"] == 0)  # fmt: skip

        wait_until(settled, 120, "101 users embedded, indexed and trained on", stack["proc"])
        ckpt_dir = data_dir / "checkpoints"
        wait_until(lambda: any(VICTIM.encode() in p.read_bytes()
                               for p in ckpt_dir.glob("ckpt-*.pt")), 60,
                   "a checkpoint whose reservoir holds the victim")  # fmt: skip
        near = c.get(f"/users/{others[0]}/similar", params={"k": 100}, headers=auth).json()
        assert VICTIM in [n["user_id"] for n in near["neighbors"]]  # 101 users: all listed

        assert c.delete(f"/users/{VICTIM}").status_code == 401
        t_forget = time.monotonic()
        r = c.delete(f"/users/{VICTIM}", headers=auth)
        assert r.status_code == 200, r.text
        report = r.json()
        print("erase report:", json.dumps(report, indent=2))
        assert report["found"] and report["sequences"]["behaviors"] == 5
        assert report["embeddings"]["embedding"] == 1
        assert all(report["index_applied"].values())

        raw = redis.Redis.from_url(redis_url)  # bytes: values are packed binary
        try:
            # the training worker's next cycle clears the marker after its checkpoint
            wait_until(lambda: not redis_holdings(raw, prefix, VICTIM), 60,
                       "no trace of the user in Redis",
                       details=lambda: str(redis_holdings(raw, prefix, VICTIM)))  # fmt: skip
        finally:
            raw.close()
        t_clean = time.monotonic() - t_forget

        files = sorted(ckpt_dir.glob("ckpt-*.pt"))
        assert files, "no checkpoint"
        for p in files:
            payload = torch.load(p, map_location="cpu", weights_only=True)
            assert not holds(payload, VICTIM) and VICTIM.encode() not in p.read_bytes(), p
        snapshot = data_dir / "index" / "users.snapshot"
        wait_until(lambda: snapshot.exists() and VICTIM.encode() not in snapshot.read_bytes(),
                   10, "an index snapshot without the user")  # fmt: skip

        for path in ("similar", "embedding", "recommendations", "profile"):
            got = c.get(f"/users/{VICTIM}/{path}", headers=auth)
            assert got.status_code == 404, (path, got.text)
        for path in ("/stats", "/metrics", "/healthz", "/readyz"):
            assert VICTIM not in c.get(path, headers=auth).text, path
        for u in others:
            got = c.get(f"/users/{u}/similar", params={"k": 100}, headers=auth).json()
            names = [n["user_id"] for n in got["neighbors"]]
            assert VICTIM not in names and len(names) == 99, u
        logs = {p.name: p.read_text(errors="replace") for p in (data_dir / "logs").glob("*.log")}
        assert not [name for name, text in logs.items() if VICTIM in text]
        print(f"forget: clean everywhere {t_clean:.1f}s after the DELETE; "
              f"test {time.monotonic() - t_start:.0f}s")  # fmt: skip
