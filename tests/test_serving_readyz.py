"""``/readyz`` (serving/readiness.py): each check with its reason, on real Redis."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving import create_app
from userstream.embedded import free_port
from userstream.settings import Settings
from userstream.stores import ModelInfo, RedisEmbeddingStore

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path, redis_prefix, redis_url) -> Settings:
    return Settings(data_dir=tmp_path, redis_prefix=redis_prefix, redis_url=redis_url)


def beat(redis_client, keys, at: float) -> None:
    record = {"app_id": "a", "partitions": ["behavior-events:0"], "ts": at - 60, "beat": at}
    redis_client.hset(keys.stream_ready, "host:1", json.dumps(record))


def test_readyz_names_each_missing_part_then_turns_ready(settings, redis_client, keys):
    store = RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)
    store.upsert(["a", "b"], np.eye(2, 4, dtype=np.float32), version=1)
    with TestClient(create_app(settings, redis_client=redis_client)) as c:
        assert c.app.state.ctx.follower.wait_for(store.feed_head(), 10)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        body = r.json()
        assert body["status"] == "not ready"
        checks = body["checks"]
        assert checks["redis"]["ok"] and checks["index"]["ok"] and checks["feed_lag"]["ok"]
        assert not checks["model"]["ok"] and "no model version" in checks["model"]["detail"]
        assert not checks["stream_worker"]["ok"]
        assert "no stream worker holds partitions" in checks["stream_worker"]["detail"]
        assert len(body["reasons"]) == 2
        assert c.get("/healthz").status_code == 200  # alive all along

        store.set_model_info(ModelInfo(1, "ckpt", items=1, updated_at=1.0, loss=0.1))
        beat(redis_client, keys, time.time() - 100)
        detail = c.get("/readyz").json()["checks"]["stream_worker"]["detail"]
        assert "heartbeat is 100s old (READY_HEARTBEAT_MAX_S=30)" in detail

        beat(redis_client, keys, time.time())
        r = c.get("/readyz")
        assert r.status_code == 200, r.json()
        assert r.json()["status"] == "ready" and r.json()["reasons"] == []


def test_readyz_reports_index_lag(settings, redis_client, keys):
    store = RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)
    store.set_model_info(ModelInfo(1, "ckpt", items=1, updated_at=1.0, loss=0.1))
    beat(redis_client, keys, time.time())
    store.upsert(["a"], np.eye(1, 4, dtype=np.float32), version=1)
    app = create_app(settings.model_copy(update={"ready_max_feed_lag_s": 0.01}),
                     redis_client=redis_client, start_follower=False)  # fmt: skip
    with TestClient(app) as c:
        c.app.state.ctx.follower.sync_once()
        time.sleep(0.05)
        store.upsert(["b"], np.eye(1, 4, dtype=np.float32), version=1)  # not applied
        checks = c.get("/readyz").json()["checks"]
        assert not checks["index"]["ok"] and checks["index"]["detail"] == (
            "index follower is not running"
        )
        assert not checks["feed_lag"]["ok"]
        assert "behind the feed (READY_MAX_FEED_LAG_S=0.01)" in checks["feed_lag"]["detail"]


def test_readyz_without_redis_answers_fast(tmp_path, redis_prefix):
    s = Settings(data_dir=tmp_path, redis_prefix=redis_prefix,
                 redis_url=f"redis://127.0.0.1:{free_port()}/0")  # fmt: skip
    with TestClient(create_app(s)) as c:
        t0 = time.perf_counter()
        r = c.get("/readyz")
        assert time.perf_counter() - t0 < 2.0
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert not checks["redis"]["ok"] and "redis does not answer" in checks["redis"]["detail"]
        assert checks["model"]["detail"] == "not checked: redis does not answer"
