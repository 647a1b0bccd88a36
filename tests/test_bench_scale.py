"""``userstream bench scale`` end to end on a small stream: the real stack ingests a
session stream, embeds every user, and the report carries every figure."""

from __future__ import annotations

import json

import pytest

from userstream.scale import ScaleConfig, run_scale
from userstream.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_scale_embeds_every_user_and_reports_every_figure(tmp_path, monkeypatch):
    for var in ("REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "USERSTREAM_CONFIG"):
        monkeypatch.delenv(var, raising=False)  # the run's own Redis and embedded broker
    cfg = ScaleConfig(users=2000, items=400, groups=20, session=3, sample_every_s=1.0,
                      settle_timeout_s=240, probe_timeout_s=60)  # fmt: skip
    report = run_scale(Settings(), cfg, tmp_path / "scale.json")
    assert report["events"] == report["events_planned"] == 6000 and report["failed_messages"] == 0
    assert report["messages"] == 2000  # a session per message
    assert report["events_ingested"] == 6000 and report["ingest_events_per_s"] > 0
    # every user of the stream (and the probes' users) has an embedding
    assert report["all_embedded_s"] is not None and report["embedded_users"] >= 2000
    assert report["index_size"] >= 2000
    assert {"stream-worker", "train-worker", "api", "redis"} <= set(report["rss_mb"])
    assert all(v["max"] > 0 for v in report["rss_mb"].values())
    assert report["redis_used_mb"]["max"] > 0 and report["redis_bytes_per_user"] > 0
    assert report["within_24gib"] and report["timeline"]
    assert 300 < report["items_seen"] <= 402  # the catalogue and the two probe items
    fresh = report["freshness"]
    assert fresh["new"]["n"] > 0 and fresh["new"]["timeouts"] == 0, fresh
    on_disk = json.loads((tmp_path / "scale.json").read_text())
    assert (
        on_disk["plot"] == str(tmp_path / "scale.png") and (tmp_path / "scale.png").stat().st_size
    )
