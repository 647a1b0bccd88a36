"""``userstream bench soak``: the real stack under load while its processes are hurt.

:func:`run_soak` starts ``userstream up`` (the embedded broker, or
``KAFKA_BOOTSTRAP_SERVERS``) against a Redis of its own (a bundled
``redis-server`` it can pause; or ``REDIS_URL``), produces a steady load of
valid events mixed with invalid messages, and meanwhile, at random times:

* kills a process of the stack with SIGKILL (stream worker, training worker,
  API; the supervisor restarts it);
* restarts the embedded broker (SIGKILL; the supervisor starts a new, empty
  one and the stream worker after it);
* pauses Redis (SIGSTOP, then SIGCONT);
* restarts the whole stack (SIGTERM to ``userstream up``, then a new one).

The embedded broker keeps its topics in memory, so what it holds unconsumed
dies with it: before a broker or stack restart the producer pauses and the
pipeline catches up, so a lost event means one the pipeline lost. Items come
from a catalogue of ``items`` (popular ones more often, as in a shop), and each
valid event carries a timestamp of its own (a millisecond apart, stored to the
millisecond): with fewer events per user than the stored window, the stored
sequences say exactly which events were lost or applied twice.

Probes: a new user every few seconds gets one event; the time until the API
serves an embedding for it is a refresh wait (``max_refresh_wait_s``).

The report (JSON) has ``ok`` (nothing lost, dropped or duplicated, every
invalid message dead-lettered, every process up at the end), ``valid_sent``,
``valid_ingested``, ``valid_lost``, ``valid_duplicated``,
``dropped_as_duplicate``, ``invalid_sent``, ``invalid_dead_lettered``,
``restarts`` (per process), ``faults`` (what was done when),
``max_refresh_wait_s``, ``rss_mb`` (per process: start, after 5 minutes, end,
and ``rss_ok``: end within 1.5x of the 5-minute value) and the settings used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from userstream.bench_env import BenchRedis, child_env, exit_on_sigterm, rss_mb, write_report
from userstream.settings import Settings
from userstream.soak_load import Producer, probe
from userstream.stores import CHANGE_QUEUES, RedisEmbeddingStore, RedisSequenceStore
from userstream.types import Keys

__all__ = ["SoakConfig", "run_soak"]

LOG = logging.getLogger(__name__)

KILLABLE = ("stream-worker", "train-worker", "api")


class SoakConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    minutes: float = Field(30.0, gt=0, description="how long the load runs")
    rate: float = Field(
        500.0, gt=0, le=1000, description="valid events per second (event times 1 ms apart)"
    )
    invalid_every: int = Field(50, ge=2, description="one invalid message per this many")
    kills: int = Field(10, ge=0, description="SIGKILLs of stack processes")
    broker_restarts: int = Field(2, ge=0, description="restarts of the embedded broker")
    redis_pauses: int = Field(2, ge=0, description="SIGSTOPs of Redis (its own only)")
    redis_pause_s: float = Field(10.0, gt=0, description="seconds each pause lasts")
    stack_restarts: int = Field(2, ge=0, description="restarts of the whole stack")
    probe_every_s: float = Field(5.0, gt=0, description="a new probe user this often")
    drain_timeout_s: float = Field(300.0, gt=0, description="longest wait to catch up")
    items: int = Field(5000, ge=1, description="size of the item catalogue")
    seed: int = Field(0, description="seed of the load and of the fault times")


@dataclass
class Sent:
    """What the producer got acknowledged, per user in order."""

    per_user: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    valid: int = 0
    invalid: int = 0
    probes: int = 0  # probe events (valid, ingested, not in per_user)
    lock: threading.Lock = field(default_factory=threading.Lock)


class StackRun:
    """One ``userstream up`` process and what its supervisor.json says."""

    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{env['API_PORT']}"
        self.restarts: dict[str, int] = defaultdict(int)  # summed over stack runs
        self.killed: dict[str, int] = {}  # name -> the pid the soak last killed

    def start(self, timeout_s: float = 240.0) -> None:
        log = open(self.data_dir / "up.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userstream", "up"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait(lambda: self.get("/healthz") is not None, timeout_s, "the API", self.proc)

    def stop(self, timeout_s: float = 120.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self._add_restarts()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / "supervisor.json").read_text())
        except (OSError, ValueError):
            return {}

    def pid(self, name: str) -> int | None:
        return self.state().get("children", {}).get(name, {}).get("pid")

    def restart_counts(self) -> dict[str, int]:
        now = {n: int(c.get("restarts", 0)) for n, c in self.state().get("children", {}).items()}
        return {n: self.restarts[n] + now.get(n, 0) for n in set(self.restarts) | set(now)}

    def _add_restarts(self) -> None:
        for n, c in self.state().get("children", {}).items():
            self.restarts[n] += int(c.get("restarts", 0))

    def rss_mb(self, own_redis: subprocess.Popen | None = None) -> dict[str, float | None]:
        """Resident MiB of every child of the stack, of ``own_redis`` (as "redis")
        and of the supervisor; None for one not running."""
        out = {name: rss_mb(child.get("pid"))
               for name, child in self.state().get("children", {}).items()}  # fmt: skip
        if own_redis is not None:
            out["redis"] = rss_mb(own_redis.pid)
        out["supervisor"] = rss_mb(self.proc.pid if self.proc else None)
        return out

    def all_up(self) -> bool:
        children = self.state().get("children", {})
        return bool(children) and all(c.get("up") for c in children.values())

    def get(self, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None


def _wait(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"userstream up exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f}s")
        time.sleep(0.25)


def run_soak(settings: Settings, cfg: SoakConfig, report_path: Path | None = None) -> dict:
    """Run the soak described in the module docstring; returns (and writes) the report."""
    exit_on_sigterm()  # a timeout or Ctrl-C from a supervisor still stops the stack
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    rng = random.Random(cfg.seed)
    bench_redis = BenchRedis(settings, work, "soak")
    own_redis, client = bench_redis.own, bench_redis.client
    env, bootstrap = child_env(settings, work / "stack", bench_redis)
    (work / "stack").mkdir(parents=True)
    total = int(cfg.rate * cfg.minutes * 60)
    users = max(10, math.ceil(total / (settings.sequence_length / 2)))  # ~half a window each
    store = RedisSequenceStore(
        client, Keys.of_settings(settings, prefix=bench_redis.prefix), settings.sequence_length
    )
    stack = StackRun(env, work / "stack")
    sent = Sent()
    faults: list[dict[str, Any]] = []
    rss: dict[str, dict[str, float | None]] = defaultdict(dict)
    waits: list[float] = []
    producer = Producer(bootstrap, settings.events_topic, cfg, users, sent)
    stop_probe = threading.Event()
    try:
        stack.start()
        LOG.info("soak: stack up in %.0fs; %d users, %d events planned", time.monotonic() - t_start,
                 users, total)  # fmt: skip
        _sample_rss(stack, own_redis, rss, "start")
        producer.start()
        prober = threading.Thread(target=probe, args=(stack, producer, stop_probe,
                                  cfg.probe_every_s, waits, sent), daemon=True)  # fmt: skip
        prober.start()
        plan = _plan(cfg, rng)
        t0 = time.monotonic()
        duration = cfg.minutes * 60
        sampled_5min = False
        for at, kind in plan:
            while time.monotonic() - t0 < at:
                if not sampled_5min and time.monotonic() - t0 >= min(300.0, duration / 2):
                    _sample_rss(stack, own_redis, rss, "at_5min")
                    sampled_5min = True
                time.sleep(0.5)
            faults.append(_fault(kind, stack, own_redis, producer, store, sent, cfg, rng,
                                 time.monotonic() - t0))  # fmt: skip
            LOG.info("soak: %s", faults[-1])
        while time.monotonic() - t0 < duration:
            if not sampled_5min and time.monotonic() - t0 >= min(300.0, duration / 2):
                _sample_rss(stack, own_redis, rss, "at_5min")
                sampled_5min = True
            time.sleep(0.5)
        producer.stop.set()
        producer.join(30)
        stop_probe.set()
        drained = _drain(store, sent, cfg.drain_timeout_s)
        settled = _settle(stack, store, cfg.drain_timeout_s)
        _sample_rss(stack, own_redis, rss, "end")
        report = _report(cfg, settings, store, sent, stack, faults, rss, waits, users,
                         drained, settled, time.monotonic() - t_start)  # fmt: skip
        report["producer_errors"] = producer.errors
    finally:
        producer.stop.set()
        stop_probe.set()
        if own_redis is not None:
            os.kill(own_redis.pid, signal.SIGCONT)
        code = stack.stop()
        LOG.info("soak: stack stopped (exit %s)", code)
        bench_redis.close()
    report["stack_exit_code"] = code
    write_report(report, report_path)
    return report


def _plan(cfg: SoakConfig, rng: random.Random) -> list[tuple[float, str]]:
    """(seconds from the start, fault) in time order, spread over the run's middle."""
    kinds = (["kill"] * cfg.kills + ["broker"] * cfg.broker_restarts
             + ["redis"] * cfg.redis_pauses + ["stack"] * cfg.stack_restarts)  # fmt: skip
    rng.shuffle(kinds)
    duration = cfg.minutes * 60
    slots = len(kinds) + 1
    step = duration / (slots + 1)
    return sorted((step * (i + 1) + step * rng.uniform(-0.3, 0.3), k) for i, k in enumerate(kinds))


def _fault(kind, stack, own_redis, producer, store, sent, cfg, rng, at) -> dict[str, Any]:
    t0 = time.monotonic()
    out: dict[str, Any] = {"at_s": round(at, 1), "kind": kind}
    if kind == "kill":
        name = rng.choice(KILLABLE)
        # a process killed a moment ago may still be restarting: wait for it to run
        last = stack.killed.get(name)
        pid = _wait(lambda: (p := stack.pid(name)) != last and p, 120, f"{name} to run", stack.proc)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it died on its own meanwhile; the supervisor has it
            out["missed"] = True
        stack.killed[name] = pid
        out.update(process=name, pid=pid)
    elif kind == "redis":
        if own_redis is None:
            out["skipped"] = "REDIS_URL is external: not paused"
        else:
            os.kill(own_redis.pid, signal.SIGSTOP)
            time.sleep(cfg.redis_pause_s)  # the fault itself: Redis does not answer
            os.kill(own_redis.pid, signal.SIGCONT)
    elif kind in ("broker", "stack"):
        # what the memory-only broker holds unconsumed dies with it: catch up first
        producer.go.clear()
        out["paused"] = producer.idle.wait(60)
        with producer.probe_gate:  # a probe in flight is acknowledged (and counted) first
            pass
        out["drained"] = _drain(store, sent, cfg.drain_timeout_s)
        if kind == "broker":
            pid = stack.pid("broker")
            if pid:
                os.kill(pid, signal.SIGKILL)
            out["pid"] = pid
        else:
            out["exit_code"] = stack.stop()
            stack.start()
        producer.go.set()
    out["took_s"] = round(time.monotonic() - t0, 1)
    return out


def _drain(store: RedisSequenceStore, sent: Sent, timeout_s: float) -> bool:
    """Wait until everything acknowledged is applied or dead-lettered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            c = store.counters()
        except Exception:
            time.sleep(0.5)
            continue
        with sent.lock:
            want_valid, want_invalid = sent.valid + sent.probes, sent.invalid
        if c["events_ingested"] >= want_valid and c["events_dead_lettered"] >= want_invalid:
            return True
        time.sleep(0.5)
    return False


def _settle(stack: StackRun, store: RedisSequenceStore, timeout_s: float) -> float | None:
    """Seconds until every changed user is embedded (nothing pending), or None."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        try:
            pending = sum(store.dirty_count(q) + store.claimed_count(q) for q in CHANGE_QUEUES)
            if pending == 0 and stack.all_up():
                return time.monotonic() - t0
        except Exception:
            pass
        time.sleep(0.5)
    return None


def _sample_rss(stack, own_redis, rss, when: str) -> None:
    for name, mb in stack.rss_mb(own_redis).items():
        rss[name][when] = mb


def _report(cfg, settings, store, sent, stack, faults, rss, waits, users, drained, settled,
            wall_s) -> dict[str, Any]:  # fmt: skip
    stored = dict(zip(sent.per_user, store.read_many(list(sent.per_user)), strict=True))
    lost = duplicated = 0
    examples: dict[str, list[str]] = {"lost": [], "duplicated": []}
    for user, items in sent.per_user.items():
        have = [str(round(b.ts * 1000)) for b in stored[user]]
        counts: dict[str, int] = defaultdict(int)
        for item in have:
            counts[item] += 1
        twice = [i for i, n in counts.items() if n > 1]
        duplicated += sum(counts[i] - 1 for i in twice)
        kept = items[-settings.sequence_length :]  # the window holds the newest only
        missing = [i for i in kept if i not in counts]
        lost += len(missing)
        examples["lost"] += [f"{user}:{i}" for i in missing][: 10 - len(examples["lost"])]
        examples["duplicated"] += [f"{user}:{i}" for i in twice][: 10 - len(examples["duplicated"])]
    c = store.counters()
    emb = RedisEmbeddingStore(store.r, store.keys)
    unembedded = sum(1 for u in sent.per_user if emb.get(u) is None)
    for name in rss:
        five, end = rss[name].get("at_5min"), rss[name].get("end")
        rss[name]["rss_ok"] = None if not five or not end else end <= 1.5 * five
    ok = (
        drained and lost == 0 and duplicated == 0 and c["events_dead_lettered"] == sent.invalid
        and stack.all_up() and settled is not None and unembedded == 0
    )  # fmt: skip
    return {
        "ok": bool(ok),
        "valid_sent": sent.valid,
        "valid_ingested": c["events_ingested"] - sent.probes,
        "probe_events": sent.probes,
        "valid_lost": lost,
        "valid_duplicated": duplicated,
        # after the final drain every message was consumed: a missing event was skipped
        "dropped_as_duplicate": lost if drained else None,
        "events_duplicate_skipped": c["events_duplicate_skipped"],
        "offset_log_resets": c["offset_log_resets"],
        "invalid_sent": sent.invalid,
        "invalid_dead_lettered": c["events_dead_lettered"],
        "users": users,
        "users_without_embedding": unembedded,
        "restarts": stack.restart_counts(),
        "faults": faults,
        "max_refresh_wait_s": round(max(waits), 2) if waits else None,
        "refresh_waits": len(waits),
        "settle_s": None if settled is None else round(settled, 1),
        "rss_mb": {k: dict(v) for k, v in rss.items()},
        "drained": drained,
        "examples": examples,  # up to 10 lost and 10 applied-twice events, user:ms
        "config": cfg.model_dump(),
        "producer_errors": None,
        "wall_s": round(wall_s, 1),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
