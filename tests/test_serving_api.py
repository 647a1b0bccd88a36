"""The FastAPI app end to end with TestClient, a real Redis and the follower thread."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, unquote

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from serving import create_app
from tests.helpers import wait_until
from userstream.embedded import free_port
from userstream.settings import Settings
from userstream.stores import (
    EmbeddingStore,
    ModelInfo,
    RedisEmbeddingStore,
    RedisSequenceStore,
    SequenceStore,
    connect,
)
from userstream.types import Event

D = 16
N_OTHERS = 50


@pytest.fixture
def settings(tmp_path, redis_prefix, redis_url) -> Settings:
    return Settings(data_dir=tmp_path, redis_prefix=redis_prefix, redis_url=redis_url)


@pytest.fixture
def store(redis_client, keys) -> EmbeddingStore:
    return RedisEmbeddingStore(redis_client, keys, feed_maxlen=1000)


@pytest.fixture
def sequences(redis_client, keys) -> SequenceStore:
    return RedisSequenceStore(redis_client, keys)


@pytest.fixture
def planted(store) -> dict[str, np.ndarray]:
    """u0 with three planted neighbours (n1 closest, then n2, n3) among random users."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal(D).astype(np.float32)
    vecs = {"u0": base}
    for name, noise in (("n1", 0.05), ("n2", 0.2), ("n3", 0.4)):
        vecs[name] = base + noise * rng.standard_normal(D).astype(np.float32)
    for i in range(N_OTHERS):
        vecs[f"o{i}"] = rng.standard_normal(D).astype(np.float32)
    vecs = {u: v / np.linalg.norm(v) for u, v in vecs.items()}
    store.upsert(list(vecs), np.stack(list(vecs.values())), version=3)
    store.set_model_info(ModelInfo(3, "ckpt-3.pt", items=7, updated_at=1.7e9, loss=0.5))
    return vecs


def _client(settings, redis_client, store, **kw) -> TestClient:
    app = create_app(settings, redis_client=redis_client, **kw)
    return TestClient(app)


def _caught_up(client: TestClient, store: EmbeddingStore) -> None:
    follower = client.app.state.ctx.follower
    assert follower.wait_for(store.feed_head(), timeout=5), "follower did not catch up"


def test_similar_returns_planted_neighbours(settings, redis_client, store, planted):
    with _client(settings, redis_client, store) as c:
        _caught_up(c, store)
        r = c.get("/users/u0/similar", params={"k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == "u0" and body["model_version"] == 3
        assert [n["user_id"] for n in body["neighbors"]] == ["n1", "n2", "n3"]
        scores = [n["score"] for n in body["neighbors"]]
        want = [float(planted["u0"] @ planted[u]) for u in ("n1", "n2", "n3")]
        np.testing.assert_allclose(scores, want, atol=1e-5)
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.9

        # k larger than the population: every other user once, never itself, best first
        r = c.get("/users/u0/similar", params={"k": 1000})
        neighbors = r.json()["neighbors"]
        names = [n["user_id"] for n in neighbors]
        assert len(names) == len(planted) - 1 == len(set(names)) and "u0" not in names
        all_scores = [n["score"] for n in neighbors]
        assert all_scores == sorted(all_scores, reverse=True)

        # default k=10 matches brute force over the other users
        r = c.get("/users/n2/similar")
        others = [u for u in planted if u != "n2"]
        brute = sorted(others, key=lambda u: -float(planted["n2"] @ planted[u]))[:10]
        assert [n["user_id"] for n in r.json()["neighbors"]] == brute


def test_similar_from_memory_makes_no_redis_call(settings, redis_client, store, planted,
                                                 monkeypatch):  # fmt: skip
    """A followed user with followed neighbours is answered from the index and the
    user table alone (on the event loop); a write holding the index sends the
    request to the thread pool, where it waits for the write instead of failing."""
    with _client(settings, redis_client, store) as c:
        _caught_up(c, store)
        ctx = c.app.state.ctx

        def no_redis(*_a, **_k):
            raise AssertionError("the in-memory path called Redis")

        for name in ("lookup", "get", "users_for", "num_of"):
            monkeypatch.setattr(ctx.embeddings, name, no_redis)
        r = c.get("/users/u0/similar", params={"k": 3})
        assert r.status_code == 200, r.text
        assert [n["user_id"] for n in r.json()["neighbors"]] == ["n1", "n2", "n3"]
        monkeypatch.undo()
        from serving import queries

        monkeypatch.setattr(queries, "LOOP_SCAN_MAX", 10)  # a long exact search: the pool
        assert queries.similar_users(ctx, "u0", 3, local_only=True) is None
        assert c.get("/users/u0/similar", params={"k": 3}).status_code == 200
        monkeypatch.undo()

        index = ctx.follower.index
        held, release, answers = threading.Event(), threading.Event(), []

        def writer() -> None:
            with index._lock.write():
                held.set()
                release.wait(10)

        def ask() -> None:
            answers.append(c.get("/users/u0/similar", params={"k": 3}))

        w = threading.Thread(target=writer)
        w.start()
        assert held.wait(5)
        q = threading.Thread(target=ask)
        q.start()
        q.join(0.5)
        assert q.is_alive() and not answers  # waiting for the write, in the pool
        assert c.get("/healthz").status_code == 200  # and the event loop is free
        release.set()
        q.join(10)
        w.join(5)
        assert answers and answers[0].status_code == 200
        assert [n["user_id"] for n in answers[0].json()["neighbors"]] == ["n1", "n2", "n3"]


def test_similar_for_user_not_yet_in_the_index(settings, redis_client, store, planted):
    """A user embedded after the index loaded is queried with its vector from Redis."""
    with _client(settings, redis_client, store, start_follower=False) as c:
        follower = c.app.state.ctx.follower
        follower.sync_once()
        store.upsert(["late"], planted["n1"][None, :], version=4)  # not applied: no thread
        assert len(follower.index) == len(planted)
        r = c.get("/users/late/similar", params={"k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == 4
        assert [n["user_id"] for n in body["neighbors"]] == ["n1", "u0"]


def test_unknown_and_not_yet_embedded_users_get_404(
    settings, redis_client, store, sequences, planted
):
    sequences.apply_many(
        "behavior-events",
        [(0, 1, Event("fresh", "i1", "click", 1.0)), (0, 2, Event("fresh", "i2", "buy", 2.0))],
    )
    with _client(settings, redis_client, store) as c:
        _caught_up(c, store)
        for path in ("/users/fresh/similar", "/users/fresh/embedding"):
            r = c.get(path)
            assert r.status_code == 404
            detail = r.json()["detail"]
            assert "'fresh' has 2 events but no embedding yet" in detail
            assert "model_version=3" in detail
        for path in ("/users/nobody/similar", "/users/nobody/embedding"):
            r = c.get(path)
            assert r.status_code == 404
            assert r.json()["detail"] == (
                "user 'nobody' has no embedding yet: no events were ingested for it "
                "(unknown user id)"
            )


@pytest.mark.parametrize("k", ["0", "-1", "1001", "5000", "ten"])
def test_bad_k_is_422(settings, redis_client, store, planted, k):
    app = create_app(settings, redis_client=redis_client, start_follower=False)
    with TestClient(app) as c:
        r = c.get("/users/u0/similar", params={"k": k})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["query", "k"]


def test_embedding_endpoint(settings, redis_client, store, planted):
    with _client(settings, redis_client, store) as c:
        r = c.get("/users/n3/embedding")
        assert r.status_code == 200
        body = r.json()
        assert body["user_id"] == "n3" and body["model_version"] == 3 and body["dim"] == D
        np.testing.assert_array_equal(np.asarray(body["embedding"], np.float32), planted["n3"])


def test_stats(settings, redis_client, store, sequences, keys):
    with _client(settings, redis_client, store) as c:
        assert c.app.state.ctx.follower.ready.wait(5)
        empty = c.get("/stats").json()
        assert empty["model_version"] is None and empty["model_updated_at"] is None
        assert empty["events_ingested"] == 0 and empty["index_size"] == 0
        assert empty["index_applied_id"] == "0-0" and empty["feed_lag_s"] == 0.0

        events = [(0, i, Event(f"u{i % 3}", f"i{i % 4}", "click", float(i))) for i in range(10)]
        sequences.apply_many("behavior-events", events, dead=[(0, 10), (0, 11)])
        # a redelivered batch: the two old offsets are skipped, the new one applied
        sequences.apply_many(
            "behavior-events", [*events[:2], (0, 12, Event("u0", "i0", "buy", 12.0))]
        )
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((2, D)).astype(np.float32)
        store.upsert(["u0", "u1"], vecs / np.linalg.norm(vecs, axis=1, keepdims=True), version=2)
        store.set_model_info(ModelInfo(2, "ckpt-2.pt", items=4, updated_at=123.5, loss=1.0))
        _caught_up(c, store)

        s = c.get("/stats").json()
        assert s["events_ingested"] == 11
        assert s["events_dead_lettered"] == 2
        assert s["events_duplicate_skipped"] == 2
        assert s["users"] == 3 and s["items"] == 4
        assert s["embedded_users"] == 2 and s["index_size"] == 2 and s["index_dim"] == D
        assert s["model_version"] == 2 and s["model_updated_at"] == 123.5
        assert s["index_ready"] is True
        assert s["index_applied_id"] == s["feed_head_id"] == store.feed_head()
        assert s["feed_lag_s"] == 0.0
        assert s["refresh_pending"] == 3 and s["offset_log_resets"] == 0
        assert s["restarts"] is None  # no supervisor beside this API
        sequences.take_dirty(2)  # a running cycle's claim is still pending
        assert c.get("/stats").json()["refresh_pending"] == 3
        settings.supervisor_state_file.write_text(
            '{"children": {"api": {"restarts": 0}, "train-worker": {"restarts": 2}}}'
        )
        assert c.get("/stats").json()["restarts"] == {"api": 0, "train-worker": 2}


def test_healthz(settings, redis_client, store):
    with _client(settings, redis_client, store) as c:
        assert c.app.state.ctx.follower.ready.wait(5)
        r = c.get("/healthz")
        assert r.status_code == 200
        assert r.json()["status"] == "ok" and r.json()["reasons"] == []

    with _client(settings, redis_client, store, start_follower=False) as c:
        r = c.get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "unavailable" and body["redis"] is True
        assert any("follower is not running" in reason for reason in body["reasons"])
        assert c.get("/users/x/similar").status_code == 503  # index not loaded


def test_healthz_without_redis(settings, redis_prefix):
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2,
                   retry=Retry(NoBackoff(), 0))  # fmt: skip
    with TestClient(create_app(settings, redis_client=dead)) as c:
        r = c.get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert body["redis"] is False and body["index_ready"] is False
        assert any(reason.startswith("redis does not answer") for reason in body["reasons"])
        # /metrics still answers, flagging Redis as down
        assert "userstream_redis_up 0.0" in c.get("/metrics").text


def test_metrics(settings, redis_client, store, sequences, planted):
    sequences.apply_many(
        "behavior-events", [(0, 1, Event("u0", "i1", "click", 1.0))], dead=[(0, 2)]
    )
    with _client(settings, redis_client, store) as c, _client(settings, redis_client, store) as c2:
        _caught_up(c, store)
        _caught_up(c2, store)  # a second app in the same process has its own registry
        for _ in range(3):
            assert c.get("/users/u0/similar", params={"k": 2}).status_code == 200
        c.get("/users/nobody/similar")
        c.get("/no/such/path")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        route = 'route="/users/{user_id}/similar"'
        assert f'userstream_http_requests_total{{method="GET",{route},status="200"}} 3.0' in text
        assert f'userstream_http_requests_total{{method="GET",{route},status="404"}} 1.0' in text
        assert 'route="<unmatched>",status="404"' in text
        assert f'userstream_http_request_duration_seconds_count{{method="GET",{route}}} 4.0' in text
        assert f"userstream_index_size {float(len(planted))}" in text
        assert "userstream_events_ingested_total 1.0" in text
        assert "userstream_events_dead_lettered_total 1.0" in text
        assert "userstream_model_version 3.0" in text
        assert "userstream_drifts_detected_total 0.0" in text
        assert "userstream_follower_rebuilds_total 1.0" in text  # loaded from read_all
        assert "userstream_follower_applied_updates_total 0.0" in text
        assert "userstream_redis_up 1.0" in text
        assert "userstream_index_feed_lag_seconds 0.0" in text

        store.upsert(["extra", "u0"], np.stack([planted["n1"], planted["n2"]]), version=4)
        _caught_up(c, store)
        text = c.get("/metrics").text
        assert "userstream_follower_applied_updates_total 2.0" in text
        assert f"userstream_index_size {float(len(planted) + 1)}" in text

        _caught_up(c2, store)
        other = c2.get("/metrics").text
        assert "userstream_http_requests_total{" not in other  # c's requests are not counted here
        assert f"userstream_index_size {float(len(planted) + 1)}" in other


def _http_series(text: str) -> dict[str, dict[str, str]]:
    """Every exposed ``userstream_http_*`` series (name and labels) -> its labels."""
    out = {}
    for line in text.splitlines():
        if line.startswith("userstream_http_"):
            series = line.rsplit(" ", 1)[0]
            out[series] = dict(re.findall(r'(\w+)="([^"]*)"', series))
    return out


def _all_series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


# Headroom over what the flood's kinds of request expose once label values are
# bounded; with a label taken from the request, one flood passes both.
MAX_SERIES = 200
MAX_METRICS_BYTES = 25_000


def test_invented_methods_and_paths_add_no_metric_series(settings, redis_client, store, planted):
    def flood(tag: str, n: int = 100) -> None:
        for i in range(n):
            word = f"{tag}{i}{uuid.uuid4().hex[:6]}"
            assert c.request(f"X{word.upper()}", f"/users/u{i}/similar").status_code == 405
            assert c.request(f"Y{word.upper()}", f"/{word}/{i}").status_code == 404
            assert c.get(f"/no/such/{word}").status_code == 404
            assert c.get(f"/users/{word}/similar").status_code == 404
        assert c.request("BREW", "/healthz").status_code == 405
        assert c.request("PROPFIND", "/stats").status_code == 405

    with _client(settings, redis_client, store) as c:
        _caught_up(c, store)
        assert c.get("/users/u0/similar").status_code == 200
        quiet = c.get("/metrics")
        flood("a")
        first = c.get("/metrics")
        flood("b")
        second = c.get("/metrics")

        before, after = _http_series(first.text), _http_series(second.text)
        assert set(after) == set(before), set(after) ^ set(before)  # nothing new on a 2nd flood
        assert _all_series(second.text) == _all_series(first.text) <= MAX_SERIES
        assert len(quiet.content) < len(second.content) < MAX_METRICS_BYTES
        # every label value from a closed set: the routes hit, methods, status codes
        values = {name: {v.get(name) for v in after.values()} for name in ("method", "route")}
        assert values["method"] == {"GET", "other"}
        routes = {"/users/{user_id}/similar", "/healthz", "/stats", "/metrics", "<unmatched>"}
        assert values["route"] == routes
        assert {v["status"] for v in after.values() if "status" in v} == {"200", "404", "405"}
        text = second.text
        assert 'method="other",route="/users/{user_id}/similar",status="405"' in text
        assert 'method="other",route="/healthz",status="405"' in text
        assert 'method="other",route="<unmatched>",status="404"' in text
        # the two floods' invented methods on invented paths, all in one series
        assert 'requests_total{method="other",route="<unmatched>",status="404"} 200.0' in text


# Ids the stream accepts (printable, up to 256 characters) that a path segment cannot
# hold as they are: '/', '%', '?', '#', spaces, unicode, route words, dots between slashes.
ODD_IDS = [
    "a/b",
    "x%2Fy",
    "ü ser",
    "a/similar",
    "a/embedding",
    "a/similar/similar",
    "/lead",
    "trail/",
    "a/../b",
    "50% off?k=1#top",
    "日本/語",
    "é/" * 128,
]
# the same ids sent unencoded, where HTTP allows it (no '%', '?', '#', space, non-ASCII, dot segment)
LITERAL_IDS = ["a/b", "a/similar", "a/embedding", "a/similar/similar", "/lead", "trail/"]


@pytest.fixture
def everyone(store, planted) -> dict[str, np.ndarray]:
    """The planted users plus ODD_IDS and plain "a", each with its own vector."""
    rng = np.random.default_rng(5)
    ids = ["a", *ODD_IDS]
    vecs = rng.standard_normal((len(ids), D)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store.upsert(ids, vecs, version=3)
    return {**planted, **dict(zip(ids, vecs, strict=True))}


@contextmanager
def _served(app: FastAPI, transport: str) -> Iterator[httpx.Client]:
    """A client of ``app``: Starlette's TestClient, or httpx to a real uvicorn server."""
    if transport == "testclient":
        with TestClient(app) as c:
            yield c
        return
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 20, "uvicorn to start", poll_s=0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("transport", ["testclient", "uvicorn"])
def test_any_stream_user_id_can_be_queried(settings, redis_client, store, everyone, transport):
    assert max(len(u) for u in ODD_IDS) == 256
    app = create_app(settings, redis_client=redis_client)
    with _served(app, transport) as c:
        assert app.state.ctx.follower.wait_for(store.feed_head(), timeout=5)
        ids = ["a", *ODD_IDS]
        if transport == "testclient":
            # The TestClient unquotes the path httpx already decoded (starlette#2587), so an
            # id holding "%2F" itself arrives as "/"; a real server decodes once.
            ids = [u for u in ids if unquote(u) == u]
        sent = [(u, quote(u, safe="")) for u in ids] + [(u, u) for u in LITERAL_IDS]
        for user, segment in sent:
            r = c.get(f"/users/{segment}/embedding")
            assert r.status_code == 200, (user, segment, r.text)
            assert r.json()["user_id"] == user
            got = np.asarray(r.json()["embedding"], np.float32)
            np.testing.assert_array_equal(got, everyone[user])

            r = c.get(f"/users/{segment}/similar", params={"k": 3})
            assert r.status_code == 200, (user, segment, r.text)
            body = r.json()
            assert body["user_id"] == user and body["model_version"] == 3
            others = [u for u in everyone if u != user]
            brute = sorted(others, key=lambda u: -float(everyone[user] @ everyone[u]))[:3]
            assert [n["user_id"] for n in body["neighbors"]] == brute, user

        r = c.get(f"/users/{quote('no/such user', safe='')}/similar")
        assert r.status_code == 404
        assert "user 'no/such user' has no embedding yet" in r.json()["detail"]
        # an id ending in a route word is not the route: /users/<a/similar>/similar
        assert c.get("/users/a/similar/similar").json()["user_id"] == "a/similar"
        assert c.get("/users/a/similar").json()["user_id"] == "a"
        # the metrics label is the template, whatever the id
        text = c.get("/metrics").text
        assert 'route="/users/{user_id}/similar",status="200"' in text
        assert "no/such" not in text and "%2F" not in text


def test_openapi_names_user_routes_by_template(settings, redis_client):
    app = create_app(settings, redis_client=redis_client, start_follower=False)
    paths = app.openapi()["paths"]
    for suffix in ("similar", "embedding", "recommendations", "profile"):
        op = paths[f"/users/{{user_id}}/{suffix}"]["get"]
        assert [p["name"] for p in op["parameters"] if p["in"] == "path"] == ["user_id"]
    assert not [p for p in paths if ":" in p]
