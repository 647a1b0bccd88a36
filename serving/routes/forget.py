"""``DELETE /users/{user_id}`` (admin): forget a user, answer with the erase report.

The erase is :func:`userstream.stores.forget_user`; then this route waits (up
to :data:`WAIT_S`) until its own replica's index has applied the tombstones,
so a neighbour list this replica serves afterwards no longer holds the user,
and says which other replicas (``EmbeddingStore.followers``) had applied them by
then. ``{user_id:path}`` takes ids holding '/', as in :mod:`serving.routes.users`
(GET routes end in a fixed segment; this one is DELETE only). With
``PSEUDONYM_KEY`` set a raw id is mapped to its pseudonym first (a pseudonym is
taken as it is), and the report names the pseudonym, never the raw id.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from serving.auth import require_admin
from serving.deps import ContextDep
from serving.follower import parse_stream_id
from userstream.stores import forget_user

__all__ = ["WAIT_S", "router"]

router = APIRouter(prefix="/users", tags=["users"])

WAIT_S = 5.0  # the longest this replica's index may take to apply the tombstones


@router.delete("/{user_id:path}", dependencies=[Depends(require_admin)])
async def forget(user_id: str, ctx: ContextDep) -> dict:
    """Erase the user's sequence, embedding, ids, queue entries and feed entries;
    every replica drops it from its index, the training worker from its reservoir
    and checkpoint at its next cycle. The report says what each store held."""
    store_id = ctx.pseudonyms.of_query(user_id)
    report = await run_in_threadpool(forget_user, ctx.sequences, ctx.embeddings, store_id)
    tombstones = report["embeddings"]["tombstones"]
    follower = ctx.follower
    if tombstones and follower.is_alive():
        here = await asyncio.to_thread(follower.wait_for, tombstones[-1], WAIT_S)
    else:
        here = not tombstones
    replicas = {follower.name: here}
    if tombstones:
        last = parse_stream_id(tombstones[-1])
        others = await run_in_threadpool(ctx.embeddings.followers)
        for name, (applied, _at) in others.items():
            replicas.setdefault(name, parse_stream_id(applied) >= last)
    report["index_applied"] = replicas
    return report
