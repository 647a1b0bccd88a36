"""What the endpoints compute, as plain functions of a :class:`ServingContext`.

Routes stay thin: they call one function here and map its exceptions to HTTP
status codes. Redis is the source of truth for embeddings and versions; the
FAISS index answers the neighbour search.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import redis

from serving.context import ServingContext
from serving.follower import feed_lag_s
from serving.index import IndexBusy
from serving.recommender import ModelNotReady
from serving.schemas import (
    ExplainedBehavior,
    Explanation,
    Health,
    Neighbor,
    Recommendations,
    RecommendedItem,
    SimilarUsers,
    Stats,
    UserEmbedding,
    UserProfile,
)
from userstream.types import Behavior

if TYPE_CHECKING:  # torch stays unloaded until a model is needed
    from model.explain import Contribution, PairExplanation

__all__ = [
    "EXPLAIN_MAX_K",
    "IndexNotReady",
    "ModelNotReady",
    "NoEmbedding",
    "TooManyToExplain",
    "RedisUnavailable",
    "UnknownUser",
    "health",
    "redis_problem",
    "recommendations",
    "explained_similar_users",
    "similar_users",
    "stats",
    "user_embedding",
    "user_num",
    "user_profile",
]

LOG = logging.getLogger(__name__)


class NoEmbedding(LookupError):
    """The user has no embedding; the message says whether it has events at all."""

    def __init__(self, user_id: str, events: int, model_version: int | None) -> None:
        if events:
            msg = (
                f"user {user_id!r} has {events} events but no embedding yet: the training "
                f"worker has not embedded it (current model_version={model_version}; see /stats)"
            )
        else:
            msg = (
                f"user {user_id!r} has no embedding yet: no events were ingested for it "
                "(unknown user id)"
            )
        super().__init__(msg)
        self.user_id = user_id
        self.events = events


class UnknownUser(LookupError):
    """No behaviors are stored for the user."""


class IndexNotReady(RuntimeError):
    """The follower has not finished its initial load (see /healthz)."""


class RedisUnavailable(RuntimeError):
    """Redis did not answer within the ops client's timeout; the message says how."""


def _redis_reason(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, (redis.TimeoutError, TimeoutError)):
        return f"redis does not answer: timed out after {timeout_s:g}s"
    return f"redis does not answer: {type(exc).__name__}: {exc}"


def redis_problem(ctx: ServingContext) -> str | None:
    """Why Redis does not answer a PING on the fail-fast client, None when it does."""
    try:
        ctx.ops.redis.ping()
    except (redis.RedisError, OSError) as exc:
        return _redis_reason(exc, ctx.ops.timeout_s)
    return None


def user_num(ctx: ServingContext, user_id: str) -> int | None:
    """The user's FAISS id, read-only (``EmbeddingStore.nums_for`` would assign one)."""
    return ctx.embeddings.num_of(user_id)


def _no_embedding(ctx: ServingContext, user_id: str) -> NoEmbedding:
    events = len(ctx.sequences.read_many([user_id])[0])
    info = ctx.embeddings.model_info()
    return NoEmbedding(user_id, events, None if info is None else info.version)


# The most vectors a search on the event loop may compare (~1 ms on one core);
# a larger exact index is searched in the thread pool, where searches overlap.
LOOP_SCAN_MAX = 40_000


class _NeedsRedis(Exception):
    """Raised by :func:`_similar` where a local-only answer would need Redis."""


def similar_users(
    ctx: ServingContext, user_id: str, k: int, *, local_only: bool = False
) -> SimilarUsers | None:
    """The k nearest other users by inner product of embeddings, best first.

    What this replica's index and user table hold answers without Redis; a user
    (or a neighbour) they do not know yet is looked up there. ``local_only``:
    return None instead of making that round trip, of waiting while an upsert
    holds the index, or of a search longer than ``LOOP_SCAN_MAX`` vectors (the
    route answers the in-memory case on the event loop and only the rest in
    its thread pool).
    """
    if not ctx.follower.ready.is_set():
        raise IndexNotReady("the similar-user index is still loading; retry shortly")
    if local_only and ctx.follower.index.scan_size > LOOP_SCAN_MAX:
        return None
    try:
        return _similar(ctx, user_id, k, local_only)
    except (_NeedsRedis, IndexBusy):  # only ever raised when local_only
        return None


def _similar(ctx: ServingContext, user_id: str, k: int, local_only: bool) -> SimilarUsers:
    def redis(call, *args):
        if local_only:
            raise _NeedsRedis
        return call(*args)

    index, table, wait = ctx.follower.index, ctx.follower.users, not local_only
    num = table.num_of(user_id)  # what this replica's index holds: no Redis round trip
    version = None if num is None else table.version_of(num)
    if num is None or version is None:  # not followed here yet (or loaded without it)
        num, version = redis(ctx.embeddings.lookup, user_id)
    query = None if num is None else index.reconstruct(num, wait=wait)
    if query is None:  # not (yet) in this replica's index: take it from Redis
        query = redis(ctx.embeddings.get, user_id)
    if query is None:
        raise redis(_no_embedding, ctx, user_id)  # the 404 says how many events are stored
    if index.dim is not None and query.shape[0] != index.dim:
        LOG.error(
            "user %r has a %d-dim embedding, the index holds %d-dim vectors",
            user_id,
            query.shape[0],
            index.dim,
        )
        raise IndexNotReady(
            f"user {user_id!r} has a {query.shape[0]}-dim embedding but the index holds "
            f"{index.dim}-dim vectors (model change in progress?)"
        )
    scores, nums = index.search(query.reshape(1, -1), k + 1, wait=wait)  # +1: the user itself
    hits = [
        (int(n), float(s)) for n, s in zip(nums[0], scores[0], strict=True) if n >= 0 and n != num
    ][:k]
    names = table.names_for([n for n, _ in hits])
    missing = [i for i, name in enumerate(names) if name is None]
    if missing:  # ids the table does not know yet: ask Redis
        found = redis(ctx.embeddings.users_for, [hits[i][0] for i in missing])
        for i, name in zip(missing, found, strict=True):
            names[i] = name
    neighbors = [
        Neighbor(user_id=name, score=score)
        for name, (_, score) in zip(names, hits, strict=True)
        if name is not None
    ]
    return SimilarUsers(user_id=user_id, model_version=version, neighbors=neighbors)


# The most neighbours one explained answer covers: the encoder pass grows with
# k * distinct items per window (model/explain.py), ~1 s on one core at 50 x 50.
EXPLAIN_MAX_K = 50


class TooManyToExplain(ValueError):
    """More neighbours asked to be explained than :data:`EXPLAIN_MAX_K`."""


def explained_similar_users(ctx: ServingContext, user_id: str, k: int, top: int) -> SimilarUsers:
    """:func:`similar_users`, each neighbour with the ``top`` behaviors of each user
    the pair's similarity rests on (:mod:`model.explain`, by the newest checkpoint).

    Raises what :func:`similar_users` raises, then :class:`ModelNotReady` before the
    first checkpoint; :class:`TooManyToExplain` for ``k`` > :data:`EXPLAIN_MAX_K`.
    """
    if k > EXPLAIN_MAX_K:
        raise TooManyToExplain(
            f"k={k}: explain=true explains at most {EXPLAIN_MAX_K} neighbours; "
            f"ask with k <= {EXPLAIN_MAX_K}, or without explain"
        )
    answer = similar_users(ctx, user_id, k)
    assert answer is not None  # not local_only
    model = ctx.recommender.current()
    seqs = ctx.sequences.read_many([user_id, *(n.user_id for n in answer.neighbors)])
    pairs = model.explain_similar(seqs[0], seqs[1:], top)
    neighbors = [
        n.model_copy(update={"explanation": _explanation(pair, model.version)})
        for n, pair in zip(answer.neighbors, pairs, strict=True)
    ]
    return answer.model_copy(update={"neighbors": neighbors})


def _explanation(pair: PairExplanation | None, version: int) -> Explanation | None:
    """A :class:`model.explain.PairExplanation` (None: nothing to explain) as the schema."""
    if pair is None:
        return None

    def behaviors(contributions: list[Contribution]) -> list[ExplainedBehavior]:
        return [
            ExplainedBehavior(
                item_id=c.item_id, behaviors=c.behaviors, weight=c.weight, shared=c.shared
            )
            for c in contributions
        ]

    return Explanation(
        model_version=version,
        similarity=pair.similarity,
        user_behaviors=behaviors(pair.user),
        neighbor_behaviors=behaviors(pair.other),
    )


def user_embedding(ctx: ServingContext, user_id: str) -> UserEmbedding:
    """The user's current embedding from Redis and the model version that made it."""
    vector = ctx.embeddings.get(user_id)
    if vector is None:
        raise _no_embedding(ctx, user_id)
    num = user_num(ctx, user_id)
    return UserEmbedding(
        user_id=user_id,
        model_version=ctx.embeddings.version_of(user_id),
        event_ts=ctx.embeddings.event_ts_of(user_id),
        indexed_event_ts=None if num is None else ctx.follower.users.event_ts(num),
        dim=int(vector.shape[0]),
        embedding=vector.astype(np.float64).tolist(),
    )


def _stored_sequence(ctx: ServingContext, user_id: str) -> list[Behavior]:
    """The user's stored behaviors; :class:`UnknownUser` when there are none."""
    seq = ctx.sequences.read_many([user_id])[0]
    if not seq:
        raise UnknownUser(f"user {user_id!r} has no stored behaviors (unknown user id)")
    return seq


def recommendations(
    ctx: ServingContext, user_id: str, k: int, exclude_seen: bool = True
) -> Recommendations:
    """Next items for the user's stored sequence, scored by the newest checkpoint."""
    seq = _stored_sequence(ctx, user_id)
    model = ctx.recommender.current()
    recs = model.recommend_many([seq], k, exclude_seen)[0]
    return Recommendations(
        user_id=user_id,
        model_version=model.version,
        exclude_seen=exclude_seen,
        items=[RecommendedItem(item_id=r.item_id, score=r.score) for r in recs],
    )


def user_profile(ctx: ServingContext, user_id: str) -> UserProfile:
    """The profile vector of the user's stored sequence, from the newest checkpoint."""
    seq = _stored_sequence(ctx, user_id)
    model = ctx.recommender.current()
    vector = model.profile_many([seq])[0]
    return UserProfile(
        user_id=user_id,
        model_version=model.version,
        behaviors=len(seq),
        dim=len(vector),
        profile=vector.tolist(),
    )


def stats(ctx: ServingContext) -> Stats:
    """Pipeline counters and index state; :class:`RedisUnavailable` when Redis does not
    answer within the fail-fast client's timeout."""
    ops = ctx.ops
    follower = ctx.follower
    index = follower.index
    applied = follower.applied_id
    ready = follower.ready.is_set()
    try:
        counters = ops.sequences.counters()
        info = ops.embeddings.model_info()
        head = ops.embeddings.feed_head()
        users, items = ops.sequences.num_users(), ops.sequences.num_items()
        pending = ops.sequences.dirty_count() + ops.sequences.claimed_count()
        stale = ops.sequences.dirty_count("embed") + ops.sequences.claimed_count("embed")
        embedded = ops.embeddings.count()
    except (redis.RedisError, OSError) as exc:
        raise RedisUnavailable(_redis_reason(exc, ops.timeout_s)) from exc
    return Stats(
        events_ingested=counters["events_ingested"],
        events_dead_lettered=counters["events_dead_lettered"],
        events_duplicate_skipped=counters["events_duplicate_skipped"],
        offset_log_resets=counters["offset_log_resets"],
        refresh_pending=pending,
        embed_pending=stale,
        users=users,
        items=items,
        embedded_users=embedded,
        model_version=None if info is None else info.version,
        model_updated_at=None if info is None else info.updated_at,
        drifts_detected=0 if info is None else info.drifts,
        index_size=len(index),
        index_kind=index.kind,
        index_dim=index.dim,
        index_ready=ready,
        index_applied_id=applied,
        feed_head_id=head,
        feed_lag_s=feed_lag_s(applied, head) if ready else None,
        restarts=_supervised_restarts(ctx.settings.supervisor_state_file),
    )


def _supervised_restarts(path: Path) -> dict[str, int] | None:
    """Restart counts from the supervisor's state file beside this API, if any."""
    try:
        state = json.loads(path.read_text())
        return {name: int(c["restarts"]) for name, c in state["children"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def health(ctx: ServingContext, redis_reason: str | None) -> Health:
    """Ready to serve when Redis answers (``redis_reason`` is None, see
    :func:`redis_problem`) and the follower runs with its index loaded."""
    reasons = [] if redis_reason is None else [redis_reason]
    follower = ctx.follower
    alive = follower.is_alive()
    ready = follower.ready.is_set()
    if not alive:
        reasons.append(
            "index follower is not running"
            + ("" if ctx.follower_started else " (the app was created with start_follower=False)")
        )
    if not ready:
        last = follower.stats.last_error
        reasons.append("index is still loading" + (f" (last error: {last})" if last else ""))
    return Health(
        status="ok" if not reasons else "unavailable",
        redis=redis_reason is None,
        follower_alive=alive,
        index_ready=ready,
        index_size=len(follower.index),
        index_applied_id=follower.applied_id,
        reasons=reasons,
    )
