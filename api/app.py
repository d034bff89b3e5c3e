"""The FastAPI application: resources opened in the lifespan, routers, errors, the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator

import asyncpg
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.telemetry import TelemetryConfig
from starlette.types import Receive, Scope, Send

from api import errors, heap
from api.deps import Resources
from api.event_hub import EventHub
from api.fast_paths import FastPaths
from api.limits import BodySizeLimit, JsonBodyGuard, StreamSlots
from api.metrics import Metrics
from api.request_context import RequestContext
from api.routes import (
    clients,
    control,
    dashboard,
    events,
    executions,
    health,
    operations,
    schedules,
    session,
    tasks,
    webhooks,
    workflows,
)
from api.routes.events import SERVER_SEND
from api.sessions import Sessions
from api.version import SERVICE, VERSION
from api.worker_watch import WorkerWatch
from shared.catalog import WorkflowCatalog
from shared.clients import ClientStore, Vault
from shared.connections import REDIS_UNAVAILABLE, create_redis, ensure_groups, open_pool, prepare
from shared.durability import StrictDurability
from shared.executions import KnownClients
from shared.reporting import init_reporting
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys

log = logging.getLogger(__name__)


async def _sync_sequence(scripts: Scripts, pool: asyncpg.Pool | None) -> None:
    """Never hand out an execution id PostgreSQL already has (after a Redis flush or a new Redis)."""
    if pool is None:
        return
    highest = await pool.fetchval("SELECT coalesce(max(id), 0) FROM executions")
    for keys in scripts.keys.all_shards:
        await scripts.of(keys).raise_sequence(int(highest))


class NovaApi(FastAPI):
    """The API's ASGI application: FastAPI, and the server's own `send` in each HTTP request's scope.

    An event stream writes its events with that send (api/routes/events.py), past the middlewares:
    every layer of ours and Starlette's looks only at a response's start, and their five send
    wrappers were about a twentieth of the API's CPU per delivery at a thousand subscribers (a sampling
    profile of `make bench`'s sse_fanout), paid for nothing.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


def _telemetry() -> TelemetryConfig | None:
    """FastAPI's own OpenTelemetry support, on (its defaults) only where an OpenTelemetry SDK is
    installed: without one no provider can be configured, yet FastAPI would still look the global
    providers up on every request, 3% of the execute route's CPU."""
    if importlib.util.find_spec("opentelemetry.sdk") is not None:
        return None
    return {"tracing": False, "metrics": False, "logs": False}


def create_app(settings: Settings | None = None, *, settle_heap: bool = False) -> FastAPI:
    """`settle_heap`: once started, tune the garbage collector for serving (see api/heap.py); for the
    API process only, not for tests."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Here, in the running loop, for Sentry's asyncio integration (a no-op without SENTRY_DSN).
        init_reporting(settings, "api")
        redis = create_redis(settings, prompt_writes=True, batch_commands=True)
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await prepare(redis)
        keys = Keys.from_settings(settings)
        pool: asyncpg.Pool | None = None
        try:
            pool = await open_pool(settings)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("PostgreSQL unavailable at start (%s); enqueueing still works", exc)
        scripts = Scripts(redis, keys)
        vault = Vault.from_settings(settings)
        clients = ClientStore(redis, pool, keys, vault)
        res = Resources(
            settings=settings,
            redis=redis,
            keys=keys,
            scripts=scripts,
            catalog=WorkflowCatalog(redis, pool, keys),
            clients=clients,
            hub=EventHub(redis, keys, shards=keys.all_shards),
            metrics=Metrics(),
            stream_slots=StreamSlots(settings.sse_max_connections_per_key),
            known_clients=KnownClients(redis, keys),
            sessions=Sessions(redis, keys, clients, settings.session_ttl),
            pool=pool,
            strict=StrictDurability(redis, settings.strict_wait_ms) if settings.durability == "strict" else None,
        )
        res.hub.observe(res.metrics.observe)
        try:
            for shard in keys.all_shards:
                await ensure_groups(redis, shard)
            await _sync_sequence(scripts, pool)
        except REDIS_UNAVAILABLE as exc:
            log.warning("Redis unavailable at start (%s); requests will answer 503 until it is back", exc)
        await res.hub.start()
        app.state.resources = res
        watch_stop = asyncio.Event()
        watch = asyncio.create_task(WorkerWatch(settings, redis).run(watch_stop), name="worker watch")
        if settle_heap:
            heap.settle_heap()
        try:
            yield
        finally:
            watch_stop.set()
            await watch
            await res.hub.stop()
            if res.pool is not None:
                await res.pool.close()
            await redis.aclose()

    app = NovaApi(
        title=SERVICE,
        version=VERSION,
        description="Workflow executions on Redis Streams. Every route but /health needs a Bearer key.",
        lifespan=lifespan,
        telemetry=_telemetry(),
    )
    errors.install(app)
    # The last added runs first: the size limit bounds what the JSON guard buffers; CORS answers
    # preflights before any of them (and adds its headers to their refusals); every response,
    # whichever layer wrote it, carries the request id.
    # Innermost: the hot routes' plain requests skip FastAPI's routing and validation (api/fast_paths.py).
    app.add_middleware(FastPaths, fastapi=app)
    app.add_middleware(JsonBodyGuard, max_depth=settings.max_json_depth)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            # As NOVA did; our keys travel in the Authorization header, which browsers send on request.
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestContext)
    for module in (
        health,
        session,
        workflows,
        tasks,
        executions,
        events,
        operations,
        schedules,
        clients,
        control,
        webhooks,
    ):
        app.include_router(module.router)

    app.include_router(dashboard.create_router())

    return app
