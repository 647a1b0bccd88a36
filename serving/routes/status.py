"""``/``: the live status page, and ``/stats/live``, the figures it adds to ``/stats``.

The page itself is open (static HTML, no data); ``/stats/live`` needs the read
scope like ``/stats`` when tokens are set, and the page sends the token typed
into its box.

The page is one static HTML file (serving/static/status.html: plain HTML, a
little JavaScript, canvas charts, no build step) that polls ``/stats`` and
``/stats/live`` and looks users up through ``/users/{id}/similar`` and
``/users/{id}/recommendations``. ``/stats/live`` holds what ``/stats`` does not:
consumer lag and the newest dead letters (read from Kafka), freshness over the
feed entries this replica applied, and the training history (loss per task per
cycle).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse

from serving.auth import require_read
from serving.deps import ContextDep

__all__ = ["router"]

router = APIRouter(tags=["ops"])

PAGE = Path(__file__).resolve().parents[1] / "static" / "status.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The status page (for the embedded default, where no Grafana runs)."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.get("/stats/live", dependencies=[Depends(require_read)])
async def live(
    ctx: ContextDep, cycles: int = Query(200, ge=0, le=1000, description="history points")
) -> dict[str, Any]:
    """Lag per partition, the newest dead letters, freshness p50/p99 and the
    training history, each with an ``error`` instead when its source is down."""

    def history() -> dict[str, Any]:
        try:
            return {"cycles": ctx.ops.embeddings.recent_cycles(cycles)}
        except Exception as exc:  # noqa: BLE001 - Redis down: the page says so
            return {"cycles": [], "cycles_error": f"Redis did not answer: {exc!r}"}

    out: dict[str, Any] = {"freshness": ctx.follower.freshness.quantiles()}
    out.update(await asyncio.to_thread(history))
    kafka = ctx.kafka
    if kafka is not None:
        topic = ctx.settings.events_topic
        out["lag"] = await kafka.lag(lambda: ctx.ops.sequences.applied_offsets(topic))
        out["dead_letters"] = await kafka.dead_letters(10)
    return out
