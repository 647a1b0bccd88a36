"""``/metrics``: this app's Prometheus registry in text format.

Always 200: when Redis does not answer within the fail-fast client's timeout the
scrape says ``userstream_redis_up 0`` and leaves the Redis-backed series out, so
the series about this replica (index, follower, requests) still arrive. The
scrape runs in asyncio's executor, not the route thread pool, which requests
stuck on a hung Redis may fill.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from serving.deps import MetricsDep
from serving.metrics import CONTENT_TYPE_LATEST

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get("/metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    return Response(await asyncio.to_thread(m.render), media_type=CONTENT_TYPE_LATEST)
