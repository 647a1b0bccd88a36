"""Prometheus metrics of one API app, in its own ``CollectorRegistry``.

* Request count and latency per route template (an ASGI middleware). Every
  label value comes from a closed set (:func:`method_label`,
  :func:`route_label`, :func:`status_label`): a client inventing methods or
  paths must not be able to add series, which are never freed.
* State read at scrape time by a custom collector: index size and lag, the
  follower's running totals, and the stream/model counters stored in Redis.
  Stream counters (events ingested, dead-lettered) are exposed as Prometheus
  counters (``*_total``), since they only grow; model version and sizes are
  gauges. When Redis does not answer, ``userstream_redis_up`` is 0 and the
  Redis-backed series are left out of that scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from serving.follower import IndexFollower, feed_lag_s
from userstream.stores import EmbeddingStore, SequenceStore

__all__ = [
    "CONTENT_TYPE_LATEST",
    "RequestMetricsMiddleware",
    "ServingMetrics",
    "method_label",
    "route_label",
    "status_label",
]

LOG = logging.getLogger(__name__)

_UNMATCHED = "<unmatched>"  # one label for every path no route matched
_OTHER = "other"
# RFC 9110 methods plus PATCH; any other token a client sends is "other".
_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
# The codes this API and its server send; any other code is labelled by its class ("4xx").
_STATUSES = frozenset(
    (200, 204, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 413, 414, 422, 429)
    + (500, 502, 503, 504)
)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def method_label(method: str) -> str:
    """The request method if it is a standard one, else ``"other"``.

    >>> method_label("GET"), method_label("get"), method_label("BREW")
    ('GET', 'other', 'other')
    """
    return method if method in _METHODS else _OTHER


def route_label(route: object) -> str:
    """The matched route's template without converters, ``"<unmatched>"`` when none.

    The template comes from the app's own routes, never from the request path.
    """
    template = getattr(route, "path_format", None)
    return template if isinstance(template, str) and template else _UNMATCHED


def status_label(status: int) -> str:
    """The status code when it is one of a fixed set, else its class.

    >>> status_label(404), status_label(418), status_label(999)
    ('404', '4xx', 'other')
    """
    if status in _STATUSES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status <= 599 else _OTHER


class _StateCollector(Collector):
    """Reads index, follower and Redis state when Prometheus scrapes."""

    def __init__(
        self, sequences: SequenceStore, embeddings: EmbeddingStore, follower: IndexFollower
    ) -> None:
        self.sequences = sequences
        self.embeddings = embeddings
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        follower = self.follower
        index = follower.index
        yield GaugeMetricFamily(
            "userstream_index_size", "Vectors in this replica's FAISS index", value=len(index)
        )
        yield GaugeMetricFamily(
            "userstream_index_ready",
            "1 once the index finished its initial load",
            value=float(follower.ready.is_set()),
        )
        yield GaugeMetricFamily(
            "userstream_index_model_version",
            "Newest model version among the vectors this replica serves (-1: none)",
            value=follower.users.newest_version(),
        )
        st = follower.stats
        for name, value, doc in (
            ("applied_updates", st.applied_updates, "Update-feed entries applied to the index"),
            ("skipped_updates", st.skipped_updates, "Feed entries skipped (dimension mismatch)"),
            ("rebuilds", st.rebuilds, "Full index loads from the embedding store"),
            ("snapshot_loads", st.snapshot_loads, "Index loads from an on-disk snapshot"),
            ("snapshots_written", st.snapshots_written, "Index snapshots written"),
            ("errors", st.errors, "Failed follower steps (retried with backoff)"),
        ):
            yield CounterMetricFamily(f"userstream_follower_{name}", doc, value=value)
        try:
            counters = self.sequences.counters()
            info = self.embeddings.model_info()
            head = self.embeddings.feed_head()
            users, items = self.sequences.num_users(), self.sequences.num_items()
            embedded = self.embeddings.count()
        except (redis.RedisError, OSError) as exc:
            LOG.warning("metrics scrape: redis does not answer: %s", exc)
            yield GaugeMetricFamily("userstream_redis_up", "1 when Redis answered", value=0)
            return
        yield GaugeMetricFamily("userstream_redis_up", "1 when Redis answered", value=1)
        for name, doc in (
            ("events_ingested", "Events applied to user sequences"),
            ("events_dead_lettered", "Invalid events sent to the dead-letter topic"),
            ("events_duplicate_skipped", "Redelivered events skipped by offset"),
        ):
            yield CounterMetricFamily(f"userstream_{name}", doc, value=counters.get(name, 0))
        yield GaugeMetricFamily("userstream_users", "Users with a sequence", value=users)
        yield GaugeMetricFamily("userstream_items", "Distinct items seen", value=items)
        yield GaugeMetricFamily(
            "userstream_embedded_users", "Users with an embedding", value=embedded
        )
        yield GaugeMetricFamily(
            "userstream_model_version",
            "Latest model version (0 before the first)",
            value=0 if info is None else info.version,
        )
        yield CounterMetricFamily(
            "userstream_drifts_detected",
            "Concept drifts the training worker detected (ADWIN on loss and hit rate)",
            value=0 if info is None else info.drifts,
        )
        yield GaugeMetricFamily(
            "userstream_index_feed_lag_seconds",
            "Feed time between the newest update and the last one applied to the index",
            value=feed_lag_s(follower.applied_id, head),
        )


class ServingMetrics:
    """The registry of one app plus its request metrics."""

    def __init__(
        self, sequences: SequenceStore, embeddings: EmbeddingStore, follower: IndexFollower
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # CPU, memory, file descriptors
        self.requests = Counter(
            "userstream_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "userstream_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(sequences, embeddings, follower))

    def observe(self, method: str, route: str, status: str, seconds: float) -> None:
        """Count one request; every label must come from the ``*_label`` functions."""
        self.requests.labels(method, route, status).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        """The registry in Prometheus text format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Pure ASGI middleware: count and time each HTTP request by its route template."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app raises before responding

        async def send_and_record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            # The router stores the matched route in the (shared) scope.
            self.metrics.observe(
                method_label(scope["method"]),
                route_label(scope.get("route")),
                status_label(status),
                time.perf_counter() - start,
            )
