"""``userstream bench ingest``: the stream worker's events/s against bare loops on the same data.

PROTOCOL section 4, "Ingest": sustained events/s of the stream worker into the
per-user sequences in Redis, as a ratio to a bare aiokafka consume loop on the
same topic, in the same run. On the embedded broker (Tansu; or the configured
Kafka) and the run's Redis (:class:`~userstream.bench_env.BenchRedis`), one run:

1. produce, before anything is timed (the producer would compete for the
   cores): ``messages`` single-event messages and ``array_messages`` arrays of
   ``array_size`` events (one user's session per message), keyed by user, each
   on a topic of ``partitions`` partitions;
2. **bare aiokafka** (this process): ``getmany`` + ``json.loads`` of every value,
   counting events, over each topic;
3. **bare Redis**: the array topic's events as one ``RPUSH`` per user and batch
   in a pipeline (no transaction, no offsets, no dedup), a reference figure;
4. **our stream worker**: ``userstream stream-worker`` processes, exactly as
   ``userstream up`` starts them, each leg with its own consumer group and
   Redis prefix: one worker on each topic, then two workers in one group on the
   single-event topic (the same data as one worker's leg);
5. **kill**: two workers in one group on a fresh topic; ``kill_messages``
   single events, each with an item id of its own, produced once both hold
   partitions; one worker is SIGKILLed once ``kill_at`` of them are applied; the
   survivor takes its partitions over. Afterwards ``events_ingested`` must equal
   what was produced and every user's sequence hold each of its events once, in
   order: ``lost`` and ``duplicated`` count what does not.

A worker leg is timed from the moment every worker of the leg holds partitions
(its readiness record: Faust's start and group join, 10-30 s on Tansu, are not
counted, nor is what one worker applied alone before a second joined) to the
last event applied, read from the store's counters; events/s = events applied
in that window / its length. The bare Kafka loop is timed from its first
records in hand to the last. CPU: the cores each process used during the window
(broker, Redis when the run started it, the workers, this process).

Report fields: ``single_ratio`` and ``array_ratio`` (worker / bare aiokafka,
events/s), ``scale_out_ratio`` (two workers / one, single events),
``bare_kafka_single_events_per_s``, ``bare_kafka_array_events_per_s``,
``bare_redis_events_per_s``, ``worker_single_events_per_s``,
``worker_array_events_per_s``, ``two_workers_events_per_s``, ``kill`` (``lost``,
``duplicated``, ``produced``, ``ingested``, ``ok``, ...), ``cpu`` (cores per
process per leg, with the host's busy cores and those of other jobs),
``single_ratio_per_cpu`` / ``array_ratio_per_cpu`` (the same ratios per CPU-second
of the consuming process), ``messages``, ``array_messages``, ``host_cores``, ``ok``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict, Field

from userstream.bench_env import BenchRedis, child_env, exit_on_sigterm, write_report
from userstream.embedded import start_broker
from userstream.settings import Settings

__all__ = ["IngestConfig", "run_ingest_bench"]

LOG = logging.getLogger(__name__)

_BEHAVIORS = ("view", "click", "cart", "purchase")
_STREAM_WORKER = ("userstream", "stream-worker")  # as userstream up starts it
_POLL_S = 0.01


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: int = Field(100_000, ge=100, description="single-event messages (and two-worker leg)")
    array_messages: int = Field(6_000, ge=10, description="array messages")
    array_size: int = Field(50, ge=2, le=10_000, description="events per array message")
    kill_messages: int = Field(20_000, ge=100, description="single events of the kill leg")
    kill_at: float = Field(0.4, gt=0, lt=1, description="applied fraction when one is killed")
    users: int = Field(10_000, ge=1, description="users the events belong to")
    items: int = Field(10_000, ge=1, description="items of the throughput legs")
    partitions: int = Field(4, ge=2, description="partitions of every topic")
    session_timeout_s: float = Field(
        6.0, gt=0, description="BROKER_SESSION_TIMEOUT of the workers (the kill leg's takeover)"
    )
    leg_timeout_s: float = Field(600.0, gt=0, description="longest wait for one leg")


@dataclass
class _Run:
    """What the legs share: the broker, the Redis, the workers' environment."""

    settings: Settings
    cfg: IngestConfig
    work: Path
    redis: BenchRedis
    bootstrap: str
    env: dict[str, str]
    broker: subprocess.Popen | None = None
    tag: str = ""
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)

    def leg_settings(self, name: str, topic: str) -> Settings:
        return self.settings.replace(
            kafka_bootstrap_servers=self.bootstrap,
            redis_url=self.redis.url,
            redis_prefix=f"{self.redis.prefix}{name}:",
            events_topic=topic,
            dlq_topic=f"{topic}-dlq",
            stream_app_id=f"{self.tag}-{name}",
            topic_partitions=self.cfg.partitions,
            data_dir=self.work / name,
        )

    def infra_pids(self) -> dict[str, int]:
        pids = {"bench": os.getpid()}
        if self.broker is not None:
            pids["broker"] = self.broker.pid
        if self.redis.own is not None:
            pids["redis"] = self.redis.own.pid
        return pids


class _Cpu:
    """CPU seconds of a set of processes between :meth:`start` and :meth:`stop`, as
    cores; ``host_busy``: the whole host's busy cores, ``others``: what processes
    outside the run (other jobs on a shared machine) took of them."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                continue
        self.t0 = 0.0
        self.start_s: dict[str, float] = {}

    def _times(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:  # the killed worker
                continue
        return out

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.start_s = self._times()
        self.host0 = psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        end = self._times()
        host = psutil.cpu_times()
        cores = {k: round((end[k] - self.start_s[k]) / wall, 2) for k in end if k in self.start_s}
        cores["total"] = round(sum(cores.values()), 2)
        busy = _busy(host) - _busy(self.host0)
        cores["host_busy"] = round(busy / wall, 2)
        cores["others"] = round(max(0.0, cores["host_busy"] - cores["total"]), 2)
        return cores


def _busy(t: Any) -> float:
    """Busy CPU seconds of the host (guest time is already in user time)."""
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def _per_cpu_s(events: int, seconds: float, cores: dict[str, float], prefix: str) -> float | None:
    """Events per CPU-second of the processes named ``prefix*``: a figure a shared,
    busy host disturbs less than events/s."""
    used = sum(v for k, v in cores.items() if k.startswith(prefix)) * seconds
    return round(events / used, 1) if used > 0 else None


def _event(k: int, user: int, cfg: IngestConfig, t0: float, item: str | None = None) -> dict:
    return {
        "user_id": f"u{user}",
        "item_id": item or f"i{(k * 7919 + user) % cfg.items}",
        "behavior": _BEHAVIORS[k % len(_BEHAVIORS)],
        "ts": round(t0 + k * 0.001, 3),
    }


def _single_events(cfg: IngestConfig, n: int, t0: float, unique: bool = False) -> list[dict]:
    return [_event(k, k % cfg.users, cfg, t0, f"e{k}" if unique else None) for k in range(n)]


def _array_events(cfg: IngestConfig, t0: float) -> list[dict]:
    """``array_messages`` sessions of ``array_size`` events, one user's each."""
    out = []
    for m in range(cfg.array_messages):
        user = m % cfg.users
        base = m * cfg.array_size
        out.extend(_event(base + j, user, cfg, t0) for j in range(cfg.array_size))
    return out


def _produce(leg: Settings, events: list[dict], group: int) -> dict[str, Any]:
    from stream.replay import produce_events

    sent = produce_events(leg, events, progress=False, total=len(events), group=group)
    if sent.failed:
        raise RuntimeError(f"{sent.failed} of {sent.messages} messages were not produced")
    return {"events": sent.events, "messages": sent.messages,
            "events_per_s": round(sent.events_per_s, 1)}  # fmt: skip


# --- bare baselines ----------------------------------------------------------------------


async def _bare_kafka(bootstrap: str, topic: str, n_events: int, timeout_s: float) -> dict:
    """A bare aiokafka loop: getmany, json.loads of each value, count the events."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )  # fmt: skip
    await consumer.start()
    loads = json.loads
    count = 0
    t0 = None
    cpu = _Cpu({"bench": os.getpid()})
    deadline = time.monotonic() + timeout_s
    try:
        while count < n_events:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare consumer: {count} of {n_events} events in {timeout_s}s")
            batch = await consumer.getmany(timeout_ms=500)
            if batch and t0 is None:  # from the first records in hand
                t0 = time.perf_counter()
                cpu.start()
            for records in batch.values():
                for rec in records:
                    doc = loads(rec.value)
                    count += len(doc) if type(doc) is list else 1
        t1 = time.perf_counter()
        cores = cpu.stop()
    finally:
        await consumer.stop()
    return {"events": count, "seconds": round(t1 - t0, 3),
            "events_per_s": round(count / max(t1 - t0, 1e-9), 1),
            "events_per_cpu_s": _per_cpu_s(count, t1 - t0, cores, "bench"), "cpu": cores}  # fmt: skip


def _bare_redis(run: _Run, events: list[dict], batch: int = 2000) -> dict:
    """The events as one RPUSH per user and batch in a pipeline: Redis's own cost."""
    client = run.redis.client
    prefix = f"{run.redis.prefix}bare:"
    t0 = time.perf_counter()
    for start in range(0, len(events), batch):
        per_user: dict[str, list[str]] = defaultdict(list)
        for ev in events[start : start + batch]:
            per_user[ev["user_id"]].append(f"{ev['item_id']}\t{ev['behavior']}\t{ev['ts']:.3f}")
        pipe = client.pipeline(transaction=False)
        for user, values in per_user.items():
            pipe.rpush(f"{prefix}{user}", *values)
        pipe.execute()
    seconds = time.perf_counter() - t0
    keys = [f"{prefix}u{u}" for u in range(run.cfg.users)]
    for i in range(0, len(keys), 1000):
        client.unlink(*keys[i : i + 1000])
    return {"events": len(events), "seconds": round(seconds, 3),
            "events_per_s": round(len(events) / seconds, 1)}  # fmt: skip


# --- the stream worker ------------------------------------------------------------------


class _Worker:
    """``userstream stream-worker``, as ``userstream up`` starts it, with a leg's settings."""

    def __init__(self, run: _Run, leg: Settings, log: Path, command: tuple[str, ...]) -> None:
        env = {
            **run.env,
            "KAFKA_BOOTSTRAP_SERVERS": run.bootstrap,
            "REDIS_URL": run.redis.url,
            "REDIS_PREFIX": leg.redis_prefix,
            "EVENTS_TOPIC": leg.events_topic,
            "DLQ_TOPIC": leg.dlq_topic,
            "STREAM_APP_ID": leg.stream_app_id,
            "TOPIC_PARTITIONS": str(leg.topic_partitions),
            "DATA_DIR": str(leg.data_dir),
            "BROKER_SESSION_TIMEOUT": str(run.cfg.session_timeout_s),  # Faust's own env var
            "BROKER_HEARTBEAT_INTERVAL": "1",
        }
        self.log = log
        self.killed = False
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command],
            env=env, stdout=self._fh, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self) -> None:
        self.killed = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        return self.proc.returncode


class _Leg:
    """One leg's workers, store and waits."""

    def __init__(self, run: _Run, name: str, topic: str) -> None:
        from stream.app import read_ready

        self.run, self.name = run, name
        self.settings = run.leg_settings(name, topic)
        self.client, self.store = _open_store(self.settings)
        self.workers: list[_Worker] = []
        self._read_ready = read_ready

    def start(self, n: int, command: tuple[str, ...] = _STREAM_WORKER) -> None:
        for i in range(n):
            log = self.run.work / "logs" / f"{self.name}-worker{i}.log"
            self.workers.append(_Worker(self.run, self.settings, log, command))

    def ingested(self) -> int:
        return self.store.counters()["events_ingested"]

    def counted(self) -> int:
        """What the bare Faust agent counted (:func:`_bare_faust_main`)."""
        return int(self.client.get(_bare_faust_key(self.settings)) or 0)

    def holding(self) -> dict[int, list[str]]:
        """pid -> partitions of each live worker that holds some (its readiness record)."""
        out = {}
        for w in self.workers:
            if w.proc.poll() is None:
                rec = self._read_ready(self.client, self.settings, w.proc.pid)
                if rec and rec.get("partitions"):
                    out[w.proc.pid] = rec["partitions"]
        return out

    def all_hold(self) -> bool:
        held = self.holding()
        parts = [p for ps in held.values() for p in ps]
        live = [w for w in self.workers if w.proc.poll() is None]
        return len(held) == len(live) and len(set(parts)) == self.run.cfg.partitions

    def wait(self, check: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + self.run.cfg.leg_timeout_s
        while True:
            for w in self.workers:
                if w.proc.poll() is not None and not w.killed:
                    raise RuntimeError(f"{self.name}: a worker exited ({w.proc.returncode}) "
                                       f"waiting for {what}:\n{w.tail()}")  # fmt: skip
            got = check()
            if got:
                return got
            if time.monotonic() > deadline:
                tails = "\n".join(w.tail(15) for w in self.workers)
                raise TimeoutError(f"{self.name}: no {what} in {self.run.cfg.leg_timeout_s}s; "
                                   f"ingested {self.ingested()}\n{tails}")  # fmt: skip
            time.sleep(_POLL_S)

    def cpu(self) -> _Cpu:
        pids = self.run.infra_pids()
        for i, w in enumerate(self.workers):
            pids[f"worker{i}"] = w.proc.pid
        return _Cpu(pids)

    def stop(self) -> list[int | None]:
        codes = [w.stop() for w in self.workers]
        self.client.close()
        return codes


def _open_store(leg: Settings):
    """(client, sequence store) of a leg, opened the way the stream worker opens them."""
    from userstream.stores import RedisSequenceStore, connect_settings
    from userstream.types import Keys

    client = connect_settings(leg)
    return client, RedisSequenceStore(client, Keys.of_settings(leg), leg.sequence_length)


def _bare_faust_leg(run: _Run, topic: str, n_messages: int) -> dict:
    """The ceiling of any Faust worker here: the same app, an agent that only counts."""
    leg = _Leg(run, "bare_faust", topic)
    ready = f"{_bare_faust_key(leg.settings)}:ready"
    try:
        leg.start(1, ("userstream.ingest_bench", "bare-faust"))
        leg.wait(lambda: leg.client.exists(ready), "the partitions assigned")
        cpu = leg.cpu()
        cpu.start()
        t0 = time.perf_counter()
        first = leg.counted()
        leg.wait(lambda: leg.counted() >= n_messages, "every message counted")
        t1 = time.perf_counter()
        cores = cpu.stop()
    finally:
        leg.stop()
    timed = n_messages - first
    return {"events": n_messages, "timed_events": timed, "seconds": round(t1 - t0, 3),
            "events_per_s": round(timed / max(t1 - t0, 1e-9), 1),
            "events_per_cpu_s": _per_cpu_s(timed, t1 - t0, cores, "worker"), "cpu": cores}  # fmt: skip


def _bare_faust_key(leg: Settings) -> str:
    return f"{leg.redis_prefix}bare_faust_count"


def _bare_faust_main() -> None:
    """``python -m userstream.ingest_bench bare-faust``: the stream worker's Faust app
    (:func:`stream.app.faust_app`) with an agent that takes the same batches of the
    same raw topic and only counts them in Redis (one INCRBY per batch)."""
    import faust

    from stream.agents import events_topic
    from stream.app import faust_app
    from userstream.stores import connect_settings

    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    app = faust_app(settings)
    client = connect_settings(settings)
    key = _bare_faust_key(settings)

    @app.on_partitions_assigned.connect
    async def _ready(sender: faust.App, assigned: set, **_: Any) -> None:
        await asyncio.to_thread(client.set, f"{key}:ready", len(assigned))

    @app.agent(events_topic(app, settings), name="count")
    async def count(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(
            settings.stream_batch_max, within=settings.stream_batch_within_s
        ):
            await asyncio.to_thread(client.incrby, key, len(batch))

    faust.Worker(
        app, loglevel="warning", quiet=True, redirect_stdouts=False
    ).execute_from_commandline()


def _throughput_leg(run: _Run, name: str, topic: str, n_events: int, n_workers: int) -> dict:
    """Workers on a pre-produced topic: events/s from the moment every worker holds
    partitions (the group formed; what one worker applied alone before is not
    counted) to the last event applied."""
    leg = _Leg(run, name, topic)
    try:
        leg.start(n_workers)
        leg.wait(leg.all_hold, "every worker holding partitions")
        cpu = leg.cpu()
        cpu.start()
        t0 = time.perf_counter()
        first = leg.ingested()
        leg.wait(lambda: leg.ingested() >= n_events, "every event applied")
        t1 = time.perf_counter()
        run.cpu[name] = cpu.stop()
        counters = leg.store.counters()
    finally:
        codes = leg.stop()
    timed = n_events - first
    out = {
        "workers": n_workers,
        "events": n_events,
        "timed_events": timed,
        "seconds": round(t1 - t0, 3),
        "events_per_s": round(timed / max(t1 - t0, 1e-9), 1),
        "events_per_cpu_s": _per_cpu_s(timed, t1 - t0, run.cpu[name], "worker"),
        "ingested": counters["events_ingested"],
        "dead_lettered": counters["events_dead_lettered"],
        "exit_codes": codes,
    }
    out["ok"] = out["ingested"] == n_events and out["dead_lettered"] == 0
    LOG.info("ingest bench: %s: %.0f events/s (%d workers)", name, out["events_per_s"], n_workers)
    return out


def _kill_leg(run: _Run, topic: str) -> dict:
    """Two workers, one SIGKILLed mid-run: every event in Redis exactly once afterwards."""
    cfg = run.cfg
    leg = _Leg(run, "kill", topic)
    events = _single_events(cfg, cfg.kill_messages, time.time() - 7200, unique=True)
    produced: dict[str, Any] = {}
    try:
        leg.start(2)
        leg.wait(leg.all_hold, "both workers holding partitions")
        holders = sorted(len(parts) for parts in leg.holding().values())

        def produce() -> None:
            try:
                produced.update(_produce(leg.settings, events, group=1))
            except BaseException as exc:  # reported below
                produced["error"] = repr(exc)

        producer = threading.Thread(target=produce, name="kill-producer", daemon=True)
        producer.start()
        kill_after = int(cfg.kill_at * len(events))
        at = leg.wait(lambda: leg.ingested() >= kill_after and leg.ingested(), "the kill point")
        victim = leg.workers[0]
        victim.kill()
        t_kill = time.monotonic()
        LOG.info("ingest bench: kill: SIGKILLed worker %d at %d events", victim.proc.pid, at)
        producer.join(cfg.leg_timeout_s)
        if "error" in produced:
            raise RuntimeError(f"kill leg: producing failed: {produced['error']}")
        leg.wait(lambda: leg.ingested() >= len(events), "every event after the kill")
        recovered_s = time.monotonic() - t_kill
        counters = leg.store.counters()
        check = _exactly_once(leg, events)
    finally:
        codes = leg.stop()
    ingested = counters["events_ingested"]
    return {
        "produced": produced.get("events"),
        "ingested": ingested,
        "killed_at_events": at,
        "partitions_per_worker": holders,  # before the kill
        "lost": check["lost"],
        "duplicated": check["duplicated"],
        "out_of_order_users": check["out_of_order_users"],
        "duplicates_skipped": counters["events_duplicate_skipped"],
        "all_in_after_kill_s": round(recovered_s, 2),
        "exit_codes": codes,
        "ok": (ingested == len(events) and check["lost"] == 0 and check["duplicated"] == 0
               and check["out_of_order_users"] == 0),
    }  # fmt: skip


def _exactly_once(leg: _Leg, events: list[dict]) -> dict[str, int]:
    """Each user's stored sequence against the events produced for it (unique item ids)."""
    want: dict[str, list[str]] = defaultdict(list)
    for ev in events:
        want[ev["user_id"]].append(ev["item_id"])
    users = sorted(want)
    lost = duplicated = disordered = 0
    for i in range(0, len(users), 500):
        chunk = users[i : i + 500]
        for user, seq in zip(chunk, leg.store.read_many(chunk), strict=True):
            got = [b.item_id for b in seq]
            expect = want[user][-leg.settings.sequence_length :]
            counts: dict[str, int] = defaultdict(int)
            for item in got:
                counts[item] += 1
            lost += sum(1 for item in expect if counts.get(item, 0) == 0)
            duplicated += sum(n - 1 for n in counts.values() if n > 1)
            if got != expect and len(got) == len(set(got)) == len(expect):
                disordered += 1
    return {"lost": lost, "duplicated": duplicated, "out_of_order_users": disordered}


# --- the run ----------------------------------------------------------------------------


def _ensure(leg: Settings) -> None:
    from stream.topics import ensure_topics

    ensure_topics(leg.effective_kafka, leg)


def run_ingest_bench(
    settings: Settings, cfg: IngestConfig, report_path: Path | None = None
) -> dict:
    """Run the benchmark of the module docstring; returns (and writes) the report."""
    exit_on_sigterm()
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ingest-"))
    bench_redis = BenchRedis(settings, work, "ingest")
    env, bootstrap = child_env(settings, work, bench_redis)
    run = _Run(settings, cfg, work, bench_redis, bootstrap, env, tag=env["STREAM_APP_ID"])
    report: dict[str, Any] = {}
    try:
        if not settings.kafka_bootstrap_servers:
            port = int(bootstrap.rsplit(":", 1)[1])
            run.broker = start_broker(port, work / "logs" / "broker.log")
        t_topic = {k: f"{run.tag}-{k}" for k in ("single", "array", "kill")}
        for name, topic in t_topic.items():
            _ensure(run.leg_settings(name, topic))
        t0 = time.time() - 86_400
        single = _single_events(cfg, cfg.messages, t0)
        arrays = _array_events(cfg, t0)
        produced = {
            "single": _produce(run.leg_settings("single", t_topic["single"]), single, 1),
            "array": _produce(run.leg_settings("array", t_topic["array"]), arrays, cfg.array_size),
        }
        LOG.info("ingest bench: produced %s", produced)
        timeout = cfg.leg_timeout_s
        bare_single = asyncio.run(_bare_kafka(bootstrap, t_topic["single"], len(single), timeout))
        bare_array = asyncio.run(_bare_kafka(bootstrap, t_topic["array"], len(arrays), timeout))
        bare_redis = _bare_redis(run, arrays)
        LOG.info("ingest bench: bare kafka %s / %s, bare redis %s",
                 bare_single["events_per_s"], bare_array["events_per_s"],
                 bare_redis["events_per_s"])  # fmt: skip
        bare_faust = _bare_faust_leg(run, t_topic["single"], len(single))
        one = _throughput_leg(run, "single", t_topic["single"], len(single), 1)
        arr = _throughput_leg(run, "array", t_topic["array"], len(arrays), 1)
        two = _throughput_leg(run, "two_workers", t_topic["single"], len(single), 2)
        kill = _kill_leg(run, t_topic["kill"])
        bare = {"kafka_single": bare_single, "kafka_array": bare_array, "redis": bare_redis,
                "faust_single": bare_faust}  # fmt: skip
        report = _report(run, produced, bare, one, arr, two, kill)
        report["seconds"] = round(time.monotonic() - t_start, 1)
    finally:
        if run.broker is not None:
            run.broker.terminate()
            try:
                run.broker.wait(10)
            except subprocess.TimeoutExpired:
                run.broker.kill()
        bench_redis.close()
    write_report(report, report_path)
    if report.get("ok"):  # else the workers' logs stay for a look
        shutil.rmtree(work, ignore_errors=True)
    else:
        LOG.warning("ingest bench: not ok; logs in %s", work)
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _report(run: _Run, produced, bare, one, arr, two, kill) -> dict:
    import aiokafka
    import faust

    cfg = run.cfg
    bare_single, bare_array, bare_redis = bare["kafka_single"], bare["kafka_array"], bare["redis"]
    return {
        "single_ratio": _ratio(one["events_per_s"], bare_single["events_per_s"]),
        "array_ratio": _ratio(arr["events_per_s"], bare_array["events_per_s"]),
        # the same per CPU-second of the consuming process: less disturbed by other jobs
        "single_ratio_per_cpu": _ratio(one["events_per_cpu_s"], bare_single["events_per_cpu_s"]),
        "array_ratio_per_cpu": _ratio(arr["events_per_cpu_s"], bare_array["events_per_cpu_s"]),
        "scale_out_ratio": _ratio(two["events_per_s"], one["events_per_s"]),
        "bare_kafka_single_events_per_s": bare_single["events_per_s"],
        "bare_kafka_array_events_per_s": bare_array["events_per_s"],
        "bare_redis_events_per_s": bare_redis["events_per_s"],
        "bare_faust_single_events_per_s": bare["faust_single"]["events_per_s"],
        "bare_faust_single_ratio": _ratio(
            bare["faust_single"]["events_per_s"], bare_single["events_per_s"]
        ),
        "worker_single_events_per_s": one["events_per_s"],
        "worker_array_events_per_s": arr["events_per_s"],
        "two_workers_events_per_s": two["events_per_s"],
        "kill": kill,
        "messages": cfg.messages,
        "array_messages": cfg.array_messages,
        "array_size": cfg.array_size,
        "partitions": cfg.partitions,
        "host_cores": os.cpu_count(),
        "cpu": run.cpu,
        "legs": {"single": one, "array": arr, "two_workers": two},
        "bare": bare,
        "produced": produced,
        "ok": one["ok"] and arr["ok"] and two["ok"] and kill["ok"],
        "config": cfg.model_dump(),
        "stream_batch_max": run.settings.stream_batch_max,
        "versions": {
            "python": platform.python_version(),
            "faust": faust.__version__,
            "aiokafka": aiokafka.__version__,
        },  # fmt: skip
        "broker": "external" if run.settings.kafka_bootstrap_servers else "embedded (Tansu)",
        "redis_own": run.redis.own is not None,
    }


if __name__ == "__main__" and sys.argv[1:] == ["bare-faust"]:
    _bare_faust_main()
