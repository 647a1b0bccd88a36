"""``/users/{user_id}/recommendations`` and ``/users/{user_id}/profile``: both
computed from the user's stored sequence by the newest checkpoint.

``{user_id:path}`` for ids holding '/', and pseudonyms (``PSEUDONYM_KEY``), as
in :mod:`serving.routes.users`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from serving import queries
from serving.deps import ContextDep
from serving.schemas import Recommendations, UserProfile

__all__ = ["router"]

router = APIRouter(prefix="/users", tags=["users"])

_ERRORS = {
    404: {"description": "no behaviors are stored for this user"},
    503: {"description": "no model checkpoint exists yet (the message says where)"},
}


@contextmanager
def _http_errors() -> Iterator[None]:
    """An unknown user is a 404; no checkpoint yet is a 503 with Retry-After."""
    try:
        yield
    except queries.UnknownUser as exc:
        raise HTTPException(404, str(exc)) from exc
    except queries.ModelNotReady as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from exc


@router.get("/{user_id:path}/recommendations", response_model=Recommendations, responses=_ERRORS)
def recommendations(
    user_id: str,
    ctx: ContextDep,
    k: Annotated[int, Query(ge=1, le=1000, description="how many items")] = 10,
    exclude_seen: Annotated[
        bool, Query(description="leave out items already in the user's sequence")
    ] = True,
) -> Recommendations:
    """The k items the encoder scores highest as the user's next behavior."""
    store_id = ctx.pseudonyms.of_query(user_id)
    with _http_errors():
        answer = queries.recommendations(ctx, store_id, k, exclude_seen)
    return answer if store_id == user_id else answer.model_copy(update={"user_id": user_id})


@router.get("/{user_id:path}/profile", response_model=UserProfile, responses=_ERRORS)
def profile(user_id: str, ctx: ContextDep) -> UserProfile:
    """The user's profile vector (features for profiling and targeting): the
    normalized mean of the item vectors of the stored history, newest checkpoint."""
    store_id = ctx.pseudonyms.of_query(user_id)
    with _http_errors():
        answer = queries.user_profile(ctx, store_id)
    return answer if store_id == user_id else answer.model_copy(update={"user_id": user_id})
