"""``/metrics``: this app's Prometheus registry in text format."""

from __future__ import annotations

from fastapi import APIRouter, Response

from serving.deps import MetricsDep
from serving.metrics import CONTENT_TYPE_LATEST

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get("/metrics", response_class=Response)
def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
