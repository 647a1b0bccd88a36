"""``bench prequential --via-kafka``: the loop through the real broker, stream worker
and Redis gives the same state and the same numbers as the in-process loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.prequential import MemoryFeed, PrequentialConfig, run_prequential
from model.prequential.baselines import RiverMFConfig
from model.prequential.kafka_feed import KafkaFeed, agreement
from model.prequential.planted import shifted_clickstream
from tests.test_prequential import tiny_settings
from userstream.cli import main
from userstream.stores import SequenceStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

torch.set_num_threads(1)

# Same events, same seed, same cadence: the encoders see the same sequences and
# dirty sets in the same order, so every number is equal, not merely close.
TOL = 0.0


def test_kafka_run_matches_the_in_process_run(
    tmp_path, broker, redis_url, redis_prefix, redis_client
):
    events = shifted_clickstream(360, n_users=24, n_groups=3, items_per_group=10, seed=2)
    s = tiny_settings(
        tmp_path,
        kafka_bootstrap_servers=broker,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        topic_partitions=2,  # users spread over partitions: only per-user order is kept
        stream_batch_within_s=0.02,
        train_every_events=60,
        train_steps=3,
        dropout=0.1,  # the runs must share the dropout masks too
    )
    config = PrequentialConfig(
        models=("popular", "river_mf", "cooccurrence", "frozen", "incremental"),
        river=(RiverMFConfig(8, 2, 0.1),),
        warmup=0.4,
        frozen_steps=2,
        window=120,
    )
    memory = MemoryFeed(s.sequence_length)
    local = run_prequential(events, s, config, feed=memory)
    with KafkaFeed(s) as feed:
        assert isinstance(feed.store, SequenceStore)
        assert feed.settings.redis_prefix.startswith(redis_prefix)
        kafka = run_prequential(events, s, config, feed=feed)
        # the state the stream worker built in Redis is the in-memory state
        users = sorted(memory.store.iter_users())
        assert sorted(feed.store.iter_users()) == users and len(users) == 24
        assert feed.store.read_many(users) == memory.store.read_many(users)
        assert feed.store.counters() == memory.store.counters()
        assert feed.store.counters()["events_ingested"] == 360
        agree = agreement(local, memory.store, kafka, feed.store)
        prefix = feed.settings.redis_prefix
        info = feed.info()
        assert list(redis_client.scan_iter(match=f"{prefix}{{0}}:seq:*"))
    assert feed.worker_exit == 0  # stopped cleanly
    assert not list(redis_client.scan_iter(match=f"{prefix}*"))  # the run's keys are gone
    # a chunk per B=60 events, one more cut where `frozen` trains on the warm-up state
    assert info["events"] == 360 and info["chunks"] == 7
    assert info["redis_reads"] > 0  # scoring read its sequences from Redis

    assert agree["sequences"] and agree["counters"] and agree["drifts_identical"]
    assert agree["cycles"] == len(local.cycles) >= 5 and agree["cycles_identical"]
    assert [c["dirty_digest"] for c in local.cycles] == [c["dirty_digest"] for c in kafka.cycles]
    assert [c["loss"] for c in local.cycles] == [c["loss"] for c in kafka.cycles]
    for name in local.models:
        for table in ("hr", "ndcg"):
            a, b = getattr(local, table)[name], getattr(kafka, table)[name]
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert np.nanmax(np.abs(a - b)) <= TOL, (name, table)
    assert agree["verdict"] == "exact"
    assert local.mean("incremental") > 0.05  # it did learn something


def test_cli_via_kafka_reports_both_runs(
    tmp_path, broker, redis_url, redis_prefix, redis_client, monkeypatch, capsys
):
    monkeypatch.delenv("USERSTREAM_CONFIG", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", broker)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_PREFIX", redis_prefix)
    tiny = ["max_len=12", "sequence_length=24", "hidden_size=32", "num_layers=1",
            "device=cpu", f"data_dir={tmp_path}", "topic_partitions=2",
            "stream_batch_within_s=0.02"]  # fmt: skip
    report = tmp_path / "r.json"
    argv = ["bench", "prequential", "--planted-shift", "300", "--via-kafka", "--report",
            str(report), "--models", "popular,incremental", "--train-every-events", "100",
            "--train-steps", "2", "--window", "100"]  # fmt: skip
    for item in tiny:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "via Kafka: 300 events" in out and "metrics: exact" in out
    via = json.loads(report.read_text())["via_kafka"]
    assert via["n_events"] == via["events"] == 300 and via["chunks"] == 3
    assert via["wall_s"] > 0 and via["wall_s_in_process"] > 0 and via["startup_s"] > 0
    assert via["agreement"]["verdict"] == "exact" and via["agreement"]["sequences"]
    assert set(via["models"]) == {"popular", "incremental"}
    m = via["models"]["incremental"]
    assert m["hr@10"] == m["hr@10_in_process"]
    assert not list(redis_client.scan_iter(match=f"{redis_prefix}*"))
