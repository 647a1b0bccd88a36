"""The ops endpoints during a Redis hang, on a real private redis-server paused with SIGSTOP.

A stopped Redis still accepts connections (the kernel completes them) but never
replies, which is what a hung or overloaded server looks like to a client.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import anyio.to_thread
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving import create_app
from serving.api import OPS_TIMEOUT_S
from tests.helpers import wait_until
from userstream.embedded import free_port, start_redis
from userstream.settings import Settings
from userstream.stores import RedisEmbeddingStore, connect
from userstream.types import Keys

# Wall-clock bound for one ops request while Redis hangs: the one second a
# probe waits, plus slack for a loaded machine. The main client would take 5 s
# or more (socket timeout and retries), so the bound still tells the two apart.
WALL_BOUND_S = 1.5
TIMED_OUT = f"redis does not answer: timed out after {OPS_TIMEOUT_S:g}s"


@pytest.fixture
def private_redis(tmp_path: Path):
    """(process, url) of a redis-server of this test's own, always resumed and stopped."""
    port = free_port()
    proc = start_redis(port, tmp_path / "redis", tmp_path / "redis.log")
    try:
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        _resume(proc)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _resume(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)


def _timed_get(client: TestClient, path: str):
    start = time.monotonic()
    r = client.get(path)
    return r, time.monotonic() - start


async def _route_pool() -> tuple[int, int, int]:
    """Slots of the route thread pool: (total, held, requests waiting for one)."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    waiting = limiter.statistics().tasks_waiting
    return int(limiter.total_tokens), int(limiter.borrowed_tokens), waiting


def _pool_full(client: TestClient) -> bool:
    total, held, waiting = client.portal.call(_route_pool)
    return held == total and waiting >= 1


def _healthy(client: TestClient) -> dict | None:
    r = client.get("/healthz")
    return r.json() if r.status_code == 200 else None


def _server_ms(r) -> float:
    m = re.fullmatch(r"redis;dur=([0-9.]+)", r.headers["server-timing"])
    assert m, r.headers["server-timing"]
    return float(m.group(1))


def test_ops_endpoints_answer_fast_while_redis_hangs_and_recover(tmp_path, private_redis):
    proc, url = private_redis
    settings = Settings(data_dir=tmp_path / "data", redis_prefix="outage:", redis_url=url)
    seed = connect(url)
    RedisEmbeddingStore(seed, Keys(settings.redis_prefix), feed_maxlen=1000).upsert(
        ["u0"], np.eye(1, 8, dtype=np.float32), version=1
    )
    seed.close()
    # The app makes its own client from settings (the production configuration).
    # The stuck requests below may end in a 500, which must not raise in their threads.
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_until(lambda: c.get("/healthz").status_code == 200, 10, "a healthy app")
        assert _server_ms(c.get("/healthz")) < 1000

        os.kill(proc.pid, signal.SIGSTOP)
        try:
            # user requests on the main client, stuck until Redis resumes, one more than
            # the route thread pool has slots: every slot is held, one request waits
            stuck = [
                threading.Thread(target=c.get, args=("/users/u0/embedding",), daemon=True)
                for _ in range(c.portal.call(_route_pool)[0] + 1)
            ]
            for t in stuck:
                t.start()
            wait_until(
                lambda: _pool_full(c),
                10,
                "the route thread pool to fill",
                details=lambda: f" (total, held, waiting) = {c.portal.call(_route_pool)}",
            )
            for _ in range(3):  # every probe, not only the first, answers in time
                r, took = _timed_get(c, "/healthz")
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["status"] == "unavailable" and body["redis"] is False
                assert body["reasons"] == [TIMED_OUT]
                assert took < WALL_BOUND_S, f"/healthz took {took:.2f}s"
                assert _server_ms(r) < 1000

            r, took = _timed_get(c, "/stats")
            assert r.status_code == 503 and r.json()["detail"] == TIMED_OUT
            assert r.headers["retry-after"] == "1"
            assert took < WALL_BOUND_S, f"/stats took {took:.2f}s"

            r, took = _timed_get(c, "/metrics")
            assert r.status_code == 200 and "userstream_redis_up 0.0" in r.text
            assert "userstream_index_size 1.0" in r.text  # the replica's own series stay
            assert "userstream_events_ingested_total" not in r.text
            assert took < WALL_BOUND_S, f"/metrics took {took:.2f}s"

            assert all(t.is_alive() for t in stuck), "user requests should wait on Redis"
        finally:
            _resume(proc)

        body = wait_until(lambda: _healthy(c), 10, "/healthz back to 200")
        assert body["reasons"] == [] and body["redis"] is True
        for t in stuck:
            t.join(20)
        assert not any(t.is_alive() for t in stuck)
        assert c.get("/stats").json()["embedded_users"] == 1
        assert "userstream_redis_up 1.0" in c.get("/metrics").text
