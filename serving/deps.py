"""FastAPI dependencies as ``Annotated`` aliases: declare ``ctx: ContextDep`` in a route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serving.context import ServingContext
from serving.metrics import ServingMetrics

__all__ = ["ContextDep", "MetricsDep", "get_context", "get_metrics"]


def get_context(request: Request) -> ServingContext:
    return request.app.state.ctx


def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.ctx.metrics


ContextDep = Annotated[ServingContext, Depends(get_context)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
