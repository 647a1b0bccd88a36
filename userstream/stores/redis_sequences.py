"""Per-user rolling behavior sequences in Redis: the system of record.

One batch of events is applied in ONE Redis MULTI/EXEC transaction together
with the highest applied Kafka offset of each partition in it. Replayed events
(offset at or below the stored one, e.g. after a crash before the Kafka commit)
are skipped, so a redelivered batch has an exactly-once effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import redis

from userstream.stores.client import require_text_client
from userstream.stores.contracts import (
    COUNTERS,
    AppliedBatch,
    ChangeQueue,
    OffsetEvent,
    plan_batch,
)
from userstream.types import Behavior, Keys, decode_behavior, encode_behavior

__all__ = ["RedisSequenceStore"]

LOG = logging.getLogger(__name__)

# Append + trim every touched sequence in ONE command: redis-py packs one EVALSHA
# far faster than an RPUSH and an LTRIM per user (benchmarks/README.md).
# It runs inside the batch's MULTI/EXEC, so the transaction still holds every
# write. ARGV = max_len, then per KEY: count, entries...; pushed in chunks
# because Lua's unpack() takes a few thousand values at most.
_APPEND_LUA = """
local max_len = tonumber(ARGV[1])
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local first = i + 1
  local last = i + n
  while first <= last do
    local stop = math.min(first + 999, last)
    redis.call('RPUSH', KEYS[k], unpack(ARGV, first, stop))
    first = stop + 1
  end
  redis.call('LTRIM', KEYS[k], -max_len, -1)
  i = last + 1
end
return #KEYS
"""


# bind_log: KEYS = logs, offsets, counters; ARGV = topic, log id, partitions...
# Drops a partition's offset when it belongs to another log; returns a flat list
# partition, old id ("" for none), ... of those.
_BIND_LOG_LUA = """
local out = {}
for i = 3, #ARGV do
  local field = ARGV[1] .. ':' .. ARGV[i]
  local old = redis.call('HGET', KEYS[1], field)
  if old ~= ARGV[2] then
    if redis.call('HDEL', KEYS[2], field) == 1 then
      redis.call('HINCRBY', KEYS[3], 'offset_log_resets', 1)
      table.insert(out, ARGV[i])
      table.insert(out, old or '')
    end
    redis.call('HSET', KEYS[1], field, ARGV[2])
  end
end
return out
"""

# take_dirty: KEYS = dirty, claimed; ARGV = max users. SPOP and SADD in one step,
# so a crash between them cannot lose a claim.
_TAKE_DIRTY_LUA = """
local got = redis.call('SPOP', KEYS[1], ARGV[1])
for i = 1, #got, 1000 do
  redis.call('SADD', KEYS[2], unpack(got, i, math.min(i + 999, #got)))
end
return got
"""

# take_oldest: KEYS = changed (sorted set), claimed; ARGV = max users. The users
# that have waited longest move to the claimed set in one step.
_TAKE_OLDEST_LUA = """
local got = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
for i = 1, #got, 1000 do
  local part = {unpack(got, i, math.min(i + 999, #got))}
  redis.call('ZREM', KEYS[1], unpack(part))
  redis.call('SADD', KEYS[2], unpack(part))
end
return got
"""

# requeue_oldest: KEYS = changed (sorted set), claimed. Claimed users go back at
# the front (score 0); returns how many there were.
_REQUEUE_OLDEST_LUA = """
local got = redis.call('SMEMBERS', KEYS[2])
for i = 1, #got, 1000 do
  local args = {}
  for j = i, math.min(i + 999, #got) do
    table.insert(args, 0)
    table.insert(args, got[j])
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
redis.call('DEL', KEYS[2])
return #got
"""


class RedisSequenceStore:
    """:class:`~userstream.stores.SequenceStore` on Redis (a client from
    :func:`userstream.stores.connect`)."""

    def __init__(self, client: redis.Redis, keys: Keys, max_len: int = 200) -> None:
        self.r = require_text_client(client)
        self.keys = keys
        self.max_len = max_len
        self._append = client.register_script(_APPEND_LUA)
        self._bind_log = client.register_script(_BIND_LOG_LUA)
        self._take_dirty = client.register_script(_TAKE_DIRTY_LUA)
        self._take_oldest = client.register_script(_TAKE_OLDEST_LUA)
        self._requeue_oldest = client.register_script(_REQUEUE_OLDEST_LUA)

    # --- writes (stream worker) ----------------------------------------------
    def applied_offsets(self, topic: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for k, v in self.r.hgetall(self.keys.offsets).items():
            t, _, p = k.rpartition(":")
            if t == topic:
                out[int(p)] = int(v)
        return out

    def apply_many(
        self,
        topic: str,
        events: Sequence[OffsetEvent],
        dead: Sequence[tuple[int, int]] = (),
    ) -> AppliedBatch:
        """Append events (in order) to their users' sequences, exactly once per offset.

        ``dead`` lists (partition, offset) of invalid events already sent to the
        dead-letter topic: they are counted and advance the offsets in the same
        transaction. A message carrying several events shares one offset; it is
        applied whole or not at all.
        """
        if not events and not dead:
            return AppliedBatch(0, 0, 0)
        plan = plan_batch(events, dead, self.applied_offsets(topic))
        if plan.applied == 0 and plan.dead == 0:
            # a wholly redelivered batch: nothing to write but the metric
            if plan.skipped:
                self.r.hincrby(self.keys.counters, "events_duplicate_skipped", plan.skipped)
            return AppliedBatch(0, plan.skipped, 0)
        pipe = self.r.pipeline(transaction=True)
        if plan.per_user:
            seq_keys: list[str] = []
            args: list[int | str] = [self.max_len]
            for user, evs in plan.per_user.items():
                kept = evs[-self.max_len :]  # older ones would be trimmed anyway
                seq_keys.append(self.keys.seq(user))
                args.append(len(kept))
                args.extend(encode_behavior(e.item_id, e.behavior, e.ts) for e in kept)
            self._append(keys=seq_keys, args=args, client=pipe)
            pipe.sadd(self.keys.users, *plan.per_user)
            pipe.sadd(self.keys.dirty, *plan.per_user)
            # NX: a user keeps the time it first changed until the embedder takes it
            pipe.zadd(self.keys.stale, dict.fromkeys(plan.per_user, time.time()), nx=True)
            pipe.sadd(self.keys.items, *plan.items)
        for name, n in plan.behaviors.items():
            pipe.hincrby(self.keys.behaviors, name, n)
        if plan.applied:
            pipe.hincrby(self.keys.counters, "events_ingested", plan.applied)
        if plan.dead:
            pipe.hincrby(self.keys.counters, "events_dead_lettered", plan.dead)
        if plan.skipped:
            pipe.hincrby(self.keys.counters, "events_duplicate_skipped", plan.skipped)
        pipe.hset(self.keys.offsets, mapping={f"{topic}:{p}": o for p, o in plan.last.items()})
        pipe.execute()
        return AppliedBatch(plan.applied, plan.skipped, len(plan.per_user), plan.dead)

    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.keys.counters, name, n)

    def bind_log(self, topic: str, log_id: str, partitions: Iterable[int]) -> dict[int, str]:
        k = self.keys
        args = [topic, log_id, *(int(p) for p in partitions)]
        flat = self._bind_log(keys=[k.logs, k.offsets, k.counters], args=args) or []
        return {int(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}

    def log_of(self, topic: str, partition: int) -> str | None:
        return self.r.hget(self.keys.logs, f"{topic}:{partition}")

    # --- reads (training worker, API) ----------------------------------------
    def read_many(self, user_ids: Sequence[str]) -> list[list[Behavior]]:
        pipe = self.r.pipeline(transaction=False)
        for u in user_ids:
            pipe.lrange(self.keys.seq(u), 0, -1)
        return [[decode_behavior(x) for x in raw] for raw in pipe.execute()]

    def read_tail(self, user_id: str, n: int) -> list[Behavior]:
        return [decode_behavior(x) for x in self.r.lrange(self.keys.seq(user_id), -n, -1)]

    # The "train" queue is a set (a cycle takes all of it anyway); the "embed" queue
    # a sorted set scored by when the user first changed, so the embedder takes
    # the longest-waiting users first even when a backlog builds up.
    def take_dirty(self, max_users: int, queue: ChangeQueue = "train") -> list[str]:
        """Claim up to ``max_users`` changed users, sorted (see the Protocol).

        Sorted, not in SPOP's random order: a training cycle (its batches and
        reservoir updates follow this order) is then reproducible from the state.
        """
        script = self._take_oldest if queue == "embed" else self._take_dirty
        got = script(keys=list(self.keys.changed(queue)), args=[max_users])
        return sorted(got or [])

    def release_claimed(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        ids = list(user_ids)
        if ids:
            self.r.srem(self.keys.changed(queue)[1], *ids)

    def requeue_claimed(self, queue: ChangeQueue = "train") -> int:
        changed, claimed = self.keys.changed(queue)
        if queue == "embed":
            return int(self._requeue_oldest(keys=[changed, claimed]))
        pipe = self.r.pipeline(transaction=True)
        pipe.scard(claimed)
        pipe.sunionstore(changed, [changed, claimed])
        pipe.delete(claimed)
        return int(pipe.execute()[0])

    def claimed_count(self, queue: ChangeQueue = "train") -> int:
        return int(self.r.scard(self.keys.changed(queue)[1]))

    def dirty_users(self, queue: ChangeQueue = "train") -> list[str]:
        changed = self.keys.changed(queue)[0]
        if queue == "embed":
            return sorted(self.r.zrange(changed, 0, -1))
        return sorted(self.r.smembers(changed))

    def mark_dirty(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        ids = list(user_ids)
        if not ids:
            return
        changed = self.keys.changed(queue)[0]
        if queue == "embed":
            self.r.zadd(changed, dict.fromkeys(ids, time.time()), nx=True)
        else:
            self.r.sadd(changed, *ids)

    def dirty_count(self, queue: ChangeQueue = "train") -> int:
        changed = self.keys.changed(queue)[0]
        return int(self.r.zcard(changed) if queue == "embed" else self.r.scard(changed))

    def oldest_change_age_s(self) -> float:
        oldest = self.r.zrange(self.keys.changed("embed")[0], 0, 0, withscores=True)
        return max(0.0, time.time() - oldest[0][1]) if oldest else 0.0

    def iter_users(self, batch: int = 1000) -> Iterator[str]:
        yield from self.r.sscan_iter(self.keys.users, count=batch)

    def num_users(self) -> int:
        return int(self.r.scard(self.keys.users))

    def num_items(self) -> int:
        return int(self.r.scard(self.keys.items))

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTERS, 0)
        out.update({k: int(v) for k, v in self.r.hgetall(self.keys.counters).items()})
        return out
