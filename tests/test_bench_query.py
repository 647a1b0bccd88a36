"""``userstream bench query`` end to end on a small N: the report's interface fields."""

from __future__ import annotations

import pytest

from userstream.query_bench import QueryConfig, run_query_bench
from userstream.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_query_reports_every_field(tmp_path, redis_url):
    cfg = QueryConfig(users=3000, clients=4, seconds=1.0, recall_queries=50, hnsw=False)
    report = run_query_bench(Settings(redis_url=redis_url), cfg, tmp_path / "query.json")
    for key in ("users", "clients", "p50_ms", "p99_ms", "rps", "p50_ms_1client",
                "recall_at_10", "cold_start_s", "snapshot_start_s", "rss_mb", "baselines"):  # fmt: skip
        assert report[key] is not None, key
    assert (report["users"], report["clients"], report["errors"]) == (3000, 4, 0)
    assert report["index_kind"] == "flat" and report["recall_at_10"] == 1.0  # exact below IVF
    assert report["rps"] > 0 and report["baselines"]["bare_fastapi_rps"] > 0
    assert (tmp_path / "query.json").exists()
