"""What the dead-letter topic receives: a rejected event or message, its reason,
and where it came from, bounded in size.

:class:`Invalid` is what decoding (:mod:`stream.events`) returns for each
rejected event; :func:`dead_letter_value` turns one into the JSON value the
stream worker sends to the dead-letter topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from stream.limits import DEAD_LETTER_MAX_BYTES, MAX_REASON

__all__ = ["DeadLetter", "Invalid", "dead_letter_value"]


@dataclass(frozen=True, slots=True)
class Invalid:
    """One rejected event (or undecodable message) for the dead-letter topic."""

    reason: str
    payload: str  # the original text: the whole message, or one array element
    payload_bytes: int | None = None  # the original size, where it is not len(payload in UTF-8)
    truncated: bool = False  # ``payload`` holds only the start of the original


DeadLetter = tuple[int, int, Any, Invalid]  # (partition, offset, message key, why)


def dead_letter_value(
    invalid: Invalid,
    topic: str,
    partition: int,
    offset: int,
    now: float,
    max_bytes: int = DEAD_LETTER_MAX_BYTES,
) -> bytes:
    """The JSON value sent to the dead-letter topic for one invalid event.

    At most ``max_bytes`` (at least 4 KiB): a longer payload is cut, and
    ``truncated`` and ``payload_bytes`` (the original size in UTF-8) say so.
    """
    if max_bytes < 4096:
        raise ValueError(f"max_bytes={max_bytes} leaves no room for the record (at least 4096)")
    payload = invalid.payload
    size = invalid.payload_bytes
    record: dict[str, Any] = {
        "reason": _fit(invalid.reason[:MAX_REASON], 2048),
        "payload": payload,
        "topic": _fit(topic, 1024),
        "partition": partition,
        "offset": offset,
        "ts": now,
        "payload_bytes": len(_utf8(payload)) if size is None else size,
        "truncated": invalid.truncated,
    }
    out = _utf8(json.dumps(record, ensure_ascii=False))
    if len(out) <= max_bytes:
        return out
    record.update(payload="", truncated=True)
    budget = max_bytes - len(_utf8(json.dumps(record, ensure_ascii=False)))
    record["payload"] = _fit(payload, budget)
    return _utf8(json.dumps(record, ensure_ascii=False))


def _fit(text: str, budget: int) -> str:
    """The longest start of ``text`` found whose JSON string body takes at most ``budget`` bytes."""
    cut = text[: max(budget, 0)]  # a character takes at least one byte
    while cut:
        size = len(_utf8(json.dumps(cut, ensure_ascii=False))) - 2  # less the quotes
        if size <= budget:
            break
        cut = cut[: min(len(cut) - 1, int(len(cut) * budget / size))]  # escapes take more
    return cut


def _utf8(text: str) -> bytes:
    # A lone surrogate (a JSON "\ud800" decoded into a reason or a str payload)
    # becomes the same escape again: still valid JSON, still the same text.
    return text.encode("utf-8", "backslashreplace")
