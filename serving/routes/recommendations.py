"""``/users/{user_id}/recommendations``: next items scored by the encoder."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from serving import queries
from serving.deps import ContextDep
from serving.schemas import Recommendations

__all__ = ["router"]

router = APIRouter(prefix="/users", tags=["users"])


@router.get(
    "/{user_id}/recommendations",
    response_model=Recommendations,
    responses={
        404: {"description": "no behaviors are stored for this user"},
        503: {"description": "no model checkpoint exists yet (the message says where)"},
    },
)
def recommendations(
    user_id: str,
    ctx: ContextDep,
    k: Annotated[int, Query(ge=1, le=1000, description="how many items")] = 10,
    exclude_seen: Annotated[
        bool, Query(description="leave out items already in the user's sequence")
    ] = True,
) -> Recommendations:
    """The k items the encoder scores highest as the user's next behavior."""
    try:
        return queries.recommendations(ctx, user_id, k, exclude_seen)
    except queries.UnknownUser as exc:
        raise HTTPException(404, str(exc)) from exc
    except queries.ModelNotReady as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from exc
