"""End to end: `userstream up` on the real embedded broker and real Redis.

A generated clickstream with planted interest groups is replayed through Kafka;
the stream worker builds sequences, the training worker trains and embeds, the
API serves similar users. Asserts precision@5 of same-group neighbours, the
dead-letter path, and (with the shared data) MovieLens 100K replay counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import shared_data
from userstream.embedded import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_USERS = 240
N_GROUPS = 6  # chance of a same-group neighbour: 1/6 (< 0.25)


def _wait(predicate, timeout_s: float, what: str, proc=None, log_dir=None, poll_s=0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"stack exited ({proc.returncode}) while waiting for {what}")
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(poll_s)
    logs = ""
    if log_dir is not None:
        for f in sorted(Path(log_dir).glob("*.log")):
            logs += f"\n--- {f.name} ---\n" + "\n".join(
                f.read_text(errors="replace").splitlines()[-20:]
            )
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last={last}){logs}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    import uuid

    data_dir = tmp_path_factory.mktemp("stack")
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"e2e-{uuid.uuid4().hex[:8]}:",
        "EMBEDDED_KAFKA_PORT": str(free_port()),
        "API_PORT": str(port),
        "TOPIC_PARTITIONS": "2",
        "STREAM_APP_ID": f"e2e-{uuid.uuid4().hex[:8]}",
        "TRAIN_INTERVAL_S": "2",
        "TRAIN_STEPS": "8",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    log = open(data_dir / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "userstream", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=10)
    info = {"proc": proc, "env": env, "client": client, "data_dir": data_dir}
    try:
        _wait(
            lambda: client.get("/healthz").status_code == 200,
            180,
            "the API to be healthy",
            proc,
            data_dir / "logs",
        )
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        log.close()
        client.close()
        info["exit_code"] = code
        keys_prefix = env["REDIS_PREFIX"]
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{keys_prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])


def _run_cli(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "userstream", *args],
        env={**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_similar_users_recover_planted_groups(stack, tmp_path):
    client, env = stack["client"], stack["env"]
    events_path, truth_path = tmp_path / "events.jsonl", tmp_path / "truth.json"
    gen = _run_cli(
        env,
        "generate",
        "--users",
        str(N_USERS),
        "--groups",
        str(N_GROUPS),
        "--events",
        str(N_USERS * 40),
        "--seed",
        "7",
        "--out",
        str(events_path),
        "--truth",
        str(truth_path),
    )
    assert gen.returncode == 0, gen.stderr
    n_events = sum(1 for _ in events_path.open())
    truth = json.loads(truth_path.read_text())
    before = client.get("/stats").json()["events_ingested"]

    rep = _run_cli(env, "replay", str(events_path), "--format", "jsonl", "--no-progress")
    assert rep.returncode == 0, rep.stderr

    logs = stack["data_dir"] / "logs"
    _wait(
        lambda: client.get("/stats").json()["events_ingested"] - before == n_events,
        180,
        f"{n_events} events ingested",
        stack["proc"],
        logs,
    )
    v0 = client.get("/stats").json()["model_version"] or 0
    # a model version trained after the last event, and every user in the index
    _wait(
        lambda: (
            ((s := client.get("/stats").json())["model_version"] or 0) >= v0 + 2
            and s["index_size"] >= len(truth)
        ),
        240,
        "fresh embeddings of every user",
        stack["proc"],
        logs,
    )
    stats = client.get("/stats").json()
    assert stats["users"] == len(truth)
    assert stats["events_dead_lettered"] == 0

    hits = total = 0
    for user, group in truth.items():
        resp = client.get(f"/users/{user}/similar", params={"k": 5})
        assert resp.status_code == 200, resp.text
        neighbors = resp.json()["neighbors"]
        assert len(neighbors) == 5
        assert user not in {n["user_id"] for n in neighbors}
        scores = [n["score"] for n in neighbors]
        assert scores == sorted(scores, reverse=True)
        hits += sum(truth[n["user_id"]] == group for n in neighbors)
        total += len(neighbors)
    precision = hits / total
    assert precision >= 0.8, f"precision@5 of same-group neighbours {precision:.3f} < 0.8"

    assert client.get("/users/nobody-like-this/similar").status_code == 404
    assert client.get(f"/users/{next(iter(truth))}/similar", params={"k": 0}).status_code == 422


def test_malformed_event_goes_to_dead_letter_topic(stack):
    import asyncio

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    client, env = stack["client"], stack["env"]
    bootstrap = f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}"
    before = client.get("/stats").json()["events_dead_lettered"]
    payload = b'{"user_id": "u-bad", "item_id": "i1", "behavior": "view"}'  # no ts

    async def roundtrip():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait("behavior-events", payload, key=b"u-bad")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            "behavior-events-dlq",
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                got = await consumer.getmany(timeout_ms=1000)
                for records in got.values():
                    for rec in records:
                        body = json.loads(rec.value)
                        if body["payload"] == payload.decode():
                            return body
            return None
        finally:
            await consumer.stop()

    body = asyncio.run(roundtrip())
    assert body is not None, "the malformed event never reached behavior-events-dlq"
    assert "ts" in body["reason"]
    _wait(
        lambda: client.get("/stats").json()["events_dead_lettered"] == before + 1,
        60,
        "the dead-letter counter",
        stack["proc"],
    )
    assert client.get("/users/u-bad/similar").status_code == 404


def test_movielens_replay_counts_every_event(stack):
    path = shared_data("ml-100k", "ml-100k.inter")
    client, env = stack["client"], stack["env"]
    before = client.get("/stats").json()
    rep = _run_cli(
        env, "replay", str(path), "--format", "movielens", "--rate", "0", "--no-progress"
    )
    assert rep.returncode == 0, rep.stderr
    _wait(
        lambda: (
            client.get("/stats").json()["events_ingested"] - before["events_ingested"] == 100_000
        ),
        300,
        "100,000 MovieLens events",
        stack["proc"],
        stack["data_dir"] / "logs",
    )
    after = client.get("/stats").json()
    assert after["events_dead_lettered"] == before["events_dead_lettered"]
    # MovieLens user ids are numbers; the synthetic ones are "u0001"-style
    assert after["users"] - before["users"] == 943
    v = after["model_version"] or 0
    _wait(
        lambda: (
            ((s := client.get("/stats").json())["model_version"] or 0) >= v + 2
            and s["index_size"] >= after["users"]
        ),
        300,
        "MovieLens users embedded",
        stack["proc"],
    )
    resp = client.get("/users/1/similar", params={"k": 10})
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["neighbors"]) == 10


def test_stack_stops_cleanly_on_sigterm(stack):
    # runs last in this module: the fixture's teardown records the exit code
    proc = stack["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
