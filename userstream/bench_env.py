"""What a benchmark of the running service needs around it: a Redis of its own
(or the configured one) under a prefix of its own, the environment of the
processes it starts, the RSS of a process, and its JSON report on disk.

``bench soak``, ``bench freshness`` and ``bench query`` share these, so every
run cleans up the same way: its Redis keys are deleted and a Redis it started
is stopped, whatever happened.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import redis

from userstream.embedded import free_port, start_redis
from userstream.settings import Settings
from userstream.stores import connect

__all__ = ["BenchRedis", "child_env", "exit_on_sigterm", "rss_mb", "write_report"]

LOG = logging.getLogger(__name__)


def exit_on_sigterm() -> None:
    """In the main thread: a SIGTERM (a timeout, a supervisor's stop) becomes
    ``SystemExit``, so the ``finally`` blocks stop what the run started."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


class BenchRedis:
    """The run's Redis: ``settings.redis_url``, else a bundled redis-server of its
    own in ``work``; keys under ``<tag>-<random>:``. :meth:`close` (or leaving
    it as a context manager) deletes those keys from a shared server, or stops
    its own and deletes its data (a million users leave ~1 GB of AOF), and
    closes the client; the run's logs stay in ``work``."""

    def __init__(
        self, settings: Settings, work: Path, tag: str, socket_timeout: float = 30
    ) -> None:
        self.own: subprocess.Popen | None = None
        self.url = settings.redis_url
        if not self.url:
            port = free_port()
            self.own_dir = work / "redis"
            self.own = start_redis(port, self.own_dir, work / "redis.log")
            self.url = f"redis://127.0.0.1:{port}/0"
        self.tag = tag
        self.prefix = f"{tag}-{uuid.uuid4().hex[:8]}:"
        self.client: redis.Redis = connect(self.url, socket_timeout=socket_timeout)

    def __enter__(self) -> BenchRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.own is None:  # a shared server: delete this run's keys, in batches
            try:
                batch: list[str] = []
                for k in self.client.scan_iter(match=f"{self.prefix}*", count=10_000):
                    batch.append(k)
                    if len(batch) >= 10_000:
                        self.client.unlink(*batch)
                        batch.clear()
                if batch:
                    self.client.unlink(*batch)
            except Exception:
                LOG.warning("%s: could not delete the run's Redis keys", self.tag)
        self.client.close()
        if self.own is not None:
            if self.own.poll() is None:
                os.kill(self.own.pid, signal.SIGCONT)  # a run may have paused it
            self.own.terminate()
            self.own.wait(10)
            shutil.rmtree(self.own_dir, ignore_errors=True)


def child_env(settings: Settings, data_dir: Path, store: BenchRedis) -> tuple[dict[str, str], str]:
    """(environment, Kafka bootstrap) of the processes a run starts: its Redis and
    prefix, its data dir, free ports for the embedded broker and the API, a
    consumer group of its own; ``USERSTREAM_CONFIG`` is not inherited."""
    kafka_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "USERSTREAM_CONFIG"},
        "DATA_DIR": str(data_dir),
        "REDIS_URL": store.url,
        "REDIS_PREFIX": store.prefix,
        "EMBEDDED_KAFKA_PORT": str(kafka_port),
        "API_PORT": str(free_port()),
        "STREAM_APP_ID": f"{store.tag}-{uuid.uuid4().hex[:8]}",
        "PYTHONUNBUFFERED": "1",
    }
    if settings.kafka_bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    else:
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return env, settings.kafka_bootstrap_servers or f"127.0.0.1:{kafka_port}"


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MiB (None when it is not running)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_report(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
