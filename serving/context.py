"""What every request handler needs, built once per app by :func:`serving.api.create_app`."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from serving.follower import IndexFollower
from serving.metrics import ServingMetrics
from serving.recommender import Recommender
from userstream.settings import Settings
from userstream.stores import EmbeddingStore, SequenceStore
from userstream.types import Keys

__all__ = ["ServingContext"]


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
