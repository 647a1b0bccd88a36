"""Validate and normalize one decoded event object into an :class:`~userstream.types.Event`.

Two paths give the same answer. :func:`accept_event` is the stream worker's
fast path: a handful of type and range checks, inline, for the event every
producer sends (the four required fields, string ids, a numeric ``ts``, a
behavior seen before); it returns ``None`` for anything else, and
:func:`check_event` then decides with one check per rule and a human reason
for each rejection (:class:`Reject`). The fast path only ever accepts what the
full checks accept, with the same normalized values
(``tests/test_stream_events.py`` compares them on generated events).

>>> check_event({"user_id": 7, "item_id": "i1", "behavior": " Click ", "ts": 1700000000000}, 2e9)
Event(user_id='7', item_id='i1', behavior='click', ts=1700000000.0, event_id=None, text=None, props=None)
>>> accept_event({"user_id": 7, "item_id": "i1", "behavior": " Click ", "ts": 1.7e9}, 0.0, 2e9) is None
True

The limits are :mod:`stream.limits`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from stream.limits import (
    MAX_DEPTH,
    MAX_FUTURE_S,
    MAX_ID_LEN,
    MAX_REASON,
    MAX_TEXT_LEN,
    MIN_TS,
    MS_THRESHOLD,
)
from userstream.types import Event

__all__ = [
    "FIELDS",
    "REQUIRED",
    "Reject",
    "accept_event",
    "check_event",
    "to_seconds",
    "ts_bounds",
    "type_name",
    "unexpected",
    "validate_event",
]

REQUIRED = ("user_id", "item_id", "behavior", "ts")
FIELDS = frozenset((*REQUIRED, "event_id", "text", "props"))

_ID_INT_BITS = (10**MAX_ID_LEN).bit_length()  # an int with more bits has more digits
_BEHAVIOR_RE = re.compile(r"[a-z0-9_\-]{1,32}")
_BEHAVIOR_CACHE: dict[str, str] = {}  # raw -> normalized; the open set is small in practice
_BEHAVIOR_CACHE_MAX = 4096
_SNIPPET = 60
_FAST_TS_MAX = 1e16  # a numeric ts the fast path converts (ms until the year 318857)


class Reject(Exception):
    """Raised by the field checks; its message is the human reason."""


def ts_bounds(now: float, min_ts: float) -> tuple[float, float]:
    """The accepted range of a normalized ``ts``: (floor, ceiling) for :func:`accept_event`."""
    return max(min_ts, 0.0), min(now + MAX_FUTURE_S, sys.float_info.max)  # inf is no ts


def accept_event(obj: Any, lo: float, hi: float) -> Event | None:
    """The event of a well-formed four-field object, else None (:func:`check_event` decides).

    ``(lo, hi)`` is :func:`ts_bounds` of the batch. Everything not accepted
    here goes to the full checks: other or optional fields, integer ids, a
    ``ts`` string, a behavior not seen yet, anything out of range.
    """
    if type(obj) is not dict or len(obj) != 4:
        return None
    try:
        user_id = obj["user_id"]
        item_id = obj["item_id"]
        behavior = _BEHAVIOR_CACHE[obj["behavior"]]
        ts = obj["ts"]
    except (KeyError, TypeError):  # TypeError: an unhashable behavior
        return None
    if type(user_id) is not str or type(item_id) is not str:
        return None
    if not (0 < len(user_id) <= MAX_ID_LEN and 0 < len(item_id) <= MAX_ID_LEN):
        return None
    if not (user_id.isprintable() and item_id.isprintable()):
        return None
    if user_id.isspace() or item_id.isspace():
        return None
    if type(ts) is int:
        if not 0 <= ts <= _FAST_TS_MAX:
            return None
        ts = float(ts)
    elif type(ts) is not float:
        return None
    if ts > MS_THRESHOLD:
        ts /= 1000.0
    if not lo <= ts <= hi:  # NaN fails too
        return None
    return _new_event(user_id, item_id, behavior, ts)


def _event_maker() -> Callable[[str, str, str, float], Event]:
    """``Event(user_id, item_id, behavior, ts)`` at half the cost, for the fast path.

    The frozen dataclass's ``__init__`` sets each of its seven slots with an
    ``object.__setattr__`` call (2.4 us of a 3.6 us fast path, issue 17); this
    sets the same slots through their descriptors, so the result is an
    ordinary, equal :class:`Event`. Should ``Event`` stop being a slotted
    dataclass of these fields, its own constructor is used.
    """
    names = ("user_id", "item_id", "behavior", "ts", "event_id", "text", "props")
    try:
        if tuple(f.name for f in dataclasses.fields(Event)) != names:
            return Event
        setters = [Event.__dict__[name].__set__ for name in names]
    except (TypeError, KeyError, AttributeError):
        return Event
    set_user, set_item, set_behavior, set_ts, set_event_id, set_text, set_props = setters
    new = object.__new__

    def make(user_id: str, item_id: str, behavior: str, ts: float) -> Event:
        ev = new(Event)
        set_user(ev, user_id)
        set_item(ev, item_id)
        set_behavior(ev, behavior)
        set_ts(ev, ts)
        set_event_id(ev, None)
        set_text(ev, None)
        set_props(ev, None)
        return ev

    return make


_new_event = _event_maker()


def validate_event(obj: Any, now: float | None = None) -> Event:
    """Validate and normalize one decoded event object; raises ValueError(reason).

    With a finite ``now`` (the wall clock by default) ``ts`` must lie within
    [:data:`~stream.limits.MIN_TS`, now + :data:`~stream.limits.MAX_FUTURE_S`];
    ``now=math.inf`` replays history and checks neither bound.
    """
    now = time.time() if now is None else now
    try:
        return check_event(obj, now, MIN_TS if math.isfinite(now) else 0.0)
    except Reject as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(unexpected(exc)) from None


def to_seconds(value: Any) -> float:
    """Epoch seconds of a ``ts`` value (number, ms number, numeric or ISO-8601 string).

    Raises ValueError with the reason. Unlike validation it has no future bound
    and no floor; dataset readers use it to sort.
    """
    try:
        return _timestamp(value, math.inf)
    except Reject as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:
        raise ValueError(unexpected(exc)) from None


def check_event(obj: Any, now: float, min_ts: float = 0.0) -> Event:
    """The full checks, one rule at a time; raises :class:`Reject` with the reason."""
    if not isinstance(obj, dict):
        raise Reject(f"event must be a JSON object, got {type_name(obj)}")
    if not FIELDS.issuperset(obj):
        unknown = sorted(_snip(k) for k in obj if k not in FIELDS)
        raise Reject("unknown field(s) " + ", ".join(repr(k) for k in unknown))
    for name in REQUIRED:
        if name not in obj:
            raise Reject(f"missing field {name!r}")
    user_id = _identifier("user_id", obj["user_id"])
    item_id = _identifier("item_id", obj["item_id"])
    behavior = _behavior(obj["behavior"])
    ts = _timestamp(obj["ts"], now, min_ts)
    event_id = _optional_string(obj, "event_id", MAX_ID_LEN)
    text = _optional_string(obj, "text", MAX_TEXT_LEN)
    props = obj.get("props")
    if props is not None:
        if not isinstance(props, dict):
            raise Reject(f"props must be a JSON object, got {type_name(props)}")
        for value in props.values():  # flat props (the usual case) need no walk
            if isinstance(value, (dict, list)):
                if _nests_deeper(props, MAX_DEPTH - 1):
                    raise Reject(f"props nest deeper than {MAX_DEPTH} levels (the event is 1)")
                break
    return Event(user_id, item_id, behavior, ts, event_id, text, props)


def _optional_string(obj: dict, name: str, max_len: int) -> str | None:
    """``obj[name]`` when absent or null (None), else a string of at most ``max_len``."""
    value = obj.get(name)
    if value is not None:
        if not isinstance(value, str):
            raise Reject(f"{name} must be a string, got {type_name(value)}")
        if len(value) > max_len:
            raise Reject(f"{name} is {len(value)} characters long (at most {max_len})")
    return value


def type_name(value: Any) -> str:
    """The JSON name of a decoded value's type (``number``, ``array``, ...)."""
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


def unexpected(exc: BaseException) -> str:
    """The reason for a check that raised something other than :class:`Reject`."""
    return f"event could not be validated ({type(exc).__name__}: {exc})"[:MAX_REASON]


def _snip(value: Any) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # e.g. an int past Python's digit limit
        text = f"<{type_name(value)}>"
    return text if len(text) <= _SNIPPET else text[:_SNIPPET] + "..."


def _identifier(name: str, value: Any) -> str:
    if isinstance(value, str):
        if not value:
            raise Reject(f"{name} is empty")
    elif isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > _ID_INT_BITS:  # checked before str(): that is quadratic
            raise Reject(f"{name} is an integer of more than {MAX_ID_LEN} digits")
        value = str(value)
    else:
        raise Reject(f"{name} must be a string or integer, got {type_name(value)}")
    if len(value) > MAX_ID_LEN:
        raise Reject(f"{name} is {len(value)} characters long (at most {MAX_ID_LEN})")
    if value.isspace():
        raise Reject(f"{name} is only whitespace")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise Reject(f"{name} contains the non-printable character U+{ord(bad):04X}")
    return value


def _behavior(value: Any) -> str:
    if not isinstance(value, str):
        raise Reject(f"behavior must be a string, got {type_name(value)}")
    got = _BEHAVIOR_CACHE.get(value)
    if got is not None:
        return got
    norm = value.strip().lower()
    if not _BEHAVIOR_RE.fullmatch(norm):
        raise Reject(f"behavior {_snip(value)!r} is not 1-32 characters of a-z, 0-9, '_' or '-'")
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
            raise Reject(f"ts {_snip(value)} is out of range") from None
    elif isinstance(value, str):
        try:
            ts = float(value)
        except ValueError:
            ts = _iso_seconds(value)
    else:
        raise Reject(f"ts must be a number or an ISO-8601 string, got {type_name(value)}")
    if not math.isfinite(ts):
        raise Reject(f"ts {_snip(value)!r} is not finite")
    if ts > MS_THRESHOLD:
        ts /= 1000.0
    if ts < 0:
        raise Reject(f"ts {_snip(value)!r} is negative")
    if ts < min_ts:
        raise Reject(f"ts {_snip(value)!r} is before {_iso(min_ts)}")
    if ts > now + MAX_FUTURE_S:
        raise Reject(f"ts {_snip(value)!r} is more than one day in the future")
    return ts


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_seconds(text: str) -> float:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise Reject(f"ts {_snip(text)!r} is not a number or ISO-8601 time") from None
    if when.tzinfo is None:  # a time without an offset is taken as UTC
        when = when.replace(tzinfo=timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):  # e.g. year 1 with a positive offset
        raise Reject(f"ts {_snip(text)!r} is out of range") from None


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
