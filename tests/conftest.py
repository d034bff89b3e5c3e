"""Real servers for the suite: one Redis and one PostgreSQL per session, started here on free ports in
temp dirs, plus factories for private servers that a test may kill and restart.

Each test gets a flushed Redis and its own database, cloned from a migrated template (fast: a file
copy inside PostgreSQL).

The servers are locked as in production: the code under test connects as the app user (Redis user
`nova` without admin commands; PostgreSQL role `nova`, owner of its database, not a superuser). Set-up
that needs more (FLUSHALL, CREATE DATABASE) uses the servers' `admin_url`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from api.app import create_app
from cli.embedded import (
    APP_USER,
    PostgresServer,
    RedisServer,
)
from shared.db import create_pool, migrate_url
from shared.settings import Settings
from shared.streams import Keys
from tests.support import ADMIN_KEY, make_settings, private_dir, redis_binaries, redis_version

_db_counter = itertools.count()


@pytest.fixture(scope="module", params=redis_binaries(), ids=redis_version)
def versioned_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private Redis per module and per Redis version here (6.2 and 7), for the atomic steps' races."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary=request.param).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with private_dir("postgres") as root:
        server = PostgresServer(root, durable=False).start()
        yield server
        server.stop()


@pytest.fixture(scope="session")
async def template_db(pg_server: PostgresServer) -> str:
    conn = await asyncpg.connect(pg_server.admin_url)
    try:
        # Owned and migrated by the app role, as in production: its clones' tables are the app's.
        await conn.execute(f"CREATE DATABASE nova_template OWNER {APP_USER}")
    finally:
        await conn.close()
    await migrate_url(pg_server.url_for("nova_template"))
    return "nova_template"


@pytest.fixture
async def db_url(pg_server: PostgresServer, template_db: str) -> AsyncIterator[str]:
    name = f"test_{os.getpid()}_{next(_db_counter)}"
    conn = await asyncpg.connect(pg_server.admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE {template_db} OWNER {APP_USER}')
    finally:
        await conn.close()
    yield pg_server.url_for(name)
    conn = await asyncpg.connect(pg_server.admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    client = Redis.from_url(redis_server.admin_url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture
def settings(redis_url: str, db_url: str) -> Settings:
    return make_settings(redis_url, db_url)


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys.from_settings(settings)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url or "", decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.database_url or "", min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Private Redis servers a test may kill and restart; all stopped afterwards."""
    made: list[RedisServer] = []

    def make(**kwargs: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(made)}", **kwargs).start()  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


@pytest.fixture
def pg_factory() -> Iterator[Callable[..., PostgresServer]]:
    """Private PostgreSQL servers a test may stop and restart; all stopped afterwards."""
    made: list[PostgresServer] = []
    with private_dir("pg") as root:

        def make(**kwargs: object) -> PostgresServer:
            kwargs.setdefault("durable", False)
            server = PostgresServer(root / f"pg{len(made)}", **kwargs).start()  # type: ignore[arg-type]
            made.append(server)
            return server

        yield make
        for server in made:
            server.stop()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process, as the operator (admin key)."""
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://nova", headers=headers) as client:
        yield client


@pytest.fixture
async def anonymous(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nova") as client:
        yield client


@pytest.fixture
def shared_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder node code can write (with the module's `sandbox_writable`): sandboxes run under their
    own uid when the worker is root, and see the rest of the host read-only."""
    with private_dir(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")) as root:
        root.chmod(0o777)
        yield root
