"""``bench prequential --via-kafka``: the prequential loop through the real ingest path.

:func:`run_prequential` normally feeds a :class:`~model.prequential.feeds.MemoryFeed`
(one process, SequenceStore's semantics in dicts). :class:`KafkaFeed` is the
same :class:`~model.prequential.feeds.Feed` over the deployed path instead:

* the embedded Kafka-compatible broker (Tansu) unless ``kafka_bootstrap_servers``
  is set, topics created explicitly (:func:`stream.topics.ensure_topics`);
* the real stream worker (``userstream stream-worker``, Faust) as a child
  process, waited for through its readiness record in Redis;
* the real :class:`~userstream.stores.RedisSequenceStore` and
  :class:`~userstream.stores.RedisEmbeddingStore` under a fresh key prefix
  (``<redis_prefix>pq-<tag>:``), deleted at the end, with fresh topic names and
  consumer group.

Events are buffered and produced (:func:`stream.replay.produce_events_async`)
in chunks: a chunk ends where the cadence makes a training cycle due (and at
the end); :meth:`KafkaFeed.sync` then waits until the stream worker's applied
offsets in Redis cover everything produced, so the unchanged TrainingWorker
reads exactly the events before the cycle, from Redis. Within a chunk the state
before an event is the user's sequence read from Redis at the chunk start (the
chunk is not produced yet) plus the chunk's earlier events of that user.

:func:`compare_via_kafka` runs the loop in process and via Kafka on the same
events and reports whether the sequences, the dirty-user set of every cycle,
the cycles' losses and the per-event metrics agree (:func:`agreement`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis

from model.prequential.feeds import MemoryFeed
from model.prequential.loop import PrequentialConfig, PrequentialResult, run_prequential
from stream.app import read_ready
from stream.replay import new_producer, produce_events_async
from stream.topics import delete_topics, ensure_topics
from userstream.embedded import free_port, resolve_redis, start_broker
from userstream.settings import Settings
from userstream.stores import (
    RedisEmbeddingStore,
    RedisSequenceStore,
    SequenceStore,
    connect_settings,
    stored_behavior,
)
from userstream.types import Behavior, Event, Keys

__all__ = ["KafkaFeed", "agreement", "compare_via_kafka"]

LOG = logging.getLogger(__name__)


class KafkaFeed:
    """A :class:`~model.prequential.Feed` through broker, stream worker and Redis.

    Use as a context manager: entering starts what is missing (broker, Redis),
    creates the topics, starts the stream worker and waits for its readiness;
    leaving stops them and deletes the run's Redis keys.
    """

    def __init__(
        self,
        settings: Settings,
        ready_timeout_s: float = 120.0,
        apply_timeout_s: float = 60.0,
        keep_keys: bool = False,
    ) -> None:
        self.base = settings
        self.ready_timeout_s = ready_timeout_s
        self.apply_timeout_s = apply_timeout_s
        self.keep_keys = keep_keys
        self.settings = settings  # the run's settings, once started
        self.store: RedisSequenceStore | None = None
        self.embeddings: RedisEmbeddingStore | None = None
        self.client: redis.Redis | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_exit: int | None = None
        self._infra: list[subprocess.Popen] = []  # broker / Redis started here
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Any = None
        self._log: Any = None
        # the chunk not produced yet
        self._pending: list[Any] = []
        self._base: dict[str, list[Behavior]] = {}  # user -> Redis tail at the chunk start
        self._new: dict[str, list[Behavior]] = {}  # user -> the chunk's events so far
        # numbers for the report
        self.startup_s = 0.0
        self.sync_s = 0.0  # producing + waiting for the stream worker
        self.produce_s = 0.0  # of which producing (until every message is acked)
        self.chunks = 0
        self.events = 0
        self.messages = 0
        self.redis_reads = 0  # users' sequences read from Redis for scoring

    # --- lifecycle -------------------------------------------------------------
    def __enter__(self) -> KafkaFeed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        t0 = time.perf_counter()
        self._tmp = tempfile.TemporaryDirectory(prefix="prequential-kafka-")
        work = Path(self._tmp.name)
        b = self.base
        kafka = b.kafka_bootstrap_servers
        if not kafka:
            port = free_port()
            self._infra.append(start_broker(port, work / "broker.log"))
            kafka = f"127.0.0.1:{port}"
        redis_url, proc = resolve_redis(
            b.redis_url, free_port(), work / "redis", work / "redis.log"
        )
        if proc is not None:
            self._infra.append(proc)
        tag = uuid.uuid4().hex[:10]
        s = self.settings = b.replace(
            kafka_bootstrap_servers=kafka,
            redis_url=redis_url,
            redis_prefix=f"{b.redis_prefix}pq-{tag}:",
            events_topic=f"prequential-{tag}",
            dlq_topic=f"prequential-{tag}-dlq",
            stream_app_id=f"prequential-{tag}",
            data_dir=work,
            # the in-process run it is compared with keys users by their raw ids; the
            # protocol scores the model, not the service's id scheme
            pseudonym_key=None,
        )
        ensure_topics(kafka, s)
        self.client = connect_settings(s)
        keys = Keys.of_settings(s)
        self.store = RedisSequenceStore(self.client, keys, s.sequence_length)
        self.embeddings = RedisEmbeddingStore(self.client, keys, s.update_feed_maxlen)
        self._start_worker(work / "stream-worker.log")
        self._loop = asyncio.new_event_loop()
        self._producer = self._loop.run_until_complete(self._new_producer())
        self.startup_s = time.perf_counter() - t0
        LOG.info(
            "via Kafka: broker %s, Redis %s prefix %r, stream worker pid %d ready in %.1fs",
            kafka, redis_url, s.redis_prefix, self.worker.pid, self.startup_s,
        )  # fmt: skip

    async def _new_producer(self) -> Any:
        producer = new_producer(self.settings)
        await producer.start()
        return producer

    def _start_worker(self, log_path: Path) -> None:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if k != "USERSTREAM_CONFIG"}
        # every setting, so the child resolves exactly this run's values
        env.update(s.as_env())
        env.setdefault("BROKER_SESSION_TIMEOUT", "6")  # Faust's: a quicker group join on Tansu
        env.setdefault("BROKER_HEARTBEAT_INTERVAL", "1")
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "userstream", "stream-worker"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait(
            lambda: read_ready(self.client, s, self.worker.pid) is not None,
            self.ready_timeout_s,
            "the stream worker's readiness",
        )

    def _wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if self.worker.poll() is not None:
                raise RuntimeError(
                    f"the stream worker exited ({self.worker.returncode}) while waiting for "
                    f"{what}:\n{self.worker_log()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {what} after {timeout_s:.0f}s; stream worker log:\n{self.worker_log()}"
                )
            time.sleep(0.005)

    def worker_log(self, lines: int = 30) -> str:
        path = self.settings.data_dir / "stream-worker.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop and remove everything the run started or wrote; each step runs even
        when an earlier one fails."""
        steps = (self._stop_producer, self._stop_worker, self._drop_keys, self._drop_topics,
                 self._stop_infra)  # fmt: skip
        for step in steps:
            try:
                step()
            except Exception:
                LOG.exception("via-Kafka cleanup: %s failed", step.__name__)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _stop_producer(self) -> None:
        if self._loop is None:
            return
        try:
            if self._producer is not None:
                self._loop.run_until_complete(self._producer.stop())
        finally:
            self._loop.close()
            self._loop = self._producer = None

    def _stop_worker(self) -> None:
        if self.worker is None:
            return
        self.worker_exit = _stop(self.worker, 30.0)  # SIGTERM: a clean stop exits 0
        if self.worker_exit != 0:
            LOG.warning("stream worker exit code %s:\n%s", self.worker_exit, self.worker_log())
        if self._log is not None:
            self._log.close()
            self._log = None

    def _drop_keys(self) -> None:
        if self.client is None:
            return
        try:
            if not self.keep_keys:
                match = f"{self.settings.redis_prefix}*"
                keys = list(self.client.scan_iter(match=match, count=1000))
                for i in range(0, len(keys), 500):
                    self.client.delete(*keys[i : i + 500])
        finally:
            self.client.close()
            self.client = None

    def _drop_topics(self) -> None:
        """An external broker keeps the run's topics: delete them (the embedded one
        started here keeps topics in memory and is stopped)."""
        if not self.base.kafka_bootstrap_servers or self.settings is self.base:
            return
        s = self.settings
        delete_topics(s.effective_kafka, [s.events_topic, s.dlq_topic])

    def _stop_infra(self) -> None:
        for proc in reversed(self._infra):
            _stop(proc, 10.0)
        self._infra.clear()

    # --- the Feed --------------------------------------------------------------
    def tail(self, user: str, n: int) -> list[Behavior]:
        base = self._base.get(user)
        if base is None:  # nothing of this chunk is produced yet: Redis = the chunk start
            base = self._base[user] = self.store.read_tail(user, n)
            self.redis_reads += 1
        new = self._new.get(user)
        return (base + new)[-n:] if new else base

    def add(self, pos: int, raw: Any, ev: Event) -> None:
        self._pending.append(raw)  # as given: the stream worker validates it again
        self._new.setdefault(ev.user_id, []).append(stored_behavior(ev))

    def sync(self) -> None:
        if not self._pending:
            return
        t0 = time.perf_counter()
        report = self._loop.run_until_complete(
            produce_events_async(
                self.settings, self._pending, progress=False, ensure=False, producer=self._producer
            )
        )
        self.produce_s += time.perf_counter() - t0
        if report.failed:
            raise RuntimeError(f"{report.failed} of {report.messages} messages were not acked")
        topic = self.settings.events_topic

        def covered() -> bool:
            done = self.store.applied_offsets(topic)
            return all(done.get(p, -1) >= o for p, o in report.offsets.items())

        self._wait(covered, self.apply_timeout_s, f"offsets {report.offsets} applied in Redis")
        self.events += report.events
        self.messages += report.messages
        self.chunks += 1
        self._pending = []
        self._base.clear()
        self._new.clear()
        self.sync_s += time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "events": self.events,
            "messages": self.messages,
            "chunks": self.chunks,
            "partitions": s.topic_partitions,
            "redis_reads": self.redis_reads,
            "startup_s": round(self.startup_s, 3),
            "sync_s": round(self.sync_s, 3),
            "produce_s": round(self.produce_s, 3),
        }


def _stop(proc: subprocess.Popen, timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --- the comparison ---------------------------------------------------------------
def agreement(
    a: PrequentialResult, a_store: SequenceStore, b: PrequentialResult, b_store: SequenceStore
) -> dict[str, Any]:
    """Do two runs on the same events agree? Final sequences, counters, every
    cycle (dirty-user set, replay count, version, loss), drifts and per-event metrics."""
    users = sorted(a_store.iter_users())
    users_b = sorted(b_store.iter_users())
    mismatched = sum(
        x != y for x, y in zip(a_store.read_many(users), b_store.read_many(users), strict=True)
    )
    ca = [(c["event"], c["dirty_digest"], c["replay"], c["version"]) for c in a.cycles]
    cb = [(c["event"], c["dirty_digest"], c["replay"], c["version"]) for c in b.cycles]
    loss_diff = max(
        (abs(x["loss"] - y["loss"]) for x, y in zip(a.cycles, b.cycles, strict=False)),
        default=0.0,
    )
    metrics: dict[str, Any] = {}
    for name in a.models:
        per_event = 0.0
        for table in ("hr", "ndcg"):
            x, y = getattr(a, table)[name], getattr(b, table)[name]
            if not np.array_equal(np.isnan(x), np.isnan(y)):
                per_event = math.inf
                continue
            sel = ~np.isnan(x)
            if sel.any():
                per_event = max(per_event, float(np.abs(x[sel] - y[sel]).max()))
        metrics[name] = {
            "max_abs_diff_per_event": per_event,
            "hr_diff": abs(a.mean(name) - b.mean(name)),
            "ndcg_diff": abs(a.mean(name, "ndcg") - b.mean(name, "ndcg")),
        }
    worst = max((m["max_abs_diff_per_event"] for m in metrics.values()), default=0.0)
    out = {
        "users": len(users),
        "sequences": users == users_b and mismatched == 0,
        "mismatched_users": mismatched + len(set(users) ^ set(users_b)),
        "counters": a_store.counters() == b_store.counters(),
        "cycles": len(ca),
        "cycles_identical": ca == cb,
        "cycle_loss_max_abs_diff": loss_diff,
        "drifts_identical": [(p, d.signal) for p, d in a.drifts]
        == [(p, d.signal) for p, d in b.drifts],
        "metrics": metrics,
    }
    out["verdict"] = (
        "exact"
        if worst == 0.0 and loss_diff == 0.0
        else "float noise"
        if worst <= 1e-6 and loss_diff <= 1e-6
        else "differ"
    )
    return out


def compare_via_kafka(
    events: Sequence[dict[str, Any]],
    settings: Settings,
    config: PrequentialConfig,
    progress: Callable[[int, int], None] | None = None,
    keep_keys: bool = False,
) -> tuple[PrequentialResult, PrequentialResult, dict[str, Any]]:
    """The loop in process, then via Kafka, on ``events``: (in-process result, Kafka
    result, the ``via_kafka`` report entry: counts, wall times, both runs' means,
    :func:`agreement`)."""
    memory = MemoryFeed(settings.sequence_length)
    local = run_prequential(events, settings, config, progress, feed=memory)
    t0 = time.perf_counter()
    with KafkaFeed(settings, keep_keys=keep_keys) as feed:
        kafka = run_prequential(events, settings, config, progress, feed=feed)
        agree = agreement(local, memory.store, kafka, feed.store)
        info = feed.info()
    info["worker_exit_code"] = feed.worker_exit
    k = config.k
    via = {
        **info,
        "n_events": kafka.n_events,
        "wall_s": round(kafka.wall_s, 3),
        "wall_s_total": round(time.perf_counter() - t0, 3),  # + startup and shutdown
        "wall_s_in_process": round(local.wall_s, 3),
        "models": {
            name: {
                f"hr@{k}": kafka.mean(name),
                f"ndcg@{k}": kafka.mean(name, "ndcg"),
                f"hr@{k}_in_process": local.mean(name),
                f"ndcg@{k}_in_process": local.mean(name, "ndcg"),
            }
            for name in kafka.models
        },
        "agreement": agree,
    }
    return local, kafka, via
