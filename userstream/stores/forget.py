"""Forget a user: erase everything the stores hold of it, and say what went.

:func:`forget_user` is what ``DELETE /users/{id}`` and ``userstream forget ID``
run. In order:

1. :meth:`SequenceStore.forget`: the user's sequence, its membership of the users
   set and of both change queues, in one Lua call in the user's slot, which also
   marks it forgotten (``{shard}:forgotten``, user -> time);
2. :meth:`EmbeddingStore.forget`: its embedding and FAISS id (one Lua call in the
   same slot), the update-feed entries that name it (XDEL), and a tombstone per
   id on the feed, without the user id, which every API replica applies by
   removing the id from its index and user table (and then snapshots).

What is not done here happens soon after, by the processes that own it: each
API replica applies the tombstone (the route waits for its own replica); the
training worker reads the markers at its next cycle, drops the users from its
replay reservoir, erases any embedding an in-flight embedding batch wrote back,
rewrites its checkpoint without them, deletes the older checkpoint files and
then clears the markers. So a marker (the raw id) lives until that cycle: at
most ``TRAIN_INTERVAL_S`` plus a cycle while a training worker runs.

Not erased (README "Forgetting a user"): the events in Kafka (the events topic
and the dead-letter topic keep them until ``TOPIC_RETENTION_MS``; the embedded
broker until it restarts), Redis's AOF file until its next rewrite, and
aggregate counters (events ingested, behavior counts, item dictionary).
"""

from __future__ import annotations

import time
from typing import Any

from userstream.stores.contracts import EmbeddingStore, SequenceStore

__all__ = ["NOT_ERASED", "forget_user"]

NOT_ERASED = (
    "events in Kafka (events and dead-letter topics) until TOPIC_RETENTION_MS; "
    "Redis AOF until its next rewrite; aggregate counters"
)


def forget_user(
    sequences: SequenceStore, embeddings: EmbeddingStore, user_id: str
) -> dict[str, Any]:
    """Erase ``user_id`` from both stores; returns the erase report (JSON-ready):
    what each store held, the feed tombstones, what follows and what is not erased.
    Idempotent: forgetting an unknown user reports zeros (and marks it)."""
    at = time.time()
    seq = sequences.forget(user_id)
    emb = embeddings.forget(user_id)
    found = bool(seq["behaviors"] or seq["users"] or emb["embedding"] or emb["nums"])
    return {
        "user_id": user_id,
        "found": found,
        "at": at,
        "sequences": seq,
        "embeddings": emb,
        "follows": {
            "index": "every API replica removes ids "
            f"{emb['nums']} when it applies the tombstones, then snapshots",
            "checkpoint": "the training worker drops the user from its reservoir at its next "
            "cycle, rewrites its checkpoint and deletes older ones, then clears the marker",
        },
        "not_erased": NOT_ERASED,
    }
