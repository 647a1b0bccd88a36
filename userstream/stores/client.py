"""The Redis client every store takes: replies decoded to ``str``.

Embedding vectors are raw float32 bytes, so the client decodes with
``surrogateescape``: text round-trips as UTF-8 and any other byte string
round-trips exactly (:func:`to_bytes` undoes the decoding). One client per
process then serves every store, and no caller decodes replies by hand.

>>> raw = b"\\x00\\xff\\x80 ok"
>>> to_bytes(raw.decode("utf-8", "surrogateescape")) == raw
True
"""

from __future__ import annotations

from typing import Any

import redis

__all__ = [
    "ENCODING_ERRORS",
    "Scripts",
    "connect",
    "connect_settings",
    "is_cluster",
    "parse_nodes",
    "require_text_client",
    "to_bytes",
]

ENCODING_ERRORS = "surrogateescape"


def parse_nodes(text: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> [(host, port), ...] (``REDIS_CLUSTER_NODES``).

    >>> parse_nodes("10.0.0.1:7000, 10.0.0.2:7001")
    [('10.0.0.1', 7000), ('10.0.0.2', 7001)]
    """
    out = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"REDIS_CLUSTER_NODES entry {part.strip()!r} is not host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("REDIS_CLUSTER_NODES names no node")
    return out


def connect(url: str, cluster_nodes: str | None = None, **kwargs: Any) -> redis.Redis:
    """A client the stores accept: for ``url``, or, when ``cluster_nodes``
    (``"host:port,..."``, any of the cluster's masters) is given, a Redis Cluster
    client that follows slots to their nodes. ``kwargs`` go to the client:
    timeouts, retry, ..."""
    common = {"decode_responses": True, "encoding": "utf-8", "encoding_errors": ENCODING_ERRORS}
    if cluster_nodes:
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p) for h, p in parse_nodes(cluster_nodes)]
        return RedisCluster(startup_nodes=nodes, **common, **kwargs)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **common, **kwargs)


def is_cluster(client: redis.Redis) -> bool:
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster)


class Scripts:
    """Runs a list of Lua calls: in one round trip (a pipeline) on one Redis, one
    call after another on a cluster (whose client does not pipeline scripts).
    Each call is atomic on its own either way; none is skipped when one before it
    fails (the caller's scripts check what they depend on)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.cluster = is_cluster(client)

    def run(self, calls: list[tuple[Any, list[str], list[Any]]]) -> list[Any]:
        """``calls``: (script, keys, args) each; returns each call's reply."""
        if not calls:
            return []
        if self.cluster or len(calls) == 1:
            return [script(keys=keys, args=args) for script, keys, args in calls]
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        return pipe.execute()


def require_text_client(client: redis.Redis) -> redis.Redis:
    """``client``, after checking it decodes replies the way the stores read them."""
    encoder = client.get_encoder()
    wanted = (True, "utf-8", ENCODING_ERRORS)
    if (encoder.decode_responses, encoder.encoding, encoder.encoding_errors) != wanted:
        raise ValueError(
            "the stores need a Redis client that decodes replies: create it with "
            "userstream.stores.connect(url) (decode_responses=True, "
            f"encoding_errors={ENCODING_ERRORS!r})"
        )
    return client


def to_bytes(value: str) -> bytes:
    """The bytes Redis holds for a reply ``value`` of a :func:`connect` client."""
    return value.encode("utf-8", ENCODING_ERRORS)


def connect_settings(settings: Any, **kwargs: Any) -> redis.Redis:
    """The client of a :class:`~userstream.settings.Settings`: its Redis Cluster
    when ``redis_cluster_nodes`` is set, else ``effective_redis_url``."""
    return connect(settings.effective_redis_url, settings.redis_cluster_nodes, **kwargs)
