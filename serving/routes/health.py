"""``/healthz``: 200 when Redis answers and the index follower is running and loaded."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving import queries
from serving.deps import ContextDep
from serving.schemas import Health

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "not ready; see reasons"}},
)
def healthz(ctx: ContextDep) -> JSONResponse:
    report = queries.health(ctx)
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "ok" else 503)
