"""``/users/{user_id}/...``: similar users and the user's embedding.

User ids may hold anything the stream accepts, '/' included: a client sends
``quote(user_id, safe="")``, the server decodes ``%2F`` to '/' before routing,
and ``{user_id:path}`` takes it. Every user route ends in its own fixed
segment, so the (greedy) match is unambiguous: ``/users/a/similar/similar`` is
user ``a/similar``.

With ``PSEUDONYM_KEY`` set the stores hold pseudonyms (:mod:`userstream.pseudonyms`):
a raw id is mapped before any lookup, a pseudonym (a neighbour id from
``/similar``) is taken as it is; ``user_id`` in the answer echoes what was asked.

``/similar?explain=true`` adds to each neighbour the behaviors of both users its
similarity rests on (:mod:`model.explain`: leave-one-out by the newest
checkpoint). Before the first checkpoint that is a 503 with what to do (the
neighbours alone are still served without ``explain``); the plain answer is
serialized without the ``explanation`` field, byte for byte what it was.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool

from serving import queries
from serving.deps import ContextDep
from serving.schemas import SimilarUsers, UserEmbedding

__all__ = ["router"]

router = APIRouter(prefix="/users", tags=["users"])

_NOT_FOUND = {404: {"description": "the user has no embedding (the message says why)"}}


# serializing without the explanation field keeps the plain answer what it was
_PLAIN = {"neighbors": {"__all__": {"explanation"}}}


@router.get(
    "/{user_id:path}/similar",
    response_model=SimilarUsers,
    responses={
        **_NOT_FOUND,
        422: {"description": "k, or explain_top, out of range (with explain=true, k <= 50)"},
        503: {
            "description": "the index is still loading; or, with explain=true, no model "
            "checkpoint exists yet (the message says where it was looked for)"
        },
    },
)
async def similar(
    user_id: str,
    ctx: ContextDep,
    k: Annotated[int, Query(ge=1, le=1000, description="how many neighbours")] = 10,
    explain: Annotated[
        bool,
        Query(
            description="add to each neighbour the behaviors of both users its similarity "
            "rests on, by the newest checkpoint (leave-one-out, model/explain.py); "
            f"k <= {queries.EXPLAIN_MAX_K}"
        ),
    ] = False,
    explain_top: Annotated[
        int, Query(ge=1, le=10, description="with explain=true: behaviors per user and neighbour")
    ] = 3,
) -> Response:
    """The k most similar other users by inner product of L2-normalized embeddings."""
    store_id = ctx.pseudonyms.of_query(user_id)
    try:
        if explain:  # an encoder pass: always in the thread pool
            answer = await run_in_threadpool(
                queries.explained_similar_users, ctx, store_id, k, explain_top
            )
        else:
            # what this replica holds in memory is answered on the event loop when
            # the search is short (queries.LOOP_SCAN_MAX); what needs Redis, or a
            # long exact search, goes to the thread pool, so neither stalls the loop
            answer = queries.similar_users(ctx, store_id, k, local_only=True)
            if answer is None:
                answer = await run_in_threadpool(queries.similar_users, ctx, store_id, k)
    except queries.TooManyToExplain as exc:
        raise HTTPException(422, str(exc)) from exc
    except queries.NoEmbedding as exc:
        raise HTTPException(404, str(exc)) from exc
    except queries.IndexNotReady as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
    except queries.ModelNotReady as exc:
        detail = f"{exc}; explain=true needs a checkpoint, ask without it for neighbours alone"
        raise HTTPException(503, detail, headers={"Retry-After": "10"}) from exc
    if store_id != user_id:
        answer = answer.model_copy(update={"user_id": user_id})
    # serialized by pydantic-core directly: FastAPI's response_model path would
    # validate the model again and walk it through jsonable_encoder
    body = answer.model_dump_json(exclude=None if explain else _PLAIN)
    return Response(body, media_type="application/json")


@router.get("/{user_id:path}/embedding", response_model=UserEmbedding, responses=_NOT_FOUND)
def embedding(user_id: str, ctx: ContextDep) -> UserEmbedding:
    """The user's current embedding and the model version that made it."""
    store_id = ctx.pseudonyms.of_query(user_id)
    try:
        answer = queries.user_embedding(ctx, store_id)
    except queries.NoEmbedding as exc:
        raise HTTPException(404, str(exc)) from exc
    return answer if store_id == user_id else answer.model_copy(update={"user_id": user_id})
