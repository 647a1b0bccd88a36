"""``/readyz``: can this replica serve? One check per dependency, each with its reason.

``/healthz`` says the process is up and reaches Redis with its follower running
(a restart would not help otherwise); ``/readyz`` says more is in place for
answers to be worth having:

* ``redis``: a PING answers on the fail-fast client (0.5 s, no retries);
* ``index``: the follower runs and its initial load is done;
* ``feed_lag``: the index is at most ``READY_MAX_FEED_LAG_S`` of feed time
  behind the update feed's head;
* ``model``: the training worker has published a model version;
* ``stream_worker``: some stream worker holds partitions and its heartbeat
  (``beat`` in ``<prefix>stream_ready``, refreshed every 5 s, stream/app.py)
  is at most ``READY_HEARTBEAT_MAX_S`` old.

Every Redis read goes through the fail-fast client; when the PING fails the
checks that need Redis say so instead of waiting out their own timeouts.
"""

from __future__ import annotations

import json
import time

import redis

from serving.context import ServingContext
from serving.follower import feed_lag_s
from serving.schemas import Check, Readiness

__all__ = ["readiness"]


def _stream_worker(ctx: ServingContext, now: float) -> Check:
    limit = ctx.settings.ready_heartbeat_max_s
    beats = []
    for raw in ctx.ops.redis.hgetall(ctx.keys.stream_ready).values():
        try:
            rec = json.loads(raw)
            beats.append(float(rec.get("beat", rec["ts"])))
        except (ValueError, KeyError, TypeError):
            continue
    if not beats:
        return Check(ok=False, detail="no stream worker holds partitions (none running, or a "
                     "rebalance in progress)")  # fmt: skip
    age = max(0.0, now - max(beats))
    if age > limit:
        return Check(ok=False, detail=f"the freshest stream worker heartbeat is {age:.0f}s old "
                     f"(READY_HEARTBEAT_MAX_S={limit:g})")  # fmt: skip
    return Check(ok=True, detail=f"{len(beats)} worker(s), heartbeat {age:.1f}s ago")


def readiness(ctx: ServingContext, redis_reason: str | None) -> Readiness:
    """The readiness report; ``redis_reason`` is the PING's outcome (None: it
    answered), taken by the caller under its deadline."""
    checks: dict[str, Check] = {}
    follower = ctx.follower
    checks["redis"] = Check(ok=redis_reason is None, detail=redis_reason or "answers")
    if not follower.is_alive():
        checks["index"] = Check(ok=False, detail="index follower is not running")
    elif not follower.ready.is_set():
        last = follower.stats.last_error
        checks["index"] = Check(
            ok=False, detail="index is still loading" + (f" (last error: {last})" if last else "")
        )
    else:
        checks["index"] = Check(ok=True, detail=f"{len(follower.index)} users loaded")
    if redis_reason is not None:
        skipped = Check(ok=False, detail="not checked: redis does not answer")
        checks.update(feed_lag=skipped, model=skipped, stream_worker=skipped)
    else:
        try:
            _redis_checks(ctx, checks)
        except (redis.RedisError, OSError) as exc:
            failed = Check(ok=False, detail=f"redis does not answer: {type(exc).__name__}: {exc}")
            for name in ("feed_lag", "model", "stream_worker"):
                checks.setdefault(name, failed)
    reasons = [f"{name}: {c.detail}" for name, c in checks.items() if not c.ok]
    return Readiness(status="not ready" if reasons else "ready", checks=checks, reasons=reasons)


def _redis_checks(ctx: ServingContext, checks: dict[str, Check]) -> None:
    ops, follower = ctx.ops, ctx.follower
    limit = ctx.settings.ready_max_feed_lag_s
    if follower.ready.is_set():
        lag = feed_lag_s(follower.applied_id, ops.embeddings.feed_head())
        checks["feed_lag"] = Check(
            ok=lag <= limit, detail=f"{lag:.1f}s behind the feed (READY_MAX_FEED_LAG_S={limit:g})"
        )
    else:
        checks["feed_lag"] = Check(ok=False, detail="the index is still loading")
    info = ops.embeddings.model_info()
    checks["model"] = (
        Check(
            ok=False,
            detail="no model version published yet (the training worker has not "
            "finished a cycle and its refresh: it needs events)",
        )  # fmt: skip
        if info is None
        else Check(ok=True, detail=f"model version {info.version}")
    )
    checks["stream_worker"] = _stream_worker(ctx, time.time())
