"""Each process's Prometheus metrics (issue 18): the stream worker on
STREAM_METRICS_PORT, the training worker on TRAIN_METRICS_PORT, the API on
/metrics.

Unit tests of the closed label sets and the lag estimate, then one real
``userstream up`` stack shared by the module: every listed metric is exported,
the series stay bounded whatever methods and paths clients invent, and a real
Prometheus (Debian's binary) scraping the stack answers every dashboard panel
and alert query of deploy/ with data.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import shutil
import string
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from model.live.metrics import PHASES, TrainMetrics
from model.live.worker import CycleReport
from stream.events import parse_message
from stream.limits import MAX_DEPTH, MAX_EVENTS_PER_MESSAGE, MAX_ID_LEN, MAX_TEXT_LEN
from stream.metrics import DEAD_LETTER_REASONS, PartitionLag, StreamMetrics, reason_label
from tests.helpers import TINY_MODEL, running_stack, stack_logs, wait_until
from tests.test_prometheus import (
    DEPLOY,
    alert_probe,
    alert_rules,
    dashboard_queries,
    metric_names,
    write_test_config,
)
from userstream.embedded import free_port

# --- dead-letter reasons: a closed set ------------------------------------------

_OK = {"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1.7e9}


def _event(**fields) -> bytes:
    d = {**_OK, **fields}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


def _nested(depth: int) -> dict:
    d: dict = {}
    for _ in range(depth):
        d = {"a": d}
    return d


# one message per rule of stream.validation / stream.events, with its label
BAD_MESSAGES: list[tuple[bytes | None, str]] = [
    (None, "empty"),
    (b"[]", "empty"),
    (b"not json", "not_json"),
    (b"\xff\xfe{}", "not_json"),
    (b'{"user_id": "u1", "ts": 1' + b"0" * 5000 + b"}", "not_json"),
    (b"[" * 5000 + b"]" * 5000, "too_deep"),
    (_event(props=_nested(MAX_DEPTH + 2)), "too_deep"),
    (b"[" + b"0," * (1 << 20) + b"0]", "too_large"),
    (json.dumps([_OK] * (MAX_EVENTS_PER_MESSAGE + 1)).encode(), "too_large"),
    (_event(text="t" * (MAX_TEXT_LEN + 1)), "too_large"),
    (_event(ts=...), "missing_field"),
    (_event(extra=1), "unknown_field"),
    (b"5", "bad_type"),
    (_event(ts=[1]), "bad_type"),
    (_event(user_id=1.5), "bad_type"),
    (_event(behavior=3), "bad_type"),
    (_event(event_id=5), "bad_type"),
    (_event(props=[]), "bad_type"),
    (_event(text=5), "bad_type"),
    (_event(ts="yesterday"), "bad_ts"),
    (_event(ts=-5), "bad_ts"),
    (_event(ts=4e9), "bad_ts"),
    (b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": NaN}', "bad_ts"),
    (_event(behavior="VIEW!!"), "bad_behavior"),
    (_event(user_id=""), "bad_id"),
    (_event(user_id="   "), "bad_id"),
    (_event(item_id="a\u0001b"), "bad_id"),
    (_event(user_id="x" * (MAX_ID_LEN + 1)), "bad_id"),
    (_event(user_id=10 ** (MAX_ID_LEN + 1)), "bad_id"),
    (_event(event_id="e" * (MAX_ID_LEN + 1)), "bad_id"),
]


@pytest.mark.parametrize("raw,label", BAD_MESSAGES, ids=[lab for _, lab in BAD_MESSAGES])
def test_every_validation_reason_maps_to_its_label(raw, label):
    events, dead = parse_message(raw)
    assert not events and len(dead) == 1
    assert reason_label(dead[0].reason) == label, dead[0].reason


def test_the_reason_labels_are_a_closed_set_that_every_rule_reaches():
    assert set(DEAD_LETTER_REASONS) == {lab for _, lab in BAD_MESSAGES} | {"other"}
    rng = random.Random(0)
    for _ in range(200):  # free text never adds a label
        text = "".join(rng.choices(string.printable, k=rng.randint(0, 80)))
        assert reason_label(text) in DEAD_LETTER_REASONS


def test_partition_lag_counts_from_the_first_sample_that_held_the_oldest_unapplied_record():
    lag = PartitionLag()
    assert lag.sample(0.0, end=0, applied=-1) == (0, 0.0)  # an empty partition
    assert lag.sample(1.0, end=100, applied=-1) == (100, 0.0)
    assert lag.sample(5.0, end=150, applied=49) == (100, 4.0)  # offset 50 was there at t=1
    assert lag.sample(7.0, end=150, applied=120) == (29, 2.0)  # 121 arrived by t=5
    assert lag.sample(8.0, end=150, applied=149) == (0, 0.0)
    assert lag.sample(9.0, end=10, applied=-1) == (10, 0.0)  # a new log: start over


def test_stream_metrics_drop_the_series_of_revoked_partitions():
    m = StreamMetrics()
    m.observe_assignment([0, 1])
    m.observe_lag({0: 10, 1: 5}, {0: 9}, now=1.0)
    text = _render(m.registry)
    assert 'userstream_stream_consumer_lag_events{partition="1"} 5.0' in text
    m.observe_assignment([0])
    m.observe_lag({0: 12}, {0: 9}, now=2.0)
    text = _render(m.registry)
    assert 'partition="1"' not in text
    assert 'userstream_stream_consumer_lag_events{partition="0"} 2.0' in text
    assert "userstream_stream_rebalances_total 2.0" in text


def test_train_metrics_take_a_cycle_report_apart():
    m = TrainMetrics()
    report = CycleReport(version=3, dirty_users=5, replay_users=7, embedded_users=12, loss=2.5,
                         train_s=1.5, embed_s=0.25, total_s=2.0, claim_s=0.125, checkpoint_s=0.5,
                         steps=4)  # fmt: skip
    m.observe_cycle(report, {"loss": 2.5, "mlm": 1.0, "next": 1.25, "seconds": 9.0, "new": 1})
    m.observe_embedded("changed", [time.time() - 2.0])
    m.observe_embedded("refresh", [0.0])  # an old user re-embedded: not a freshness sample
    text = _render(m.registry)
    assert 'userstream_train_cycle_phase_duration_seconds_sum{phase="train"} 1.0' in text
    assert 'userstream_train_cycle_phase_duration_seconds_sum{phase="checkpoint"} 0.5' in text
    assert 'userstream_train_loss{task="total"} 2.5' in text
    assert 'task="seconds"' not in text and 'task="new"' not in text  # closed set
    assert "userstream_train_steps_total 4.0" in text
    assert "userstream_embedding_freshness_seconds_count 1.0" in text
    assert 'userstream_embedder_users_total{reason="refresh"} 1.0' in text


def _render(registry) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(registry).decode()


# --- the real stack ------------------------------------------------------------------

# what each process must export (histograms by their _count, counters by _total)
STREAM_METRICS = (
    "userstream_stream_events_applied_total",
    "userstream_stream_duplicates_skipped_total",
    "userstream_stream_dead_letters_total",
    "userstream_stream_batch_messages_count",
    "userstream_stream_batch_apply_duration_seconds_count",
    "userstream_stream_consumer_lag_events",
    "userstream_stream_consumer_lag_seconds",
    "userstream_stream_rebalances_total",
    "userstream_stream_assigned_partitions",
    "userstream_stream_heartbeat_timestamp_seconds",
    "process_resident_memory_bytes",
)
TRAIN_METRICS = (
    "userstream_train_cycles_total",
    "userstream_train_cycle_duration_seconds_count",
    "userstream_train_cycle_phase_duration_seconds_count",
    "userstream_train_steps_total",
    "userstream_train_loss",
    "userstream_train_learning_rate",
    "userstream_train_item_rows",
    "userstream_train_items_live",
    "userstream_train_item_rows_free",
    "userstream_train_items_expired_total",
    "userstream_train_model_version",
    "userstream_train_drifts_detected_total",
    "userstream_embedding_freshness_seconds_count",
    "userstream_embedder_users_total",
    "userstream_train_heartbeat_timestamp_seconds",
    "process_resident_memory_bytes",
)
API_METRICS = (
    "userstream_http_request_duration_seconds_count",
    "userstream_http_requests_total",
    "userstream_index_size",
    "userstream_index_feed_lag_seconds",
    "userstream_index_model_version",
    "userstream_model_version",
    "process_resident_memory_bytes",
)
SERIES_MAX = 1000  # per process, whatever the clients do
N_USERS = 12
BAD = [raw for raw, _ in BAD_MESSAGES if raw is not None and len(raw) < 100_000][:6]


def _samples(text: str) -> dict[str, float]:
    """series (name{labels}) -> value of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def _value(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for series, v in samples.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def _produce(env: dict, messages: list[tuple[bytes, bytes | None]]) -> None:
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}",
            max_request_size=4 << 20,
        )
        await producer.start()
        try:
            futures = [await producer.send("behavior-events", v, key=k) for k, v in messages]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def _traffic(env: dict, round_: int) -> None:
    """N_USERS users with a few valid events each, and some invalid messages."""
    now = time.time()
    messages = [
        (f"m{u}".encode(), json.dumps({"user_id": f"m{u}", "item_id": f"i{(u + k) % 7}",
                                       "behavior": "view", "ts": now}).encode())
        for u in range(N_USERS) for k in range(3)
    ]  # fmt: skip
    messages += [(f"bad{round_}-{i}".encode(), raw) for i, raw in enumerate(BAD)]
    _produce(env, messages)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    with running_stack(tmp_path_factory.mktemp("metrics-stack"), redis_url, TRAIN_STEPS="2",
                       **{k.upper(): str(v) for k, v in TINY_MODEL.items()}) as info:  # fmt: skip
        env = info["env"]
        info["urls"] = {
            "api": f"http://127.0.0.1:{env['API_PORT']}/metrics",
            "stream-worker": f"http://127.0.0.1:{env['STREAM_METRICS_PORT']}/metrics",
            "train-worker": f"http://127.0.0.1:{env['TRAIN_METRICS_PORT']}/metrics",
        }
        _traffic(env, 0)
        for u in range(N_USERS):
            info["client"].get(f"/users/m{u}/similar", params={"k": 3})
        yield info


def _scrape(url: str) -> dict[str, float]:
    r = httpx.get(url, timeout=5)
    r.raise_for_status()
    return _samples(r.text)


def _wait(stack, check, what: str, timeout_s: float = 120):
    return wait_until(check, timeout_s, what, stack["proc"], poll_s=0.25,
                      details=lambda: stack_logs(stack["data_dir"], lines=25),
                      ignore=(httpx.HTTPError, OSError, KeyError))  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_every_process_exports_its_metrics(stack):
    urls = stack["urls"]
    valid = 3 * N_USERS
    stream = _wait(stack, lambda: (s := _scrape(urls["stream-worker"]))
                   and _value(s, "userstream_stream_events_applied_total") >= valid
                   and _value(s, "userstream_stream_dead_letters_total") >= len(BAD)
                   and s.get('userstream_stream_consumer_lag_events{partition="0"}') == 0
                   and s.get('userstream_stream_consumer_lag_events{partition="1"}') == 0
                   and s, "the stream worker's metrics to count the events")  # fmt: skip
    for name in STREAM_METRICS:
        assert any(k.partition("{")[0] == name for k in stream), name
    for reason in DEAD_LETTER_REASONS:  # every label exists from the start
        assert f'userstream_stream_dead_letters_total{{reason="{reason}"}}' in stream
    expected = {lab for raw, lab in BAD_MESSAGES if raw in BAD}
    for reason in expected:
        assert _value(stream, "userstream_stream_dead_letters_total", reason=reason) >= 1, reason
    assert _value(stream, "userstream_stream_rebalances_total") >= 1
    assert _value(stream, "userstream_stream_assigned_partitions") == 2
    assert time.time() - _value(stream, "userstream_stream_heartbeat_timestamp_seconds") < 30

    train = _wait(stack, lambda: (s := _scrape(urls["train-worker"]))
                  and _value(s, "userstream_train_cycles_total") >= 1
                  and _value(s, "userstream_embedding_freshness_seconds_count") >= N_USERS
                  and s, "a training cycle and the users' embeddings")  # fmt: skip
    for name in TRAIN_METRICS:
        assert any(k.partition("{")[0] == name for k in train), name
    for phase in PHASES:
        assert (
            _value(train, "userstream_train_cycle_phase_duration_seconds_count", phase=phase) >= 1
        )
    assert _value(train, "userstream_train_model_version") >= 1
    assert _value(train, "userstream_train_steps_total") >= 2
    assert math.isfinite(_value(train, "userstream_train_loss", task="total"))
    assert _value(train, "userstream_train_learning_rate") == pytest.approx(1e-3)
    # the events were produced seconds ago with ts = now: fresh, well under a minute
    fresh_sum = _value(train, "userstream_embedding_freshness_seconds_sum")
    assert fresh_sum / _value(train, "userstream_embedding_freshness_seconds_count") < 60

    api = _wait(stack, lambda: (s := _scrape(urls["api"]))
                and _value(s, "userstream_index_size") >= N_USERS
                and _value(s, "userstream_index_model_version") >= 0 and s,
                "the API's index to hold the users")  # fmt: skip
    for name in API_METRICS:
        assert any(k.partition("{")[0] == name for k in api), name
    route = "/users/{user_id}/similar"
    assert _value(api, "userstream_http_request_duration_seconds_count", route=route) >= 1


_METHODS = ("GET", "POST", "DELETE", "PATCH")
_KS = (-5, 3, 5000)


def _path(rng: random.Random, kind: int, k: int) -> str:
    if kind == 0:  # a path no route has
        return "/" + "/".join(uuid.uuid4().hex[: rng.randint(1, 12)]
                              for _ in range(rng.randint(1, 4)))  # fmt: skip
    return f"/users/{uuid.uuid4().hex}/similar?k={k}"  # a route, an unknown user


def _invented_requests(client: httpx.Client, base: str, rng: random.Random, n: int = 0) -> None:
    """Every kind of request once (n=0), or ``n`` random ones with invented methods
    and paths."""
    if n == 0:
        combos = [(m, kind, k) for m in (*_METHODS, "BREW") for kind in (0, 1) for k in _KS]
    else:
        combos = [(rng.choice(_METHODS) if rng.random() < 0.5 else "".join(
                       rng.choices(string.ascii_uppercase, k=rng.randint(3, 12))),
                   rng.randint(0, 1), rng.randint(-5, 5000)) for _ in range(n)]  # fmt: skip
    for method, kind, k in combos:
        try:
            client.request(method, base + _path(rng, kind, k), timeout=5)
        except httpx.HTTPError:
            pass


@pytest.mark.integration
@pytest.mark.slow
def test_series_stay_bounded_whatever_clients_invent(stack):
    urls = stack["urls"]
    _wait(stack, lambda: _value(_scrape(urls["train-worker"]), "userstream_train_cycles_total") >= 1,
          "a training cycle (its loss series)")  # fmt: skip
    rng = random.Random(18)
    with httpx.Client() as client:
        for name, url in urls.items():
            base = url.removesuffix("/metrics")
            _invented_requests(client, base, rng)  # the first of each kind may add a series
            before = _scrape(url)
            _invented_requests(client, base, rng, n=150)
            after = _scrape(url)
            # the supervisor's status line and health probes may add a real route meanwhile;
            # what the invented requests can reach must not grow
            touched = ('route="<unmatched>"', 'method="other"', 'route="/users/{user_id}/similar"')
            grown = sorted(k for k in set(after) - set(before)
                           if name != "api" or any(t in k for t in touched))  # fmt: skip
            assert not grown, f"{name}: {len(before)} series grew by {grown[:10]}"
            assert len(after) <= SERIES_MAX, f"{name}: {len(after)} series"
            methods = {m for k in after for m in re.findall(r'method="([^"]*)"', k)}
            assert methods <= {*_METHODS, "HEAD", "PUT", "OPTIONS", "other"}, methods
            assert not [k for k in after if re.search(r'route="[^"]*[0-9a-f]{8}', k)]


# --- a real Prometheus on the stack ----------------------------------------------------


def _prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("the prometheus binary is absent (Debian: apt-get install prometheus; "
                    ".ci/run installs it)")  # fmt: skip
    return path


def _query(base: str, expr: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.integration
@pytest.mark.slow
def test_prometheus_answers_every_panel_and_alert_with_data(stack, tmp_path):
    binary = _prometheus_bin()
    env = stack["env"]
    ports = {"api": int(env["API_PORT"]), "stream-worker": int(env["STREAM_METRICS_PORT"]),
             "train-worker": int(env["TRAIN_METRICS_PORT"])}  # fmt: skip
    config = write_test_config(tmp_path, ports)
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def details() -> str:
        return "\n--- prometheus.log ---\n" + (tmp_path / "prometheus.log").read_text()[-3000:]

    try:
        wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 60,
                   "Prometheus ready", proc, poll_s=0.2, ignore=(httpx.HTTPError,),
                   details=details)  # fmt: skip
        wait_until(lambda: sum(float(r["value"][1]) for r in _query(base, "up")) == 3, 60,
                   "all three targets up", proc, poll_s=0.5, ignore=(httpx.HTTPError,),
                   details=details)  # fmt: skip
        # traffic while Prometheus watches, so rates and quantiles have something to say
        _traffic(env, 1)
        for u in range(N_USERS):
            stack["client"].get(f"/users/m{u}/similar", params={"k": 3})
        queries = {f"panel {title!r}: {expr}": expr for title, expr in dashboard_queries()}
        queries |= {f"alert {name}: {expr}": alert_probe(expr) for name, expr in alert_rules()}
        names = {n for e in queries.values() for n in metric_names(e)}
        queries |= {f"metric {n}": f"count({n})" for n in sorted(names)}
        missing = dict(queries)

        def all_answered() -> bool:
            for what, expr in list(missing.items()):
                if _query(base, expr):
                    del missing[what]
            return not missing

        wait_until(all_answered, 90, "every dashboard and alert query to return data", proc,
                   poll_s=1.0, ignore=(httpx.HTTPError,),
                   details=lambda: f"\nno data: {sorted(missing)}" + details())  # fmt: skip
        # the ingest rate saw the traffic, and every alert rule evaluates without error
        assert float(_query(base, "sum(rate(userstream_stream_events_applied_total[1m]))")[0]
                     ["value"][1]) > 0  # fmt: skip
        groups = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in rules} == {name for name, _ in alert_rules()}
        wait_until(lambda: all(r["health"] == "ok" for r in
                               (rr for g in httpx.get(f"{base}/api/v1/rules").json()["data"]
                                ["groups"] for rr in g["rules"])), 30, "every rule evaluated",
                   proc, ignore=(httpx.HTTPError,))  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_deploy_dir_is_where_the_tests_look():
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()
    assert Path(DEPLOY / "grafana" / "dashboards" / "userstream.json").is_file()
