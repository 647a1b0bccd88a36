"""One APIRouter per resource; :data:`api_router` includes them all."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from serving.auth import require_metrics, require_read
from serving.routes import forget, health, metrics, recommendations, stats, status, users

__all__ = ["api_router"]

api_router = APIRouter()
# access (serving/auth.py): reads need the read scope, DELETE the admin scope
# (forget.py), the probes none
_READ = [Depends(require_read)]
api_router.include_router(users.router, dependencies=_READ)
api_router.include_router(recommendations.router, dependencies=_READ)
api_router.include_router(forget.router)
api_router.include_router(stats.router, dependencies=_READ)
api_router.include_router(health.router)
api_router.include_router(metrics.router, dependencies=[Depends(require_metrics)])
api_router.include_router(status.router)
