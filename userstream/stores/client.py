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

__all__ = ["ENCODING_ERRORS", "connect", "require_text_client", "to_bytes"]

ENCODING_ERRORS = "surrogateescape"


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url`` that the stores accept (``kwargs`` go to ``redis.Redis``:
    timeouts, retry, ...)."""
    return redis.Redis.from_url(
        url, decode_responses=True, encoding="utf-8", encoding_errors=ENCODING_ERRORS, **kwargs
    )


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
