"""Event dicts (``stream.datasets``) -> per-user behavior sequences, oldest first.

The offline commands read the same files the replayer streams into Kafka, with
the same reader, so an offline model and a live one see the same events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from userstream.types import Behavior

__all__ = ["load_sequences", "sequences_from_events"]


def sequences_from_events(events: Iterable[Mapping[str, Any]]) -> dict[str, list[Behavior]]:
    """Group events (already in timestamp order) by user, keeping their order.

    Users keep the order in which they first appear; ids become strings.
    """
    from stream.events import to_seconds

    out: dict[str, list[Behavior]] = {}
    for ev in events:
        user = str(ev["user_id"])
        behavior = Behavior(
            str(ev["item_id"]), str(ev.get("behavior") or "event"), to_seconds(ev["ts"])
        )
        out.setdefault(user, []).append(behavior)
    return out


def load_sequences(path: str | Path, fmt: str) -> dict[str, list[Behavior]]:
    """Read ``path`` in format ``fmt`` (see ``stream.datasets.FORMATS``) into sequences."""
    from stream.datasets import read_dataset

    return sequences_from_events(read_dataset(path, fmt))
