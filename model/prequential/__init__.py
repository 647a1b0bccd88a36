"""The streaming benchmark (PROTOCOL section 2): ``userstream bench prequential``.

Start reading at :mod:`model.prequential.loop` (test-then-train over a stream
through the live code path), then :mod:`model.prequential.models` (every
model behind one interface), :mod:`model.prequential.baselines` (popularity,
co-occurrence, River MF), :mod:`model.prequential.feeds` /
:mod:`model.prequential.kafka_feed` (where the events go: in process, or
through the real broker, stream worker and Redis) and
:mod:`model.prequential.report` (JSON, table, plot).
:mod:`model.prequential.planted` makes a stream with an abrupt shift.
"""

from model.prequential.feeds import Feed, MemoryFeed
from model.prequential.loop import MODELS, PrequentialConfig, PrequentialResult, run_prequential
from model.prequential.models import Cadence, PrequentialModel

__all__ = [
    "MODELS",
    "Cadence",
    "Feed",
    "MemoryFeed",
    "PrequentialConfig",
    "PrequentialModel",
    "PrequentialResult",
    "run_prequential",
]
