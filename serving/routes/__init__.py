"""One APIRouter per resource; :data:`api_router` includes them all."""

from __future__ import annotations

from fastapi import APIRouter

from serving.routes import health, metrics, recommendations, stats, users

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(users.router)
api_router.include_router(recommendations.router)
api_router.include_router(stats.router)
api_router.include_router(health.router)
api_router.include_router(metrics.router)
