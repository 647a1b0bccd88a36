"""Shapes that more than one package agrees on: the normalized event, the
Redis key schema.

Data flows one way: ``stream`` writes sequences, ``model`` reads them and writes
embeddings, ``serving`` reads embeddings. Each side imports this module rather
than the other packages' internals.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_SHARDS", "Behavior", "Event", "Keys", "ShardKeys", "shard_of"]


@dataclass(frozen=True, slots=True)
class Behavior:
    """One stored step of a user's sequence."""

    item_id: str
    behavior: str
    ts: float


@dataclass(frozen=True, slots=True)
class Event:
    """A validated, normalized behavior event."""

    user_id: str
    item_id: str
    behavior: str
    ts: float
    event_id: str | None = None
    text: str | None = None
    props: dict | None = None

    def to_behavior(self) -> Behavior:
        return Behavior(self.item_id, self.behavior, self.ts)


MAX_SHARDS = 1024


def shard_of(user_id: str, shards: int) -> int:
    """The shard holding ``user_id``'s state: CRC-32 of its UTF-8 bytes mod ``shards``.

    >>> shard_of("alice", 1), shard_of("alice", 16)
    (0, 7)
    """
    if shards == 1:
        return 0
    return zlib.crc32(user_id.encode("utf-8", "surrogateescape")) % shards


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one shard of the per-user state. They share one Redis Cluster
    hash tag, so a transaction (one Lua call) over them stays inside one slot:
    a user's sequence, its change queues, its embedding and the offsets the shard
    applied always move together."""

    base: str  # "<prefix>{<shard>}:", e.g. "us:{3}:"
    shard: int

    def seq(self, user_id: str) -> str:  # string of packed behaviors (stores/packing.py)
        return f"{self.base}seq:{user_id}"

    @property
    def users(self) -> str:  # set of the shard's user ids with a sequence
        return f"{self.base}users"

    @property
    def behaviors(self) -> str:  # hash behavior name -> count
        return f"{self.base}behaviors"

    @property
    def dirty(self) -> str:  # set of users changed since the trainer last took them
        return f"{self.base}dirty"

    @property
    def claimed(self) -> str:  # set of dirty users a training cycle took, not yet done
        return f"{self.base}claimed"

    @property
    def stale(self) -> str:  # sorted set: users changed since the embedder took them, by since
        return f"{self.base}stale"

    @property
    def stale_claimed(self) -> str:  # set of stale users the embedder took, not yet written
        return f"{self.base}stale-claimed"

    def changed(self, queue: str) -> tuple[str, str]:
        """(changed set, claimed set) of a change queue: "train" or "embed"."""
        if queue == "train":
            return self.dirty, self.claimed
        if queue == "embed":
            return self.stale, self.stale_claimed
        raise ValueError(f"unknown change queue {queue!r}: expected 'train' or 'embed'")

    @property
    def forgotten(self) -> str:  # sorted set: users erased (forget), by when; see stores/forget.py
        return f"{self.base}forgotten"

    @property
    def offsets(self) -> str:  # hash "topic:partition" -> last offset this shard applied
        return f"{self.base}offsets"

    @property
    def logs(self) -> str:  # hash "topic:partition" -> id of the log its offset came from
        return f"{self.base}logs"

    @property
    def counters(self) -> str:  # hash: events_ingested, events_dead_lettered, ...
        return f"{self.base}counters"

    @property
    def emb(
        self,
    ) -> str:  # hash user -> version, event ts, float32 vector (stores/redis_embeddings.py)
        return f"{self.base}emb"

    @property
    def user_num(self) -> str:  # hash user -> int64 id used by FAISS
        return f"{self.base}user_num"

    @property
    def user_num_rev(self) -> str:  # hash int64 id -> user
        return f"{self.base}user_num_rev"

    @property
    def user_num_next(self) -> str:  # counter of the shard's ids (id = count * shards + shard)
        return f"{self.base}user_num_next"


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key the system uses, under one prefix (``Settings.redis_prefix``).

    Per-user state is split into ``shards`` (:class:`ShardKeys`, one Redis Cluster
    hash tag each; ``Settings.redis_shards``); the rest are single keys:

    stream/ writes: shard seq:*, users, behaviors, dirty, stale, offsets, logs,
            counters; the dictionaries (item and behavior name <-> number)
    model/  writes: shard emb, user_num*; model, updates (a Redis Stream)
    serving/ reads all of them.

    >>> Keys("us:", shards=16).seq("alice")
    'us:{7}:seq:alice'
    """

    prefix: str = "us:"
    shards: int = 1
    ids: str = "raw"  # the user-id scheme: "raw", or "hmac:<key fingerprint>" (pseudonyms)

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(
                f"redis prefix {self.prefix!r} must not contain braces "
                "(they mark Redis Cluster hash tags)"
            )
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {self.shards}")

    @classmethod
    def of_settings(cls, settings: Any, prefix: str | None = None) -> Keys:
        """The keys of a :class:`~userstream.settings.Settings`: its prefix (or
        ``prefix``), shards and user-id scheme."""
        from userstream.pseudonyms import id_scheme

        return cls(prefix or settings.redis_prefix, settings.effective_redis_shards,
                   id_scheme(settings.pseudonym_key))  # fmt: skip

    def shard(self, index: int) -> ShardKeys:
        return ShardKeys(f"{self.prefix}{{{index}}}:", index)

    def all_shards(self) -> list[ShardKeys]:
        return [self.shard(i) for i in range(self.shards)]

    def shard_of(self, user_id: str) -> int:
        return shard_of(user_id, self.shards)

    def of(self, user_id: str) -> ShardKeys:
        """The shard keys of ``user_id``."""
        return self.shard(shard_of(user_id, self.shards))

    def seq(self, user_id: str) -> str:
        return self.of(user_id).seq(user_id)

    # --- dictionaries: one hash tag, so interning is one atomic Lua call ----------
    def dictionary(self, kind: str) -> tuple[str, str, str]:
        """(name -> number hash, number -> name hash, counter) of ``kind``: "item"
        or "behavior"."""
        if kind not in ("item", "behavior"):
            raise ValueError(f"unknown dictionary {kind!r}: expected 'item' or 'behavior'")
        base = f"{self.prefix}{{dict}}:{kind}"
        return f"{base}:num", f"{base}:name", f"{base}:next"

    @property
    def layout(self) -> str:  # hash: format, shards (checked by every store)
        return f"{self.prefix}layout"

    @property
    def model(self) -> str:  # hash: version, checkpoint, items, updated_at, loss...
        return f"{self.prefix}model"

    @property
    def updates(self) -> str:  # Redis Stream of embedding upserts: u, i, v
        return f"{self.prefix}updates"

    @property
    def cycles(self) -> str:  # Redis Stream: one entry per training cycle (the history)
        return f"{self.prefix}cycles"

    @property
    def followers(self) -> str:  # hash replica -> JSON {"id": applied feed id, "at": unix time}
        return f"{self.prefix}followers"

    @property
    def stream_ready(self) -> str:  # hash worker -> JSON readiness + heartbeat (stream/app.py)
        return f"{self.prefix}stream_ready"
