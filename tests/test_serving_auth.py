"""Bearer tokens on the API (serving/auth.py): scopes, 401 / 403, open modes; real
Redis and the follower thread, as in tests/test_serving_api.py."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serving import create_app
from serving.auth import TokenAuth
from userstream.settings import Settings
from userstream.stores import ModelInfo, RedisEmbeddingStore
from userstream.tokens import hash_line, new_token

pytestmark = pytest.mark.integration

READ, ADMIN = new_token(), new_token()
TOKENS = f"{hash_line(READ, 'read')},{hash_line(ADMIN, 'admin')}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def store(redis_client, keys):
    store = RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)
    vecs = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    store.upsert([f"u{i}" for i in range(5)], vecs / np.linalg.norm(vecs, axis=1, keepdims=True),
                 version=1)  # fmt: skip
    store.set_model_info(ModelInfo(1, "ckpt", items=1, updated_at=1.0, loss=0.1))
    return store


def client(tmp_path, redis_prefix, redis_url, redis_client, **settings) -> TestClient:
    s = Settings(data_dir=tmp_path, redis_prefix=redis_prefix, redis_url=redis_url, **settings)
    c = TestClient(create_app(s, redis_client=redis_client))
    c.__enter__()
    assert c.app.state.ctx.follower.ready.wait(10)
    return c


@pytest.fixture
def guarded(tmp_path, redis_prefix, redis_url, redis_client, store):
    c = client(tmp_path, redis_prefix, redis_url, redis_client, api_tokens=TOKENS)
    yield c
    c.__exit__(None, None, None)


def test_reads_need_a_known_token_with_www_authenticate(guarded):
    for path in ("/users/u1/similar", "/users/u1/embedding", "/stats", "/metrics"):
        r = guarded.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert "needs a bearer token with the read scope" in r.json()["detail"]
        r = guarded.get(path, headers=bearer("not-a-token"))
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["detail"] == "invalid bearer token (not one of API_TOKENS)"
        assert guarded.get(path, headers={"Authorization": f"Basic {READ}"}).status_code == 401
        assert guarded.get(path, headers=bearer(READ)).status_code == 200, path
        assert guarded.get(path, headers=bearer(ADMIN)).status_code == 200, path


def test_delete_needs_the_admin_scope(guarded):
    assert guarded.delete("/users/u1").status_code == 401
    r = guarded.delete("/users/u1", headers=bearer(READ))
    assert r.status_code == 403
    assert (
        r.json()["detail"]
        == "DELETE /users/{user_id:path} needs the admin scope; this token has read"
    )
    assert guarded.get("/users/u1/embedding", headers=bearer(READ)).status_code == 200  # untouched
    r = guarded.delete("/users/u1", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json()["embeddings"]["embedding"] == 1
    assert guarded.get("/users/u1/embedding", headers=bearer(READ)).status_code == 404


def test_probes_are_always_open(guarded):
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/readyz").status_code in (200, 503)  # open; readiness is its own test
    assert "checks" in guarded.get("/readyz").json()


def test_open_reads_and_metrics_keep_delete_guarded(tmp_path, redis_prefix, redis_url,
                                                    redis_client, store):  # fmt: skip
    c = client(tmp_path, redis_prefix, redis_url, redis_client, api_tokens=TOKENS,
               api_open_reads=True)  # fmt: skip
    try:
        assert c.get("/users/u1/similar").status_code == 200
        assert c.get("/metrics").status_code == 401  # its own setting
        assert c.delete("/users/u1").status_code == 401
    finally:
        c.__exit__(None, None, None)
    c = client(tmp_path, redis_prefix, redis_url, redis_client, api_tokens=TOKENS,
               api_open_metrics=True)  # fmt: skip
    try:
        assert c.get("/metrics").status_code == 200
        assert c.get("/stats").status_code == 401
    finally:
        c.__exit__(None, None, None)


def test_no_tokens_is_open_and_logged(tmp_path, redis_prefix, redis_url, redis_client, store,
                                      caplog):  # fmt: skip
    c = client(tmp_path, redis_prefix, redis_url, redis_client)
    try:
        assert "the API is open" in caplog.text
        assert c.get("/users/u1/similar").status_code == 200
        assert c.delete("/users/u2").status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_settings_hold_hashes_and_scopes_rank():
    auth = TokenAuth.of_settings(Settings(api_tokens=TOKENS))
    assert auth.scope_of(READ) == "read" and auth.scope_of(ADMIN) == "admin"
    assert auth.scope_of(READ + "x") is None and auth.scope_of("") is None
    both = TokenAuth.of_settings(
        Settings(api_tokens=f"{hash_line(READ, 'read')}, {hash_line(READ, 'admin')}")
    )
    assert both.scope_of(READ) == "admin"  # the widest scope wins
    for wrong in (READ, f"sha256:{'0' * 64}:write", f"md5:{'0' * 32}:read"):
        with pytest.raises(ValidationError):
            Settings(api_tokens=wrong)  # a raw token, an unknown scope or hash
