"""What every request handler needs, built once per app by :func:`serving.api.create_app`."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from serving.auth import TokenAuth
from serving.follower import IndexFollower
from serving.kafka_view import KafkaView
from serving.metrics import ServingMetrics
from serving.recommender import Recommender
from userstream.pseudonyms import Pseudonymizer
from userstream.settings import Settings
from userstream.stores import EmbeddingStore, SequenceStore
from userstream.types import Keys

__all__ = ["OpsStores", "ServingContext"]


@dataclass(frozen=True)
class OpsStores:
    """The stores again, on a client that fails fast (short timeouts, no retries).

    ``/healthz``, ``/stats`` and ``/metrics`` read through these, so that a hung
    Redis turns into a quick 503 (or ``userstream_redis_up 0``) instead of a
    request that waits out the main client's timeouts and retries.
    """

    redis: redis.Redis
    sequences: SequenceStore
    embeddings: EmbeddingStore
    timeout_s: float  # the socket timeout of ``redis``, quoted in the reasons


@dataclass(frozen=True)
class ServingContext:
    """The app's long-lived objects; stored on ``app.state.ctx``, reached via ``deps``."""

    settings: Settings
    redis: redis.Redis
    keys: Keys
    embeddings: EmbeddingStore
    sequences: SequenceStore
    follower: IndexFollower
    metrics: ServingMetrics
    follower_started: bool
    recommender: Recommender
    ops: OpsStores
    kafka: KafkaView | None = None  # lag and dead letters for the status page
    auth: TokenAuth | None = None  # bearer tokens (serving/auth.py); None = open
    # raw id -> store id (PSEUDONYM_KEY, userstream/pseudonyms.py); the identity when off
    pseudonyms: Pseudonymizer = field(default_factory=lambda: Pseudonymizer(None))
