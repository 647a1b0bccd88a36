"""The load of a soak run: the producer of valid and invalid messages, and the
probes that time how long a new user waits for its embedding."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from userstream.soak import Sent, SoakConfig, StackRun

__all__ = ["HOSTILE", "Producer", "probe"]

HOSTILE = (  # invalid messages of every kind the stream worker must dead-letter
    b'{"user_id": "x", "item_id": "i", "behavior": "view"}',  # no ts
    b"not json at all",
    b"\xff\xfe\x00 not utf-8",
    b"[" * 3000 + b"]" * 3000,  # nested beyond any limit
    b'{"user_id": "x", "item_id": "i", "behavior": "view", "ts": ' + b"9" * 400 + b"}",
    b'{"user_id": "' + b"7" * 1000 + b'", "item_id": "i", "behavior": "view", "ts": 1}',
    b'{"user_id": "   ", "item_id": "i", "behavior": "view", "ts": 1700000000}',
    b'{"user_id": "x", "item_id": "i", "behavior": "view", "ts": 0}',
    b"[]",
)


class Producer(threading.Thread):
    """Steady load: one valid event per message at ``rate``, an invalid message
    every ``invalid_every``. Sends are pipelined (up to ``WINDOW`` unacknowledged)
    and a message counts as sent only once the broker acknowledged it, in send
    order; when sends fail (the broker is restarting) a new producer takes over
    and the failed messages are not counted. A message whose acknowledgement was
    lost may still arrive: the checks ignore such extras."""

    WINDOW = 2000

    def __init__(self, bootstrap: str, topic: str, cfg: SoakConfig, users: int, sent: Sent):
        super().__init__(name="soak-producer", daemon=True)
        self.bootstrap, self.topic, self.cfg = bootstrap, topic, cfg
        self.users, self.sent = users, sent
        self.rng = random.Random(cfg.seed)
        self.go = threading.Event()  # cleared = paused
        self.go.set()
        self.idle = threading.Event()  # set while paused with nothing in flight
        self.probe_gate = threading.Lock()  # held by the prober while a probe is in flight
        self.stop = threading.Event()
        self.seq = 0
        self.errors = 0
        self.t0 = time.time() - 60.0  # each event 1 ms after the last: unique, never ahead
        self._pending: deque = deque()  # (future, user or None, event identity)

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = None
        t_next = time.monotonic()
        while not self.stop.is_set():
            if not self.go.is_set():
                if producer is not None:
                    producer = self._settle(producer, wait=True)
                self.idle.set()
                self.go.wait(0.2)
                t_next = time.monotonic()
                continue
            self.idle.clear()
            if producer is None:
                try:
                    producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks=1,
                                             linger_ms=5, retries=0, request_timeout_ms=5000)  # fmt: skip
                except Exception:  # the broker is restarting
                    self.errors += 1
                    time.sleep(0.5)
                    continue
            t_next += 1.0 / self.cfg.rate
            delay = t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:  # fell behind (paused, restarting): do not burst
                t_next = time.monotonic()
            key, value, user, ident = self._next_message()
            try:
                self._pending.append((producer.send(self.topic, value=value, key=key), user, ident))
            except Exception:
                self.errors += 1
                producer = self._settle(producer, wait=True, broken=True)
                continue
            producer = self._settle(producer, wait=len(self._pending) >= self.WINDOW)
        if producer is not None:
            self._settle(producer, wait=True)

    def _next_message(self) -> tuple[bytes, bytes, str | None, str | None]:
        self.seq += 1
        if self.seq % self.cfg.invalid_every == 0:
            return b"bad", HOSTILE[self.seq % len(HOSTILE)], None, None
        user = f"s{self.rng.randrange(self.users)}"
        ms = round(self.t0 * 1000) + self.seq  # the event's identity
        item = f"i{int(self.rng.paretovariate(1.2)) % self.cfg.items}"
        body = {"user_id": user, "item_id": item, "behavior": "view", "ts": ms / 1000}
        return user.encode(), json.dumps(body).encode(), user, str(ms)

    def _settle(self, producer, wait: bool, broken: bool = False):
        """Count what was acknowledged, in order; with ``wait`` until nothing is in
        flight. Returns the producer, or None when it must be replaced."""
        if wait and not broken:
            try:
                producer.flush(timeout=15)
            except Exception:
                broken = True
        while self._pending:
            fut, user, ident = self._pending[0]
            if not fut.is_done:
                if not wait:
                    break
                try:
                    fut.get(timeout=15)
                except Exception:
                    pass
            self._pending.popleft()
            if fut.succeeded():
                with self.sent.lock:
                    if user is None:
                        self.sent.invalid += 1
                    else:
                        self.sent.valid += 1
                        self.sent.per_user[user].append(ident)
            else:
                self.errors += 1
                broken = True
        if broken:
            try:
                producer.close(timeout=1)
            except Exception:
                pass
            time.sleep(0.5)
            return None
        return producer


def probe(stack: StackRun, load: Producer, stop: threading.Event, every_s: float,
          waits: list[float], sent: Sent) -> None:  # fmt: skip
    """A new user every ``every_s``: the time until the API serves its embedding.

    Probes pause with the load (``load.go``), and a probe in flight holds
    ``load.probe_gate``: a fault that restarts the memory-only broker takes the
    gate after pausing the load, so no acknowledged probe dies with the broker."""
    from kafka import KafkaProducer

    n = 0
    while not stop.wait(every_s):
        with load.probe_gate:
            if not load.go.is_set():
                continue  # paused for a broker or stack restart
            n += 1
            user = f"probe-{n}"
            body = {"user_id": user, "item_id": "probe-item", "behavior": "view",
                    "ts": time.time()}  # fmt: skip
            t0 = time.monotonic()
            try:
                producer = KafkaProducer(bootstrap_servers=load.bootstrap, acks=1,
                                         request_timeout_ms=5000)  # fmt: skip
                producer.send(load.topic, value=json.dumps(body).encode(),
                              key=user.encode()).get(10)  # fmt: skip
                producer.close(timeout=2)
            except Exception:
                continue  # the broker is restarting; the next probe tries again
            with sent.lock:
                sent.probes += 1
        while not stop.is_set():
            if stack.get(f"/users/{user}/embedding") is not None:
                waits.append(time.monotonic() - t0)
                break
            time.sleep(0.25)
