"""Stored workflows: PostgreSQL is the record, Redis a copy the hot paths read.

Workflows are immutable once created, so every process may cache them forever. The enqueue path and
the workers read the Redis copy (then their own memory), never PostgreSQL: executions keep flowing
while PostgreSQL is down, and the API does no database round trip per enqueue.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from shared.streams import Keys, dumps, loads


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
    def __init__(self, redis: Redis, pool: asyncpg.Pool | None, keys: Keys) -> None:
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self._memory: dict[int, StoredWorkflow] = {}

    async def create(self, name: str, description: str | None, definition: dict[str, Any]) -> StoredWorkflow:
        if self.pool is None:
            raise RuntimeError("creating a workflow needs PostgreSQL")
        row = await self.pool.fetchrow(
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
        row = await self.pool.fetchrow(
            "SELECT id, name, description, definition, created_at FROM workflows WHERE id = $1", workflow_id
        )
        if row is None:
            return None
        workflow = _from_row(row)
        await self._cache(workflow)
        return workflow

    async def list(self, *, limit: int = 100, offset: int = 0) -> list[StoredWorkflow]:
        if self.pool is None:
            raise RuntimeError("listing workflows needs PostgreSQL")
        rows = await self.pool.fetch(
            """SELECT id, name, description, definition, created_at FROM workflows
               ORDER BY id LIMIT $1 OFFSET $2""",
            limit,
            offset,
        )
        return [_from_row(r) for r in rows]

    async def highest_execution_id(self) -> int:
        """The largest execution id PostgreSQL holds: the floor of Redis's id sequence."""
        if self.pool is None:
            raise RuntimeError("PostgreSQL is not connected")
        return int(await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM executions"))

    async def _cache(self, workflow: StoredWorkflow) -> None:
        await self.redis.set(self.keys.workflow(workflow.id), dumps(workflow.as_json()))
        self._memory[workflow.id] = workflow
