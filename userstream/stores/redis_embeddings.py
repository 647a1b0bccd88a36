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


def _vector(raw: str) -> np.ndarray:
    return np.frombuffer(to_bytes(raw), dtype=np.float32)


class RedisEmbeddingStore:
    """:class:`~userstream.stores.EmbeddingStore` on Redis (a client from
    :func:`userstream.stores.connect`)."""

    def __init__(self, client: redis.Redis, keys: Keys, feed_maxlen: int = 2_000_000) -> None:
        self.r = require_text_client(client)
        self.keys = keys
        self.feed_maxlen = feed_maxlen

    # --- ids ---------------------------------------------------------------
    def nums_for(self, user_ids: Sequence[str]) -> list[int]:
        known = self.r.hmget(self.keys.user_num, list(user_ids)) if user_ids else []
        out: list[int] = []
        for u, n in zip(user_ids, known, strict=True):
            if n is None:
                num = int(self.r.incr(self.keys.user_num_next))
                if not self.r.hsetnx(self.keys.user_num, u, num):  # lost a race: reuse winner's
                    num = int(self.r.hget(self.keys.user_num, u))
                else:
                    self.r.hset(self.keys.user_num_rev, num, u)
                out.append(num)
            else:
                out.append(int(n))
        return out

    def num_of(self, user_id: str) -> int | None:
        raw = self.r.hget(self.keys.user_num, user_id)
        return None if raw is None else int(raw)

    def count(self) -> int:
        return int(self.r.hlen(self.keys.emb))

    def users_for(self, nums: Sequence[int]) -> list[str | None]:
        if not nums:
            return []
        return self.r.hmget(self.keys.user_num_rev, [int(n) for n in nums])

    # --- writes (training worker) ------------------------------------------
    def upsert(self, user_ids: Sequence[str], vectors: np.ndarray, version: int) -> None:
        if len(user_ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        nums = self.nums_for(user_ids)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(
            self.keys.emb, mapping={u: v.tobytes() for u, v in zip(user_ids, vectors, strict=True)}
        )
        pipe.hset(self.keys.emb_version, mapping={u: version for u in user_ids})
        for u, n, v in zip(user_ids, nums, vectors, strict=True):
            pipe.xadd(
                self.keys.updates,
                {"u": u, "i": n, "v": v.tobytes()},
                maxlen=self.feed_maxlen,
                approximate=True,
            )
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
            EmbeddingUpdate(sid, f["u"], int(f["i"]), _vector(f["v"]).copy())
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
