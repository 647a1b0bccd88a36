"""Decode one Kafka message value into normalized events and dead letters.

A message value is one JSON object or a JSON array of objects (clickstream
collectors batch events that way). :func:`split_batch` (what the stream worker
calls per batch) and :func:`parse_message` (one message) are pure and cheap:

>>> events, invalid = parse_message(b'{"user_id": 7, "item_id": "i1", "behavior": " Click ", "ts": 1700000000000}')
>>> events[0].user_id, events[0].behavior, events[0].ts
('7', 'click', 1700000000.0)
>>> parse_message(b'{"user_id": "u1", "item_id": "i1", "behavior": "view"}')[1][0].reason
"missing field 'ts'"

An :class:`~stream.dead_letters.Invalid` carries a human reason and the
ORIGINAL payload text (for an array, the text of the offending element only),
ready for the dead-letter topic. The helpers :func:`event_to_json` and
:func:`encode_events` build message values for producers.

Parsing never raises, whatever the bytes: a message is redelivered until its
batch is applied, so one message that made the worker fail would stop its
partition for good. Every limit (:mod:`stream.limits`) is checked before the
work it bounds, and whatever still goes wrong in one message (or one element of
an array) becomes an ``Invalid`` with the reason:

>>> parse_message(b"[" * 5000 + b"]" * 5000)[1][0].reason[:40]
'message nests arrays or objects too deep'
>>> parse_message(b'{"user_id": "u1", "item_id": "i1", "behavior": "view", "ts": 1' + b"0" * 400 + b"}")[1][0].reason[-19:]
'... is out of range'

The fast path (issue 17): a message of well-formed events costs one UTF-8
decode, one ``JSONDecoder.raw_decode`` and :func:`~stream.validation.accept_event`
per event; anything else (an error, a limit, an unusual field) takes the full
path below it, which gives every reason.

This module also re-exports the limits, :class:`~stream.dead_letters.Invalid`,
:func:`~stream.dead_letters.dead_letter_value` and the validation entry points,
so ``from stream.events import ...`` finds everything about a message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from stream.dead_letters import DeadLetter, Invalid, dead_letter_value
from stream.limits import (
    DEAD_LETTER_MAX_BYTES,
    MAX_DEPTH,
    MAX_EVENTS_PER_MESSAGE,
    MAX_FUTURE_S,
    MAX_ID_LEN,
    MAX_MESSAGE_BYTES,
    MAX_REASON,
    MAX_TEXT_LEN,
    MIN_TS,
)
from stream.validation import (
    FIELDS,
    Reject,
    accept_event,
    check_event,
    to_seconds,
    ts_bounds,
    type_name,
    unexpected,
    validate_event,
)
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

_raw_decode = json.JSONDecoder().raw_decode  # json.loads less its two regex passes


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
    lo, hi = ts_bounds(now, min_ts)
    events: list[tuple[int, int, Event]] = []
    dead: list[DeadLetter] = []
    add = events.append
    for partition, offset, key, value in records:
        try:
            good, bad = _parse(value, now, min_ts, lo, hi)
        except Exception as exc:  # a bug in the checks must not stop the partition either
            LOG.exception("parse_message raised on offset %s of partition %s", offset, partition)
            good, bad = [], [Invalid(unexpected(exc), _head(value), truncated=True)]
        if len(good) == 1:
            add((partition, offset, good[0]))
        else:
            events.extend([(partition, offset, ev) for ev in good])
        for inv in bad:
            dead.append((partition, offset, key, inv))
    return events, dead


def parse_message(
    raw: bytes | str | None, now: float | None = None, min_ts: float = 0.0
) -> tuple[list[Event], list[Invalid]]:
    """Decode one message value into (valid events in message order, invalid ones).

    Never raises. ``now`` is the wall clock (``time.time()`` by default) for the
    future bound; ``min_ts`` a floor for ``ts`` (:func:`split_batch` passes
    :data:`MIN_TS`).
    """
    now = time.time() if now is None else now
    return _parse(raw, now, min_ts, *ts_bounds(now, min_ts))


def _parse(
    raw: Any, now: float, min_ts: float, lo: float, hi: float
) -> tuple[list[Event], list[Invalid]]:
    """The fast path for a message of well-formed events, else :func:`_parse_full`."""
    if type(raw) is bytes and len(raw) <= MAX_MESSAGE_BYTES:
        try:
            text = raw.decode("utf-8")
            doc, end = _raw_decode(text)
        except Exception:  # the full path says what is wrong
            return _parse_full(raw, now, min_ts)
        if end == len(text):  # else trailing whitespace or extra data: the full path
            if type(doc) is dict:
                ev = accept_event(doc, lo, hi)
                if ev is not None:
                    return [ev], []
            elif type(doc) is list and len(doc) <= MAX_EVENTS_PER_MESSAGE:
                events = [accept_event(obj, lo, hi) for obj in doc]
                if events and None not in events:
                    return events, []
            return _validate_doc(doc, text, now, min_ts)
    return _parse_full(raw, now, min_ts)


def _parse_full(raw: Any, now: float, min_ts: float) -> tuple[list[Event], list[Invalid]]:
    """Every check in order, each failure a dead letter with its reason."""
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
    return _validate_doc(doc, text, now, min_ts)


def _validate_doc(
    doc: Any, text: str, now: float, min_ts: float
) -> tuple[list[Event], list[Invalid]]:
    """The full checks of a decoded message (one event, or an array of them)."""
    if not isinstance(doc, list):
        try:
            return [check_event(doc, now, min_ts)], []
        except Reject as exc:
            return [], [Invalid(str(exc), text)]
        except Exception as exc:
            return [], [Invalid(unexpected(exc), text)]
    if not doc:
        return [], [Invalid("message is an empty JSON array", text)]
    if len(doc) > MAX_EVENTS_PER_MESSAGE:
        why = f"message holds {len(doc)} events (at most {MAX_EVENTS_PER_MESSAGE})"
        return [], [Invalid(why, text)]
    events: list[Event] = []
    bad: list[tuple[int, str]] = []
    for i, obj in enumerate(doc):
        try:
            events.append(check_event(obj, now, min_ts))
        except Reject as exc:
            bad.append((i, str(exc)))
        except Exception as exc:
            bad.append((i, unexpected(exc)))
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
    return f"message is not valid JSON: {exc}"[:MAX_REASON]


def _snip_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return f"<{type_name(value)}>"


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
