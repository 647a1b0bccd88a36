"""``userstream bench scale``: a million users and a hundred thousand items through the real stack.

The project's generator (:meth:`~stream.generator.ClickstreamGenerator.sessions`)
makes ``users`` users in ``groups`` interest groups over ``items`` items; each
session is ``session`` consecutive events of one user, sent as one JSON-array
message (as a client SDK uploads a session), users taking turns so that the
first ``users`` sessions cover everybody. The stack (``userstream up``:
embedded broker or the configured Kafka, Redis, stream worker, training
worker, API) ingests, trains and embeds as it would in production; meanwhile
the freshness probes of ``bench freshness`` time new and existing users, and a
sampler reads every few seconds the RSS of every process, Redis memory, the
events ingested and the users embedded.

The run ends once every event is ingested and every changed user embedded
(the embed queue is empty), or at ``settle_timeout_s``. Training keeps its
cadence throughout: its backlog of users not yet trained on (``train_pending``)
is reported, not waited for.

Report fields: ``users``, ``items``, ``events``, ``messages``,
``produce_events_per_s``, ``ingest_events_per_s`` (first message produced to
the last event ingested), ``embedded_users``, ``all_embedded_s`` (from the
first message to an empty embed queue), ``embed_users_per_s``, ``cycles``,
``freshness`` (``new`` / ``existing`` as in ``bench freshness``), ``rss_mb``
(per process: ``max`` and ``end``), ``redis_used_mb`` (``max``, ``end``),
``redis_bytes_per_user``, ``train_pending``, ``index_size``, ``within_24gib``,
``timeline`` (the samples) and a PNG of the timeline beside the report.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stream.generator import ClickstreamGenerator
from stream.replay import produce_events
from userstream.bench_env import BenchRedis, child_env, exit_on_sigterm, write_report
from userstream.freshness import Prober, cycle_times
from userstream.settings import Settings
from userstream.soak import StackRun
from userstream.stores import RedisEmbeddingStore, RedisSequenceStore
from userstream.types import Keys

__all__ = ["ScaleConfig", "run_scale"]

LOG = logging.getLogger(__name__)

GIB = 1024**3


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: int = Field(1_000_000, ge=10, description="users of the stream")
    items: int = Field(100_000, ge=10, description="items of the catalogue")
    groups: int = Field(100, ge=1, description="interest groups (items split among them)")
    session: int = Field(3, ge=1, le=50, description="events per session (one message)")
    passes: float = Field(1.0, gt=0, description="sessions = passes x users")
    rate: float = Field(0.0, ge=0, description="events per second produced (0: at once)")
    sample_every_s: float = Field(5.0, gt=0, description="time between samples")
    settle_timeout_s: float = Field(3600.0, gt=0, description="longest wait for the backlog")
    probe_timeout_s: float = Field(300.0, gt=0, description="a freshness probe gives up after")
    seed: int = Field(0)


class _Sampler(threading.Thread):
    """Every ``every_s``: RSS per process, Redis memory, events ingested, users embedded."""

    def __init__(self, stack: StackRun, bench_redis: BenchRedis, keys: Keys, every_s: float,
                 t0: float) -> None:  # fmt: skip
        super().__init__(name="scale-sampler", daemon=True)
        self.stack, self.redis, self.every_s, self.t0 = stack, bench_redis, every_s, t0
        self.sequences = RedisSequenceStore(bench_redis.client, keys)
        self.embeddings = RedisEmbeddingStore(bench_redis.client, keys)
        self.stop = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self.rss_max: dict[str, float] = defaultdict(float)
        self.redis_max = 0.0

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a sample lost is not worth the run
                LOG.warning("scale: sample failed: %s", exc)

    def sample(self) -> dict[str, Any]:
        rss = self.rss()
        for name, mb in rss.items():
            self.rss_max[name] = max(self.rss_max[name], mb)
        used = self.redis.client.info("memory")["used_memory"] / 2**20
        self.redis_max = max(self.redis_max, used)
        return {
            "t_s": round(time.monotonic() - self.t0, 1),
            "events_ingested": self.sequences.counters()["events_ingested"],
            "embedded_users": self.embeddings.count(),
            "embed_pending": self.pending("embed"),
            "train_pending": self.pending("train"),
            "redis_used_mb": round(used, 1),
            "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        }

    def pending(self, queue: str) -> int:
        return self.sequences.dirty_count(queue) + self.sequences.claimed_count(queue)

    def rss(self) -> dict[str, float]:
        return {k: v for k, v in self.stack.rss_mb(self.redis.own).items() if v is not None}


def _events(gen: ClickstreamGenerator, cfg: ScaleConfig, start_ts: float) -> Iterator[dict]:
    for session in gen.sessions(round(cfg.passes * cfg.users), cfg.session, start_ts=start_ts):
        yield from session


def run_scale(settings: Settings, cfg: ScaleConfig, report_path: Path | None = None) -> dict:
    """Run the benchmark described in the module docstring; returns (and writes) the report."""
    exit_on_sigterm()
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="scale-"))
    bench_redis = BenchRedis(settings, work, "scale")
    keys = Keys.of_settings(settings, prefix=bench_redis.prefix)
    env, bootstrap = child_env(settings, work / "stack", bench_redis)
    (work / "stack").mkdir(parents=True)
    stack = StackRun(env, work / "stack")
    store = RedisSequenceStore(bench_redis.client, keys, settings.sequence_length)
    producer_settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap})
    gen = ClickstreamGenerator(n_users=cfg.users, n_groups=cfg.groups,
                               items_per_group=max(1, cfg.items // cfg.groups), seed=cfg.seed,
                               mean_gap_s=0.0)  # fmt: skip
    n_events = round(cfg.passes * cfg.users) * cfg.session
    stop = threading.Event()
    user_ids = gen.user_ids
    probers = Prober.pair(stack, store, bootstrap, settings.events_topic, stop,
                          cfg.probe_timeout_s, lambda rng: user_ids[rng.randrange(len(user_ids))],
                          cfg.seed)  # fmt: skip
    sampler: _Sampler | None = None
    try:
        stack.start()
        LOG.info("scale: stack up in %.0fs; producing %d events of %d users over %d items",
                 time.monotonic() - t_start, n_events, cfg.users, cfg.items)  # fmt: skip
        t0 = time.monotonic()
        sampler = _Sampler(stack, bench_redis, keys, cfg.sample_every_s, t0)
        sampler.start()
        for p in probers:
            p.start()
        sent = produce_events(producer_settings, _events(gen, cfg, time.time() - 86_400),
                              rate=cfg.rate, progress=None, total=n_events,
                              group=cfg.session)  # fmt: skip
        t_produced = time.monotonic() - t0
        LOG.info("scale: %d events in %d messages produced in %.0fs (%d failed)",
                 sent.events, sent.messages, t_produced, sent.failed)  # fmt: skip

        def probes() -> int:
            return sum(p.sent for p in probers)

        def all_in() -> bool:
            return store.counters()["events_ingested"] >= sent.events + probes()

        t_ingested = _wait_for(all_in, cfg.settle_timeout_s, stack)
        ingested_at = None if t_ingested is None else time.monotonic() - t0
        t_embedded = _wait_for(lambda: sampler.pending("embed") == 0, cfg.settle_timeout_s, stack)
        embedded_at = None if t_embedded is None else time.monotonic() - t0
        stop.set()
        for p in probers:
            p.join(cfg.probe_timeout_s + 10)
        _wait_for(all_in, 60, stack)  # the last probes' events too
        sampler.stop.set()
        sampler.join(cfg.sample_every_s + 30)
        last = sampler.sample()
        last["events_ingested"] -= probes()
        stats = stack.get("/stats") or {}
        report = _report(cfg, sent, n_events, t_produced, ingested_at, embedded_at, last, stats,
                         sampler, probers, work)  # fmt: skip
        report["seconds"] = round(time.monotonic() - t_start, 1)
    finally:
        stop.set()
        if sampler is not None:
            sampler.stop.set()
        code = stack.stop()
        LOG.info("scale: stack stopped (exit %s)", code)
        bench_redis.close()
    report["stack_exit_code"] = code
    write_report(report, report_path)
    if report_path is not None:
        report["plot"] = _plot(report, report_path.with_suffix(".png"))
        write_report(report, report_path)
    return report


def _wait_for(check, timeout_s: float, stack: StackRun) -> float | None:
    """Seconds until ``check()`` holds (None at ``timeout_s``); raises if the stack exited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if stack.proc is not None and stack.proc.poll() is not None:
            raise RuntimeError(f"the stack exited ({stack.proc.returncode}); see {stack.data_dir}")
        try:
            if check():
                return time.monotonic() - t0
        except Exception as exc:  # Redis busy under load: try again
            LOG.debug("scale: check failed: %s", exc)
        time.sleep(1.0)
    return None


def _report(cfg, sent, n_events, t_produced, ingested_at, embedded_at, last, stats, sampler,
            probers, work) -> dict[str, Any]:  # fmt: skip
    rss_end = last["rss_mb"]
    total_max = sum(sampler.rss_max.values())
    embedded = last["embedded_users"]
    return {
        "users": cfg.users,
        "items": cfg.items,
        "items_seen": stats.get("items"),
        "events": sent.events,
        "events_planned": n_events,
        "messages": sent.messages,
        "failed_messages": sent.failed,
        "produce_s": round(t_produced, 1),
        "produce_events_per_s": round(sent.events / t_produced, 1) if t_produced else None,
        "ingested_s": None if ingested_at is None else round(ingested_at, 1),
        "ingest_events_per_s": None if not ingested_at else round(sent.events / ingested_at, 1),
        "events_ingested": last["events_ingested"],  # of the stream, without the probes
        "embedded_users": embedded,  # the probes' users included
        "all_embedded_s": None if embedded_at is None else round(embedded_at, 1),
        "embed_users_per_s": None if not embedded_at else round(embedded / embedded_at, 1),
        "train_pending": last["train_pending"],
        "model_version": stats.get("model_version"),
        "index_size": stats.get("index_size"),
        "cycles": cycle_times(work / "stack" / "logs" / "train-worker.log"),
        "freshness": {"new": probers[0].summary(), "existing": probers[1].summary()},
        "rss_mb": {
            k: {"max": round(sampler.rss_max[k], 1), "end": rss_end.get(k)}
            for k in sorted(sampler.rss_max)
        },  # fmt: skip
        "rss_total_max_mb": round(total_max, 1),
        "redis_used_mb": {"max": round(sampler.redis_max, 1), "end": last["redis_used_mb"]},
        # of the whole server: the run's own unless REDIS_URL names a shared one
        "redis_bytes_per_user": round(last["redis_used_mb"] * 2**20 / max(1, embedded)),
        "redis_own": "redis" in sampler.rss_max,
        "within_24gib": total_max * 2**20 < 24 * GIB,
        "config": cfg.model_dump(),
        "timeline": sampler.samples,
    }


def _plot(report: dict, path: Path) -> str | None:
    """Events ingested, users embedded and memory over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timeline"]
    if not rows:
        return None
    t = [r["t_s"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [r["events_ingested"] / 1e6 for r in rows], label="events ingested (M)")
    top.plot(t, [r["embedded_users"] / 1e6 for r in rows], label="users embedded (M)")
    top.plot(t, [r["embed_pending"] / 1e6 for r in rows], label="embed queue (M users)")
    top.legend()
    top.set_title(f"bench scale: {report['users']:,} users, {report['items']:,} items")
    names = sorted({k for r in rows for k in r["rss_mb"]})
    for name in names:
        bottom.plot(t, [r["rss_mb"].get(name, float("nan")) / 1024 for r in rows], label=name)
    bottom.plot(t, [r["redis_used_mb"] / 1024 for r in rows], "--", label="redis used_memory")
    bottom.set_ylabel("GiB")
    bottom.set_xlabel("seconds since the first message")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
