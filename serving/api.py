"""The FastAPI app: :func:`create_app` wires stores, index follower and metrics; :func:`serve` runs it.

The app's lifespan starts the :class:`~serving.follower.IndexFollower` thread
and stops it (with a final index snapshot) on shutdown. Everything a request
needs lives in one :class:`~serving.context.ServingContext` on ``app.state.ctx``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import redis
import uvicorn
from fastapi import FastAPI
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from serving.access_log import AccessLogMiddleware
from serving.auth import TokenAuth
from serving.context import OpsStores, ServingContext
from serving.follower import IndexFollower
from serving.kafka_view import KafkaView
from serving.metrics import RequestMetricsMiddleware, ServingMetrics
from serving.recommender import Recommender
from serving.routes import api_router
from userstream.logs import configure_logging
from userstream.pseudonyms import Pseudonymizer
from userstream.settings import Settings
from userstream.stores import RedisEmbeddingStore, RedisSequenceStore, connect_settings
from userstream.stores.client import is_cluster
from userstream.types import Keys

__all__ = ["OPS_TIMEOUT_S", "create_app", "fail_fast_client", "serve"]

LOG = logging.getLogger(__name__)

# The main client (user requests, the follower): the follower's XREAD BLOCK
# stays well under the socket timeout, and a few short retries ride out a
# restart; redis-py's default policy would spend seconds per failed call. The
# follower has its own backoff loop.
_REDIS_CONNECT_TIMEOUT_S = 2.0
_REDIS_SOCKET_TIMEOUT_S = 5.0
_REDIS_RETRIES = 2
# The fail-fast client of /healthz, /stats and /metrics: one try, well under the
# second a health probe waits, so an outage is a quick 503 and not a hang.
OPS_TIMEOUT_S = 0.5
# Per-connection state that redis-py's pool fills in itself; copying it into a
# second pool would share it (or restore the main client's timeouts later).
_POOL_OWNED = frozenset(
    (
        "orig_host_address",
        "orig_socket_timeout",
        "orig_socket_connect_timeout",
        "maint_notifications_pool_handler",
        "himport_registry",
    )
)


def _version() -> str:
    try:
        return version("userstream")
    except PackageNotFoundError:
        return "0+unknown"


def fail_fast_client(client: redis.Redis, timeout_s: float = OPS_TIMEOUT_S) -> redis.Redis:
    """A second client to the server of ``client`` (same address, credentials, TLS and
    decoding) whose calls give up after ``timeout_s`` without retrying.

    A pool of its own: a connection stuck on the main client's timeout never
    delays it, and its timeouts never shorten the main client's.
    """
    if is_cluster(client):
        from redis.cluster import RedisCluster

        enc = client.get_encoder()
        return RedisCluster(  # type: ignore[return-value]
            startup_nodes=list(client.nodes_manager.startup_nodes.values()),
            decode_responses=enc.decode_responses, encoding=enc.encoding,
            encoding_errors=enc.encoding_errors, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _POOL_OWNED}
    connect_timeout = kwargs.get("socket_connect_timeout") or timeout_s
    kwargs.update(
        socket_timeout=timeout_s,
        socket_connect_timeout=min(connect_timeout, timeout_s),
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,  # no extra PING before a command: one round trip per call
    )
    return redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )


def create_app(
    settings: Settings,
    *,
    redis_client: redis.Redis | None = None,
    start_follower: bool = True,
) -> FastAPI:
    """Build the API app for ``settings``.

    ``redis_client``: use this client (from :func:`userstream.stores.connect`; the
    caller closes it) instead of one made from ``settings.effective_redis_url``. ``start_follower=False`` leaves the
    index follower thread off: ``/healthz`` then answers 503 and callers may
    drive ``app.state.ctx.follower.sync_once()`` themselves.
    """
    own_client = redis_client is None
    client = redis_client or connect_settings(
        settings,
        socket_connect_timeout=_REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=_REDIS_SOCKET_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), _REDIS_RETRIES),
    )
    keys = Keys.of_settings(settings)
    embeddings = RedisEmbeddingStore(client, keys, feed_maxlen=settings.update_feed_maxlen)
    sequences = RedisSequenceStore(client, keys, max_len=settings.sequence_length)
    follower = IndexFollower(
        embeddings,
        settings.index_dir,
        settings.index_snapshot_interval_s,
        name=f"{socket.gethostname()}:{settings.api_port}",  # stable across restarts
        index_options={
            "ivf_min": settings.index_ivf_min,
            "nlist": settings.index_nlist,
            "nprobe": settings.index_nprobe,
            "threads": settings.faiss_threads,
        },  # fmt: skip
    )
    ops_client = fail_fast_client(client)
    ops = OpsStores(
        redis=ops_client,
        sequences=RedisSequenceStore(ops_client, keys, max_len=settings.sequence_length),
        embeddings=RedisEmbeddingStore(ops_client, keys, feed_maxlen=settings.update_feed_maxlen),
        timeout_s=OPS_TIMEOUT_S,
    )
    metrics = ServingMetrics(ops.sequences, ops.embeddings, follower)
    ctx = ServingContext(
        settings=settings,
        redis=client,
        keys=keys,
        embeddings=embeddings,
        sequences=sequences,
        follower=follower,
        metrics=metrics,
        follower_started=start_follower,
        recommender=Recommender(settings.checkpoint_dir, embeddings),
        ops=ops,
        kafka=KafkaView(settings.effective_kafka, settings.events_topic, settings.dlq_topic),
        auth=_auth(settings),
        pseudonyms=Pseudonymizer.of_settings(settings),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if start_follower:
            follower.start()
            LOG.info("index follower started (snapshots in %s)", follower.snapshot_path)
        try:
            yield
        finally:
            if start_follower:
                await asyncio.to_thread(follower.stop)
            ops_client.close()
            if ctx.kafka is not None:
                await ctx.kafka.close()
            if own_client:
                client.close()

    app = FastAPI(
        title="userstream",
        summary="Similar users from streaming user-behavior embeddings",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    if settings.access_log_sample > 0:
        app.add_middleware(AccessLogMiddleware, sample=settings.access_log_sample)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.include_router(api_router)
    return app


def _auth(settings: Settings) -> TokenAuth:
    """The tokens of ``settings``; logs which parts of the API are open."""
    auth = TokenAuth.of_settings(settings)
    if auth.open:
        LOG.warning("API_TOKENS is not set: the API is open (every endpoint, DELETE "
                    "/users/{id} included, answers without a token)")  # fmt: skip
    else:
        scopes = sorted({s for _, s in auth.hashes})
        LOG.info("API tokens: %d (%s); reads %s, /metrics %s", len(auth.hashes), ", ".join(scopes),
                 "open" if auth.open_reads else "need a token",
                 "open" if auth.open_metrics else "needs a token")  # fmt: skip
    return auth


def serve(settings: Settings) -> None:
    """Run the API with uvicorn on ``settings.api_host:settings.api_port`` (blocks)."""
    if not logging.getLogger().handlers:  # the CLI may have configured logging already
        configure_logging(settings.log_format)
    app = create_app(settings)
    LOG.info("serving on http://%s:%d", settings.api_host, settings.api_port)
    # no access log: a line per request costs more than a search; /metrics counts them
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level="info",
                loop="uvloop", http="httptools", access_log=False)  # fmt: skip
