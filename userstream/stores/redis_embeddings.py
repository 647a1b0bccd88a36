"""User embeddings in Redis plus an append-only update feed (a Redis Stream).

The training worker is the only writer. API replicas materialize their FAISS
index from :meth:`RedisEmbeddingStore.read_all` once, then follow the feed with
:meth:`RedisEmbeddingStore.read_updates` from the last stream id they applied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import redis

from userstream.stores.client import require_text_client, to_bytes
from userstream.stores.contracts import EmbeddingUpdate, FeedState, ModelInfo
from userstream.types import Keys

__all__ = ["RedisEmbeddingStore"]


# assign ids: KEYS = user_num, user_num_rev, user_num_next; ARGV = user ids.
# Returns one id per user (an existing one, or the next free one).
_ASSIGN_LUA = """
local out = {}
for i, u in ipairs(ARGV) do
  local n = redis.call('HGET', KEYS[1], u)
  if not n then
    n = redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[1], u, n)
    redis.call('HSET', KEYS[2], n, u)
  end
  out[i] = tonumber(n)
end
return out
"""
_ASSIGN_CHUNK = 10_000


def _vector(raw: str) -> np.ndarray:
    return np.frombuffer(to_bytes(raw), dtype=np.float32)


class RedisEmbeddingStore:
    """:class:`~userstream.stores.EmbeddingStore` on Redis (a client from
    :func:`userstream.stores.connect`)."""

    def __init__(self, client: redis.Redis, keys: Keys, feed_maxlen: int = 2_000_000) -> None:
        self.r = require_text_client(client)
        self.keys = keys
        self.feed_maxlen = feed_maxlen
        self._assign = client.register_script(_ASSIGN_LUA)

    # --- ids ---------------------------------------------------------------
    def nums_for(self, user_ids: Sequence[str]) -> list[int]:
        """One HMGET for all; the unknown ones get ids in one script call per
        10,000 (atomic, so concurrent writers agree on every id)."""
        if not user_ids:
            return []
        known = self.r.hmget(self.keys.user_num, list(user_ids))
        missing = list(dict.fromkeys(u for u, n in zip(user_ids, known, strict=True) if n is None))
        assigned: dict[str, int] = {}
        k = self.keys
        for start in range(0, len(missing), _ASSIGN_CHUNK):
            chunk = missing[start : start + _ASSIGN_CHUNK]
            nums = self._assign(keys=[k.user_num, k.user_num_rev, k.user_num_next], args=chunk)
            assigned.update(zip(chunk, (int(n) for n in nums), strict=True))
        return [
            int(n) if n is not None else assigned[u] for u, n in zip(user_ids, known, strict=True)
        ]

    def num_of(self, user_id: str) -> int | None:
        raw = self.r.hget(self.keys.user_num, user_id)
        return None if raw is None else int(raw)

    def lookup(self, user_id: str) -> tuple[int | None, int | None]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.keys.user_num, user_id)
        pipe.hget(self.keys.emb_version, user_id)
        num, version = pipe.execute()
        return (None if num is None else int(num)), (None if version is None else int(version))

    def count(self) -> int:
        return int(self.r.hlen(self.keys.emb))

    def users_for(self, nums: Sequence[int]) -> list[str | None]:
        if not nums:
            return []
        return self.r.hmget(self.keys.user_num_rev, [int(n) for n in nums])

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
        k = self.keys
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(k.emb, mapping={u: v.tobytes() for u, v in zip(user_ids, vectors, strict=True)})
        pipe.hset(k.emb_version, mapping=dict.fromkeys(user_ids, version))
        ts = list(event_ts) if event_ts is not None else [None] * len(user_ids)
        stamped = {u: repr(float(t)) for u, t in zip(user_ids, ts, strict=True) if t is not None}
        if stamped:
            pipe.hset(k.emb_event_ts, mapping=stamped)
        for u, n, v, t in zip(user_ids, nums, vectors, ts, strict=True):
            entry = {"u": u, "i": n, "v": v.tobytes(), "m": version}
            if t is not None:
                entry["t"] = repr(float(t))
            pipe.xadd(k.updates, entry, maxlen=self.feed_maxlen, approximate=True)
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
        raw = self.r.hget(self.keys.emb, user_id)
        return None if raw is None else _vector(raw).copy()

    def version_of(self, user_id: str) -> int | None:
        raw = self.r.hget(self.keys.emb_version, user_id)
        return None if raw is None else int(raw)

    def versions_of(self, user_ids: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        for start in range(0, len(user_ids), 50_000):
            raw = self.r.hmget(self.keys.emb_version, list(user_ids[start : start + 50_000]))
            out.extend(None if v is None else int(v) for v in raw)
        return out

    def event_ts_of(self, user_id: str) -> float | None:
        raw = self.r.hget(self.keys.emb_event_ts, user_id)
        return None if raw is None else float(raw)

    def feed_head(self) -> str:
        last = self.r.xrevrange(self.keys.updates, count=1)
        return last[0][0] if last else "0-0"

    def read_all(self) -> tuple[list[str], np.ndarray, list[int]]:
        users: list[str] = []
        vecs: list[np.ndarray] = []
        for u, raw in self.r.hscan_iter(self.keys.emb, count=2000):
            users.append(u)
            vecs.append(_vector(raw))
        nums = self.nums_for(users)
        mat = np.stack(vecs) if vecs else np.zeros((0, 0), dtype=np.float32)
        return users, mat, nums

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
            EmbeddingUpdate(
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
