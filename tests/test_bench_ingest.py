"""``userstream bench ingest`` end to end, small: the report's interface fields, and
correctness where two stream workers share four partitions (one of them SIGKILLed
mid-run): every event in Redis exactly once. No timing is asserted (the machine is
shared); only that every leg measured something."""

from __future__ import annotations

import json

import pytest

from userstream.ingest_bench import IngestConfig, run_ingest_bench
from userstream.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATES = ("bare_kafka_single_events_per_s", "bare_kafka_array_events_per_s",
         "bare_faust_single_events_per_s", "bare_redis_events_per_s",
         "worker_single_events_per_s", "worker_array_events_per_s",
         "two_workers_events_per_s")  # fmt: skip


def test_bench_ingest_reports_every_leg_and_loses_nothing(tmp_path, redis_url):
    cfg = IngestConfig(messages=3000, array_messages=200, kill_messages=2000, users=300,
                       leg_timeout_s=240)  # fmt: skip
    path = tmp_path / "ingest.json"
    report = run_ingest_bench(Settings(redis_url=redis_url), cfg, path)
    assert json.loads(path.read_text())["single_ratio"] == report["single_ratio"]
    for key in ("single_ratio", "array_ratio", "scale_out_ratio", *RATES):
        assert report[key] is not None and report[key] > 0, key
    assert (report["messages"], report["array_messages"]) == (3000, 200)
    assert report["host_cores"] >= 1 and report["cpu"]["single"]["worker0"] >= 0
    # each throughput leg applied every event once, nothing dead-lettered
    for name, events in (("single", 3000), ("array", 200 * 50), ("two_workers", 3000)):
        leg = report["legs"][name]
        assert (leg["ingested"], leg["dead_lettered"]) == (events, 0), name
        assert all(code == 0 for code in leg["exit_codes"]), (name, leg["exit_codes"])
    # two workers over four partitions, one SIGKILLed mid-run: no loss, no duplicate
    kill = report["kill"]
    assert kill["partitions_per_worker"] == [2, 2]
    assert (kill["produced"], kill["ingested"]) == (2000, 2000)
    assert (kill["lost"], kill["duplicated"], kill["out_of_order_users"]) == (0, 0, 0)
    assert 0 < kill["killed_at_events"] < 2000
    assert kill["exit_codes"][0] == -9 and kill["exit_codes"][1] == 0
    assert kill["ok"] and report["ok"]
