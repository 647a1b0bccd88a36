"""Per-user rolling behavior sequences in Redis: the system of record.

Users are spread over ``Keys.shards`` shards (one Redis Cluster hash tag each).
Every shard keeps, in its own keys, its users' packed sequences
(:mod:`~userstream.stores.packing`), their change queues, counters, and the
highest Kafka offset of each partition it has applied. A batch of events becomes
one Lua call per shard and per chunk of at most :data:`CHUNK_EVENTS` events: each
call appends its events and advances its shard's offsets in one atomic step, so
no single call blocks Redis for long, and every call stays inside one slot.

Exactly once: a shard skips events at or below its stored offset (a redelivered
batch changes nothing), and each call checks the offsets it advances still hold
what this writer read (compare-and-set). Chunks are cut in offset order at
message boundaries (a batch holds each partition's records in offset order),
so after any crash a shard's state is "everything up to
its offset"; a lost race (another writer moved the offsets) re-reads and
retries, and what the other writer applied is then skipped.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import groupby

import numpy as np
import redis

from userstream.stores.client import Scripts, require_text_client, to_bytes
from userstream.stores.contracts import (
    COUNTERS,
    AppliedBatch,
    ChangeQueue,
    OffsetEvent,
    plan_batch,
)
from userstream.stores.packing import BEHAVIOR_NUMBERS, RECORD_BYTES, Dictionary, pack, unpack
from userstream.types import Behavior, Keys, ShardKeys

__all__ = ["CHUNK_EVENTS", "CHUNK_USERS", "LAYOUT", "OffsetsMoved", "RedisSequenceStore"]

LOG = logging.getLogger(__name__)

LAYOUT = "packed-2"  # 10-byte behaviors, embeddings with a header; Keys.layout records it
CHUNK_EVENTS = 2_000  # events per Lua call at most (benchmarks/README.md)
CHUNK_USERS = 500  # users per Lua call at most
ITEM_LIMIT = 2**32 - 1  # item numbers are uint32 in a record
BEHAVIOR_LIMIT = BEHAVIOR_NUMBERS  # 63 (the model itself tells 62 names apart)
OTHER_BEHAVIOR = "other"  # what a behavior name past the first 63 is stored as
_RETRIES = 3

# apply: KEYS = users, dirty, stale, behaviors, counters, offsets, seq keys...
# ARGV = max bytes, now, n users, user ids..., packed records..., n behaviors,
# (name, count)..., n counters, (name, n)..., n offsets, (field, expected, new)...
# Returns 0 (and writes nothing) when an offset no longer holds the expected value.
_APPLY_LUA = """
local maxb = tonumber(ARGV[1])
local nu = tonumber(ARGV[3])
local ob = 4 + 2 * nu
local nb = tonumber(ARGV[ob])
local oc = ob + 1 + 2 * nb
local nc = tonumber(ARGV[oc])
local oo = oc + 1 + 2 * nc
local no = tonumber(ARGV[oo])
for j = 0, no - 1 do
  local cur = redis.call('HGET', KEYS[6], ARGV[oo + 1 + 3 * j])
  if (cur or '') ~= ARGV[oo + 2 + 3 * j] then return 0 end
end
for k = 1, nu do
  local key = KEYS[6 + k]
  local len = redis.call('APPEND', key, ARGV[3 + nu + k])
  if len > maxb then
    redis.call('SET', key, redis.call('GETRANGE', key, len - maxb, -1))
  end
  redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[3 + k])
end
if nu > 0 then
  redis.call('SADD', KEYS[1], unpack(ARGV, 4, 3 + nu))
  redis.call('SADD', KEYS[2], unpack(ARGV, 4, 3 + nu))
end
for j = 0, nb - 1 do redis.call('HINCRBY', KEYS[4], ARGV[ob + 1 + 2 * j], ARGV[ob + 2 + 2 * j]) end
for j = 0, nc - 1 do redis.call('HINCRBY', KEYS[5], ARGV[oc + 1 + 2 * j], ARGV[oc + 2 + 2 * j]) end
for j = 0, no - 1 do redis.call('HSET', KEYS[6], ARGV[oo + 1 + 3 * j], ARGV[oo + 3 + 3 * j]) end
return 1
"""

# bind_log: KEYS = logs, offsets; ARGV = topic, log id, partitions...
# Drops a partition's offset when it belongs to another log; returns a flat list
# partition, old id ("" for none), ... of those.
_BIND_LOG_LUA = """
local out = {}
for i = 3, #ARGV do
  local field = ARGV[1] .. ':' .. ARGV[i]
  local old = redis.call('HGET', KEYS[1], field)
  if old ~= ARGV[2] then
    if redis.call('HDEL', KEYS[2], field) == 1 then
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

# claim: KEYS = changed (sorted set), claimed; ARGV = users. The users still
# waiting move to the claimed set in one step; returns those.
_CLAIM_LUA = """
local got = {}
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[2], ARGV[i])
    table.insert(got, ARGV[i])
  end
end
return got
"""

# requeue: KEYS = changed, claimed; ARGV = "embed" or "train". Claimed users go
# back (to the front of the embed queue: score 0); returns how many there were.
_REQUEUE_LUA = """
local got = redis.call('SMEMBERS', KEYS[2])
for i = 1, #got, 1000 do
  local stop = math.min(i + 999, #got)
  if ARGV[1] == 'embed' then
    local args = {}
    for j = i, stop do
      table.insert(args, 0)
      table.insert(args, got[j])
    end
    redis.call('ZADD', KEYS[1], unpack(args))
  else
    redis.call('SADD', KEYS[1], unpack(got, i, stop))
  end
end
redis.call('DEL', KEYS[2])
return #got
"""


# forget: KEYS = seq, users, dirty, claimed, stale, stale-claimed, forgotten (one
# shard: one slot); ARGV = user, now. Erases the user's own state and marks it
# forgotten; returns {bytes of its sequence, then 0/1 per set it was in}.
_FORGET_LUA = """
local n = redis.call('STRLEN', KEYS[1])
redis.call('DEL', KEYS[1])
local out = {n}
for k = 2, 4 do table.insert(out, redis.call('SREM', KEYS[k], ARGV[1])) end
table.insert(out, redis.call('ZREM', KEYS[5], ARGV[1]))
table.insert(out, redis.call('SREM', KEYS[6], ARGV[1]))
redis.call('ZADD', KEYS[7], ARGV[2], ARGV[1])
return out
"""

# clear_forgotten: KEYS = forgotten; ARGV = before, users. Drops markers set at or
# before ``before``; returns how many went.
_CLEAR_FORGOTTEN_LUA = """
local n = 0
for i = 2, #ARGV do
  local at = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if at and tonumber(at) <= tonumber(ARGV[1]) then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
"""


class OffsetsMoved(RuntimeError):
    """Another writer kept moving this topic's applied offsets during a batch."""


def check_layout(client: redis.Redis, keys: Keys) -> None:
    """Record (first use) or check that the data under ``keys.prefix`` is laid out
    as this code writes it, with the same number of shards."""
    want = {"format": LAYOUT, "shards": str(keys.shards), "ids": keys.ids}
    for field, value in want.items():
        client.hsetnx(keys.layout, field, value)
    got = client.hgetall(keys.layout)
    if got.get("format") != LAYOUT:
        raise ValueError(
            f"Redis under prefix {keys.prefix!r} holds data in the stored form "
            f"{got.get('format')!r}, this code reads and writes {LAYOUT!r}: use a new "
            "REDIS_PREFIX or an empty Redis (the state rebuilds from a replay)"
        )
    if got.get("ids") != keys.ids:
        raise ValueError(
            f"Redis under prefix {keys.prefix!r} holds users under the id scheme "
            f"{got.get('ids')!r}, this process uses {keys.ids!r}: every process needs the "
            "same PSEUDONYM_KEY (or none); a new key needs a new REDIS_PREFIX"
        )
    if got.get("shards") != want["shards"]:
        raise ValueError(
            f"Redis under prefix {keys.prefix!r} holds data in {got.get('shards')} shards, "
            f"this process expects {keys.shards}: set REDIS_SHARDS={got.get('shards')} (it "
            "cannot change once data exists), or use a new REDIS_PREFIX / an empty Redis"
        )


class RedisSequenceStore:
    """:class:`~userstream.stores.SequenceStore` on Redis or Redis Cluster (a client
    from :func:`userstream.stores.connect`)."""

    def __init__(self, client: redis.Redis, keys: Keys, max_len: int = 200) -> None:
        self.r = require_text_client(client)
        self.keys = keys
        self.max_len = max_len
        self.shards = keys.all_shards()
        self._layout_checked = False
        self.items = Dictionary(client, keys.dictionary("item"), ITEM_LIMIT)
        self.behavior_names = Dictionary(
            client, keys.dictionary("behavior"), BEHAVIOR_LIMIT, overflow=OTHER_BEHAVIOR
        )
        self._scripts = Scripts(client)
        self._rotate = 0  # the shard a train-queue claim starts with (fairness)
        self._apply = client.register_script(_APPLY_LUA)
        self._bind_log = client.register_script(_BIND_LOG_LUA)
        self._take_dirty = client.register_script(_TAKE_DIRTY_LUA)
        self._claim = client.register_script(_CLAIM_LUA)
        self._requeue = client.register_script(_REQUEUE_LUA)
        self._forget = client.register_script(_FORGET_LUA)
        self._clear_forgotten = client.register_script(_CLEAR_FORGOTTEN_LUA)

    def _check_layout(self) -> None:
        """Once, at the first write or full read (not in __init__: a store is built
        while Redis may still be down)."""
        if not self._layout_checked:
            check_layout(self.r, self.keys)
            self._layout_checked = True

    def _per_shard(self, command: str, key_of, *args) -> list:
        """One read command per shard, in one pipeline (cross-slot is fine there)."""
        pipe = self.r.pipeline(transaction=False)
        for sk in self.shards:
            getattr(pipe, command)(key_of(sk), *args)
        return pipe.execute()

    # --- writes (stream worker) ----------------------------------------------
    def _shard_offsets(self, topic: str) -> list[dict[int, int]]:
        out = []
        for raw in self._per_shard("hgetall", lambda sk: sk.offsets):
            done: dict[int, int] = {}
            for k, v in raw.items():
                t, _, p = k.rpartition(":")
                if t == topic:
                    done[int(p)] = int(v)
            out.append(done)
        return out

    def applied_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset every shard has applied (the lowest of the
        shards'; a partition some shard lacks counts as nothing applied)."""
        per = self._shard_offsets(topic)
        parts = set().union(*per)
        return {p: min(d.get(p, -1) for d in per) for p in parts if all(p in d for d in per)}

    def apply_many(
        self,
        topic: str,
        events: Sequence[OffsetEvent],
        dead: Sequence[tuple[int, int]] = (),
    ) -> AppliedBatch:
        """Append events (in order) to their users' sequences, exactly once per offset.

        ``dead`` lists (partition, offset) of invalid events already sent to the
        dead-letter topic: they are counted (in shard 0) and advance the offsets
        in the same step. A message carrying several events shares one offset;
        it is applied whole or not at all.
        """
        if not events and not dead:
            return AppliedBatch(0, 0, 0)
        self._check_layout()
        for _ in range(_RETRIES):
            result = self._apply_once(topic, events, dead)
            if result is not None:
                return result
            LOG.warning(
                "the applied offsets of %s moved during a batch (another writer); re-reading them",
                topic,
            )
        raise OffsetsMoved(
            f"the applied offsets of {topic} moved {_RETRIES} times during one batch: two stream "
            "workers are writing the same partitions (check the consumer group)"
        )

    def _apply_once(
        self, topic: str, events: Sequence[OffsetEvent], dead: Sequence[tuple[int, int]]
    ) -> AppliedBatch | None:
        done = self._shard_offsets(topic)
        batch_last: dict[int, int] = {}
        for p, o in dead:
            batch_last[p] = max(o, batch_last.get(p, -1))
        by_shard: list[list[OffsetEvent]] = [[] for _ in self.shards]
        for rec in events:
            p, o = rec[0], rec[1]
            batch_last[p] = max(o, batch_last.get(p, -1))
            by_shard[self.keys.shard_of(rec[2].user_id)].append(rec)
        fresh: list[list[OffsetEvent]] = []
        shard_skipped: list[int] = []
        applied = n_dead = 0
        users: set[str] = set()
        for s, recs in enumerate(by_shard):
            plan = plan_batch(recs, dead if s == 0 else (), done[s])
            applied += plan.applied
            shard_skipped.append(plan.skipped)
            n_dead += plan.dead
            users.update(plan.per_user)
            mine = done[s]
            # batch order: each partition's records come in offset order
            fresh.append([r for r in recs if r[1] > mine.get(r[0], -1)])
        new = [r[2] for recs in fresh for r in recs]
        item_nums = self.items.nums_for(e.item_id for e in new)
        behavior_nums = self.behavior_names.nums_for(e.behavior for e in new)
        nums = iter(zip(item_nums, behavior_nums, strict=True))
        calls = []
        for s, recs in enumerate(fresh):
            shard_nums = [next(nums) for _ in recs]
            calls.extend(self._shard_calls(
                self.shards[s], topic, recs, shard_nums, done[s], batch_last,
                skipped=shard_skipped[s],
                dead=n_dead if s == 0 else 0,
            ))  # fmt: skip
        replies = self._scripts.run(calls)
        if any(int(x) == 0 for x in replies):
            return None
        return AppliedBatch(applied, sum(shard_skipped), len(users), n_dead)

    def _shard_calls(
        self,
        sk: ShardKeys,
        topic: str,
        recs: list[OffsetEvent],
        nums: list[tuple[int, int]],
        done: dict[int, int],
        batch_last: dict[int, int],
        skipped: int,
        dead: int,
    ) -> list[tuple]:
        """The Lua calls of one shard: its new events in chunks cut at message
        boundaries, the last call also advancing every partition of the batch."""
        current = dict(done)  # what each call expects to find, then sets
        chunks: list[list[int]] = []  # indexes into recs
        chunk: list[int] = []
        chunk_users: set[str] = set()
        for _, group in groupby(range(len(recs)), key=lambda k: (recs[k][0], recs[k][1])):
            members = list(group)
            if chunk and (
                len(chunk) + len(members) > CHUNK_EVENTS or len(chunk_users) >= CHUNK_USERS
            ):
                chunks.append(chunk)
                chunk, chunk_users = [], set()
            chunk.extend(members)
            chunk_users.update(recs[k][2].user_id for k in members)
        behind = any(o > done.get(p, -1) for p, o in batch_last.items())
        if chunk or (not chunks and (behind or skipped or dead)):
            chunks.append(chunk)
        calls = []
        now = repr(time.time())
        for c, idx in enumerate(chunks):
            last = c == len(chunks) - 1
            per_user: dict[str, list[int]] = {}
            moves: dict[int, int] = {}
            behaviors: dict[str, int] = {}
            for k in idx:
                p, o, ev = recs[k]
                per_user.setdefault(ev.user_id, []).append(k)
                if o > moves.get(p, -1):
                    moves[p] = o
                behaviors[ev.behavior] = behaviors.get(ev.behavior, 0) + 1
            if last:
                for p, o in batch_last.items():
                    if o > max(current.get(p, -1), moves.get(p, -1)):
                        moves[p] = o
            counters = {"events_ingested": len(idx)}
            if last:
                counters.update(events_duplicate_skipped=skipped, events_dead_lettered=dead)
            counters = {k: v for k, v in counters.items() if v}
            blobs = self._pack_users(per_user.values(), recs, nums)
            args: list = [self.max_len * RECORD_BYTES, now, len(per_user), *per_user, *blobs]
            args.append(len(behaviors))
            for name, n in behaviors.items():
                args += [name, n]
            args.append(len(counters))
            for name, n in counters.items():
                args += [name, n]
            args.append(len(moves))
            for p, o in moves.items():
                old = current.get(p)
                args += [f"{topic}:{p}", "" if old is None else str(old), o]
                current[p] = o
            keys = [sk.users, sk.dirty, sk.stale, sk.behaviors, sk.counters, sk.offsets]
            keys += [sk.seq(u) for u in per_user]
            calls.append((self._apply, keys, args))
        return calls

    def _pack_users(
        self,
        per_user: Iterable[list[int]],
        recs: list[OffsetEvent],
        nums: list[tuple[int, int]],
    ) -> list[bytes]:
        """Each user's new records (the last ``max_len``: older ones would be trimmed
        anyway), packed in one numpy call for the whole chunk, then cut per user."""
        order: list[int] = []
        sizes: list[int] = []
        for ks in per_user:
            kept = ks[-self.max_len :]
            order.extend(kept)
            sizes.append(len(kept) * RECORD_BYTES)
        n = len(order)
        blob = pack(
            np.fromiter((nums[k][0] for k in order), np.uint32, n),
            np.fromiter((nums[k][1] for k in order), np.int64, n),
            np.fromiter((recs[k][2].ts for k in order), np.float64, n),
        )
        out, pos = [], 0
        for size in sizes:
            out.append(blob[pos : pos + size])
            pos += size
        return out

    def count(self, name: str, n: int = 1) -> None:
        self.r.hincrby(self.shards[0].counters, name, n)

    def bind_log(self, topic: str, log_id: str, partitions: Iterable[int]) -> dict[int, str]:
        self._check_layout()
        args = [topic, log_id, *(int(p) for p in partitions)]
        calls = [(self._bind_log, [sk.logs, sk.offsets], args) for sk in self.shards]
        dropped: dict[int, str] = {}
        for flat in self._scripts.run(calls):
            flat = flat or []
            dropped.update({int(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)})
        if dropped:
            self.count("offset_log_resets", len(dropped))
        return dropped

    def log_of(self, topic: str, partition: int) -> str | None:
        return self.r.hget(self.shards[0].logs, f"{topic}:{partition}")

    # --- reads (training worker, API) ----------------------------------------
    def _decode(self, raws: list[str | None]) -> list[list[Behavior]]:
        parts = [unpack(to_bytes(raw)) if raw else None for raw in raws]
        all_items = {int(n) for p in parts if p is not None for n in np.unique(p[0])}
        all_behaviors = {int(n) for p in parts if p is not None for n in np.unique(p[1])}
        items = dict(zip(all_items, self.items.names_for(all_items), strict=True))
        names = dict(zip(all_behaviors, self.behavior_names.names_for(all_behaviors), strict=True))
        out = []
        for p in parts:
            if p is None:
                out.append([])
                continue
            it, be, ts = p
            out.append([
                Behavior(items[i], names[b], t)
                for i, b, t in zip(it.tolist(), be.tolist(), ts.tolist(), strict=True)
            ])  # fmt: skip
        return out

    def read_many(self, user_ids: Sequence[str]) -> list[list[Behavior]]:
        self._check_layout()
        pipe = self.r.pipeline(transaction=False)
        for u in user_ids:
            pipe.get(self.keys.seq(u))
        return self._decode(pipe.execute())

    def read_tail(self, user_id: str, n: int) -> list[Behavior]:
        if n <= 0:
            return []
        raw = self.r.getrange(self.keys.seq(user_id), -n * RECORD_BYTES, -1)
        return self._decode([raw])[0]

    # The "train" queue is a set per shard (a cycle takes all of it anyway); the
    # "embed" queue a sorted set per shard scored by when the user first changed,
    # so the embedder takes the longest-waiting users first across shards.
    def take_dirty(self, max_users: int, queue: ChangeQueue = "train") -> list[str]:
        """Claim up to ``max_users`` changed users, sorted (see the Protocol).

        Sorted, not in SPOP's random order: a training cycle (its batches and
        reservoir updates follow this order) is then reproducible from the state.
        """
        if max_users <= 0:
            return []
        if queue == "embed":
            return sorted(self._take_oldest(max_users))
        n = len(self.shards)
        start, self._rotate = self._rotate, (self._rotate + 1) % n
        order = [self.shards[(start + i) % n] for i in range(n)]
        quotas = [max_users // n + (1 if i < max_users % n else 0) for i in range(n)]
        first = [(sk, q) for sk, q in zip(order, quotas, strict=True) if q]
        replies = self._scripts.run(
            [(self._take_dirty, list(sk.changed("train")), [q]) for sk, q in first]
        )
        got = [u for part in replies for u in (part or [])]
        full = any(len(part or []) == q for (_, q), part in zip(first, replies, strict=True))
        if len(got) < max_users and (full or len(first) < n):
            for sk in order:  # a second pass: some shards hold more than their share
                if len(got) >= max_users:
                    break
                got.extend(self._take_dirty(keys=list(sk.changed("train")),
                                            args=[max_users - len(got)]) or [])  # fmt: skip
        return sorted(got)

    def _take_oldest(self, max_users: int) -> list[str]:
        peeked = self._per_shard(
            "zrange", lambda sk: sk.changed("embed")[0], 0, max_users - 1, False, True
        )  # desc=False, withscores=True
        merged = heapq.nsmallest(
            max_users,
            ((score, s, u) for s, rows in enumerate(peeked) for u, score in rows),
        )
        chosen: dict[int, list[str]] = {}
        for _, s, u in merged:
            chosen.setdefault(s, []).append(u)
        calls = [(self._claim, list(self.shards[s].changed("embed")), users)
                 for s, users in chosen.items()]  # fmt: skip
        return [u for part in self._scripts.run(calls) for u in (part or [])]

    def _group(self, user_ids: Iterable[str]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for u in user_ids:
            out.setdefault(self.keys.shard_of(u), []).append(u)
        return out

    def release_claimed(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        groups = self._group(user_ids)
        if groups:
            pipe = self.r.pipeline(transaction=False)
            for s, ids in groups.items():
                pipe.srem(self.shards[s].changed(queue)[1], *ids)
            pipe.execute()

    def requeue_claimed(self, queue: ChangeQueue = "train") -> int:
        self.keys.shard(0).changed(queue)  # checks the queue name
        calls = [(self._requeue, list(sk.changed(queue)), [queue]) for sk in self.shards]
        return sum(int(n) for n in self._scripts.run(calls))

    def claimed_count(self, queue: ChangeQueue = "train") -> int:
        return sum(int(n) for n in self._per_shard("scard", lambda sk: sk.changed(queue)[1]))

    def dirty_users(self, queue: ChangeQueue = "train") -> list[str]:
        if queue == "embed":
            parts = self._per_shard("zrange", lambda sk: sk.changed(queue)[0], 0, -1)
        else:
            parts = self._per_shard("smembers", lambda sk: sk.changed(queue)[0])
        return sorted(u for part in parts for u in part)

    def mark_dirty(self, user_ids: Iterable[str], queue: ChangeQueue = "train") -> None:
        groups = self._group(user_ids)
        if not groups:
            return
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for s, ids in groups.items():
            changed = self.shards[s].changed(queue)[0]
            if queue == "embed":
                pipe.zadd(changed, dict.fromkeys(ids, now), nx=True)
            else:
                pipe.sadd(changed, *ids)
        pipe.execute()

    def dirty_count(self, queue: ChangeQueue = "train") -> int:
        command = "zcard" if queue == "embed" else "scard"
        return sum(int(n) for n in self._per_shard(command, lambda sk: sk.changed(queue)[0]))

    def oldest_change_age_s(self) -> float:
        parts = self._per_shard("zrange", lambda sk: sk.changed("embed")[0], 0, 0, False, True)
        oldest = [rows[0][1] for rows in parts if rows]
        return max(0.0, time.time() - min(oldest)) if oldest else 0.0

    def iter_users(self, batch: int = 1000) -> Iterator[str]:
        for sk in self.shards:
            yield from self.r.sscan_iter(sk.users, count=batch)

    def num_users(self) -> int:
        return sum(int(n) for n in self._per_shard("scard", lambda sk: sk.users))

    def num_items(self) -> int:
        return self.items.size()

    def behavior_counts(self) -> dict[str, int]:
        """Behavior name -> events applied, over every shard."""
        out: dict[str, int] = {}
        for raw in self._per_shard("hgetall", lambda sk: sk.behaviors):
            for name, n in raw.items():
                out[name] = out.get(name, 0) + int(n)
        return out

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTERS, 0)
        for raw in self._per_shard("hgetall", lambda sk: sk.counters):
            for k, v in raw.items():
                out[k] = out.get(k, 0) + int(v)
        return out

    # --- erasure -------------------------------------------------------------
    def forget(self, user_id: str) -> dict[str, int]:
        sk = self.keys.of(user_id)
        keys = [sk.seq(user_id), sk.users, sk.dirty, sk.claimed, sk.stale, sk.stale_claimed,
                sk.forgotten]  # fmt: skip
        got = [int(x) for x in self._forget(keys=keys, args=[user_id, repr(time.time())])]
        names = ("users", "train_changed", "train_claimed", "embed_changed", "embed_claimed")
        return {"behaviors": got[0] // RECORD_BYTES, **dict(zip(names, got[1:], strict=True))}

    def forgotten(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rows in self._per_shard("zrange", lambda sk: sk.forgotten, 0, -1, False, True):
            out.update((u, float(t)) for u, t in rows)
        return out

    def clear_forgotten(self, user_ids: Iterable[str], before: float) -> int:
        calls = [(self._clear_forgotten, [self.shards[s].forgotten], [repr(before), *ids])
                 for s, ids in self._group(user_ids).items()]  # fmt: skip
        return sum(int(n) for n in self._scripts.run(calls)) if calls else 0
