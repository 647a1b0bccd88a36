"""What one message may hold: the limits every check in :mod:`stream.validation`
and :mod:`stream.events` enforces, in one place.

Every limit is checked before the work it bounds; past one, the message (or
the one event) becomes a dead letter with the reason, never an exception.

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

The ``ts`` floor is a check of the live stream only: :func:`stream.events.split_batch`
(what the stream worker calls) applies it, and so does
:func:`stream.validation.validate_event` when ``now`` is finite. Tests, planted
streams and :func:`stream.validation.to_seconds` (dataset readers) use small
synthetic times, and ``validate_event(obj, now=math.inf)`` replays history. It
is 1995, not 2000, because ``userstream replay`` sends recorded data sets
through the stream worker with their own times (MovieLens 100K is from 1997;
the larger MovieLens sets start in January 1995): it catches an unset time (0,
the year 1970), not old data.
"""

from __future__ import annotations

__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "MAX_DEPTH",
    "MAX_EVENTS_PER_MESSAGE",
    "MAX_FUTURE_S",
    "MAX_ID_LEN",
    "MAX_MESSAGE_BYTES",
    "MAX_REASON",
    "MAX_TEXT_LEN",
    "MIN_TS",
    "MS_THRESHOLD",
]

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
"""A dead letter's value stays below this, well under the producer's default ``max_request_size``."""
MAX_REASON = 1000
"""Characters of a reason in a dead letter."""
MS_THRESHOLD = 1e11
"""A larger ``ts`` is epoch milliseconds (1e11 s is the year 5138)."""
