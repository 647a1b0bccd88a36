"""``/healthz``: 200 when Redis answers and the index follower is running and loaded;
``/readyz``: 200 when this replica can serve (:mod:`serving.readiness`).

It answers within :data:`DEADLINE_S` whatever Redis does: the PING goes through
the fail-fast client in a worker thread, and a check still running at the
deadline (a name lookup hanging, say) counts as Redis not answering. The
``Server-Timing`` header says how long the Redis check took.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving import queries
from serving.context import ServingContext
from serving.deps import ContextDep
from serving.readiness import readiness
from serving.schemas import Health, Readiness

__all__ = ["DEADLINE_S", "router"]

router = APIRouter(tags=["ops"])

# Above the fail-fast client's socket timeout, so that its own reason wins, and
# below the one second a probe may wait.
DEADLINE_S = 0.8


async def _redis_problem(ctx: ServingContext) -> str | None:
    """Why Redis cannot serve (None when it answers), within ``DEADLINE_S``; run in
    asyncio's executor, not the route thread pool that stuck requests may fill."""
    check = asyncio.to_thread(queries.redis_problem, ctx)
    try:
        return await asyncio.wait_for(check, DEADLINE_S)
    except TimeoutError:
        return f"redis does not answer: no reply within the {DEADLINE_S:g}s deadline"


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "not ready; see reasons"}},
)
async def healthz(ctx: ContextDep) -> JSONResponse:
    start = time.perf_counter()
    reason = await _redis_problem(ctx)
    took_ms = (time.perf_counter() - start) * 1000
    report = queries.health(ctx, reason)
    return JSONResponse(
        report.model_dump(),
        status_code=200 if report.status == "ok" else 503,
        headers={"Server-Timing": f"redis;dur={took_ms:.1f}"},
    )


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready; see each check"}},
)
async def readyz(ctx: ContextDep) -> JSONResponse:
    """Ready to serve: Redis answers, the index is loaded and caught up, a model
    exists and a stream worker's heartbeat is fresh; each check says why not."""
    start = time.perf_counter()
    reason = await _redis_problem(ctx)
    report = await asyncio.to_thread(readiness, ctx, reason)
    took_ms = (time.perf_counter() - start) * 1000
    ready = report.status == "ready"
    headers = {"Server-Timing": f"redis;dur={took_ms:.1f}"}
    if not ready:
        headers["Retry-After"] = "5"
    return JSONResponse(report.model_dump(), status_code=200 if ready else 503, headers=headers)
