"""User embeddings in Redis plus an append-only update feed (a Redis Stream).

Embeddings and FAISS ids live in the user's shard (:class:`~userstream.types.ShardKeys`),
beside its sequence; ids are ``count * shards + shard``, so every shard assigns
its own without asking another. The model info, the feed and the followers are
single keys.

The training worker is the only writer. API replicas materialize their FAISS
index from :meth:`RedisEmbeddingStore.read_all` once, then follow the feed with
:meth:`RedisEmbeddingStore.read_updates` from the last stream id they applied.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from userstream.stores.client import Scripts, require_text_client, to_bytes
from userstream.stores.contracts import CYCLE_HISTORY, EmbeddingUpdate, FeedState, ModelInfo
from userstream.stores.redis_sequences import check_layout
from userstream.types import Keys

__all__ = ["RedisEmbeddingStore"]


# assign ids: KEYS = user_num, user_num_rev, user_num_next; ARGV = shards, shard,
# user ids. Returns one id per user (an existing one, or the shard's next free one).
_ASSIGN_LUA = """
local shards = tonumber(ARGV[1])
local shard = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV do
  local u = ARGV[i]
  local n = redis.call('HGET', KEYS[1], u)
  if not n then
    n = redis.call('INCR', KEYS[3]) * shards + shard
    redis.call('HSET', KEYS[1], u, n)
    redis.call('HSET', KEYS[2], n, u)
  end
  out[i - 2] = tonumber(n)
end
return out
"""
_ASSIGN_CHUNK = 10_000

# forget: KEYS = emb, user_num, user_num_rev (one shard: one slot); ARGV = user,
# ids the feed named it by. Erases its embedding and ids; returns {had an
# embedding (0/1), its id or -1}.
_FORGET_LUA = """
local had = redis.call('HDEL', KEYS[1], ARGV[1])
local n = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if n then redis.call('HDEL', KEYS[3], n) end
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[i]) end
end
return {had, tonumber(n or -1)}
"""
_FEED_SCAN = 10_000  # feed entries per XRANGE of a forget


def _vector(raw: str) -> np.ndarray:
    return np.frombuffer(to_bytes(raw), dtype=np.float32)


# A stored embedding: version (uint32) and event ts (float64, NaN for none), then
# the float32 vector; one hash field per user instead of three.
_HEADER = struct.Struct("<Id")


def _stored(version: int, event_ts: float | None, vector: np.ndarray) -> bytes:
    ts = math.nan if event_ts is None else float(event_ts)
    return _HEADER.pack(version, ts) + vector.tobytes()


def _header(raw: str) -> tuple[int, float | None]:
    version, ts = _HEADER.unpack_from(to_bytes(raw))  # whole: a char may be several bytes
    return version, (None if math.isnan(ts) else ts)


def _stored_vector(raw: str) -> np.ndarray:
    return np.frombuffer(to_bytes(raw), dtype=np.float32, offset=_HEADER.size)


class RedisEmbeddingStore:
    """:class:`~userstream.stores.EmbeddingStore` on Redis (a client from
    :func:`userstream.stores.connect`)."""

    def __init__(self, client: redis.Redis, keys: Keys, feed_maxlen: int = 2_000_000) -> None:
        self.r = require_text_client(client)
        self.keys = keys
        self.feed_maxlen = feed_maxlen
        self.shards = keys.all_shards()
        self._layout_checked = False
        self._scripts = Scripts(client)
        self._assign = client.register_script(_ASSIGN_LUA)
        self._forget = client.register_script(_FORGET_LUA)

    def _check_layout(self) -> None:
        """Once, at the first id assignment or full read (not in __init__: a store is
        built while Redis may still be down)."""
        if not self._layout_checked:
            check_layout(self.r, self.keys)
            self._layout_checked = True

    def _group(self, user_ids: Sequence[str]) -> dict[int, list[int]]:
        """shard -> positions in ``user_ids``."""
        out: dict[int, list[int]] = {}
        for i, u in enumerate(user_ids):
            out.setdefault(self.keys.shard_of(u), []).append(i)
        return out

    def _hmget(self, user_ids: Sequence[str], key_of) -> list[str | None]:
        """One field per user from its shard's hash ``key_of(shard keys)``."""
        out: list[str | None] = [None] * len(user_ids)
        groups = [(s, pos[i : i + 50_000]) for s, pos in self._group(user_ids).items()
                  for i in range(0, len(pos), 50_000)]  # fmt: skip
        pipe = self.r.pipeline(transaction=False)
        for s, pos in groups:
            pipe.hmget(key_of(self.shards[s]), [user_ids[i] for i in pos])
        for (_, pos), got in zip(groups, pipe.execute(), strict=True):
            for i, v in zip(pos, got, strict=True):
                out[i] = v
        return out

    # --- ids ---------------------------------------------------------------
    def nums_for(self, user_ids: Sequence[str]) -> list[int]:
        """One HMGET per shard for all; the unknown ones get ids in one script call
        per shard and 10,000 users (atomic, so concurrent writers agree on every id)."""
        if not user_ids:
            return []
        self._check_layout()
        known = self._hmget(user_ids, lambda sk: sk.user_num)
        missing = list(dict.fromkeys(u for u, n in zip(user_ids, known, strict=True) if n is None))
        calls, chunks = [], []
        for s, pos in self._group(missing).items():
            sk = self.shards[s]
            for start in range(0, len(pos), _ASSIGN_CHUNK):
                chunk = [missing[i] for i in pos[start : start + _ASSIGN_CHUNK]]
                keys = [sk.user_num, sk.user_num_rev, sk.user_num_next]
                calls.append((self._assign, keys, [len(self.shards), s, *chunk]))
                chunks.append(chunk)
        assigned: dict[str, int] = {}
        for chunk, nums in zip(chunks, self._scripts.run(calls), strict=True):
            assigned.update(zip(chunk, (int(n) for n in nums), strict=True))
        return [
            int(n) if n is not None else assigned[u] for u, n in zip(user_ids, known, strict=True)
        ]

    def num_of(self, user_id: str) -> int | None:
        raw = self.r.hget(self.keys.of(user_id).user_num, user_id)
        return None if raw is None else int(raw)

    def lookup(self, user_id: str) -> tuple[int | None, int | None]:
        sk = self.keys.of(user_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(sk.user_num, user_id)
        pipe.hget(sk.emb, user_id)
        num, raw = pipe.execute()
        return (None if num is None else int(num)), (None if raw is None else _header(raw)[0])

    def count(self) -> int:
        pipe = self.r.pipeline(transaction=False)
        for sk in self.shards:
            pipe.hlen(sk.emb)
        return sum(int(n) for n in pipe.execute())

    def users_for(self, nums: Sequence[int]) -> list[str | None]:
        if not nums:
            return []
        n_shards = len(self.shards)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(nums):
            groups.setdefault(int(n) % n_shards, []).append(i)
        out: list[str | None] = [None] * len(nums)
        pipe = self.r.pipeline(transaction=False)
        for s, pos in groups.items():
            pipe.hmget(self.shards[s].user_num_rev, [int(nums[i]) for i in pos])
        for pos, got in zip(groups.values(), pipe.execute(), strict=True):
            for i, u in zip(pos, got, strict=True):
                out[i] = u
        return out

    # --- writes (training worker) ------------------------------------------
    def upsert(
        self,
        user_ids: Sequence[str],
        vectors: np.ndarray,
        version: int,
        event_ts: Sequence[float] | None = None,
    ) -> None:
        if len(user_ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        nums = self.nums_for(user_ids)
        ts = list(event_ts) if event_ts is not None else [None] * len(user_ids)
        pipe = self.r.pipeline(transaction=False)
        for s, pos in self._group(user_ids).items():
            sk = self.shards[s]
            pipe.hset(sk.emb, mapping={user_ids[i]: _stored(version, ts[i], vectors[i])
                                       for i in pos})  # fmt: skip
        for u, n, v, t in zip(user_ids, nums, vectors, ts, strict=True):
            entry = {"u": u, "i": n, "v": v.tobytes(), "m": version}
            if t is not None:
                entry["t"] = repr(float(t))
            pipe.xadd(self.keys.updates, entry, maxlen=self.feed_maxlen, approximate=True)
        pipe.execute()

    def set_model_info(self, info: ModelInfo) -> None:
        self.r.hset(
            self.keys.model,
            mapping={
                "version": info.version,
                "checkpoint": info.checkpoint,
                "items": info.items,
                "updated_at": info.updated_at,
                "loss": info.loss,
                "drifts": info.drifts,
            },
        )

    def append_cycle(self, record: dict[str, float]) -> None:
        self.r.xadd(self.keys.cycles, {k: repr(float(v)) for k, v in record.items()},
                    maxlen=CYCLE_HISTORY, approximate=False)  # fmt: skip

    def recent_cycles(self, n: int = CYCLE_HISTORY) -> list[dict[str, float]]:
        if n <= 0:
            return []
        got = self.r.xrevrange(self.keys.cycles, count=n)
        return [{k: float(v) for k, v in fields.items()} for _, fields in reversed(got)]

    # --- reads (API) -------------------------------------------------------
    def model_info(self) -> ModelInfo | None:
        raw = self.r.hgetall(self.keys.model)
        if not raw:
            return None
        return ModelInfo(
            version=int(raw["version"]),
            checkpoint=raw.get("checkpoint", ""),
            items=int(raw.get("items", 0)),
            updated_at=float(raw.get("updated_at", 0.0)),
            loss=float(raw.get("loss", "nan")),
            drifts=int(raw.get("drifts", 0)),
        )

    def get(self, user_id: str) -> np.ndarray | None:
        raw = self.r.hget(self.keys.of(user_id).emb, user_id)
        return None if raw is None else _stored_vector(raw).copy()

    def version_of(self, user_id: str) -> int | None:
        raw = self.r.hget(self.keys.of(user_id).emb, user_id)
        return None if raw is None else _header(raw)[0]

    def versions_of(self, user_ids: Sequence[str]) -> list[int | None]:
        raw = self._hmget(list(user_ids), lambda sk: sk.emb)
        return [None if v is None else _header(v)[0] for v in raw]

    def event_ts_of(self, user_id: str) -> float | None:
        raw = self.r.hget(self.keys.of(user_id).emb, user_id)
        return None if raw is None else _header(raw)[1]

    def feed_head(self) -> str:
        last = self.r.xrevrange(self.keys.updates, count=1)
        return last[0][0] if last else "0-0"

    def read_all(self) -> tuple[list[str], np.ndarray, list[int], list[int]]:
        self._check_layout()
        users: list[str] = []
        vecs: list[np.ndarray] = []
        versions: list[int] = []
        for sk in self.shards:
            for u, raw in self.r.hscan_iter(sk.emb, count=2000):
                users.append(u)
                vecs.append(_stored_vector(raw))
                versions.append(_header(raw)[0])
        nums = self.nums_for(users)
        mat = np.stack(vecs) if vecs else np.zeros((0, 0), dtype=np.float32)
        return users, mat, nums, versions

    def register_follower(self, name: str, applied_id: str, at: float) -> None:
        self.r.hset(self.keys.followers, name, json.dumps({"id": applied_id, "at": at}))

    def followers(self) -> dict[str, tuple[str, float]]:
        out = {}
        for name, raw in self.r.hgetall(self.keys.followers).items():
            rec = json.loads(raw)
            out[name] = (str(rec["id"]), float(rec["at"]))
        return out

    def forget_follower(self, name: str) -> None:
        self.r.hdel(self.keys.followers, name)

    def trim_feed(self, min_id: str) -> int:
        return int(self.r.xtrim(self.keys.updates, minid=min_id, approximate=False))

    def read_updates(
        self, after: str, count: int = 10_000, block_ms: int | None = None
    ) -> list[EmbeddingUpdate]:
        got = self.r.xread({self.keys.updates: after}, count=count, block=block_ms)
        return [
            EmbeddingUpdate(sid, "", int(f["i"]), np.zeros(0, np.float32), deleted=True)
            if "d" in f  # a tombstone (forget)
            else EmbeddingUpdate(
                sid,
                f["u"],
                int(f["i"]),
                _vector(f["v"]).copy(),
                float(f["t"]) if "t" in f else None,
                int(f["m"]) if "m" in f else None,
            )  # fmt: skip
            for _key, entries in got or []
            for sid, f in entries
        ]

    def forget(self, user_id: str) -> dict[str, Any]:
        named: list[str] = []  # feed entries that name the user
        nums: dict[int, None] = {}
        start = "-"
        while True:
            rows = self.r.xrange(self.keys.updates, min=start, count=_FEED_SCAN)
            for sid, f in rows:
                if f.get("u") == user_id:
                    named.append(sid)
                    nums[int(f["i"])] = None
            if len(rows) < _FEED_SCAN:
                break
            start = "(" + rows[-1][0]
        sk = self.keys.of(user_id)
        had, num = self._forget(keys=[sk.emb, sk.user_num, sk.user_num_rev],
                                args=[user_id, *nums])  # fmt: skip
        if int(num) >= 0:
            nums = {int(num): None, **nums}
        deleted = 0
        for i in range(0, len(named), 1000):
            deleted += int(self.r.xdel(self.keys.updates, *named[i : i + 1000]))
        pipe = self.r.pipeline(transaction=False)
        for n in nums:  # no user id in a tombstone: the feed forgets the name now
            pipe.xadd(self.keys.updates, {"i": n, "d": 1}, maxlen=self.feed_maxlen,
                      approximate=True)  # fmt: skip
        tombstones = pipe.execute() if nums else []
        return {"embedding": int(had), "nums": list(nums), "feed_entries_deleted": deleted,
                "tombstones": list(tombstones)}  # fmt: skip

    def feed_state(self) -> FeedState:
        first = self.r.xrange(self.keys.updates, count=1)
        oldest = first[0][0] if first else None
        try:
            info = self.r.xinfo_stream(self.keys.updates)
        except redis.ResponseError:  # no feed yet
            return FeedState(0, 0, None, None)
        added = info.get("entries-added")  # Redis >= 7 only
        last = info.get("last-generated-id")
        return FeedState(int(info["length"]), None if added is None else int(added), oldest, last)
