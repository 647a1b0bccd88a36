"""A sampled access log: ``ACCESS_LOG_SAMPLE`` of requests, one line each with
the method, the route *template* (``/users/{user_id}/similar``: no user id
reaches the log), the status and the milliseconds. Off (0) by default: a line
per request costs more than a search, and ``/metrics`` counts every request.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

__all__ = ["AccessLogMiddleware"]

LOG = logging.getLogger("userstream.access")


class AccessLogMiddleware:
    """Pure ASGI middleware (no per-request objects unless the request is sampled)."""

    def __init__(self, app: Any, sample: float, rng: random.Random | None = None) -> None:
        self.app = app
        self.sample = sample
        self.rng = rng or random.Random()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.rng.random() >= self.sample:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "(no route)"
            LOG.info("%s %s %d %.1f ms", scope.get("method", "?"), path, status[0],
                     (time.perf_counter() - t0) * 1000)  # fmt: skip
