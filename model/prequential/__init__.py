"""The streaming benchmark (PROTOCOL section 2): ``userstream bench prequential``.

Start reading at :mod:`model.prequential.loop` (test-then-train over a stream
through the live code path), then :mod:`model.prequential.models` (every
model behind one interface), :mod:`model.prequential.baselines` (popularity,
co-occurrence, River MF), :mod:`model.prequential.neighbours` (PROTOCOL section 3:
the next item from each neighbour source's similar users), :mod:`model.prequential.feeds` /
:mod:`model.prequential.kafka_feed` (where the events go: in process, or
through the real broker, stream worker and Redis) and
:mod:`model.prequential.report` (JSON, table, plot).
:mod:`model.prequential.planted` makes a stream with an abrupt shift.
"""

from model.prequential.feeds import Feed, MemoryFeed
from model.prequential.loop import MODELS, PrequentialConfig, PrequentialResult, run_prequential
from model.prequential.models import Cadence, PrequentialModel
from model.prequential.neighbours import NEIGHBOUR_SOURCES

__all__ = [
    "MODELS",
    "NEIGHBOUR_SOURCES",
    "Cadence",
    "Feed",
    "MemoryFeed",
    "PrequentialConfig",
    "PrequentialModel",
    "PrequentialResult",
    "run_prequential",
]
