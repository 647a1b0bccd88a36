"""Where a prequential run's events go: the sequence state the training worker reads.

:class:`MemoryFeed` applies each event at once to in-memory stores (the
default); :class:`model.prequential.kafka_feed.KafkaFeed` sends the same
events through the real broker, stream worker and Redis instead.
"""

from __future__ import annotations

from typing import Any, Protocol

from userstream.stores import (
    EmbeddingStore,
    MemoryEmbeddingStore,
    MemorySequenceStore,
    SequenceStore,
)
from userstream.types import Behavior, Event

__all__ = ["TOPIC", "Feed", "MemoryFeed"]

TOPIC = "prequential"


class Feed(Protocol):
    """Ingest path of a run: ``add`` every event after it was scored, ``tail`` for
    the state before the next one, ``sync`` before a cycle reads ``store``."""

    store: SequenceStore  # what the TrainingWorker reads
    embeddings: EmbeddingStore  # what it writes

    def tail(self, user: str, n: int) -> list[Behavior]:
        """The last ``n`` behaviors of ``user`` given every event added so far."""
        ...

    def add(self, pos: int, raw: Any, ev: Event) -> None:
        """Event ``pos`` (``raw`` as given, ``ev`` validated) after it was scored."""
        ...

    def sync(self) -> None:
        """Return once ``store`` holds every added event."""
        ...


FEED_MAXLEN = 50_000  # update-feed entries a MemoryFeed keeps at most


class MemoryFeed:
    """The in-process path: each event goes at once to a MemorySequenceStore."""

    def __init__(self, max_len: int) -> None:
        self.store = MemorySequenceStore(max_len)
        # the ``ours`` neighbour source follows the update feed as the API does; the
        # worker trims what it applied (a backstop bounds it when nobody follows)
        self.embeddings = MemoryEmbeddingStore(feed_maxlen=FEED_MAXLEN)

    def tail(self, user: str, n: int) -> list[Behavior]:
        return self.store.read_tail(user, n)

    def add(self, pos: int, raw: Any, ev: Event) -> None:
        self.store.apply_many(TOPIC, [(0, pos, ev)])

    def sync(self) -> None:
        pass
