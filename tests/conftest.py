"""Real servers for the suite: one Redis and one PostgreSQL per session, started here on free ports in
temp dirs, plus factories for private servers that a test may kill and restart.

Each test gets a flushed Redis and its own database, cloned from a migrated template (fast: a file
copy inside PostgreSQL, made ahead of the test by a thread; see DatabaseSupply).

The servers are locked as in production: the code under test connects as the app user (Redis user
`nova` without admin commands; PostgreSQL role `nova`, owner of its database, not a superuser). Set-up
that needs more (FLUSHALL, CREATE DATABASE) uses the servers' `admin_url`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
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


@pytest.fixture
async def versioned_redis(versioned_server: RedisServer) -> AsyncIterator[Redis]:
    """An empty `versioned_server`, as its admin user: the race tests flush and list every key (the
    scripts' own rights are tested in test_embedded)."""
    client = Redis.from_url(versioned_server.admin_url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def initdb_cache() -> Iterator[Path]:
    """One initdb per test process, copied for each new PostgreSQL (the session's, a test's own, chaos
    runs'): initdb takes seconds on a loaded machine, the copy a fraction of that."""
    with private_dir("initdb") as root:
        PostgresServer.initdb_cache = root
        try:
            yield root
        finally:
            PostgresServer.initdb_cache = None


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


class DatabaseSupply:
    """Each test's database, cloned from the template ahead of time by a thread of its own.

    A clone is a copy of the template inside PostgreSQL (a tenth of a second to half a second on a
    loaded machine), and used databases are dropped (WITH (FORCE): whatever a test left connected is
    cut off). Both happen here while the previous test runs, instead of before and after each test.
    Every test still gets a database of its own, fresh from the template.
    """

    AHEAD = 2

    def __init__(self, server: PostgresServer, template: str) -> None:
        self.server = server
        self.template = template
        self.ready: queue.Queue[str | BaseException] = queue.Queue()
        # Work for the thread, in order: "create", a database name to drop, or None to stop.
        self.jobs: queue.Queue[str | None] = queue.Queue()
        self.drop_errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, name="db-supply", daemon=True)

    def start(self) -> DatabaseSupply:
        for _ in range(self.AHEAD):
            self.jobs.put("create")
        self.thread.start()
        return self

    async def take(self) -> str:
        name = await asyncio.to_thread(self._next)
        self.jobs.put("create")
        if isinstance(name, BaseException):
            raise name
        return name

    def _next(self) -> str | BaseException:
        while True:
            try:
                return self.ready.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    return RuntimeError("the database supply's thread has stopped (see the first failure)")

    def give_back(self, name: str) -> None:
        self.jobs.put(name)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(60)
        if self.drop_errors:
            raise self.drop_errors[0]

    def _serve(self) -> None:
        # Its own event loop, never the tests': a test blocking its loop does not stop the supply.
        loop = asyncio.new_event_loop()
        try:
            conn = loop.run_until_complete(asyncpg.connect(self.server.admin_url))
        except Exception as exc:
            self.ready.put(exc)
            loop.close()
            return
        try:
            while (job := self.jobs.get()) is not None:
                if job == "create":
                    name = f"test_{os.getpid()}_{next(_db_counter)}"
                    sql = f'CREATE DATABASE "{name}" TEMPLATE {self.template} OWNER {APP_USER}'
                    try:
                        loop.run_until_complete(conn.execute(sql))
                    except Exception as exc:
                        # Raised in the test that asks for a database next, as a failed CREATE was before.
                        self.ready.put(exc)
                    else:
                        self.ready.put(name)
                else:
                    try:
                        loop.run_until_complete(conn.execute(f'DROP DATABASE IF EXISTS "{job}" WITH (FORCE)'))
                    except Exception as exc:
                        self.drop_errors.append(exc)
        finally:
            loop.run_until_complete(conn.close())
            loop.close()


@pytest.fixture(scope="session")
def db_supply(pg_server: PostgresServer, template_db: str) -> Iterator[DatabaseSupply]:
    supply = DatabaseSupply(pg_server, template_db).start()
    yield supply
    supply.stop()


@pytest.fixture
async def db_url(pg_server: PostgresServer, db_supply: DatabaseSupply) -> AsyncIterator[str]:
    name = await db_supply.take()
    yield pg_server.url_for(name)
    db_supply.give_back(name)


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
