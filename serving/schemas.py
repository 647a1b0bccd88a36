"""Response bodies of the API (pydantic models, so they show up in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = [
    "Check",
    "ExplainedBehavior",
    "Explanation",
    "Health",
    "Readiness",
    "Neighbor",
    "RecommendedItem",
    "Recommendations",
    "SimilarUsers",
    "Stats",
    "UserEmbedding",
]


class ExplainedBehavior(BaseModel):
    item_id: str
    behaviors: dict[str, int] = Field(
        description="the user's behaviors on this item in the window the encoder reads "
        '(its last MAX_LEN behaviors), by type: count, e.g. {"view": 2, "cart": 1}'
    )
    weight: float = Field(
        description="drop of `similarity` when these behaviors are left out of the user's "
        "window (leave-one-out by the model, model/explain.py); > 0, larger = more of the "
        "similarity rests on them"
    )
    shared: bool = Field(
        description="the other user has behaviors on this item too (reported beside the "
        "weight, never used for it)"
    )


class Explanation(BaseModel):
    model_version: int = Field(description="version of the checkpoint that computed it")
    similarity: float = Field(
        description="cosine of the two users' embeddings recomputed by that checkpoint from "
        "their stored sequences, the value the weights are drops of; can differ a little "
        "from `score` (the index holds the last embeddings the training worker wrote)"
    )
    user_behaviors: list[ExplainedBehavior] = Field(
        description="the queried user's items that contribute most, largest weight first "
        "(at most explain_top; fewer when fewer have a positive weight)"
    )
    neighbor_behaviors: list[ExplainedBehavior] = Field(
        description="the same for the neighbour's items"
    )


class Neighbor(BaseModel):
    user_id: str
    score: float = Field(description="inner product of L2-normalized embeddings (cosine)")
    explanation: Explanation | None = Field(
        None,
        description="only with explain=true (absent otherwise): the behaviors of both users "
        "the similarity rests on; null when either user has no stored behaviors",
    )


class SimilarUsers(BaseModel):
    user_id: str
    model_version: int | None = Field(description="model version of the query user's embedding")
    neighbors: list[Neighbor] = Field(description="most similar other users, best first")


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="encoder score (inner product with the item embedding)")


class Recommendations(BaseModel):
    user_id: str
    model_version: int = Field(description="version of the checkpoint that scored the items")
    exclude_seen: bool
    items: list[RecommendedItem] = Field(description="most likely next items, best first")


class UserEmbedding(BaseModel):
    user_id: str
    model_version: int | None = Field(description="model version that made this embedding")
    event_ts: float | None = Field(
        None, description="ts of the newest behavior this embedding saw (unix seconds)"
    )
    indexed_event_ts: float | None = Field(
        None,
        description="the same for the vector this replica's similar-user index holds "
        "(null: not indexed yet, or loaded before this replica followed the feed)",
    )
    dim: int
    embedding: list[float]


class UserProfile(BaseModel):
    user_id: str
    model_version: int = Field(description="version of the checkpoint that made the vector")
    behaviors: int = Field(description="stored behaviors the vector averages over")
    dim: int
    profile: list[float] = Field(
        description="L2-normalized mean of the item vectors of the stored history: "
        "features for profiling and targeting models"
    )


class Stats(BaseModel):
    events_ingested: int
    events_dead_lettered: int
    events_duplicate_skipped: int
    offset_log_resets: int = Field(
        0,
        description="times the stored offsets were dropped because the topic became a new log "
        "(a restarted embedded broker, a recreated topic, another cluster)",
    )
    refresh_pending: int = Field(
        0,
        description="changed users not trained on yet: the dirty ones plus those a running "
        "cycle claimed (a user changed again while claimed counts in both)",
    )
    embed_pending: int = Field(
        0,
        description="changed users whose event is not in their embedding yet: the stale ones "
        "plus those the embedder is writing (a user changed again meanwhile counts twice)",
    )
    users: int = Field(description="users with a behavior sequence")
    items: int = Field(description="distinct items seen")
    embedded_users: int = Field(description="users with an embedding in Redis")
    model_version: int | None = Field(description="latest model version; null before the first")
    model_updated_at: float | None = Field(description="unix time of the latest model version")
    drifts_detected: int = Field(0, description="concept drifts the training worker detected")
    index_size: int = Field(description="vectors in this replica's FAISS index")
    index_kind: str = Field("flat", description='"flat" (exact) or "ivf" (by size)')
    index_dim: int | None
    index_ready: bool
    index_applied_id: str = Field(description="last update-feed entry applied to the index")
    feed_head_id: str = Field(description="newest update-feed entry")
    feed_lag_s: float | None = Field(
        description="feed time between the newest entry and the last applied one; "
        "null until the index is loaded"
    )
    restarts: dict[str, int] | None = Field(
        None,
        description="restarts of each process `userstream up` supervises (from "
        "DATA_DIR/supervisor.json); null when no supervisor runs beside this API",
    )


class Health(BaseModel):
    status: str = Field(description='"ok" or "unavailable"')
    redis: bool
    follower_alive: bool
    index_ready: bool
    index_size: int
    index_applied_id: str
    reasons: list[str] = Field(default_factory=list, description="why it is unavailable")


class Check(BaseModel):
    ok: bool
    detail: str = Field(description="what was found, or why it fails")


class Readiness(BaseModel):
    status: str = Field(description='"ready" or "not ready"')
    checks: dict[str, Check] = Field(
        description="redis, index, feed_lag, model, stream_worker: each with its reason"
    )
    reasons: list[str] = Field(default_factory=list, description="the failing checks' details")
