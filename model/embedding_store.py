"""User embeddings in Redis plus an append-only update feed (a Redis Stream).

The training worker is the only writer. API replicas materialize their FAISS
index from :meth:`EmbeddingStore.read_all` once, then follow the feed with
:meth:`EmbeddingStore.read_updates` from the last stream id they applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis

from userstream.types import Keys

__all__ = ["EmbeddingStore", "EmbeddingUpdate", "ModelInfo"]


@dataclass(frozen=True, slots=True)
class EmbeddingUpdate:
    stream_id: str  # Redis Stream entry id, e.g. "1732900000000-0"
    user_id: str
    num: int  # stable int64 id for FAISS
    vector: np.ndarray  # (D,) float32, L2-normalized


@dataclass(frozen=True, slots=True)
class ModelInfo:
    version: int
    checkpoint: str
    items: int
    updated_at: float
    loss: float
    drifts: int = 0  # drifts detected by the training worker's DriftMonitor so far


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


class EmbeddingStore:
    def __init__(self, client: redis.Redis, keys: Keys, feed_maxlen: int = 2_000_000) -> None:
        self.r = client
        self.keys = keys
        self.feed_maxlen = feed_maxlen

    # --- ids ---------------------------------------------------------------
    def nums_for(self, user_ids: Sequence[str]) -> list[int]:
        """Stable int64 ids for users, assigned on first sight."""
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
        """The user's int64 id if it was ever embedded (read-only: assigns nothing)."""
        raw = self.r.hget(self.keys.user_num, user_id)
        return None if raw is None else int(raw)

    def count(self) -> int:
        """Number of users with a stored embedding."""
        return int(self.r.hlen(self.keys.emb))

    def users_for(self, nums: Sequence[int]) -> list[str | None]:
        if not nums:
            return []
        got = self.r.hmget(self.keys.user_num_rev, [int(n) for n in nums])
        return [None if g is None else _s(g) for g in got]

    # --- writes (training worker) ------------------------------------------
    def upsert(self, user_ids: Sequence[str], vectors: np.ndarray, version: int) -> None:
        """Store embeddings (N, D) float32 and append them to the update feed."""
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
        raw = {_s(k): _s(v) for k, v in self.r.hgetall(self.keys.model).items()}
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
        return None if raw is None else np.frombuffer(raw, dtype=np.float32).copy()

    def version_of(self, user_id: str) -> int | None:
        raw = self.r.hget(self.keys.emb_version, user_id)
        return None if raw is None else int(raw)

    def feed_head(self) -> str:
        """Id of the newest feed entry ("0-0" when empty): follow from here after read_all."""
        last = self.r.xrevrange(self.keys.updates, count=1)
        return _s(last[0][0]) if last else "0-0"

    def read_all(self) -> tuple[list[str], np.ndarray, list[int]]:
        """Every stored embedding: (user_ids, (N, D) float32, nums)."""
        users: list[str] = []
        vecs: list[np.ndarray] = []
        for u, raw in self.r.hscan_iter(self.keys.emb, count=2000):
            users.append(_s(u))
            vecs.append(np.frombuffer(raw, dtype=np.float32))
        nums = self.nums_for(users)
        mat = np.stack(vecs) if vecs else np.zeros((0, 0), dtype=np.float32)
        return users, mat, nums

    def read_updates(
        self, after: str, count: int = 10_000, block_ms: int | None = None
    ) -> list[EmbeddingUpdate]:
        """Feed entries strictly after stream id ``after`` (blocking up to block_ms)."""
        got = self.r.xread({self.keys.updates: after}, count=count, block=block_ms)
        out: list[EmbeddingUpdate] = []
        for _key, entries in got or []:
            for sid, fields in entries:
                f = {_s(k): v for k, v in fields.items()}
                out.append(
                    EmbeddingUpdate(
                        stream_id=_s(sid),
                        user_id=_s(f["u"]),
                        num=int(f["i"]),
                        vector=np.frombuffer(f["v"], dtype=np.float32).copy(),
                    )
                )
        return out

    def feed_oldest(self) -> str | None:
        """Id of the oldest entry still in the (trimmed) feed, None when empty."""
        first = self.r.xrange(self.keys.updates, count=1)
        return _s(first[0][0]) if first else None
