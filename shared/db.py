"""PostgreSQL access: the connection pool and versioned migrations.

Migrations are the numbered ``shared/migrations/NNNN_name.sql`` files, applied in order, each in its
own transaction, under an advisory lock so that several processes running ``nova migrate`` at once
(every replica on deploy) apply each file exactly once.

They run while the previous release's workers, projector and API are still serving (a rolling deploy),
so every migration after 0003 is additive: new tables, new nullable (or defaulted) columns, new indexes;
nothing the running code reads or writes is dropped, renamed or retyped (tests/test_rolling.py checks the
files). A migration waits at most ``_LOCK_TIMEOUT`` for a table lock and is then tried again from the
start: an ALTER TABLE queued behind a long transaction would otherwise hold up every later query on that
table (the projector's upserts) for as long as it waited. A deadlock with the projector is retried too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
import orjson

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every NOVA process.
_MIGRATION_LOCK = 0x4E4F5641
# How long one statement of a migration may wait for a table lock before the migration is tried again.
_LOCK_TIMEOUT = "2s"
# Tries of one migration that lost a lock wait or a deadlock, with a growing pause between them.
_MIGRATION_TRIES = 30


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        if entry.name.endswith(".sql") and entry.name[:4].isdigit():
            version = int(entry.name[:4])
            found.append(Migration(version, entry.name[5:-4], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb round-trips through orjson: the same codec as the streams, and faster than json.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
        format="text",
    )


# The integers the jsonb codec (orjson) encodes: 64-bit signed, and unsigned above.
_JSON_INT_MIN, _JSON_INT_MAX = -(2**63), 2**64 - 1


def jsonb_problem(value: Any, where: str) -> str | None:
    """Why `value` (decoded JSON) cannot be stored as jsonb, naming the place (`where` and the path
    below it), or None. PostgreSQL's text and jsonb cannot hold U+0000, and the codec cannot encode an
    integer beyond 64 bits: stored as they are, both fail in PostgreSQL or the codec (a 500 where the
    caller's input was at fault). Walked with a stack: the JSON guard bounds the depth, not the width."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return f"{path}: text cannot contain U+0000 (NUL)"
        elif isinstance(item, bool) or item is None or isinstance(item, float):
            continue
        elif isinstance(item, int):
            if not _JSON_INT_MIN <= item <= _JSON_INT_MAX:
                return f"{path}: {item} is beyond the 64-bit integers a stored value can hold"
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and "\x00" in key:
                    return f"{path}: a key cannot contain U+0000 (NUL)"
                stack.append((f"{path}.{key}", inner))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}", inner) for i, inner in enumerate(item))
    return None


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs)


class LazyPool:
    """A pool opened on first use, and again on the next use after an open failed.

    A long-lived process (a worker) may start while PostgreSQL is down; with a pool opened once at
    start it would run without PostgreSQL for the rest of its life. Once open, asyncpg's pool replaces
    broken connections itself, so only the first successful open matters.
    """

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    @property
    def current(self) -> asyncpg.Pool | None:
        """The pool if it is open, without trying to open it."""
        return self._pool

    async def get(self) -> asyncpg.Pool:
        """The open pool; raises what connecting raises (OSError, asyncpg errors) while PostgreSQL is
        unreachable, and tries again on the next call."""
        if self._pool is not None:
            return self._pool
        async with self._opening:
            # One open at a time: callers that waited use the pool the first one opened.
            if self._pool is None:
                if self._closed:
                    raise asyncpg.InterfaceError("pool is closed")
                self._pool = await create_pool(self.dsn, min_size=self.min_size, max_size=self.max_size)
            return self._pool

    async def close(self) -> None:
        async with self._opening:
            self._closed = True
            if self._pool is not None:
                await self._pool.close()
                self._pool = None


def _log_notice(_conn: asyncpg.Connection, message: asyncpg.PostgresLogMessage) -> None:
    # What a migration says with RAISE NOTICE (e.g. the workflows it renamed) reaches the operator.
    log.warning("migration: %s", message.message)


async def migrate(
    conn: asyncpg.Connection, available: list[Migration] | None = None, *, lock_timeout: str = _LOCK_TIMEOUT
) -> list[int]:
    """Apply the migrations this database lacks (`available`: the packaged ones); returns the versions
    applied now."""
    async with conn.transaction():
        # Under the lock too: concurrent CREATE TABLE IF NOT EXISTS can still collide.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    applied: list[int] = []
    for migration in migrations() if available is None else available:
        for attempt in range(1, _MIGRATION_TRIES + 1):
            try:
                if await _apply(conn, migration, lock_timeout):
                    applied.append(migration.version)
                break
            except (asyncpg.LockNotAvailableError, asyncpg.TransactionRollbackError) as exc:
                # Rolled back whole: nothing of it stays, and the next try starts over.
                if attempt == _MIGRATION_TRIES:
                    raise
                log.warning("migration %04d waited too long for a lock (%s); trying again", migration.version, exc)
                await asyncio.sleep(min(2.0, 0.05 * attempt))
    return applied


async def _apply(conn: asyncpg.Connection, migration: Migration, lock_timeout: str) -> bool:
    """Apply one migration unless applied already; False when it was."""
    async with conn.transaction():
        # The advisory lock first, without a timeout: another replica migrating is waited for.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        done = await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", migration.version)
        if done:
            return False
        # set_config: a parameter, not SQL text; local to this transaction.
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", lock_timeout)
        log.info("applying migration %04d %s", migration.version, migration.name)
        conn.add_log_listener(_log_notice)
        try:
            await conn.execute(migration.sql)
        finally:
            conn.remove_log_listener(_log_notice)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", migration.version, migration.name
        )
        return True


async def migrate_url(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
