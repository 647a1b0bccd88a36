"""API bearer tokens and the hashes the settings hold (``API_TOKENS``).

A token is 256 random bits as URL-safe text; the settings keep
``sha256:<hex of its SHA-256>:<scope>`` (:func:`hash_line`), never the token.
``serving/auth.py`` checks requests against them; ``userstream token`` prints
a new pair.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

__all__ = ["Scope", "digest", "hash_line", "new_token", "parse_tokens"]

Scope = Literal["read", "admin"]


def new_token() -> str:
    """A new random bearer token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    """The SHA-256 of ``token``'s UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def hash_line(token: str, scope: Scope) -> str:
    """The ``API_TOKENS`` entry of ``token`` with ``scope``: ``sha256:<hex>:<scope>``.

    >>> hash_line("t", "read")[:23]
    'sha256:e3b98a4da31a127d'
    """
    return f"sha256:{digest(token).hex()}:{scope}"


def parse_tokens(value: str | None) -> list[tuple[bytes, Scope]]:
    """(digest, scope) of each entry of an ``API_TOKENS`` value (validated by Settings).

    >>> parse_tokens(hash_line("t", "admin"))[0][1]
    'admin'
    """
    out: list[tuple[bytes, Scope]] = []
    for entry in (value or "").split(","):
        if entry.strip():
            _, hexdigest, scope = entry.strip().split(":")
            out.append((bytes.fromhex(hexdigest), scope))  # type: ignore[arg-type]
    return out
