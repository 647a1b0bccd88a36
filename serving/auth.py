"""Bearer tokens with two scopes: ``read`` (users, stats, metrics) and ``admin``
(everything, and the only scope that may delete a user).

The settings hold hashes, never tokens: ``API_TOKENS=sha256:<hex>:admin,...``,
the hex SHA-256 of each token (``userstream token`` prints a new token and its
line). A request's token is hashed and compared with every configured hash by
:func:`hmac.compare_digest`, all of them each time, so the time taken does not
say which hash (or how much of one) matched. Tokens are random 256-bit strings,
so an unsalted fast hash is enough: there is nothing to guess from it.

No hashes configured: the API is open (:meth:`TokenAuth.open`; logged at
start). ``API_OPEN_READS`` / ``API_OPEN_METRICS`` keep reads or ``/metrics``
open while tokens guard the rest. ``/healthz`` and ``/readyz`` are always open
(probes). 401 = no token, or not a known one (with ``WWW-Authenticate:
Bearer``); 403 = a known token without the scope needed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request

from userstream.settings import Settings
from userstream.tokens import Scope, digest, parse_tokens

__all__ = [
    "TokenAuth",
    "require_admin",
    "require_metrics",
    "require_read",
]

_RANK = {"read": 1, "admin": 2}  # admin may do what read may


@dataclass(frozen=True)
class TokenAuth:
    """What the API accepts: (SHA-256 digest, scope) pairs and which parts stay open."""

    hashes: tuple[tuple[bytes, Scope], ...] = ()
    open_reads: bool = False
    open_metrics: bool = False

    @classmethod
    def of_settings(cls, settings: Settings) -> TokenAuth:
        pairs = tuple(parse_tokens(settings.api_tokens))
        return cls(pairs, settings.api_open_reads, settings.api_open_metrics)

    @property
    def open(self) -> bool:
        """No tokens configured: every endpoint answers without one."""
        return not self.hashes

    def scope_of(self, token: str) -> Scope | None:
        """The widest scope ``token`` has, None for an unknown token."""
        mine = digest(token)
        found: Scope | None = None
        for known, scope in self.hashes:  # every one: no early exit
            if hmac.compare_digest(mine, known) and _RANK[scope] > _RANK.get(found or "", 0):
                found = scope
        return found

    def check(self, authorization: str | None, need: Scope, what: str) -> None:
        """Raise 401/403 unless ``authorization`` (the header) carries a token with
        scope ``need``; ``what`` names the endpoint in the message."""
        if self.open:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(
                401,
                f"{what} needs a bearer token with the {need} scope: send "
                "'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scope = self.scope_of(token.strip())
        if scope is None:
            raise HTTPException(
                401,
                "invalid bearer token (not one of API_TOKENS)",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if _RANK[scope] < _RANK[need]:
            raise HTTPException(403, f"{what} needs the {need} scope; this token has {scope}")


def _auth(request: Request) -> TokenAuth:
    return request.app.state.ctx.auth or TokenAuth()


def _what(request: Request) -> str:
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"


# async: a sync dependency takes a slot of the route thread pool
async def require_read(request: Request) -> None:
    auth = _auth(request)
    if not auth.open_reads:
        auth.check(request.headers.get("authorization"), "read", _what(request))


async def require_metrics(request: Request) -> None:
    auth = _auth(request)
    if not auth.open_metrics:
        auth.check(request.headers.get("authorization"), "read", _what(request))


async def require_admin(request: Request) -> None:
    _auth(request).check(request.headers.get("authorization"), "admin", _what(request))
