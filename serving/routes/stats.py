"""``/stats``: pipeline counters, model version and index state as JSON.

Read through the fail-fast client in asyncio's executor, not the route thread
pool: requests stuck on a hung Redis may hold every slot of that pool.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException

from serving import queries
from serving.deps import ContextDep
from serving.schemas import Stats

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get(
    "/stats",
    response_model=Stats,
    responses={503: {"description": "Redis does not answer (the message says how)"}},
)
async def stats(ctx: ContextDep) -> Stats:
    """Events ingested / dead-lettered, users, items, model version, index size and lag."""
    try:
        return await asyncio.to_thread(queries.stats, ctx)
    except queries.RedisUnavailable as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
