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

Parsing never raises, whatever the bytes: a message is redelivered until its
batch is applied, so one message that made the worker fail would stop its
partition for good. Every limit below is checked before the work it bounds,
and whatever still goes wrong in one message (or one element of an array)
becomes an :class:`Invalid` with the reason:

>>> parse_message(b"[" * 5000 + b"]" * 5000)[1][0].reason[:40]
'message nests arrays or objects too deep'
>>> parse_message(b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1' + b"0" * 400 + b"}")[1][0].reason[-19:]
'... is out of range'

=========================  ========================================  ==============================
limit                      constant                                  past it
=========================  ========================================  ==============================
message size               :data:`MAX_MESSAGE_BYTES` (1 MiB)         the message is dead-lettered
                                                                     undecoded, payload cut
events per array message   :data:`MAX_EVENTS_PER_MESSAGE` (10,000)   the message is one dead letter
nesting depth              :data:`MAX_DEPTH` (32; the event object   the event (or, past the JSON
                           is level 1, ``props`` level 2)            decoder's limit, the message)
id length                  :data:`MAX_ID_LEN` (256 characters;       the event; so are empty and
                           integer ids by their digits; event_id)    whitespace-only ids
text length                :data:`MAX_TEXT_LEN` (1024 characters)    the event
``ts`` range               finite, representable as a float, not     the event
                           negative, at most :data:`MAX_FUTURE_S`
                           ahead of the wall clock
``ts`` floor (live only)   :data:`MIN_TS` (1995-01-01T00:00:00Z)     the event
dead-letter value          :data:`DEAD_LETTER_MAX_BYTES` (256 KiB)   the payload is cut, its size
                                                                     and ``truncated`` recorded
=========================  ========================================  ==============================

The ``ts`` floor is a check of the live stream only: :func:`split_batch` (what
the stream worker calls) applies it, and so does :func:`validate_event` when
``now`` is finite. Tests, planted streams and :func:`to_seconds` (dataset
readers) use small synthetic times, and ``validate_event(obj, now=math.inf)``
replays history. It is 1995, not 2000, because ``userstream replay`` sends
recorded data sets through the stream worker with their own times (MovieLens
100K is from 1997; the larger MovieLens sets start in January 1995): it
catches an unset time (0, the year 1970), not old data.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from userstream.types import Event

__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "DeadLetter",
    "FIELDS",
    "Invalid",
    "MAX_DEPTH",
    "MAX_EVENTS_PER_MESSAGE",
    "MAX_FUTURE_S",
    "MAX_ID_LEN",
    "MAX_MESSAGE_BYTES",
    "MAX_TEXT_LEN",
    "MIN_TS",
    "dead_letter_value",
    "encode_events",
    "event_to_json",
    "parse_message",
    "split_batch",
    "to_seconds",
    "validate_event",
]

LOG = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
"""A larger message value is dead-lettered without being decoded."""
MAX_EVENTS_PER_MESSAGE = 10_000
"""A longer array is one dead letter (not one per element)."""
MAX_DEPTH = 32
"""Objects and arrays nest at most this deep in one event (the event is level 1)."""
MAX_ID_LEN = 256
"""Characters of user_id, item_id and event_id (an integer id: its digits)."""
MAX_TEXT_LEN = 1024
MAX_FUTURE_S = 86_400.0
"""A ``ts`` further ahead of the wall clock is rejected."""
MIN_TS = 788_918_400.0
"""1995-01-01T00:00:00Z: the live stream rejects an earlier ``ts`` (see the module doc)."""
DEAD_LETTER_MAX_BYTES = 256 << 10
"""A dead-letter value stays below this, well under the producer's default ``max_request_size``."""

_MS_THRESHOLD = 1e11  # larger numbers are epoch milliseconds (1e11 s is the year 5138)
_ID_INT_BITS = (10**MAX_ID_LEN).bit_length()  # an int with more bits has more digits
_MAX_REASON = 1000  # characters of a reason in a dead letter
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
    payload_bytes: int | None = None  # the original size, where it is not len(payload in UTF-8)
    truncated: bool = False  # ``payload`` holds only the start of the original


DeadLetter = tuple[int, int, Any, Invalid]  # (partition, offset, message key, why)


class _Reject(Exception):
    """Raised by the field checks; its message is the human reason."""


def _snip(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # e.g. an int past Python's digit limit
        text = f"<{_type_name(value)}>"
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


def _unexpected(exc: BaseException) -> str:
    return f"event could not be validated ({type(exc).__name__}: {exc})"[:_MAX_REASON]


def _identifier(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not value:
            raise _Reject(f"{name} is empty")
    elif isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _ID_INT_BITS:  # checked before str(): that is quadratic
            raise _Reject(f"{name} is an integer of more than {MAX_ID_LEN} digits")
        value = str(value)
    else:
        raise _Reject(f"{name} must be a string or integer, got {_type_name(value)}")
    if len(value) > MAX_ID_LEN:
        raise _Reject(f"{name} is {len(value)} characters long (at most {MAX_ID_LEN})")
    if value.isspace():
        raise _Reject(f"{name} is only whitespace")
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


def _timestamp(value: Any, now: float, min_ts: float = 0.0) -> float:
    if isinstance(value, float):
        ts = value
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            ts = float(value)
        except OverflowError:
            raise _Reject(f"ts {_snip(value)} is out of range") from None
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
    if ts < min_ts:
        raise _Reject(f"ts {_snip(value)!r} is before {_iso(min_ts)}")
    if ts > now + MAX_FUTURE_S:
        raise _Reject(f"ts {_snip(value)!r} is more than one day in the future")
    return ts


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_seconds(text: str) -> float:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise _Reject(f"ts {_snip(text)!r} is not a number or ISO-8601 time") from None
    if when.tzinfo is None:  # a time without an offset is taken as UTC
        when = when.replace(tzinfo=timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):  # e.g. year 1 with a positive offset
        raise _Reject(f"ts {_snip(text)!r} is out of range") from None


def to_seconds(value: Any) -> float:
    """Epoch seconds of a ``ts`` value (number, ms number, numeric or ISO-8601 string).

    Raises ValueError with the reason. Unlike validation it has no future bound
    and no floor; dataset readers use it to sort.
    """
    try:
        return _timestamp(value, math.inf)
    except _Reject as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(_unexpected(exc)) from None


def validate_event(obj: Any, now: float | None = None) -> Event:
    """Validate and normalize one decoded event object; raises ValueError(reason).

    With a finite ``now`` (the wall clock by default) ``ts`` must lie within
    [:data:`MIN_TS`, now + :data:`MAX_FUTURE_S`]; ``now=math.inf`` replays
    history and checks neither bound.
    """
    now = time.time() if now is None else now
    try:
        return _validate(obj, now, MIN_TS if math.isfinite(now) else 0.0)
    except _Reject as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(_unexpected(exc)) from None


def _validate(obj: Any, now: float, min_ts: float = 0.0) -> Event:
    if not isinstance(obj, dict):
        raise _Reject(f"event must be a JSON object, got {_type_name(obj)}")
    if not FIELDS.issuperset(obj):
        unknown = sorted(_snip(k) for k in obj if k not in FIELDS)
        raise _Reject("unknown field(s) " + ", ".join(repr(k) for k in unknown))
    for name in REQUIRED:
        if name not in obj:
            raise _Reject(f"missing field {name!r}")
    user_id = _identifier("user_id", obj["user_id"])
    item_id = _identifier("item_id", obj["item_id"])
    behavior = _behavior(obj["behavior"])
    ts = _timestamp(obj["ts"], now, min_ts)
    event_id = obj.get("event_id")
    if event_id is not None:
        if not isinstance(event_id, str):
            raise _Reject(f"event_id must be a string, got {_type_name(event_id)}")
        if len(event_id) > MAX_ID_LEN:
            raise _Reject(f"event_id is {len(event_id)} characters long (at most {MAX_ID_LEN})")
    text = obj.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise _Reject(f"text must be a string, got {_type_name(text)}")
        if len(text) > MAX_TEXT_LEN:
            raise _Reject(f"text is {len(text)} characters long (at most {MAX_TEXT_LEN})")
    props = obj.get("props")
    if props is not None:
        if not isinstance(props, dict):
            raise _Reject(f"props must be a JSON object, got {_type_name(props)}")
        for value in props.values():  # flat props (the usual case) need no walk
            if isinstance(value, (dict, list)):
                if _nests_deeper(props, MAX_DEPTH - 1):
                    raise _Reject(f"props nest deeper than {MAX_DEPTH} levels (the event is 1)")
                break
    return Event(user_id, item_id, behavior, ts, event_id, text, props)


def _nests_deeper(value: dict | list, levels: int) -> bool:
    """Whether objects and arrays nest more than ``levels`` deep in ``value`` (itself one).

    A walk with its own stack, so no depth of input can reach the recursion limit.
    """
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                if depth >= levels:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_message(
    raw: bytes | str | None, now: float | None = None, min_ts: float = 0.0
) -> tuple[list[Event], list[Invalid]]:
    """Decode one message value into (valid events in message order, invalid ones).

    Never raises. ``now`` is the wall clock (``time.time()`` by default) for the
    future bound; ``min_ts`` a floor for ``ts`` (:func:`split_batch` passes
    :data:`MIN_TS`).
    """
    if raw is None:
        return [], [Invalid("message has no value", "")]
    if not isinstance(raw, (bytes, bytearray, memoryview, str)):
        return [], [Invalid(f"message value is {type(raw).__name__}, not bytes", "")]
    size = _size(raw)
    if size > MAX_MESSAGE_BYTES:
        why = f"message is {size} bytes (at most {MAX_MESSAGE_BYTES})"
        return [], [Invalid(why, _head(raw), size, truncated=True)]
    try:
        text = raw.decode("utf-8") if not isinstance(raw, str) else raw
    except UnicodeDecodeError as exc:
        return [], [
            Invalid(
                f"message is not valid UTF-8: {exc}", bytes(raw).decode("utf-8", "replace"), size
            )
        ]
    try:
        doc = json.loads(text)
    except RecursionError:
        why = f"message nests arrays or objects too deep to decode (an event: {MAX_DEPTH} levels)"
        return [], [Invalid(why, text)]
    except ValueError as exc:
        return [], [Invalid(_not_json(exc), text)]
    except Exception as exc:  # MemoryError and the like: still this message's fault
        return [], [Invalid(f"message could not be decoded ({type(exc).__name__}: {exc})", text)]
    if now is None:
        now = time.time()
    if not isinstance(doc, list):
        try:
            return [_validate(doc, now, min_ts)], []
        except _Reject as exc:
            return [], [Invalid(str(exc), text)]
        except Exception as exc:
            return [], [Invalid(_unexpected(exc), text)]
    if not doc:
        return [], [Invalid("message is an empty JSON array", text)]
    if len(doc) > MAX_EVENTS_PER_MESSAGE:
        why = f"message holds {len(doc)} events (at most {MAX_EVENTS_PER_MESSAGE})"
        return [], [Invalid(why, text)]
    events: list[Event] = []
    bad: list[tuple[int, str]] = []
    for i, obj in enumerate(doc):
        try:
            events.append(_validate(obj, now, min_ts))
        except _Reject as exc:
            bad.append((i, str(exc)))
        except Exception as exc:
            bad.append((i, _unexpected(exc)))
    if not bad:
        return events, []
    pieces = _element_texts(text, len(doc))
    if pieces is None:  # cannot happen for text json.loads took; the decoded element will do
        return events, [Invalid(reason, _snip_json(doc[i])) for i, reason in bad]
    return events, [Invalid(reason, pieces[i]) for i, reason in bad]


def _size(raw: bytes | str) -> int:
    if isinstance(raw, str):  # tests and tools pass text; the worker passes bytes
        return (
            len(raw) if len(raw) * 4 <= MAX_MESSAGE_BYTES else len(raw.encode("utf-8", "replace"))
        )
    return len(raw)


def _head(raw: Any) -> str:
    """The start of an oversized (or unparsable) value, as text for the dead letter."""
    if isinstance(raw, str):
        return raw[:DEAD_LETTER_MAX_BYTES]
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw[:DEAD_LETTER_MAX_BYTES]).decode("utf-8", "replace")
    return ""


def _not_json(exc: ValueError) -> str:
    if "integer string conversion" in str(exc):  # Python's guard against quadratic int()
        return f"message holds an integer of more than {sys.get_int_max_str_digits()} digits"
    return f"message is not valid JSON: {exc}"[:_MAX_REASON]


def _snip_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return f"<{_type_name(value)}>"


def _element_texts(text: str, n_elements: int) -> list[str] | None:
    """The exact source text of each element of a JSON array (slow path, invalid ones only)."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    out: list[str] = []
    try:
        pos = text.index("[") + 1
        n = len(text)
        while True:
            while pos < n and text[pos] in ws:
                pos += 1
            if text[pos] == "]":
                break
            _, end = decoder.raw_decode(text, pos)
            out.append(text[pos:end])
            pos = end
            while pos < n and text[pos] in ws:
                pos += 1
            if text[pos] == ",":
                pos += 1
    except Exception:
        return None
    return out if len(out) == n_elements else None


def split_batch(
    records: Iterable[tuple[int, int, Any, bytes | None]],
    now: float | None = None,
    min_ts: float = MIN_TS,
) -> tuple[list[tuple[int, int, Event]], list[DeadLetter]]:
    """Parse (partition, offset, key, value) records into offset-tagged events and dead letters.

    Events of one message share its offset and keep the message order. Every
    message yields events, dead letters or both, and nothing raises: this is the
    stream worker's decode, so it applies the live ``ts`` floor :data:`MIN_TS`.
    """
    now = time.time() if now is None else now
    events: list[tuple[int, int, Event]] = []
    dead: list[DeadLetter] = []
    for partition, offset, key, value in records:
        try:
            good, bad = parse_message(value, now, min_ts)
        except Exception as exc:  # a bug in the checks must not stop the partition either
            LOG.exception("parse_message raised on offset %s of partition %s", offset, partition)
            good, bad = [], [Invalid(_unexpected(exc), _head(value), truncated=True)]
        for ev in good:
            events.append((partition, offset, ev))
        for inv in bad:
            dead.append((partition, offset, key, inv))
    return events, dead


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
        "reason": _fit(invalid.reason[:_MAX_REASON], 2048),
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
