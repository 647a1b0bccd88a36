"""``GET /users/{id}/recommendations`` with a real checkpoint from a tiny Trainer
run, real Redis (fixtures in conftest) and the FastAPI app."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from model.trainer import Trainer
from serving import create_app
from userstream.settings import Settings
from userstream.stores import (
    EmbeddingStore,
    ModelInfo,
    RedisEmbeddingStore,
    RedisSequenceStore,
)
from userstream.types import Behavior, Event

RING = 10  # item i is always followed by item (i + 1) % RING


def ring_sequence(start: int, n: int, t0: float = 0.0) -> list[Behavior]:
    return [Behavior(f"i{(start + t) % RING}", "view", t0 + t) for t in range(n)]


@pytest.fixture
def settings(tmp_path, redis_prefix, redis_url) -> Settings:
    return Settings(
        data_dir=tmp_path,
        redis_prefix=redis_prefix,
        redis_url=redis_url,
        max_len=8,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        train_batch_size=32,
        learning_rate=5e-3,
        mlm_weight=0.0,
        contrastive_weight=0.0,
        device="cpu",
    )


@pytest.fixture
def store(redis_client, keys) -> EmbeddingStore:
    return RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)


@pytest.fixture
def users(redis_client, keys) -> dict[str, list[Behavior]]:
    """Three users in Redis whose sequences walk the ring."""
    seqs = {"a": ring_sequence(0, 4), "b": ring_sequence(5, 3), "c": ring_sequence(7, 6)}
    events, offset = [], 0
    for user, seq in seqs.items():
        for x in seq:
            offset += 1
            events.append((0, offset, Event(user, x.item_id, x.behavior, x.ts)))
    RedisSequenceStore(redis_client, keys).apply_many("behavior-events", events)
    return seqs


def train_and_save(settings: Settings, steps: int, trainer: Trainer | None = None) -> Trainer:
    trainer = trainer or Trainer(settings)
    seqs = [ring_sequence(s, n) for s in range(RING) for n in (3, 5, 8)]
    trainer.learn_many(seqs, steps=steps)
    trainer.save(settings.checkpoint_dir)
    return trainer


def get(client: TestClient, user: str, **params):
    return client.get(f"/users/{user}/recommendations", params=params)


def test_503_before_the_first_checkpoint_then_recommendations(settings, redis_client, store, users):
    app = create_app(settings, redis_client=redis_client, start_follower=False)
    with TestClient(app) as c:
        r = get(c, "a")
        assert r.status_code == 503
        assert "no model checkpoint" in r.json()["detail"]
        assert str(settings.checkpoint_dir) in r.json()["detail"]

        trainer = train_and_save(settings, steps=150)
        store.set_model_info(ModelInfo(trainer.version, "x", 10, 1.0, trainer.last_loss))
        r = get(c, "a", k=3)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == "a" and body["model_version"] == trainer.version
        assert body["exclude_seen"] is True
        items = [x["item_id"] for x in body["items"]]
        scores = [x["score"] for x in body["items"]]
        assert len(items) == 3 and scores == sorted(scores, reverse=True)
        seen = {x.item_id for x in users["a"]}  # i0..i3
        assert not seen & set(items)
        assert items[0] == "i4"  # the ring's next item, learned from the checkpoint

        # every user: the next ring item comes first
        for user, seq in users.items():
            top = get(c, user, k=1).json()["items"][0]["item_id"]
            assert top == f"i{(int(seq[-1].item_id[1:]) + 1) % RING}", user

        # seen items come back when asked for; k larger than the catalogue is capped
        r = get(c, "c", k=1000, exclude_seen="false").json()
        assert r["exclude_seen"] is False and len(r["items"]) == RING
        assert {x.item_id for x in users["c"]} <= {x["item_id"] for x in r["items"]}
        assert len(get(c, "c", k=1000).json()["items"]) == RING - len(
            {x.item_id for x in users["c"]}
        )

        assert get(c, "nobody").status_code == 404
        assert get(c, "a", k=0).status_code == 422


def test_reloads_when_the_model_version_in_redis_changes(settings, redis_client, store, users):
    trainer = train_and_save(settings, steps=5)
    store.set_model_info(ModelInfo(trainer.version, "x", 10, 1.0, trainer.last_loss))
    app = create_app(settings, redis_client=redis_client, start_follower=False)
    with TestClient(app) as c:
        first = get(c, "a", k=5).json()
        assert first["model_version"] == 1

        train_and_save(settings, steps=100, trainer=trainer)  # v2 on disk...
        assert get(c, "a", k=5).json()["model_version"] == 1  # ...not announced yet
        store.set_model_info(ModelInfo(trainer.version, "x", 10, 2.0, trainer.last_loss))
        second = get(c, "a", k=5).json()
        assert second["model_version"] == 2
        assert second["items"] != first["items"]
        assert second["items"][0]["item_id"] == "i4"


def test_profile_is_the_normalized_mean_item_vector_of_the_stored_history(
    settings, redis_client, store, users
):
    app = create_app(settings, redis_client=redis_client, start_follower=False)
    with TestClient(app) as c:
        r = c.get("/users/c/profile")
        assert r.status_code == 503 and "no model checkpoint" in r.json()["detail"]

        trainer = train_and_save(settings, steps=5)
        store.set_model_info(ModelInfo(trainer.version, "x", 10, 1.0, trainer.last_loss))
        body = c.get("/users/c/profile").json()
        assert body["user_id"] == "c" and body["model_version"] == trainer.version
        assert body["behaviors"] == len(users["c"]) and body["dim"] == settings.hidden_size
        table = trainer.encoder.item_emb.weight.detach()
        rows = trainer.items.rows_for([x.item_id for x in users["c"]])
        expected = table[rows].mean(0)
        expected = (expected / expected.norm()).tolist()
        assert body["profile"] == pytest.approx(expected, abs=1e-5)
        # another history, another vector
        assert c.get("/users/a/profile").json()["profile"] != body["profile"]
        assert c.get("/users/nobody/profile").status_code == 404


def test_user_ids_with_slashes_and_unicode_reach_both_routes(settings, redis_client, keys, store):
    """Ids as the stream accepts them, sent with quote(safe=""), one per route word too."""
    seqs = {
        "a/b": ring_sequence(0, 4),
        "ü ser": ring_sequence(3, 5),
        "x/profile": ring_sequence(5, 3),
        "日本/recommendations": ring_sequence(7, 6),
    }
    flat = [(user, x) for user, seq in seqs.items() for x in seq]
    events = [(0, n, Event(u, x.item_id, x.behavior, x.ts)) for n, (u, x) in enumerate(flat, 1)]
    RedisSequenceStore(redis_client, keys).apply_many("behavior-events", events)
    trainer = train_and_save(settings, steps=5)
    store.set_model_info(ModelInfo(trainer.version, "x", 10, 1.0, trainer.last_loss))
    app = create_app(settings, redis_client=redis_client, start_follower=False)
    with TestClient(app) as c:
        for user, seq in seqs.items():
            segment = quote(user, safe="")
            r = c.get(f"/users/{segment}/recommendations", params={"k": 2})
            assert r.status_code == 200, (user, r.text)
            assert r.json()["user_id"] == user and len(r.json()["items"]) == 2
            r = c.get(f"/users/{segment}/profile")
            assert r.status_code == 200, (user, r.text)
            assert r.json()["user_id"] == user and r.json()["behaviors"] == len(seq)
        # the literal form, where an id is plain ASCII
        assert c.get("/users/x/profile/profile").json()["user_id"] == "x/profile"
        assert c.get("/users/a/b/recommendations").json()["user_id"] == "a/b"
        r = c.get(f"/users/{quote('no/body', safe='')}/profile")
        assert r.status_code == 404 and "'no/body'" in r.json()["detail"]
