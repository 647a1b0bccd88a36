"""Each process's Prometheus endpoint: one registry served on its own port.

The stream worker (``STREAM_METRICS_PORT``) and the training worker
(``TRAIN_METRICS_PORT``) each serve their own registry with
:func:`serve_registry` on a daemon thread (``prometheus_client``'s WSGI
server, on ``METRICS_HOST``); the API keeps ``/metrics`` on its own port.
Every path of such a server answers the same registry, so a scraper inventing
paths or methods adds no series. A port of 0 turns the endpoint off.

A port that is taken is logged and the process runs on without an endpoint:
metrics must never stop ingestion or training (and a supervisor would only
restart the process into the same taken port).
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

__all__ = ["new_registry", "serve_registry"]

LOG = logging.getLogger(__name__)


def new_registry() -> CollectorRegistry:
    """A registry of its own, with the process's CPU, memory and file descriptors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


def serve_registry(
    registry: CollectorRegistry, host: str, port: int, what: str
) -> WSGIServer | None:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    Returns the server (``shutdown()`` stops it), or None when ``port`` is 0 or
    cannot be bound (logged as a warning with the setting to change).
    """
    if port == 0:
        LOG.info("%s metrics are off (port 0)", what)
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        LOG.warning(
            "%s metrics cannot listen on %s:%d (%s): this process exports no metrics; "
            "set its *_METRICS_PORT to a free port (0: off)",
            what,
            host,
            port,
            exc,
        )
        return None
    LOG.info("%s metrics on http://%s:%d/metrics", what, host, port)
    return server
