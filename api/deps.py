"""What routes get from the application: its resources, and who is calling.

Every route but /health and the dashboard's page requires `Authorization: Bearer <key>`: the
operators' key (NOVA_ADMIN_KEY) or a client's key. The SSE routes, and only they, also accept
`?access_token=` because browsers' EventSource cannot send headers. Without either, the dashboard's
session cookie stands for the key it was opened with (api/sessions.py); a request that changes
something must then carry the session's CSRF token too.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Annotated

import asyncpg
from fastapi import Depends, Header, Query, Request
from redis.asyncio import Redis

from api.errors import ApiError, unavailable
from api.event_hub import EventHub
from api.limits import StreamSlots
from api.metrics import Metrics
from api.sessions import COOKIE, CSRF_HEADER, SAFE_METHODS, Session, Sessions
from shared.catalog import WorkflowCatalog
from shared.clients import ADMIN, ClientStore, Principal, hash_key, is_admin_key
from shared.connections import REDIS_UNAVAILABLE, open_pool
from shared.durability import StrictDurability
from shared.executions import KnownClients
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys


@dataclass
class Resources:
    settings: Settings
    redis: Redis
    keys: Keys
    scripts: Scripts
    catalog: WorkflowCatalog
    clients: ClientStore
    hub: EventHub
    metrics: Metrics
    stream_slots: StreamSlots
    known_clients: KnownClients
    sessions: Sessions
    pool: asyncpg.Pool | None = None
    # Set in strict durability mode: what each enqueue confirms before the 202.
    strict: StrictDurability | None = None
    _pool_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def db(self) -> asyncpg.Pool:
        if self.pool is None:
            raise unavailable("PostgreSQL")
        return self.pool

    async def ensure_pool(self) -> None:
        """Open the pool if PostgreSQL was down when the API started."""
        if self.pool is not None:
            return
        async with self._pool_lock:
            if self.pool is None:
                self.pool = await open_pool(self.settings)
                self.catalog.pool = self.pool
                self.clients.pool = self.pool


async def resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    if res.pool is None:
        # PostgreSQL was down at start; try again (cheaply, under a lock) on each request until it is back.
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            await asyncio.wait_for(res.ensure_pool(), 2)
    return res


Res = Annotated[Resources, Depends(resources)]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise _unauthorized("Authorization must be 'Bearer <API key>'")
    return value.strip()


async def authenticate(res: Resources, key: str | None) -> Principal:
    if not key:
        raise _unauthorized("this route needs an API key: send 'Authorization: Bearer <key>'")
    admin = res.settings.admin_key.get_secret_value() if res.settings.admin_key else None
    if is_admin_key(key, admin):
        return ADMIN
    try:
        client = await res.clients.resolve(key)
    except REDIS_UNAVAILABLE:
        raise unavailable("Redis") from None
    if client is None:
        raise _unauthorized("unknown or revoked API key")
    return Principal(admin=False, client=client)


async def principal(
    request: Request,
    res: Res,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> Principal:
    key = _bearer(authorization)
    if key is None and "access_token" in request.query_params:
        # A key in a URL ends up in access logs, proxies and browser history: only the SSE routes,
        # whose browser client (EventSource) cannot send headers, take that risk.
        raise _unauthorized(
            "access_token is accepted on the event-stream routes only; send 'Authorization: Bearer <key>'"
        )
    if key is None and COOKIE in request.cookies:
        session = await _session(res, request.cookies[COOKIE])
        if request.method not in SAFE_METHODS and not session.csrf_matches(request.headers.get(CSRF_HEADER)):
            # SameSite=Strict already keeps other sites' pages from sending the cookie; the token also
            # refuses a same-site page (another port, a sibling subdomain) that cannot read it.
            raise ApiError(403, f"a request signed in by session cookie must carry the session's {CSRF_HEADER}")
        return session.principal
    return await authenticate(res, key)


async def _session(res: Resources, cookie: str) -> Session:
    admin = res.settings.admin_key.get_secret_value() if res.settings.admin_key else None
    try:
        session = await res.sessions.get(cookie, admin)
    except REDIS_UNAVAILABLE:
        raise unavailable("Redis") from None
    if session is None:
        raise _unauthorized("the session has expired or was signed out: sign in again (POST /session)")
    return session


@dataclass(frozen=True)
class StreamCaller:
    """The caller of an SSE route, and which key it used (event streams are capped per key)."""

    principal: Principal
    key_digest: str


async def stream_caller(
    request: Request,
    res: Res,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    access_token: Annotated[str | None, Query(description="API key, for EventSource clients")] = None,
) -> StreamCaller:
    key = _bearer(authorization) or access_token
    if not key and COOKIE in request.cookies:
        # The dashboard's EventSource sends the session cookie; its streams count against the key behind it.
        session = await _session(res, request.cookies[COOKIE])
        return StreamCaller(session.principal, session.key_digest)
    caller = await authenticate(res, key)
    return StreamCaller(caller, hash_key(key or ""))


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})


Caller = Annotated[Principal, Depends(principal)]
SseCaller = Annotated[StreamCaller, Depends(stream_caller)]


async def admin(caller: Caller) -> Principal:
    if not caller.admin:
        raise ApiError(403, "this route is for operators (the admin key)")
    return caller


Admin = Annotated[Principal, Depends(admin)]
