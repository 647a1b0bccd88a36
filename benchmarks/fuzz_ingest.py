"""Hostile messages through the ingest path, counted exactly: does anything get lost or crash?

    python benchmarks/fuzz_ingest.py [--messages 10000] [--seed 0] [--via-kafka]

The messages come from the strategies of ``tests/test_ingest_hostile.py``:
the event grammar (valid events, events with exactly one defect, arrays of
both: how many of each a message holds is known by construction), byte-level
mutations of such messages (their outcome is unknown beforehand), a few
tombstones, and the known poison cases (the reported ones and every limit of
``stream.events``), repeated ``--messages / 1000`` times.

In process, ``split_batch`` runs over all of them in batches (as the worker
takes them). Checked: it never raises; every message gives exactly as many
events plus dead letters as it has elements (decoded independently); labelled
messages give exactly their valid and invalid counts; every dead-letter value
is strict UTF-8 JSON within ``DEAD_LETTER_MAX_BYTES``.

``--via-kafka`` sends the same messages through the embedded broker (Tansu), a
real stream worker and Redis under a fresh prefix, and checks Redis against
the in-process outcome: events ingested, dead letters counted and on the DLQ
topic (each one valid and within the limit), users, and that the worker never
exited. Messages over the producer's 1 MiB limit stay in-process only.

``valid_events`` / ``invalid_events`` are what was sent: by construction for
labelled messages, as ``split_batch`` decodes them for mutated ones (whose
total is still checked against the independent element count).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import write_json

from stream.events import DEAD_LETTER_MAX_BYTES, dead_letter_value, split_batch

_BATCH = 500  # messages per split_batch call, the worker's default batch
_PRODUCER_MAX = 1_000_000  # bytes: larger values cannot be produced with default settings


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` messages: {value, key, kind, valid, invalid} (the counts None where unknown)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed
    from hypothesis import strategies as st

    from tests.test_ingest_hostile import POISON, labelled_messages, mutated_messages

    rng = random.Random(seed)
    keys = [f"u{i:03d}".encode() for i in range(40)] + [None]
    out: list[dict[str, Any]] = []
    for _ in range(max(1, n // 1000)):
        for name, value in POISON.items():
            out.append({"value": value, "kind": f"poison:{name}", "valid": 0, "invalid": 1})
    for _ in range(max(1, n // 500)):
        out.append({"value": None, "kind": "tombstone", "valid": 0, "invalid": 1})
    drawn = st.one_of(
        labelled_messages().map(lambda m: {"value": m[0], "kind": "grammar", "valid": m[1],
                                           "invalid": m[2]}),
        mutated_messages().map(lambda v: {"value": v, "kind": "mutated", "valid": None,
                                          "invalid": None}),
    )  # fmt: skip
    per_example = 10
    want = max(0, n - len(out))

    @with_seed(seed)
    @settings(
        max_examples=max(1, -(-want // per_example)),
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(drawn, min_size=per_example, max_size=per_example))
    def collect(items: list[dict[str, Any]]) -> None:
        out.extend(items)

    collect()
    out = out[:n]
    rng.shuffle(out)
    for m in out:
        m["key"] = rng.choice(keys if m["value"] is not None else keys[:-1])  # Kafka wants one
    return out


def _expected_outputs(value: Any) -> int:
    from tests.test_ingest_hostile import expected_outputs

    return expected_outputs(value)


def _record_ok(value: bytes) -> bool:
    try:
        record = json.loads(value.decode("utf-8"))
    except ValueError:
        return False
    return len(value) <= DEAD_LETTER_MAX_BYTES and bool(record.get("reason"))


def run_in_process(messages: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(messages)
    got_events = [0] * n
    got_dead = [0] * n
    reasons: collections.Counter[str] = collections.Counter()
    users: set[str] = set()
    crashes = bad_records = 0
    split_s = 0.0
    for start in range(0, n, _BATCH):
        records = [(0, i, m["key"], m["value"]) for i, m in enumerate(messages[start:start + _BATCH], start)]  # fmt: skip
        t0 = time.perf_counter()
        try:
            events, dead = split_batch(records)
        except Exception as exc:  # what must never happen
            crashes += 1
            print(f"split_batch raised on messages {start}..: {exc!r}")
            continue
        split_s += time.perf_counter() - t0
        for _, offset, ev in events:
            got_events[offset] += 1
            users.add(ev.user_id)
        for _, offset, _, inv in dead:
            got_dead[offset] += 1
            reasons[_category(inv.reason)] += 1
            bad_records += not _record_ok(dead_letter_value(inv, "events", 0, offset, 0.0))
    wrong_total = wrong_label = 0
    valid = invalid = 0
    kinds: collections.Counter[str] = collections.Counter()
    for i, m in enumerate(messages):
        kinds[m["kind"].split(":")[0]] += 1
        wrong_total += got_events[i] + got_dead[i] != _expected_outputs(m["value"])
        if m["valid"] is None:
            m["valid"], m["invalid"] = got_events[i], got_dead[i]  # the oracle for Kafka
        else:
            wrong_label += (got_events[i], got_dead[i]) != (m["valid"], m["invalid"])
        valid += m["valid"]
        invalid += m["invalid"]
    applied, dead_lettered = sum(got_events), sum(got_dead)
    return {
        "messages": n,
        "kinds": dict(kinds),
        "valid_events": valid,
        "invalid_events": invalid,
        "applied": applied,
        "dead_lettered": dead_lettered,
        "users": len(users),
        "wrong_totals": wrong_total,
        "wrong_labels": wrong_label,
        "bad_dead_letter_records": bad_records,
        "crashes": crashes,
        "split_us_per_message": split_s / max(n, 1) * 1e6,
        "reasons": dict(reasons.most_common(25)),
        "ok": crashes == wrong_total == wrong_label == bad_records == 0
        and (applied, dead_lettered) == (valid, invalid),
    }


def _category(reason: str) -> str:
    """A reason without its values (``ts '5' is ...`` -> ``ts ... is ...``)."""
    head = reason.split(":")[0] if reason.startswith("message") else reason
    words = [w if not any(c in w for c in "'0123456789") else "..." for w in head.split()]
    return " ".join(words)[:60]


def run_via_kafka(messages: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from stream.topics import ensure_topics, read_topic_async
    from tests.helpers import wait_until
    from tests.test_stream_worker import Worker, wait_ready
    from userstream.embedded import free_port, resolve_redis, start_broker
    from userstream.settings import Settings
    from userstream.stores import RedisSequenceStore, connect
    from userstream.types import Keys

    sent = [m for m in messages if m["value"] is None or len(m["value"]) <= _PRODUCER_MAX]
    work = Path(tempfile.mkdtemp(prefix="fuzz-ingest-"))
    infra = []
    port = free_port()
    infra.append(start_broker(port, work / "broker.log"))
    kafka = f"127.0.0.1:{port}"
    base = Settings()
    redis_url, proc = resolve_redis(base.redis_url, free_port(), work / "redis", work / "redis.log")
    if proc is not None:
        infra.append(proc)
    tag = uuid.uuid4().hex[:10]
    s = base.replace(
        data_dir=work,
        kafka_bootstrap_servers=kafka,
        redis_url=redis_url,
        redis_prefix=f"{base.redis_prefix}fuzz-{tag}:",
        events_topic=f"fuzz-{tag}",
        dlq_topic=f"fuzz-{tag}-dlq",
        stream_app_id=f"fuzz-{tag}",
        topic_partitions=2,
        stream_batch_within_s=0.05,
    )
    client = connect(redis_url)
    store = RedisSequenceStore(client, Keys(s.redis_prefix), s.sequence_length)
    ensure_topics(kafka, s)
    worker = Worker(s, work / "worker.log")
    result: dict[str, Any] = {"messages": len(sent), "left_out_over_1mb": len(messages) - len(sent)}
    crashes = 0
    try:
        t0 = time.perf_counter()
        wait_ready(worker, client, s)
        result["startup_s"] = time.perf_counter() - t0

        async def produce() -> tuple[dict[int, int], int]:
            producer = AIOKafkaProducer(bootstrap_servers=kafka)
            await producer.start()
            try:
                futs = [
                    await producer.send(s.events_topic, value=m["value"], key=m["key"])
                    for m in sent
                ]
                done = await asyncio.gather(*futs, return_exceptions=True)
            finally:
                await producer.stop()
            last: dict[int, int] = {}
            for meta in done:
                if not isinstance(meta, BaseException):
                    last[meta.partition] = max(meta.offset, last.get(meta.partition, -1))
            return last, sum(isinstance(d, BaseException) for d in done)

        t0 = time.perf_counter()
        last, failed = asyncio.run(produce())
        result["produce_failed"] = failed

        def covered() -> bool:
            done = store.applied_offsets(s.events_topic)
            return all(done.get(p, -1) >= o for p, o in last.items())

        try:
            wait_until(covered, timeout_s, "every offset applied", proc=worker.proc)
        except AssertionError as exc:
            crashes += worker.proc.poll() is not None
            result["error"] = str(exc)
            print(worker.tail())
        result["ingest_s"] = time.perf_counter() - t0
        counters = store.counters()
        valid = sum(m["valid"] for m in sent)
        invalid = sum(m["invalid"] for m in sent)
        try:
            dlq = asyncio.run(
                read_topic_async(kafka, s.dlq_topic, min_messages=invalid, timeout_s=60)
            )
        except TimeoutError as exc:
            dlq, result["error"] = [], f"the DLQ topic: {exc!r}"
        want_users = {
            e.user_id for _, _, e in split_batch([(0, 0, None, m["value"]) for m in sent])[0]
        }
        result.update(
            valid_events=valid,
            invalid_events=invalid,
            applied=counters.get("events_ingested", 0),
            dead_lettered=counters.get("events_dead_lettered", 0),
            duplicates_skipped=counters.get("events_duplicate_skipped", 0),
            dlq_records=len(dlq),
            bad_dead_letter_records=sum(not _record_ok(m.value) for m in dlq),
            largest_dead_letter_bytes=max((len(m.value) for m in dlq), default=0),
            users=len(set(store.iter_users())),
            users_expected=len(want_users),
        )
        crashes += worker.proc.poll() is not None
        rc = worker.stop()
        crashes += rc != 0
        result["worker_exit"] = rc
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
        keys = list(client.scan_iter(match=f"{s.redis_prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        client.close()
        for p in reversed(infra):
            p.terminate()
            p.wait(10)
    result["crashes"] = crashes
    result["ok"] = (
        crashes == 0
        and result.get("produce_failed") == 0
        and "error" not in result
        and (result["applied"], result["dead_lettered"], result["dlq_records"])
        == (result["valid_events"], result["invalid_events"], result["invalid_events"])
        and result["bad_dead_letter_records"] == 0
        and result["users"] == result["users_expected"]
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--via-kafka", action="store_true", help="also through broker + worker + Redis")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the worker")
    args = p.parse_args()

    t0 = time.perf_counter()
    messages = generate(args.messages, args.seed)
    generate_s = time.perf_counter() - t0
    local = run_in_process(messages)
    report: dict[str, Any] = {
        "seed": args.seed,
        "generate_s": generate_s,
        "limit_dead_letter_bytes": DEAD_LETTER_MAX_BYTES,
        "in_process": local,
        **{k: local[k] for k in ("messages", "valid_events", "invalid_events", "applied",
                                 "dead_lettered", "crashes", "ok")},
    }  # fmt: skip
    rows = [("in process", local)]
    if args.via_kafka:
        kafka = run_via_kafka(messages, args.timeout)
        report["via_kafka"] = kafka
        rows.append(("via Kafka", kafka))
        report["ok"] = local["ok"] and kafka["ok"]
        report["crashes"] = local["crashes"] + kafka["crashes"]
    path = write_json("fuzz_ingest", report)

    print(f"{len(messages):,} messages ({local['kinds']}), generated in {generate_s:.1f}s")
    print(f"{'':>12}  {'messages':>8}  {'valid':>7}  {'applied':>7}  {'invalid':>7}  "
          f"{'dead':>7}  {'crashes':>7}  ok")  # fmt: skip
    for name, r in rows:
        print(
            f"{name:>12}  {r['messages']:>8,}  {r['valid_events']:>7,}  {r['applied']:>7,}  "
            f"{r['invalid_events']:>7,}  {r['dead_lettered']:>7,}  {r['crashes']:>7}  {r['ok']}"
        )
    print(f"split_batch: {local['split_us_per_message']:.1f} us per message; report: {path}")
    if not report["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
