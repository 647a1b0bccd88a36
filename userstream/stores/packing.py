"""The stored form of a rolling sequence: fixed 10-byte records in one Redis string.

One record per behavior, little-endian: the item's number (uint32), then one
48-bit word (uint32 low, uint16 high) holding the behavior name's number in its
top 6 bits and the time in milliseconds in the other 42 (up to the year 2109).
Numbers come from two :class:`Dictionary` objects kept in Redis (item and
behavior name <-> number). 200 behaviors are 2,000 bytes (one 2 KiB allocation
with the string header), against about 37 bytes each as tab-separated text;
appending is one ``APPEND`` and trimming one ``GETRANGE``, so the Lua script never
parses a record, and reading is one ``numpy.frombuffer``.

>>> raw = pack(np.array([7, 8]), np.array([1, 63]), np.array([1.5, 1700000000.123]))
>>> len(raw)
20
>>> items, behaviors, ts = unpack(raw)
>>> items.tolist(), behaviors.tolist(), ts.tolist()
([7, 8], [1, 63], [1.5, 1700000000.123])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import redis

__all__ = [
    "BEHAVIOR_NUMBERS",
    "MAX_TS_MS",
    "RECORD",
    "RECORD_BYTES",
    "Dictionary",
    "pack",
    "to_ms",
    "unpack",
]

LOG = logging.getLogger(__name__)

RECORD = np.dtype([("item", "<u4"), ("word_lo", "<u4"), ("word_hi", "<u2")])
RECORD_BYTES = RECORD.itemsize  # 10
_TS_BITS = 42
MAX_TS_MS = 2**_TS_BITS - 1  # 2109-05-15
BEHAVIOR_NUMBERS = 2 ** (48 - _TS_BITS) - 1  # 63: numbers 1..63, 0 = past the limit


def to_ms(ts: np.ndarray | Sequence[float]) -> np.ndarray:
    """Seconds -> whole milliseconds, rounded half to even (``round(ts * 1000)``)."""
    return np.rint(np.asarray(ts, dtype=np.float64) * 1000.0).astype(np.int64)


def pack(items: np.ndarray, behaviors: np.ndarray, ts: np.ndarray | Sequence[float]) -> bytes:
    """Records for aligned arrays of item numbers, behavior numbers (0..63) and ts
    (seconds)."""
    ms = to_ms(ts)
    if len(ms) and (ms.min() < 0 or ms.max() > MAX_TS_MS):
        raise ValueError(f"ts must be 0..{MAX_TS_MS / 1000:.0f} seconds to be stored")
    word = ms | (np.asarray(behaviors, dtype=np.int64) << _TS_BITS)
    out = np.empty(len(ms), dtype=RECORD)
    out["item"] = items
    out["word_lo"] = word & 0xFFFFFFFF
    out["word_hi"] = word >> 32
    return out.tobytes()


def unpack(raw: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item numbers, behavior numbers, ts in seconds) of packed records."""
    if len(raw) % RECORD_BYTES:
        raise ValueError(
            f"a stored sequence of {len(raw)} bytes is not whole {RECORD_BYTES}-byte records: "
            "it was written by another layout (see Keys.layout)"
        )
    rec = np.frombuffer(raw, dtype=RECORD)
    word = rec["word_lo"].astype(np.int64) | (rec["word_hi"].astype(np.int64) << 32)
    return rec["item"], word >> _TS_BITS, (word & MAX_TS_MS) / 1000.0


# intern: KEYS = name->num hash, num->name hash, counter; ARGV = limit, names...
# Returns one number per name (an existing one or the next free one, from 1;
# 0 once all ``limit`` numbers are taken).
_INTERN_LUA = """
local limit = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local n = redis.call('HGET', KEYS[1], ARGV[i])
  if not n then
    n = redis.call('INCR', KEYS[3])
    if tonumber(n) > limit then
      redis.call('DECR', KEYS[3])
      n = 0
    else
      redis.call('HSET', KEYS[1], ARGV[i], n)
      redis.call('HSET', KEYS[2], n, ARGV[i])
    end
  end
  out[i - 1] = tonumber(n)
end
return out
"""
_CHUNK = 5_000


class Dictionary:
    """Names (item ids, behavior names) <-> numbers 1..``limit``, kept in Redis and
    cached in the process.

    Numbers are assigned atomically (one Lua call on keys of one hash tag) and
    never change, so every process agrees on them and a cache entry never goes
    stale. Interning happens before the batch that needs it: a crash in between
    leaves a name with a number and nothing referring to it, which is harmless.

    Once ``limit`` names have numbers, a new name gets number 0, read back as
    ``overflow`` (where that is None, a new name is an error); :attr:`overflowed`
    counts the names mapped so in this process.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: tuple[str, str, str],
        limit: int,
        overflow: str | None = None,
    ) -> None:
        self.r = client
        self.keys = list(keys)
        self.limit = limit
        self.overflow = overflow
        self.overflowed = 0
        self._num: dict[str, int] = {}
        self._name: dict[int, str] = {} if overflow is None else {0: overflow}
        self._intern = client.register_script(_INTERN_LUA)

    def nums_for(self, names: Iterable[str]) -> list[int]:
        """The number of every name, interning the new ones."""
        names = list(names)
        num = self._num
        missing = [n for n in dict.fromkeys(names) if n not in num]
        if missing:
            self._learn(missing)
        return [num.get(n, 0) for n in names]

    def _learn(self, names: list[str]) -> None:
        for start in range(0, len(names), _CHUNK):
            chunk = names[start : start + _CHUNK]
            got = self._intern(keys=self.keys, args=[self.limit, *chunk])
            for name, n in zip(chunk, got, strict=True):
                n = int(n)
                if n == 0:
                    if self.overflow is None:
                        raise ValueError(
                            f"{self.keys[0]} holds {self.limit} names, the most a stored record "
                            "can number: use a new REDIS_PREFIX, or fewer distinct names"
                        )
                    self.overflowed += 1
                    LOG.warning("%s is full (%d names): %r is stored as %r",
                                self.keys[0], self.limit, name, self.overflow)  # fmt: skip
                else:
                    self._name[n] = name
                self._num[name] = n  # 0 included: warned once per name and process

    def names_for(self, nums: Iterable[int]) -> list[str]:
        """The name of every number (a number Redis does not know is an error)."""
        nums = [int(n) for n in nums]
        name = self._name
        missing = [n for n in dict.fromkeys(nums) if n not in name]
        for start in range(0, len(missing), _CHUNK):
            chunk = missing[start : start + _CHUNK]
            got = self.r.hmget(self.keys[1], chunk)
            for n, text in zip(chunk, got, strict=True):
                if text is None:
                    raise ValueError(
                        f"number {n} is not in {self.keys[1]}: the dictionary was "
                        "deleted while sequences still refer to it"
                    )
                name[n] = text
                self._num[text] = n
        return [name[n] for n in nums]

    def size(self) -> int:
        """Names in the dictionary (all processes)."""
        return int(self.r.hlen(self.keys[0]))
