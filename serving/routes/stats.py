"""``/stats``: pipeline counters, model version and index state as JSON."""

from __future__ import annotations

from fastapi import APIRouter

from serving import queries
from serving.deps import ContextDep
from serving.schemas import Stats

__all__ = ["router"]

router = APIRouter(tags=["ops"])


@router.get("/stats", response_model=Stats)
def stats(ctx: ContextDep) -> Stats:
    """Events ingested / dead-lettered, users, items, model version, index size and lag."""
    return queries.stats(ctx)
