"""Shapes that more than one package agrees on: the normalized event, the
encoding of one stored behavior, and the Redis key schema.

Data flows one way: ``stream`` writes sequences, ``model`` reads them and writes
embeddings, ``serving`` reads embeddings. Each side imports this module rather
than the other packages' internals.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Behavior", "Event", "Keys", "encode_behavior", "decode_behavior"]

_SEP = "\t"


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


def encode_behavior(item_id: str, behavior: str, ts: float) -> str:
    """Compact string form kept in Redis lists (validation forbids tabs in ids)."""
    return f"{item_id}{_SEP}{behavior}{_SEP}{ts:.3f}"


def decode_behavior(raw: str) -> Behavior:
    item_id, behavior, ts = raw.split(_SEP)
    return Behavior(item_id, behavior, float(ts))


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key the system uses, under one prefix (``Settings.redis_prefix``).

    stream/ writes: seq:*, users, items, dirty, stale, offsets, counters
    model/  writes: emb, emb_version, emb_event_ts, user_num*, model, updates (a Redis
            Stream)
    serving/ reads all of them.
    """

    prefix: str = "us:"

    def seq(self, user_id: str) -> str:
        return f"{self.prefix}seq:{user_id}"

    @property
    def users(self) -> str:  # set of every user id with a sequence
        return f"{self.prefix}users"

    @property
    def items(self) -> str:  # set of every item id seen
        return f"{self.prefix}items"

    @property
    def behaviors(self) -> str:  # hash behavior name -> count
        return f"{self.prefix}behaviors"

    @property
    def dirty(self) -> str:  # set of users changed since the trainer last took them
        return f"{self.prefix}dirty"

    @property
    def offsets(self) -> str:  # hash "topic:partition" -> last applied offset
        return f"{self.prefix}offsets"

    @property
    def logs(self) -> str:  # hash "topic:partition" -> id of the log its offset came from
        return f"{self.prefix}logs"

    @property
    def claimed(self) -> str:  # set of dirty users a training cycle took, not yet done
        return f"{self.prefix}claimed"

    @property
    def stale(self) -> str:  # set of users changed since the embedder last took them
        return f"{self.prefix}stale"

    @property
    def stale_claimed(self) -> str:  # set of stale users the embedder took, not yet written
        return f"{self.prefix}stale-claimed"

    def changed(self, queue: str) -> tuple[str, str]:
        """(changed set, claimed set) of a change queue: "train" or "embed"."""
        if queue == "train":
            return self.dirty, self.claimed
        if queue == "embed":
            return self.stale, self.stale_claimed
        raise ValueError(f"unknown change queue {queue!r}: expected 'train' or 'embed'")

    @property
    def counters(self) -> str:  # hash: events_ingested, events_dead_lettered, ...
        return f"{self.prefix}counters"

    @property
    def emb(self) -> str:  # hash user -> float32 bytes (L2-normalized)
        return f"{self.prefix}emb"

    @property
    def emb_version(self) -> str:  # hash user -> model version that made the embedding
        return f"{self.prefix}emb_version"

    @property
    def emb_event_ts(self) -> str:  # hash user -> ts of the newest behavior embedded
        return f"{self.prefix}emb_event_ts"

    @property
    def user_num(self) -> str:  # hash user -> int64 id used by FAISS
        return f"{self.prefix}user_num"

    @property
    def user_num_rev(self) -> str:  # hash int64 id -> user
        return f"{self.prefix}user_num_rev"

    @property
    def user_num_next(self) -> str:  # counter for new int64 ids
        return f"{self.prefix}user_num_next"

    @property
    def model(self) -> str:  # hash: version, checkpoint, items, updated_at, loss...
        return f"{self.prefix}model"

    @property
    def updates(self) -> str:  # Redis Stream of embedding upserts: u, i, v
        return f"{self.prefix}updates"

    @property
    def followers(self) -> str:  # hash replica -> JSON {"id": applied feed id, "at": unix time}
        return f"{self.prefix}followers"
