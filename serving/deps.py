"""FastAPI dependencies as ``Annotated`` aliases: declare ``ctx: ContextDep`` in a route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.context import ServingContext
from serving.metrics import ServingMetrics

__all__ = ["ContextDep", "MetricsDep", "get_context", "get_metrics"]


# async: a sync dependency takes a slot of the route thread pool, and /healthz
# must not wait for one while requests stuck on Redis hold them all.
async def get_context(request: Request) -> ServingContext:
    return request.app.state.ctx


async def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.ctx.metrics


ContextDep = Annotated[ServingContext, Depends(get_context)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
