"""``userstream bench freshness``: how long an event takes to reach the served embedding.

The real stack (``userstream up``: embedded broker or the configured Kafka,
Redis, stream worker, training worker, API) runs under a steady load of single
events (``rate`` per second, :class:`~userstream.soak_load.Producer`). Two probe
threads send one event at a time, for a *new* user (never seen) and for an
*existing* one (a load user that already has an embedding), and time from the
send to the moment ``GET /users/{id}/embedding`` reports an
``indexed_event_ts`` at or after the probe's ``ts``: the vector the API's
similar-user index searches with holds the event. The same probe also times the
moment the event is in the user's stored sequence in Redis (ingest alone: the
baseline in the same run). Training cycles run at their usual cadence
meanwhile; their durations come from the training worker's log.

Report fields: ``new`` and ``existing`` (each ``p50_s``, ``p99_s``, ``n``,
``timeouts``, ``ingest_p50_s`` / ``ingest_p99_s`` and ``embedded_p50_s`` /
``embedded_p99_s``: in Redis, before the API's index applied it), ``cycles`` (count and
train/total seconds), ``rate``, ``events_sent``, ``events_ingested``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from userstream.bench_env import BenchRedis, child_env, exit_on_sigterm, write_report
from userstream.settings import Settings
from userstream.soak import Sent, SoakConfig, StackRun
from userstream.soak_load import Producer
from userstream.stores import RedisSequenceStore
from userstream.types import Keys

__all__ = ["FreshnessConfig", "Prober", "cycle_times", "run_freshness"]

LOG = logging.getLogger(__name__)

_CYCLE = re.compile(r"cycle v(\d+): .* train ([\d.]+)s, total ([\d.]+)s")


class FreshnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    minutes: float = Field(3.0, gt=0, description="how long the load runs")
    rate: float = Field(1000.0, gt=0, le=1000, description="load events per second")
    users: int = Field(20_000, ge=10, description="users of the load")
    items: int = Field(5000, ge=1, description="size of the item catalogue")
    warmup_s: float = Field(30.0, ge=0, description="load before the first probe")
    probe_timeout_s: float = Field(120.0, gt=0, description="a probe gives up after this")
    seed: int = Field(0)


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if xs else None


class Prober(threading.Thread):
    """One probe at a time, for new users (``kind="new"``) or for existing ones
    (``"existing"``: ``pick(rng)`` names a load user; one without an embedding
    yet is skipped). Each probe gives up after ``timeout_s``."""

    def __init__(self, kind: str, stack: StackRun, store: RedisSequenceStore, bootstrap: str,
                 topic: str, stop: threading.Event, *, timeout_s: float,
                 pick: Callable[[random.Random], str] | None = None, seed: int = 0) -> None:  # fmt: skip
        super().__init__(name=f"probe-{kind}", daemon=True)
        if kind not in ("new", "existing") or (kind == "existing" and pick is None):
            raise ValueError("kind is 'new', or 'existing' with a pick function")
        self.kind, self.stack, self.store = kind, stack, store
        self.bootstrap, self.topic, self.stop = bootstrap, topic, stop
        self.timeout_s, self.pick = timeout_s, pick
        self.served: list[float] = []
        self.ingested: list[float] = []
        self.embedded: list[float] = []  # in Redis, before the API's index has it
        self.timeouts = 0
        self.sent = 0  # probe events the broker acknowledged
        self.rng = random.Random(seed + (kind == "new"))

    @classmethod
    def pair(cls, stack: StackRun, store: RedisSequenceStore, bootstrap: str, topic: str,
             stop: threading.Event, timeout_s: float, pick: Callable[[random.Random], str],
             seed: int = 0) -> list[Prober]:  # fmt: skip
        """A prober for new users and one for existing ones (``pick``), in that order."""
        return [cls(kind, stack, store, bootstrap, topic, stop, timeout_s=timeout_s, pick=pick,
                    seed=seed) for kind in ("new", "existing")]  # fmt: skip

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks=1, linger_ms=0)
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                user = self._user(n)
                if user is None:
                    self.stop.wait(0.2)
                    continue
                self._probe(producer, user)
        finally:
            producer.close(timeout=2)

    def _user(self, n: int) -> str | None:
        if self.kind == "new":
            return f"fresh-{uuid.uuid4().hex[:6]}-{n}"
        user = self.pick(self.rng)
        return user if self.stack.get(f"/users/{user}/embedding") is not None else None

    def _probe(self, producer, user: str) -> None:
        ts = round(time.time(), 3)  # events are stored to the millisecond
        body = {"user_id": user, "item_id": f"probe-{self.kind}", "behavior": "click", "ts": ts}
        t0 = time.monotonic()
        producer.send(self.topic, value=json.dumps(body).encode(), key=user.encode()).get(10)
        self.sent += 1
        ingested = embedded = None
        deadline = t0 + self.timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            now = time.monotonic()
            if ingested is None:
                tail = self.store.read_tail(user, 1)
                if tail and tail[0].ts >= ts - 5e-4:
                    ingested = now - t0
            got = self.stack.get(f"/users/{user}/embedding")
            if embedded is None and got is not None and (got.get("event_ts") or 0) >= ts - 5e-4:
                embedded = now - t0
            seen = None if got is None else got.get("indexed_event_ts")
            if seen is not None and seen >= ts - 5e-4:
                self.served.append(now - t0)
                self.ingested.append(ingested if ingested is not None else now - t0)
                self.embedded.append(embedded if embedded is not None else now - t0)
                return
            time.sleep(0.01)
        if not self.stop.is_set():  # the run's end cuts the last probe short: not a timeout
            self.timeouts += 1

    def summary(self) -> dict[str, Any]:
        return {
            "p50_s": _pct(self.served, 50),
            "p99_s": _pct(self.served, 99),
            "n": len(self.served),
            "timeouts": self.timeouts,
            "ingest_p50_s": _pct(self.ingested, 50),
            "ingest_p99_s": _pct(self.ingested, 99),
            "embedded_p50_s": _pct(self.embedded, 50),
            "embedded_p99_s": _pct(self.embedded, 99),
        }


def cycle_times(log: Path) -> dict[str, Any]:
    train, total = [], []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    for m in _CYCLE.finditer(text):
        train.append(float(m.group(2)))
        total.append(float(m.group(3)))
    return {"n": len(train), "train_s_p50": _pct(train, 50), "train_s_max": max(train, default=None),
            "total_s_p50": _pct(total, 50), "total_s_max": max(total, default=None)}  # fmt: skip


def run_freshness(
    settings: Settings, cfg: FreshnessConfig, report_path: Path | None = None
) -> dict:
    """Run the benchmark described in the module docstring; returns (and writes) the report."""
    exit_on_sigterm()
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="freshness-"))
    bench_redis = BenchRedis(settings, work, "fresh")
    env, bootstrap = child_env(settings, work / "stack", bench_redis)
    (work / "stack").mkdir(parents=True)
    store = RedisSequenceStore(bench_redis.client, Keys.of_settings(settings, prefix=bench_redis.prefix),
                               settings.sequence_length)  # fmt: skip
    stack = StackRun(env, work / "stack")
    sent = Sent()
    load = SoakConfig(minutes=cfg.minutes, rate=cfg.rate, invalid_every=10**9, items=cfg.items,
                      seed=cfg.seed)  # fmt: skip
    producer = Producer(bootstrap, settings.events_topic, load, cfg.users, sent)
    stop = threading.Event()
    probers = Prober.pair(stack, store, bootstrap, settings.events_topic, stop,
                          cfg.probe_timeout_s, lambda rng: f"s{rng.randrange(cfg.users)}",
                          cfg.seed)  # fmt: skip
    try:
        stack.start()
        LOG.info("freshness: stack up in %.0fs", time.monotonic() - t_start)
        producer.start()
        t0 = time.monotonic()
        stop.wait(cfg.warmup_s)
        for p in probers:
            p.start()
        while time.monotonic() - t0 < cfg.minutes * 60:
            time.sleep(1.0)
            if stack.proc is not None and stack.proc.poll() is not None:
                raise RuntimeError(f"the stack exited ({stack.proc.returncode}); see {work}")
        elapsed = time.monotonic() - t0
        stop.set()
        producer.stop.set()
        producer.join(30)
        for p in probers:
            p.join(cfg.probe_timeout_s + 10)
        counters = store.counters()
        report = {
            "new": probers[0].summary(),
            "existing": probers[1].summary(),
            "cycles": cycle_times(work / "stack" / "logs" / "train-worker.log"),
            "rate": cfg.rate,
            "rate_achieved": round(sent.valid / elapsed, 1),
            "events_sent": sent.valid,
            "events_ingested": counters["events_ingested"],
            "config": cfg.model_dump(),
            "settings": {
                k: getattr(settings, k)
                for k in (
                    "train_interval_s",
                    "train_every_events",
                    "train_steps",
                    "embed_claim_max",
                    "embed_poll_s",
                )
            },  # fmt: skip
            "seconds": round(time.monotonic() - t_start, 1),
        }
    finally:
        stop.set()
        producer.stop.set()
        code = stack.stop()
        LOG.info("freshness: stack stopped (exit %s)", code)
        bench_redis.close()
    write_report(report, report_path)
    return report
