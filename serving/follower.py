"""Keep a :class:`~serving.index.UserIndex` current by following the embedding update feed.

:class:`IndexFollower` runs one daemon thread:

1. Initial load. Use the on-disk snapshot when it exists and the feed still
   holds every entry after the snapshot's feed id (no trimmed gap). Otherwise
   rebuild from :meth:`EmbeddingStore.read_all`, continuing from the feed head
   taken *before* ``read_all``: entries written meanwhile are applied twice,
   which is harmless because an upsert is idempotent and the feed is ordered.
2. Follow. ``read_updates(after=applied_id, block_ms=...)`` in a loop, each
   batch applied as one index upsert.
3. Snapshot every ``snapshot_interval_s`` when something changed, and on
   :meth:`stop`.
4. Report its position every ``report_interval_s``
   (:meth:`EmbeddingStore.register_follower`, under ``name``): the training
   worker trims the feed to what every live follower still needs. Before each
   read it checks that nothing after its position was trimmed (a follower
   silent for longer than the feed's retention) and rebuilds if so.

Redis errors are logged and retried with exponential backoff; the thread only
ends on :meth:`stop`. When the follower falls so far behind that the feed was
trimmed past ``applied_id`` it rebuilds, as at start.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis

from serving.freshness_window import FreshnessWindow
from serving.index import UserIndex
from userstream.stores import EmbeddingStore, EmbeddingUpdate, feed_covers, parse_stream_id

__all__ = ["IndexFollower", "FollowerStats", "feed_lag_s", "parse_stream_id", "SNAPSHOT_NAME"]

LOG = logging.getLogger(__name__)

SNAPSHOT_NAME = "users.snapshot"
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 10.0


def feed_lag_s(applied_id: str, head_id: str) -> float:
    """Feed time (stream ids are millisecond timestamps) ``applied_id`` is behind the head."""
    applied, head = parse_stream_id(applied_id), parse_stream_id(head_id)
    return max(0.0, (head[0] - applied[0]) / 1000.0) if head > applied else 0.0


class UserTable:
    """Per FAISS id, what the index holds: the user id, the model version and the
    ts of the newest behavior of its vector (from the feed; a rebuild from the
    embeddings reads the versions, the ts stay unknown). The similar-user path reads
    names and ids here instead of asking Redis. Written by the follower thread
    only; readers see a value before or after an update, never a torn one.

    Memory: a dict entry per user (~120 bytes) plus 16 bytes of arrays.
    """

    def __init__(self) -> None:
        self._num: dict[str, int] = {}
        self._names: list[str | None] = []
        self._version = np.full(1024, -1, dtype=np.int64)
        self._ts = np.full(1024, np.nan)

    def __len__(self) -> int:
        return len(self._num)

    def set(self, nums: list[int], users: list[str], versions: list[int | None] | None = None,
            ts: list[float | None] | None = None) -> None:  # fmt: skip
        top = max(nums)
        if top >= len(self._ts):
            size = max(top + 1, 2 * len(self._ts))
            version, stamp = np.full(size, -1, dtype=np.int64), np.full(size, np.nan)
            version[: len(self._version)], stamp[: len(self._ts)] = self._version, self._ts
            self._version, self._ts = version, stamp
        if top >= len(self._names):
            self._names.extend([None] * (top + 1 - len(self._names)))
        for n, u in zip(nums, users, strict=True):
            self._names[n] = u
            self._num[u] = n
        if versions is not None:
            self._version[nums] = [-1 if v is None else v for v in versions]
        if ts is not None:
            self._ts[nums] = [np.nan if t is None else t for t in ts]

    def remove(self, nums: list[int]) -> None:
        """Forget these ids (tombstones of forgotten users): name, version and ts."""
        for n in nums:
            if 0 <= n < len(self._names) and (name := self._names[n]) is not None:
                self._names[n] = None
                if self._num.get(name) == n:
                    del self._num[name]
            if 0 <= n < len(self._ts):
                self._version[n], self._ts[n] = -1, np.nan

    def num_of(self, user_id: str) -> int | None:
        return self._num.get(user_id)

    def newest_version(self) -> int:
        """The newest model version among the vectors held (-1: none known)."""
        return int(self._version.max()) if len(self._version) else -1

    def names_for(self, nums) -> list[str | None]:
        names = self._names
        return [names[n] if 0 <= n < len(names) else None for n in nums]

    def version_of(self, num: int) -> int | None:
        v = self._version
        return int(v[num]) if 0 <= num < len(v) and v[num] >= 0 else None

    def event_ts(self, num: int) -> float | None:
        ts = self._ts
        t = ts[num] if 0 <= num < len(ts) else np.nan
        return None if np.isnan(t) else float(t)

    # the index snapshot carries the table, so a snapshot start needs no Redis scan
    def to_bytes(self) -> bytes:
        nums = [n for n, u in enumerate(self._names) if u is not None]
        head = json.dumps({"nums": nums, "users": [self._names[n] for n in nums]}).encode()
        version = self._version[nums].astype(np.int64).tobytes()
        ts = self._ts[nums].astype(np.float64).tobytes()
        return len(head).to_bytes(8, "little") + head + version + ts

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserTable:
        n_head = int.from_bytes(raw[:8], "little")
        head = json.loads(raw[8 : 8 + n_head])
        nums, users = head["nums"], head["users"]
        k = len(nums)
        body = raw[8 + n_head :]
        if len(body) != 16 * k:
            raise ValueError(f"user table: {len(body)} bytes for {k} users")
        out = cls()
        if k:
            out.set(nums, users, np.frombuffer(body[: 8 * k], np.int64).tolist(),
                    np.frombuffer(body[8 * k :], np.float64).tolist())  # fmt: skip
        return out


@dataclass
class FollowerStats:
    """Running totals, read by the /metrics collector (plain ints, no locking needed)."""

    applied_updates: int = 0  # feed entries applied to the index
    rebuilds: int = 0  # full loads from read_all
    snapshot_loads: int = 0
    snapshots_written: int = 0
    skipped_updates: int = 0  # entries that could not be applied (e.g. wrong dimension)
    errors: int = 0  # failed loop iterations (Redis down, ...)
    forgotten: int = 0  # ids removed by tombstones (forgotten users)
    last_error: str | None = None


class IndexFollower:
    """Materialize and follow the user-embedding feed into a :class:`UserIndex`.

    ``index`` always returns the current index object; a rebuild swaps in a new
    one, so readers should fetch ``follower.index`` per request rather than keep
    it. ``start``/``stop`` run the thread; :meth:`sync_once` does one step
    synchronously for callers that drive the follower themselves (tests, batch
    tools) and must not be mixed with a running thread.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        index_dir: str | Path,
        snapshot_interval_s: float = 30.0,
        *,
        block_ms: int = 500,
        batch_size: int = 1000,
        name: str | None = None,
        report_interval_s: float = 2.0,
        index_options: dict | None = None,
    ) -> None:
        if batch_size < 1 or block_ms < 0 or snapshot_interval_s <= 0:
            raise ValueError("batch_size >= 1, block_ms >= 0 and snapshot_interval_s > 0 required")
        self.store = store
        self.snapshot_path = Path(index_dir) / SNAPSHOT_NAME
        self.snapshot_interval_s = snapshot_interval_s
        self.block_ms = block_ms
        self.batch_size = batch_size
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.report_interval_s = report_interval_s
        self.stats = FollowerStats()
        self.freshness = FreshnessWindow()  # event ts -> embedding written, last entries
        self.users = UserTable()  # who each id in the index is, and how fresh
        self.ready = threading.Event()  # set once the initial load is done
        self.index_options = dict(index_options or {})  # UserIndex(**): ivf_min, nlist, nprobe
        self._index = UserIndex(**self.index_options)
        self._applied_id = "0-0"
        self._snapshot_id: str | None = None  # feed id of the last snapshot written/loaded
        self._applied = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- state ---------------------------------------------------------------
    @property
    def index(self) -> UserIndex:
        return self._index

    @property
    def applied_id(self) -> str:
        """Stream id of the last feed entry reflected in the index ("0-0" before any)."""
        return self._applied_id

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for(self, stream_id: str, timeout: float) -> bool:
        """Block until the index reflects feed entry ``stream_id``; False on timeout."""
        target = parse_stream_id(stream_id)
        with self._applied:
            return self._applied.wait_for(
                lambda: self.ready.is_set() and parse_stream_id(self._applied_id) >= target,
                timeout,
            )

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (within about block_ms) and write a final snapshot if changed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOG.warning("index follower did not stop within %.1fs", timeout)
                return
            self._thread = None
        if self.ready.is_set():
            try:
                self.snapshot()
            except OSError:
                LOG.exception("final index snapshot to %s failed", self.snapshot_path)

    # --- steps ---------------------------------------------------------------
    def sync_once(self, block_ms: int = 0) -> int:
        """Initial load if not done yet, then apply one batch; returns entries applied.

        Waits up to ``block_ms`` for new entries (0: do not wait).
        """
        if not self.ready.is_set():
            self._initial_load()
        # entries after our position may have been trimmed while we were silent
        # (stalled, or cut off from Redis longer than the feed's retention)
        if not self._covers(self._applied_id):
            LOG.warning("update feed was trimmed past %s: rebuilding the index", self._applied_id)
            self._rebuild()
            return 0
        # XREAD BLOCK 0 would wait forever: 0 means "no BLOCK" here.
        got = self.store.read_updates(
            self._applied_id, count=self.batch_size, block_ms=block_ms or None
        )
        self._apply(got)
        return len(got)

    def report(self) -> None:
        """Tell the writer how far this follower got (what it may trim)."""
        if self.ready.is_set():
            self.store.register_follower(self.name, self._applied_id, time.time())

    def snapshot(self) -> bool:
        """Write a snapshot if anything changed since the last one; True when written."""
        feed_id = self._applied_id
        if feed_id == self._snapshot_id:
            return False
        self._index.save(self.snapshot_path, feed_id, extra=self.users.to_bytes())
        self._snapshot_id = feed_id
        self.stats.snapshots_written += 1
        return True

    # --- internals -----------------------------------------------------------
    def _run(self) -> None:
        backoff = _BACKOFF_MIN_S
        last_snapshot = last_report = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sync_once(block_ms=self.block_ms)
                if time.monotonic() - last_report >= self.report_interval_s:
                    last_report = time.monotonic()
                    self.report()
                if time.monotonic() - last_snapshot >= self.snapshot_interval_s:
                    last_snapshot = time.monotonic()
                    self.snapshot()
                backoff = _BACKOFF_MIN_S
            except (redis.RedisError, OSError) as exc:
                self._record_error(exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            except Exception as exc:  # a bug must not silently kill the follower
                LOG.exception("index follower step failed; retrying in %.1fs", backoff)
                self._record_error(exc, backoff, logged=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        LOG.info("index follower stopped at feed id %s", self._applied_id)
        try:  # a replica that stopped needs nothing kept for it
            self.store.forget_follower(self.name)
        except (redis.RedisError, OSError):
            LOG.warning("could not withdraw follower %s from the feed's list", self.name)

    def _record_error(self, exc: Exception, backoff: float, logged: bool = False) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        if not logged:
            LOG.warning("index follower: %s; retrying in %.1fs", self.stats.last_error, backoff)

    def _covers(self, feed_id: str) -> bool:
        """True when the feed still holds every entry after ``feed_id``
        (:func:`userstream.stores.feed_covers`)."""
        return feed_covers(self.store.feed_state(), feed_id)

    def _initial_load(self) -> None:
        if self._load_snapshot():
            self._mark_ready()
            return
        self._rebuild()

    def _load_snapshot(self) -> bool:
        if not self.snapshot_path.exists():
            return False
        try:
            index, feed_id, extra = UserIndex.read_snapshot(self.snapshot_path,
                                                            **self.index_options)  # fmt: skip
            users = UserTable.from_bytes(extra) if extra else UserTable()
        except (OSError, ValueError) as exc:
            LOG.warning("ignoring index snapshot %s: %s", self.snapshot_path, exc)
            return False
        head = self.store.feed_head()
        if parse_stream_id(feed_id) > parse_stream_id(head):
            LOG.warning(
                "index snapshot is at feed id %s, past the feed head %s (feed reset?): rebuilding",
                feed_id,
                head,
            )
            return False
        if not self._covers(feed_id):
            LOG.info("update feed was trimmed past the snapshot's feed id %s: rebuilding", feed_id)
            return False
        self._index, self.users = index, users
        self._snapshot_id = feed_id
        self.stats.snapshot_loads += 1
        with self._applied:
            self._applied_id = feed_id
            self._applied.notify_all()
        return True

    def _rebuild(self) -> None:
        t0 = time.perf_counter()
        head = self.store.feed_head()  # before read_all: nothing written after is missed
        users, vectors, nums, versions = self.store.read_all()
        index = UserIndex.build(nums, vectors, **self.index_options) if nums else (
            UserIndex(**self.index_options))  # fmt: skip
        table = UserTable()
        if nums:
            table.set(list(nums), list(users), versions)
        self._index, self.users = index, table
        self.stats.rebuilds += 1
        with self._applied:
            self._applied_id = head
            self._applied.notify_all()
        LOG.info(
            "index rebuilt from the embedding store: %d users, dim %s, following from %s in %.3fs",
            len(index),
            index.dim,
            head,
            time.perf_counter() - t0,
        )
        self._mark_ready()

    def _mark_ready(self) -> None:
        with self._applied:
            self.ready.set()
            self._applied.notify_all()

    def _apply(self, updates: list[EmbeddingUpdate]) -> None:
        if not updates:
            return
        last_id = updates[-1].stream_id
        # tombstones (forgotten users) win over upserts of the same id in the batch:
        # an id is never assigned again, so a later upsert of it is a stale write
        gone = list(dict.fromkeys(u.num for u in updates if u.deleted))
        if gone:
            drop = set(gone)
            updates = [u for u in updates if u.num not in drop]
        dim = self._index.dim
        good = [u for u in updates if dim is None or u.vector.shape[0] == dim]
        if good and dim is None:  # first vectors ever: they fix the dimension
            dim = good[0].vector.shape[0]
            good = [u for u in good if u.vector.shape[0] == dim]
        if len(good) < len(updates):
            self.stats.skipped_updates += len(updates) - len(good)
            LOG.error(
                "skipped %d feed entries whose dimension differs from the index (%s)",
                len(updates) - len(good),
                dim,
            )
        if good:
            self._index.upsert([u.num for u in good], np.stack([u.vector for u in good]))
            self.users.set([u.num for u in good], [u.user_id for u in good],
                           [u.version for u in good], [u.event_ts for u in good])  # fmt: skip
        self.stats.applied_updates += len(good)
        self.freshness.observe((u.stream_id, u.event_ts) for u in good)
        if gone:
            self._index.delete(gone)
            self.users.remove(gone)
            self.stats.forgotten += len(gone)
        with self._applied:
            self._applied_id = last_id
            self._applied.notify_all()
        if gone and self._thread is not None:  # the last snapshot still holds them
            self.snapshot()
