"""Stored workflows: PostgreSQL is the record, Redis a copy the hot paths read.

Workflows are immutable once created, so every process may cache them forever. The enqueue path and
the workers read the Redis copy (then their own memory), never PostgreSQL: executions keep flowing
while PostgreSQL is down, and the API does no database round trip per enqueue.

A workflow missing from Redis (after a flush, on a new instance) is looked up in PostgreSQL. While
PostgreSQL cannot be reached that lookup has no answer: `get` raises CatalogUnavailable, which
callers treat as transient, instead of returning None ("no such workflow").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from shared.db import LazyPool
from shared.streams import Keys, dumps, loads

# What reaching PostgreSQL raises while it is down, restarting or out of connections (as opposed to
# an error in the query itself).
POSTGRES_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.InterfaceError,
)


class CatalogUnavailable(ConnectionError):
    """The workflow is not in Redis and PostgreSQL, its record, cannot be reached: unknown for now.

    Transient: the run (or request) should be retried later, not dead-lettered. A ConnectionError,
    so code that already treats lost connections as transient (the API's 503, the worker leaving an
    entry pending) does the right thing without knowing this class.
    """


@dataclass(frozen=True)
class StoredWorkflow:
    id: int
    name: str
    description: str | None
    definition: dict[str, Any]
    created_at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "definition": self.definition,
            "created_at": self.created_at,
        }


def _from_row(row: asyncpg.Record) -> StoredWorkflow:
    created: datetime = row["created_at"]
    return StoredWorkflow(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        definition=row["definition"],
        created_at=created.isoformat(),
    )


class WorkflowCatalog:
    def __init__(self, redis: Redis, pool: asyncpg.Pool | LazyPool | None, keys: Keys) -> None:
        """`pool` may be a LazyPool: a process started while PostgreSQL was down then opens it once
        PostgreSQL is back. None means this deployment has no PostgreSQL at all."""
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self._memory: dict[int, StoredWorkflow] = {}

    async def _db(self, needed_for: str) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError(f"{needed_for} needs PostgreSQL")
        return await self.pool.get() if isinstance(self.pool, LazyPool) else self.pool

    async def create(self, name: str, description: str | None, definition: dict[str, Any]) -> StoredWorkflow:
        pool = await self._db("creating a workflow")
        row = await pool.fetchrow(
            """INSERT INTO workflows (name, description, definition) VALUES ($1, $2, $3)
               RETURNING id, name, description, definition, created_at""",
            name,
            description,
            definition,
        )
        workflow = _from_row(row)
        await self._cache(workflow)
        return workflow

    async def get(self, workflow_id: int) -> StoredWorkflow | None:
        cached = self._memory.get(workflow_id)
        if cached is not None:
            return cached
        raw = await self.redis.get(self.keys.workflow(workflow_id))
        if raw:
            data = loads(raw)
            workflow = StoredWorkflow(
                id=int(data["id"]),
                name=data["name"],
                description=data.get("description"),
                definition=data["definition"],
                created_at=data.get("created_at", ""),
            )
            self._memory[workflow_id] = workflow
            return workflow
        if self.pool is None:
            return None
        try:
            pool = await self._db("reading a workflow")
            row = await pool.fetchrow(
                "SELECT id, name, description, definition, created_at FROM workflows WHERE id = $1", workflow_id
            )
        except POSTGRES_UNREACHABLE as exc:
            raise CatalogUnavailable(
                f"workflow {workflow_id} is not in Redis and PostgreSQL is unreachable ({type(exc).__name__}: {exc})"
            ) from exc
        if row is None:
            return None
        workflow = _from_row(row)
        await self._cache(workflow)
        return workflow

    async def list(self, *, limit: int = 100, offset: int = 0) -> list[StoredWorkflow]:
        pool = await self._db("listing workflows")
        rows = await pool.fetch(
            """SELECT id, name, description, definition, created_at FROM workflows
               ORDER BY id LIMIT $1 OFFSET $2""",
            limit,
            offset,
        )
        return [_from_row(r) for r in rows]

    async def highest_execution_id(self) -> int:
        """The largest execution id PostgreSQL holds: the floor of Redis's id sequence."""
        pool = await self._db("raising the execution id sequence")
        return int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM executions"))

    async def _cache(self, workflow: StoredWorkflow) -> None:
        await self.redis.set(self.keys.workflow(workflow.id), dumps(workflow.as_json()))
        self._memory[workflow.id] = workflow
