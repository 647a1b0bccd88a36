"""Stream stage of userstream: clickstream events in Kafka -> per-user sequences in Redis.

Start reading at :mod:`stream.app` (``run_worker``: topics, Faust app, readiness),
then :mod:`stream.agents` (the thin ingest loop and its delivery guarantees),
:mod:`stream.events` (pure decode + validation); the exactly-once Redis write
is :class:`userstream.stores.RedisSequenceStore`. Producers: :mod:`stream.replay` (data sets and
any event iterable), :mod:`stream.datasets` (readers), :mod:`stream.generator`
(synthetic clickstream with planted groups). Run a worker with
``userstream stream-worker``.

Only light modules are imported here; Faust and aiokafka load on first use of
:func:`create_app` / :func:`run_worker` / :func:`replay` / :func:`ensure_topics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stream.datasets import FORMATS, Dataset, read_dataset
from stream.events import Invalid, encode_events, event_to_json, parse_message
from stream.generator import ClickstreamGenerator

if TYPE_CHECKING:
    from stream.app import create_app, run_worker
    from stream.replay import ReplayReport, produce_events, replay
    from stream.topics import ensure_topics, ensure_topics_async, read_topic_async

__all__ = [
    "FORMATS",
    "ClickstreamGenerator",
    "Dataset",
    "Invalid",
    "ReplayReport",
    "create_app",
    "encode_events",
    "ensure_topics",
    "ensure_topics_async",
    "event_to_json",
    "parse_message",
    "produce_events",
    "read_dataset",
    "read_topic_async",
    "replay",
    "run_worker",
]

_LAZY = {
    "create_app": "stream.app",
    "run_worker": "stream.app",
    "ReplayReport": "stream.replay",
    "produce_events": "stream.replay",
    "replay": "stream.replay",
    "ensure_topics": "stream.topics",
    "ensure_topics_async": "stream.topics",
    "read_topic_async": "stream.topics",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
