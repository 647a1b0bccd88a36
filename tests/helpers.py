"""What several test modules share: waiting on a condition, small settings, and a
real `userstream up` stack to test against."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from userstream.embedded import free_port
from userstream.settings import Settings

T = TypeVar("T")

# a learner small enough for unit tests (seconds on one CPU thread)
TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, dropout=0.0, device="cpu")


def tiny_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with a :data:`TINY_MODEL` learner whose files live in ``tmp_path``."""
    return Settings(**{"data_dir": tmp_path, **TINY_MODEL, **overrides})


def stream_settings(
    data_dir: Path, kafka: str, redis_url: str, redis_prefix: str, **overrides: Any
) -> Settings:
    """Settings for a stream worker under test: its own topics and consumer group."""
    tag = uuid.uuid4().hex[:8]
    return Settings(**{
        "data_dir": data_dir, "kafka_bootstrap_servers": kafka, "redis_url": redis_url,
        "redis_prefix": redis_prefix, "events_topic": f"ev-{tag}", "dlq_topic": f"dlq-{tag}",
        "stream_app_id": f"stream-test-{tag}", "topic_partitions": 2,
        "stream_batch_within_s": 0.05, **overrides,
    })  # fmt: skip


def wait_until(
    check: Callable[[], T],
    timeout_s: float = 20.0,
    what: str = "the condition",
    proc: subprocess.Popen | None = None,
    poll_s: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something true and return that.

    Fails at once when ``proc`` exits, and after ``timeout_s`` with ``what``,
    the last value seen and ``details()`` (e.g. log tails). Exceptions in
    ``ignore`` count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        try:
            last = check()
            if last:
                return last
        except ignore:
            pass
        if time.monotonic() > deadline:
            extra = details() if details is not None else ""
            raise AssertionError(
                f"timed out after {timeout_s:.0f}s waiting for {what} (last={last!r}){extra}"
            )
        time.sleep(poll_s)


def stack_logs(data_dir: Path, lines: int = 20) -> str:
    """The tails of a stack's logs (``up.log`` and ``logs/*``), for a failure message."""
    out = ""
    for f in [data_dir / "up.log", *sorted((data_dir / "logs").glob("*.log"))]:
        if f.is_file():
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out += f"\n--- {f.name} ---\n" + "\n".join(tail)
    return out


def kill_leftovers(state_path: Path) -> None:
    """Children a failed test left running (each leads its own process group)."""
    try:
        children = json.loads(state_path.read_text())["children"].values()
    except (OSError, ValueError):
        return
    for c in children:
        if c.get("pid") is not None:
            try:
                os.killpg(c["pid"], signal.SIGKILL)
            except OSError:
                pass


@contextmanager
def running_stack(data_dir: Path, redis_url: str, **settings: str) -> Iterator[dict[str, Any]]:
    """``userstream up`` on its own ports, Redis prefix and consumer group, with
    ``settings`` (environment variables) on top; yields {proc, env, client,
    data_dir, state} once the API is healthy; on exit stops it (SIGTERM), records
    ``exit_code`` and deletes the stack's Redis keys."""
    import httpx
    import redis

    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"stack-{uuid.uuid4().hex[:8]}:",
        "EMBEDDED_KAFKA_PORT": str(free_port()),
        "API_PORT": str(port),
        "STREAM_METRICS_PORT": str(free_port()),
        "TRAIN_METRICS_PORT": str(free_port()),
        "TOPIC_PARTITIONS": "2",
        "STREAM_APP_ID": f"stack-{uuid.uuid4().hex[:8]}",
        "TRAIN_INTERVAL_S": "2",
        "TRAIN_STEPS": "8",
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    log = open(data_dir / "up.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "userstream", "up"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    state_path = data_dir / "supervisor.json"
    info: dict[str, Any] = {"proc": proc, "env": env, "client": client, "data_dir": data_dir}
    info["state"] = lambda: json.loads(state_path.read_text())
    try:
        wait_until(lambda: client.get("/healthz").status_code == 200, 180, "a healthy API",
                   proc, poll_s=0.5, details=lambda: stack_logs(data_dir),
                   ignore=(httpx.HTTPError, OSError))  # fmt: skip
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            info["exit_code"] = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            info["exit_code"] = None
        log.close()
        client.close()
        kill_leftovers(state_path)
        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"{env['REDIS_PREFIX']}*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])
        r.close()


def produce_raw(
    env: dict[str, str], key: bytes, payload: bytes, topic: str = "behavior-events"
) -> None:
    """One message to a running stack's embedded broker (acknowledged)."""
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{env['EMBEDDED_KAFKA_PORT']}")
        await producer.start()
        try:
            await producer.send_and_wait(topic, payload, key=key)
        finally:
            await producer.stop()

    asyncio.run(send())
