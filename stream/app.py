"""The Faust application of the stream worker, its readiness signal and its runner.

Start reading at :func:`run_worker` (what ``userstream stream-worker`` calls): it
creates the topics, builds the app with :func:`create_app` and runs a Faust
worker until SIGTERM/SIGINT (exit code 0 after a clean stop).

Readiness: each time the consumer group assigns this worker its partitions,
the worker writes a field ``{host}:{pid}`` into the Redis hash
``{redis_prefix}stream_ready`` (value: JSON with app id, topic partitions and
time; ``beat``, refreshed every :data:`HEARTBEAT_S` while it holds partitions, is
what the API's ``/readyz`` checks) and logs ``stream worker ready``; it deletes the field when the
partitions are revoked and on shutdown. A supervisor or test waits for its
child's field (see :func:`ready_field`, :func:`read_ready`) instead of sleeping
through the 10-30 s group join.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any

import faust
import redis
from faust.sensors import Monitor

from stream.agents import EXIT_LOG_CHANGED, attach_ingest_agent, die
from stream.logs import LogChanged, LogGuard
from stream.metrics import StreamMetrics, attach_metrics
from stream.stall import attach_watchdog
from stream.topics import LogIds, ensure_topics_async
from userstream.logs import dict_config
from userstream.metrics import serve_registry
from userstream.settings import Settings
from userstream.stores import RedisSequenceStore, connect_settings
from userstream.types import Keys

__all__ = [
    "QuietMonitor",
    "create_app",
    "faust_app",
    "read_ready",
    "ready_field",
    "ready_key",
    "run_worker",
]

LOG = logging.getLogger(__name__)

LOG_CHECK_S = 5.0  # how often the topic's log identity is checked between batches
HEARTBEAT_S = 5.0  # how often a worker with partitions refreshes "beat" in its record


def ready_key(settings: Settings) -> str:
    """The Redis hash of ready stream workers (field per worker process)."""
    return f"{settings.redis_prefix}stream_ready"


def ready_field(pid: int | None = None, host: str | None = None) -> str:
    return f"{host or socket.gethostname()}:{os.getpid() if pid is None else pid}"


def read_ready(client: redis.Redis, settings: Settings, pid: int) -> dict[str, Any] | None:
    """The readiness record of worker process ``pid`` on this host, or None."""
    raw = client.hget(ready_key(settings), ready_field(pid))
    return None if raw is None else json.loads(raw)


class QuietMonitor(Monitor):
    """Faust's monitor without its bookkeeping per message and event.

    Its figures are for Faust's web views, which the worker does not serve
    (``web_enabled=False``; the worker's own metrics are :mod:`stream.metrics`),
    and the five calls per message cost ~5% of the per-message path (issue 17).
    Everything else (commits, sends, rebalances) it still records.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def track_tp_end_offset(self, tp: Any, offset: int) -> None:
        pass


def faust_app(settings: Settings) -> faust.App:
    """The stream worker's Faust app, before any agent: how it joins, fetches and
    buffers (``bench ingest`` runs a bare agent on the same app, as a ceiling)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the leaf
    return faust.App(
        settings.stream_app_id,
        broker=f"kafka://{settings.effective_kafka}",
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        autodiscover=False,
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        topic_allow_declare=False,  # stream.topics.ensure_topics creates them explicitly
        topic_disable_leader=True,  # no tables, so no assignor leader topic
        consumer_auto_offset_reset="earliest",
        # Faust's 60 s default makes a dead member linger for a minute, and the
        # embedded broker (Tansu) holds a JoinGroup for about half the session
        # timeout: 10 s keeps failover and a fresh join quick. The env var
        # BROKER_SESSION_TIMEOUT (read by Faust) overrides it.
        broker_session_timeout=10.0,
        broker_max_poll_records=settings.stream_max_poll_records,
        consumer_max_fetch_size=settings.stream_fetch_max_bytes,
        stream_buffer_maxsize=max(4096, 2 * settings.stream_batch_max),
        monitor=QuietMonitor(),
    )


def create_app(settings: Settings, metrics: StreamMetrics | None = None) -> faust.App:
    """A Faust app with the ingest agent; Redis (not Faust tables) holds the state.
    ``metrics``: record batches, assignments, lag and a heartbeat there."""
    app = faust_app(settings)
    client = connect_settings(settings)
    store = RedisSequenceStore(client, Keys.of_settings(settings), settings.sequence_length)
    guard = LogGuard(store, settings.events_topic, LogIds(settings.effective_kafka))
    attach_ingest_agent(app, settings, store, guard, metrics)
    if metrics is not None:
        attach_metrics(app, settings, store, metrics)
    attach_watchdog(app, settings.events_topic, store, settings.stream_stall_s)
    key, field = ready_key(settings), ready_field()
    assigned_record: dict[str, Any] = {}  # this worker's record while it holds partitions

    def _write(fn, *args) -> None:
        try:
            fn(*args)
        except redis.RedisError as exc:  # readiness is a hint; never crash a rebalance on it
            LOG.warning("could not update %s: %r", key, exc)

    @app.on_partitions_assigned.connect
    async def _ready(sender: faust.App, assigned: set, **_: Any) -> None:
        # before any batch of this assignment: offsets of another log must go
        mine = [tp for tp in assigned if tp.topic == settings.events_topic]
        try:
            dropped = await asyncio.to_thread(guard.bind, [tp.partition for tp in mine])
        except Exception as exc:
            die(f"could not bind the offsets to the topic's log: {exc!r}", EXIT_LOG_CHANGED)
        for tp in mine:
            # another recorded log, and the group's committed offset (the broker kept
            # it) counts that log too: read the new one from its start
            if dropped.get(tp.partition) and (await app.consumer.position(tp) or 0) > 0:
                await app.consumer.seek(tp, 0)
                LOG.warning("%s:%d reads the new log from its start", tp.topic, tp.partition)
        log_id = guard.bound
        parts = sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)
        record = {"app_id": settings.stream_app_id, "partitions": parts, "ts": time.time(),
                  "log": log_id}  # fmt: skip
        assigned_record.clear()
        assigned_record.update(record)
        record["beat"] = record["ts"]
        await asyncio.to_thread(_write, client.hset, key, field, json.dumps(record))
        LOG.info("stream worker ready: %d partitions assigned %s", len(parts), parts)

    @app.timer(LOG_CHECK_S)
    async def _check_log() -> None:
        # a topic recreated under a running consumer may deliver nothing for long
        if guard.bound is None:
            return
        try:
            await asyncio.to_thread(guard.check)
        except LogChanged as exc:
            die(f"{exc}: restarting binds the new log", EXIT_LOG_CHANGED)
        except Exception as exc:  # the broker does not answer: the batches wait too
            LOG.warning("could not check the topic's log id: %r", exc)

    @app.timer(HEARTBEAT_S)
    async def _heartbeat() -> None:
        # the API's /readyz wants a fresh "beat": this event loop still runs
        if assigned_record:
            record = {**assigned_record, "beat": time.time()}
            await asyncio.to_thread(_write, client.hset, key, field, json.dumps(record))

    @app.on_partitions_revoked.connect
    async def _revoked(sender: faust.App, revoked: set, **_: Any) -> None:
        assigned_record.clear()
        await asyncio.to_thread(_write, client.hdel, key, field)

    @app.on_before_shutdown.connect
    async def _shutdown(sender: faust.App, **_: Any) -> None:
        assigned_record.clear()
        await asyncio.to_thread(_write, client.hdel, key, field)

    return app


def run_worker(settings: Settings | None = None, loglevel: str = "info") -> None:
    """Ensure the topics, then run the stream worker until a signal; exits the process.

    Exit codes: 0 after SIGTERM/SIGINT and a clean stop, 70 when a batch could
    not be applied (see :mod:`stream.agents`), 75 when the topic became a new
    log under it (:mod:`stream.logs`; started again, it binds the new one), 76
    when records waited ``stream_stall_s`` with none applied (:mod:`stream.stall`;
    started again, it rejoins), 1 on other errors.
    """
    settings = settings or Settings()
    # asyncio.run() would leave no current loop behind; Faust wants one.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(ensure_topics_async(settings.effective_kafka, settings))
    metrics = StreamMetrics()
    serve_registry(metrics.registry, settings.metrics_host, settings.stream_metrics_port,
                   "stream worker")  # fmt: skip
    app = create_app(settings, metrics)
    LOG.info(
        "stream worker %s: %s (%d partitions) -> Redis prefix %r, dead letters -> %s",
        settings.stream_app_id,
        settings.events_topic,
        settings.topic_partitions,
        settings.redis_prefix,
        settings.dlq_topic,
    )
    worker = faust.Worker(app, loop=loop, loglevel=loglevel, quiet=True, redirect_stdouts=False,
                          logging_config=dict_config(settings.log_format, loglevel))  # fmt: skip
    worker.execute_from_commandline()  # raises SystemExit
