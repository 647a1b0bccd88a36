"""The state every stage shares, behind two typed contracts.

Start reading at :mod:`userstream.stores.contracts` (the :class:`SequenceStore`
and :class:`EmbeddingStore` Protocols and the data that crosses them). Each has
two implementations with the same semantics: Redis
(:mod:`~userstream.stores.redis_sequences`, :mod:`~userstream.stores.redis_embeddings`,
the service's system of record) and memory (:mod:`~userstream.stores.memory`, the
one-process benchmark loop and tests). Redis clients come from :func:`connect`.

Any stage may import this package; it imports nothing of ``stream``, ``model``
or ``serving``.
"""

from userstream.stores.client import connect, connect_settings
from userstream.stores.contracts import (
    CHANGE_QUEUES,
    COUNTERS,
    CYCLE_HISTORY,
    AppliedBatch,
    BatchPlan,
    ChangeQueue,
    EmbeddingStore,
    EmbeddingUpdate,
    FeedState,
    ModelInfo,
    OffsetEvent,
    SequenceStore,
    feed_covers,
    parse_stream_id,
    plan_batch,
    stored_behavior,
)
from userstream.stores.forget import forget_user
from userstream.stores.memory import MemoryEmbeddingStore, MemorySequenceStore
from userstream.stores.redis_embeddings import RedisEmbeddingStore
from userstream.stores.redis_sequences import RedisSequenceStore

__all__ = [
    "CHANGE_QUEUES",
    "CYCLE_HISTORY",
    "COUNTERS",
    "AppliedBatch",
    "BatchPlan",
    "ChangeQueue",
    "EmbeddingStore",
    "EmbeddingUpdate",
    "FeedState",
    "MemoryEmbeddingStore",
    "MemorySequenceStore",
    "ModelInfo",
    "OffsetEvent",
    "RedisEmbeddingStore",
    "RedisSequenceStore",
    "SequenceStore",
    "connect",
    "connect_settings",
    "feed_covers",
    "forget_user",
    "parse_stream_id",
    "plan_batch",
    "stored_behavior",
]
