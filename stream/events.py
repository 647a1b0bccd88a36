"""Decode and validate one Kafka message value into normalized events.

A message value is one JSON object or a JSON array of objects (clickstream
collectors batch events that way). :func:`parse_message` is pure and cheap
(plain dict checks, no pydantic per message) because the stream worker calls it
for every message:

>>> events, invalid = parse_message(b'{"user_id": 7, "item_id": "i1", "behavior": " Click ", "ts": 1700000000000}')
>>> events[0].user_id, events[0].behavior, events[0].ts
('7', 'click', 1700000000.0)
>>> parse_message(b'{"user_id": "u1", "item_id": "i1", "behavior": "view"}')[1][0].reason
"missing field 'ts'"

An :class:`Invalid` carries a human reason and the ORIGINAL payload text (for
an array, the text of the offending element only), ready for the dead-letter
topic. The helpers :func:`event_to_json` and :func:`encode_events` build
message values for producers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from userstream.types import Event

__all__ = [
    "DeadLetter",
    "FIELDS",
    "Invalid",
    "MAX_FUTURE_S",
    "MAX_ID_LEN",
    "MAX_TEXT_LEN",
    "dead_letter_value",
    "encode_events",
    "event_to_json",
    "parse_message",
    "split_batch",
    "to_seconds",
    "validate_event",
]

LOG = logging.getLogger(__name__)

MAX_ID_LEN = 256
MAX_TEXT_LEN = 1024
MAX_FUTURE_S = 86_400.0  # reject timestamps more than one day ahead of the wall clock
_MS_THRESHOLD = 1e11  # larger numbers are epoch milliseconds (1e11 s is the year 5138)
REQUIRED = ("user_id", "item_id", "behavior", "ts")
FIELDS = frozenset((*REQUIRED, "event_id", "text", "props"))
_BEHAVIOR_RE = re.compile(r"[a-z0-9_\-]{1,32}")
_BEHAVIOR_CACHE: dict[str, str] = {}  # raw -> normalized; the open set is small in practice
_BEHAVIOR_CACHE_MAX = 4096
_SNIPPET = 60


@dataclass(frozen=True, slots=True)
class Invalid:
    """One rejected event (or undecodable message) for the dead-letter topic."""

    reason: str
    payload: str  # the original text: the whole message, or one array element


DeadLetter = tuple[int, int, Any, Invalid]  # (partition, offset, message key, why)


class _Reject(Exception):
    """Raised by the field checks; its message is the human reason."""


def _snip(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _identifier(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not value:
            raise _Reject(f"{name} is empty")
    elif isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    else:
        raise _Reject(f"{name} must be a string or integer, got {_type_name(value)}")
    if len(value) > MAX_ID_LEN:
        raise _Reject(f"{name} is {len(value)} characters long (at most {MAX_ID_LEN})")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise _Reject(f"{name} contains the non-printable character U+{ord(bad):04X}")
    return value


def _behavior(value: Any) -> str:
    if not isinstance(value, str):
        raise _Reject(f"behavior must be a string, got {_type_name(value)}")
    got = _BEHAVIOR_CACHE.get(value)
    if got is not None:
        return got
    norm = value.strip().lower()
    if not _BEHAVIOR_RE.fullmatch(norm):
        raise _Reject(f"behavior {_snip(value)!r} is not 1-32 characters of a-z, 0-9, '_' or '-'")
    if len(_BEHAVIOR_CACHE) < _BEHAVIOR_CACHE_MAX:
        _BEHAVIOR_CACHE[value] = norm
    return norm


def _timestamp(value: Any, now: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str):
        try:
            ts = float(value)
        except ValueError:
            ts = _iso_seconds(value)
    else:
        raise _Reject(f"ts must be a number or an ISO-8601 string, got {_type_name(value)}")
    if not math.isfinite(ts):
        raise _Reject(f"ts {_snip(value)!r} is not finite")
    if ts > _MS_THRESHOLD:
        ts /= 1000.0
    if ts < 0:
        raise _Reject(f"ts {_snip(value)!r} is negative")
    if ts > now + MAX_FUTURE_S:
        raise _Reject(f"ts {_snip(value)!r} is more than one day in the future")
    return ts


def _iso_seconds(text: str) -> float:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _Reject(f"ts {_snip(text)!r} is not a number or ISO-8601 time") from None
    if when.tzinfo is None:  # a time without an offset is taken as UTC
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def to_seconds(value: Any) -> float:
    """Epoch seconds of a ``ts`` value (number, ms number, numeric or ISO-8601 string).

    Raises ValueError with the reason. Unlike validation it has no future bound;
    dataset readers use it to sort.
    """
    try:
        return _timestamp(value, math.inf)
    except _Reject as exc:
        raise ValueError(str(exc)) from None


def validate_event(obj: Any, now: float | None = None) -> Event:
    """Validate and normalize one decoded event object; raises ValueError(reason)."""
    try:
        return _validate(obj, time.time() if now is None else now)
    except _Reject as exc:
        raise ValueError(str(exc)) from None


def _validate(obj: Any, now: float) -> Event:
    if not isinstance(obj, dict):
        raise _Reject(f"event must be a JSON object, got {_type_name(obj)}")
    if not FIELDS.issuperset(obj):
        unknown = sorted(k for k in obj if k not in FIELDS)
        raise _Reject("unknown field(s) " + ", ".join(repr(k) for k in unknown))
    for name in REQUIRED:
        if name not in obj:
            raise _Reject(f"missing field {name!r}")
    user_id = _identifier("user_id", obj["user_id"])
    item_id = _identifier("item_id", obj["item_id"])
    behavior = _behavior(obj["behavior"])
    ts = _timestamp(obj["ts"], now)
    event_id = obj.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise _Reject(f"event_id must be a string, got {_type_name(event_id)}")
    text = obj.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise _Reject(f"text must be a string, got {_type_name(text)}")
        if len(text) > MAX_TEXT_LEN:
            raise _Reject(f"text is {len(text)} characters long (at most {MAX_TEXT_LEN})")
    props = obj.get("props")
    if props is not None and not isinstance(props, dict):
        raise _Reject(f"props must be a JSON object, got {_type_name(props)}")
    return Event(user_id, item_id, behavior, ts, event_id, text, props)


def parse_message(raw: bytes | str | None) -> tuple[list[Event], list[Invalid]]:
    """Decode one message value into (valid events in message order, invalid ones)."""
    if raw is None:
        return [], [Invalid("message has no value", "")]
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    except UnicodeDecodeError as exc:
        return [], [
            Invalid(f"message is not valid UTF-8: {exc}", bytes(raw).decode("utf-8", "replace"))
        ]
    try:
        doc = json.loads(text)
    except ValueError as exc:
        return [], [Invalid(f"message is not valid JSON: {exc}", text)]
    now = time.time()
    if not isinstance(doc, list):
        try:
            return [_validate(doc, now)], []
        except _Reject as exc:
            return [], [Invalid(str(exc), text)]
    if not doc:
        return [], [Invalid("message is an empty JSON array", text)]
    events: list[Event] = []
    bad: list[tuple[int, str]] = []
    for i, obj in enumerate(doc):
        try:
            events.append(_validate(obj, now))
        except _Reject as exc:
            bad.append((i, str(exc)))
    if not bad:
        return events, []
    pieces = _element_texts(text)
    return events, [Invalid(reason, pieces[i]) for i, reason in bad]


def _element_texts(text: str) -> list[str]:
    """The exact source text of each element of a JSON array (slow path, invalid ones only)."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    pos = text.index("[") + 1
    out: list[str] = []
    n = len(text)
    while True:
        while pos < n and text[pos] in ws:
            pos += 1
        if text[pos] == "]":
            return out
        _, end = decoder.raw_decode(text, pos)
        out.append(text[pos:end])
        pos = end
        while pos < n and text[pos] in ws:
            pos += 1
        if text[pos] == ",":
            pos += 1


def split_batch(
    records: Iterable[tuple[int, int, Any, bytes | None]],
) -> tuple[list[tuple[int, int, Event]], list[DeadLetter]]:
    """Parse (partition, offset, key, value) records into offset-tagged events and dead letters.

    Events of one message share its offset and keep the message order.
    """
    events: list[tuple[int, int, Event]] = []
    dead: list[DeadLetter] = []
    for partition, offset, key, value in records:
        good, bad = parse_message(value)
        for ev in good:
            events.append((partition, offset, ev))
        for inv in bad:
            dead.append((partition, offset, key, inv))
    return events, dead


def dead_letter_value(
    invalid: Invalid, topic: str, partition: int, offset: int, now: float
) -> bytes:
    """The JSON value sent to the dead-letter topic for one invalid event."""
    return json.dumps(
        {
            "reason": invalid.reason,
            "payload": invalid.payload,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "ts": now,
        },
        ensure_ascii=False,
    ).encode()


def event_to_json(event: Event | Mapping[str, Any]) -> str:
    """One event as a JSON object string (optional fields left out when unset)."""
    if isinstance(event, Event):
        obj: dict[str, Any] = {
            "user_id": event.user_id,
            "item_id": event.item_id,
            "behavior": event.behavior,
            "ts": event.ts,
        }
        if event.event_id is not None:
            obj["event_id"] = event.event_id
        if event.text is not None:
            obj["text"] = event.text
        if event.props is not None:
            obj["props"] = event.props
    else:
        obj = {k: v for k, v in event.items() if v is not None}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def encode_events(events: Iterable[Event | Mapping[str, Any]]) -> bytes:
    """A message value: one object for a single event, else a JSON array."""
    parts = [event_to_json(e) for e in events]
    if len(parts) == 1:
        return parts[0].encode()
    return ("[" + ",".join(parts) + "]").encode()
