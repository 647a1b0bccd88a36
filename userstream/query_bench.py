"""``userstream bench query``: similar-user queries over HTTP at N users.

N synthetic users (unit vectors around ``groups`` directions: users in interest
groups) are written through the project's own
:class:`~userstream.stores.RedisEmbeddingStore` (timed: new users per second),
then the API (``userstream api``, a separate process) is started on them: the
time until ``/healthz`` answers is the cold start (rebuild from Redis); after a
SIGTERM (which writes the index snapshot) a second start times the snapshot
start. ``GET /users/{id}/similar?k=10`` is timed at 1 client and at ``clients``
concurrent clients (one keep-alive connection each, threads): p50/p99 and
requests/s; recall@10 compares what the API serves with exact search over all
vectors. Baselines in the same run: bare FAISS exact and HNSW32 (efSearch 64)
searches and the API's own :class:`~serving.index.UserIndex`, in this process,
one thread, and a bare FastAPI endpoint under the same uvicorn settings and
the same clients.

Report fields: ``users``, ``clients``, ``p50_ms``, ``p99_ms``, ``rps`` (at
``clients``), ``p50_ms_1client``, ``p99_ms_1client``, ``rps_1client``,
``recall_at_10``, ``index_kind``, ``cold_start_s``, ``snapshot_start_s``,
``rss_mb``, ``write_users_per_s``, ``baselines``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from userstream.bench_env import BenchRedis, child_env, exit_on_sigterm, rss_mb, write_report
from userstream.embedded import free_port
from userstream.settings import Settings
from userstream.stores import RedisEmbeddingStore
from userstream.types import Keys

__all__ = ["QueryConfig", "run_query_bench"]

LOG = logging.getLogger(__name__)

_BARE_APP = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI()
@app.get("/users/{user_id}/similar")
def similar(user_id: str, k: int = 10):
    return {"user_id": user_id, "model_version": 1,
            "neighbors": [{"user_id": f"u{i}", "score": 0.5} for i in range(k)]}
@app.get("/healthz")
def healthz():
    return {"ok": True}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            loop="uvloop", http="httptools", access_log=False)
"""


class QueryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: int = Field(1_000_000, ge=100, description="synthetic users")
    clients: int = Field(16, ge=1, description="concurrent clients of the second run")
    dim: int = Field(64, ge=2, description="embedding dimension")
    groups: int = Field(1000, ge=1, description="interest groups the users come from")
    noise: float = Field(0.1, ge=0, description="spread of a user around its group")
    seconds: float = Field(15.0, gt=0, description="length of each timed query run")
    recall_queries: int = Field(500, ge=10, description="users whose answers are scored")
    hnsw: bool = Field(True, description="time the bare HNSW baseline (builds it: minutes)")
    seed: int = Field(0)


def _rss_mb(pid: int | None) -> float | None:
    mb = rss_mb(pid)
    return None if mb is None else round(mb, 1)


def _vectors(cfg: QueryConfig) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    centers = rng.standard_normal((cfg.groups, cfg.dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.empty((cfg.users, cfg.dim), dtype=np.float32)
    for start in range(0, cfg.users, 100_000):
        n = min(100_000, cfg.users - start)
        part = centers[rng.integers(0, cfg.groups, n)]
        part = part + cfg.noise * rng.standard_normal((n, cfg.dim)).astype(np.float32)
        x[start : start + n] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def _wait_http(port: int, path: str, timeout_s: float, proc: subprocess.Popen) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no 200 from {path} within {timeout_s:.0f}s")


def _load(port: int, users: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads, each a keep-alive connection asking for similar users."""
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        k = i
        while not stop.is_set():
            user = users[k % len(users)]
            k += clients
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/users/{user}/similar?k=10")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[i] += 1
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            lat[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(30)
    elapsed = time.perf_counter() - t0
    all_lat = np.array([x for part in lat for x in part]) * 1000
    return {
        "p50_ms": round(float(np.percentile(all_lat, 50)), 3) if len(all_lat) else None,
        "p99_ms": round(float(np.percentile(all_lat, 99)), 3) if len(all_lat) else None,
        "rps": round(len(all_lat) / elapsed, 1),
        "requests": int(len(all_lat)),
        "errors": int(sum(errors)),
    }


def _get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    return json.loads(resp.read())


def _bare_faiss(
    x: np.ndarray, queries: np.ndarray, exact: np.ndarray, hnsw: bool, settings: Settings
) -> dict:
    import faiss

    from serving.index import UserIndex

    faiss.omp_set_num_threads(1)
    out: dict[str, Any] = {}
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    t0 = time.perf_counter()
    for q in queries[:200]:
        flat.search(q.reshape(1, -1), 11)
    out["faiss_exact_ms"] = round((time.perf_counter() - t0) / 200 * 1000, 3)
    del flat
    # the API's own index, in process: what the HTTP path adds on top of it
    ours = UserIndex.build(np.arange(len(x)), x, ivf_min=settings.index_ivf_min,
                           nlist=settings.index_nlist, nprobe=settings.index_nprobe)  # fmt: skip
    t0 = time.perf_counter()
    for q in queries[:200]:
        ours.search(q.reshape(1, -1), 11)
    out["user_index_ms"] = round((time.perf_counter() - t0) / 200 * 1000, 3)
    out["user_index_kind"] = ours.kind
    del ours
    if hnsw:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        index.add(x)
        out["faiss_hnsw_build_s"] = round(time.perf_counter() - t0, 1)
        faiss.omp_set_num_threads(1)
        index.hnsw.efSearch = 64
        t0 = time.perf_counter()
        got = np.stack([index.search(q.reshape(1, -1), 11)[1][0] for q in queries])
        out["faiss_hnsw_ms"] = round((time.perf_counter() - t0) / len(queries) * 1000, 3)
        hits = sum(len(set(g[1:]) & set(w)) for g, w in zip(got, exact, strict=True))
        out["faiss_hnsw_recall_at_10"] = round(hits / (10 * len(exact)), 4)
    return out


def run_query_bench(settings: Settings, cfg: QueryConfig, report_path: Path | None = None) -> dict:
    """Run the benchmark described in the module docstring; returns (and writes) the report."""
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="query-"))
    bench_redis = BenchRedis(settings, work, "query", socket_timeout=120)
    client = bench_redis.client
    store = RedisEmbeddingStore(client, Keys.of_settings(settings, prefix=bench_redis.prefix),
                                feed_maxlen=settings.update_feed_maxlen)  # fmt: skip
    report: dict[str, Any] = {"users": cfg.users, "clients": cfg.clients}
    api: subprocess.Popen | None = None
    bare: subprocess.Popen | None = None
    env, _bootstrap = child_env(settings, work / "data", bench_redis)
    api_port = int(env["API_PORT"])

    def start_api(name: str) -> tuple[subprocess.Popen, float]:
        log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen([sys.executable, "-m", "userstream", "api"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        return proc, _wait_http(api_port, "/healthz", 600, proc)

    try:
        x = _vectors(cfg)
        names = [f"q{i}" for i in range(cfg.users)]
        t0 = time.perf_counter()
        for start in range(0, cfg.users, 10_000):
            store.upsert(names[start : start + 10_000], x[start : start + 10_000], version=1)
        report["write_users_per_s"] = round(cfg.users / (time.perf_counter() - t0))
        store.trim_feed(store.feed_head())  # the API rebuilds from the embeddings
        LOG.info("query bench: %d users written (%d/s)", cfg.users, report["write_users_per_s"])
        api, report["cold_start_s"] = start_api("api-cold")
        report["cold_start_s"] = round(report["cold_start_s"], 2)
        stats = _get_json(api_port, "/stats")
        report["index_kind"] = stats["index_kind"]
        report["rss_mb"] = {"api_cold": _rss_mb(api.pid)}
        rng = np.random.default_rng(cfg.seed + 1)
        query_rows = rng.choice(cfg.users, size=min(cfg.users, 5000), replace=False)
        query_users = [names[i] for i in query_rows]
        # recall@10: the API's neighbours against exact search over every vector
        scored = query_rows[: cfg.recall_queries]
        sims = x[scored] @ x.T
        sims[np.arange(len(scored)), scored] = -np.inf  # not the user itself
        exact_rows = np.argpartition(-sims, 10, axis=1)[:, :10]
        del sims
        hits = 0
        for row, want in zip(scored, exact_rows, strict=True):
            got = _get_json(api_port, f"/users/{names[row]}/similar?k=10")["neighbors"]
            hits += len({n["user_id"] for n in got} & {names[i] for i in want})
        report["recall_at_10"] = round(hits / (10 * len(scored)), 4)
        one = _load(api_port, query_users, 1, cfg.seconds)
        many = _load(api_port, query_users, cfg.clients, cfg.seconds)
        report.update(p50_ms=many["p50_ms"], p99_ms=many["p99_ms"], rps=many["rps"],
                      errors=many["errors"], p50_ms_1client=one["p50_ms"],
                      p99_ms_1client=one["p99_ms"], rps_1client=one["rps"])  # fmt: skip
        report["rss_mb"]["api_after_load"] = _rss_mb(api.pid)
        api.send_signal(signal.SIGTERM)  # writes the snapshot
        api.wait(120)
        api, snap_s = start_api("api-snapshot")
        report["snapshot_start_s"] = round(snap_s, 2)
        report["rss_mb"]["api_snapshot"] = _rss_mb(api.pid)
        api.send_signal(signal.SIGTERM)
        api.wait(120)
        api = None
        # baselines in the same run
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", _BARE_APP, str(bare_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_http(bare_port, "/healthz", 60, bare)
        bare_one = _load(bare_port, query_users, 1, min(cfg.seconds, 10))
        bare_many = _load(bare_port, query_users, cfg.clients, min(cfg.seconds, 10))
        bare.terminate()
        bare.wait(10)
        bare = None
        base = _bare_faiss(x, x[scored], exact_rows, cfg.hnsw, settings)  # ids there are rows
        base.update(bare_fastapi_rps=bare_many["rps"], bare_fastapi_p50_ms=bare_many["p50_ms"],
                    bare_fastapi_p99_ms=bare_many["p99_ms"],
                    bare_fastapi_p50_ms_1client=bare_one["p50_ms"])  # fmt: skip
        report["baselines"] = base
        report["ratios"] = {
            "rps_vs_bare_fastapi": round(report["rps"] / max(bare_many["rps"], 1e-9), 3),
            "p50_1client_vs_faiss_exact": round(one["p50_ms"] / base["faiss_exact_ms"], 2),
        }
        report["settings"] = {k: getattr(settings, k) for k in
                              ("index_ivf_min", "index_nlist", "index_nprobe", "faiss_threads")}  # fmt: skip
        report["config"] = cfg.model_dump()
        report["redis_used_mb"] = round(int(client.info("memory")["used_memory"]) / 2**20, 1)
    finally:
        for proc in (api, bare):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        bench_redis.close()
    write_report(report, report_path)
    return report
