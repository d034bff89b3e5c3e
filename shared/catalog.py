"""Stored workflows: PostgreSQL is the record, Redis a copy the hot paths read.

A workflow is versioned: an update stores a new version, and an execution runs the version it was
queued with (its request names it). Versions never change once written, so every process may cache
them for ever (Redis, then its own memory). What does change, the workflow's current version and
whether it was deleted (its "head"), is read from Redis on each use and never kept in memory: every
API replica sees an update or a delete at once.

The enqueue path and the workers read the Redis copy, never PostgreSQL: executions keep flowing while
PostgreSQL is down, and the API does no database round trip per enqueue. An update or delete writes
the head to Redis while it holds the workflow's row lock, so concurrent changes reach Redis in the
order PostgreSQL applied them; a copy filled from PostgreSQL after a miss never overwrites one.

A workflow missing from Redis (after a flush, on a new instance) is looked up in PostgreSQL. While
PostgreSQL cannot be reached that lookup has no answer: `get` raises CatalogUnavailable, which
callers treat as transient, instead of returning None ("no such workflow").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from shared.db import LazyPool
from shared.streams import ACTIVE_EXECUTION_STATUSES, Keys, dumps, loads
from shared.workflow import Definition, DefinitionProblem, graph_warnings

log = logging.getLogger(__name__)

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


class DuplicateName(ValueError):
    """Another live workflow has this name."""

    def __init__(self, name: str, existing_id: int | None) -> None:
        super().__init__(f"workflow '{name}' already exists (id {existing_id})")
        self.name = name
        self.existing_id = existing_id


class WorkflowBusy(Exception):
    """The workflow has executions queued or running: it cannot be deleted now."""

    def __init__(self, workflow_id: int, active: int) -> None:
        super().__init__(
            f"workflow {workflow_id} has {active} execution(s) queued or running; delete it once they have finished"
        )
        self.workflow_id = workflow_id
        self.active = active


def definition_warnings(definition: Definition) -> list[DefinitionProblem]:
    """What is worth telling about an accepted graph (e.g. nodes no path reaches), naming the node.

    The one place the API asks; the graph's own checks live in shared/workflow.py.
    """
    return graph_warnings(definition)


def _iso(value: datetime) -> str:
    return value.isoformat()


@dataclass(frozen=True)
class StoredWorkflow:
    """One version of a workflow, with its definition."""

    id: int
    name: str
    description: str | None
    definition: dict[str, Any]
    created_at: str
    version: int = 1
    # When this version was stored (the workflow's last update, for its current version).
    updated_at: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "graph_definition": self.definition,
            "created_at": self.created_at,
            "updated_at": self.updated_at or self.created_at,
            "version": self.version,
        }


@dataclass(frozen=True)
class WorkflowHead:
    """A workflow's current version and state: what the execute route needs, without the definition."""

    id: int
    name: str
    description: str | None
    version: int
    created_at: str
    updated_at: str
    deleted: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "deleted": self.deleted,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkflowHead:
        return cls(
            id=int(data["id"]),
            name=data["name"],
            description=data.get("description"),
            version=int(data["version"]),
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            deleted=bool(data.get("deleted")),
        )


def _head(row: asyncpg.Record) -> WorkflowHead:
    return WorkflowHead(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        version=row["version"],
        created_at=_iso(row["created_at"]),
        updated_at=_iso(row["updated_at"]),
        deleted=row["deleted_at"] is not None,
    )


def _current(row: asyncpg.Record) -> StoredWorkflow:
    return StoredWorkflow(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        definition=row["definition"],
        created_at=_iso(row["created_at"]),
        version=row["version"],
        updated_at=_iso(row["updated_at"]),
    )


_HEAD_COLUMNS = "id, name, description, version, created_at, updated_at, deleted_at"
_CURRENT_COLUMNS = f"{_HEAD_COLUMNS}, definition"

# Counts executions of a workflow that are not finished, as PostgreSQL has projected them.
_ACTIVE_SQL = "SELECT count(*) FROM executions WHERE workflow_id = $1 AND status = ANY($2::text[])"

# Unfinished executions PostgreSQL does not know of yet (the projector is behind); see shared/executions.py.
UnprojectedActive = Callable[[int], Awaitable[int]]


class WorkflowCatalog:
    def __init__(self, redis: Redis, pool: asyncpg.Pool | LazyPool | None, keys: Keys) -> None:
        """`pool` may be a LazyPool: a process started while PostgreSQL was down then opens it once
        PostgreSQL is back. None means this deployment has no PostgreSQL at all."""
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self._versions: dict[tuple[int, int], StoredWorkflow] = {}
        # The head this process last read or wrote, per workflow: see last_seen().
        self._heads: dict[int, WorkflowHead] = {}

    async def _db(self, needed_for: str) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError(f"{needed_for} needs PostgreSQL")
        return await self.pool.get() if isinstance(self.pool, LazyPool) else self.pool

    # ---- changes (PostgreSQL first, Redis under the row lock) ------------------------------------

    async def create(self, name: str, description: str | None, definition: dict[str, Any]) -> StoredWorkflow:
        """Store a new workflow as version 1; raises DuplicateName."""
        async with self._changing() as (conn, published):
            try:
                row = await conn.fetchrow(
                    f"""INSERT INTO workflows (name, description, definition) VALUES ($1, $2, $3)
                        RETURNING {_CURRENT_COLUMNS}""",
                    name,
                    description,
                    definition,
                )
            except asyncpg.UniqueViolationError:
                raise DuplicateName(name, await self._live_id(name)) from None
            workflow = _current(row)
            await self._store_version(conn, workflow.id)
            published.add(workflow.id)
            await self._publish(workflow, _head(row))
        return workflow

    async def update(
        self,
        workflow_id: int,
        *,
        name: str | None = None,
        description: str | None = None,
        definition: dict[str, Any] | None = None,
    ) -> StoredWorkflow | None:
        """Store a new version with the given fields changed (None: unchanged); None if there is no
        such live workflow. Raises DuplicateName. Executions already queued keep their version."""
        async with self._changing() as (conn, published):
            try:
                row = await conn.fetchrow(
                    f"""UPDATE workflows SET name = COALESCE($2, name), description = COALESCE($3, description),
                               definition = COALESCE($4, definition), version = version + 1, updated_at = now()
                        WHERE id = $1 AND deleted_at IS NULL
                        RETURNING {_CURRENT_COLUMNS}""",
                    workflow_id,
                    name,
                    description,
                    definition,
                )
            except asyncpg.UniqueViolationError:
                raise DuplicateName(name or "", await self._live_id(name or "")) from None
            if row is None:
                return None
            workflow = _current(row)
            await self._store_version(conn, workflow.id)
            published.add(workflow.id)
            await self._publish(workflow, _head(row))
        return workflow

    async def delete(self, workflow_id: int, unprojected_active: UnprojectedActive) -> bool:
        """Remove a workflow from listings and from execution; its versions stay readable, so its
        executions do too. False if there is no such live workflow; raises WorkflowBusy while any of
        its executions is queued or running."""
        async with self._changing() as (conn, published):
            row = await conn.fetchrow(
                f"SELECT {_HEAD_COLUMNS} FROM workflows WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", workflow_id
            )
            if row is None:
                return False
            head = _head(row)
            # Refuse new executions first, then count the unfinished ones. On a single Redis the enqueue
            # step checks the head itself; on a cluster an execute call that read the head before this
            # write is the only one that can still slip in (a moment's window).
            published.add(workflow_id)
            await self._write_head(dataclasses.replace(head, deleted=True))
            try:
                # Redis first: an event the projector acknowledges after this read was committed to
                # PostgreSQL before, so the count below sees it; neither read can miss an execution.
                active = await unprojected_active(workflow_id)
                active += int(await conn.fetchval(_ACTIVE_SQL, workflow_id, list(ACTIVE_EXECUTION_STATUSES)))
                if active:
                    raise WorkflowBusy(workflow_id, active)
                await conn.execute("UPDATE workflows SET deleted_at = now() WHERE id = $1", workflow_id)
            except BaseException:
                await self._write_head(head)
                published.clear()  # restored: nothing to drop should the rollback fail
                raise
        return True

    async def _store_version(self, conn: asyncpg.Connection, workflow_id: int) -> None:
        """Record the workflows row as it now stands as its version."""
        await conn.execute(
            """INSERT INTO workflow_versions (workflow_id, version, name, description, definition, created_at)
               SELECT id, version, name, description, definition, updated_at FROM workflows WHERE id = $1""",
            workflow_id,
        )

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[tuple[asyncpg.Connection, set[int]]]:
        """A transaction that may publish heads to Redis before it commits (under the row lock); it
        adds their ids to the set. Should it not commit, those heads are dropped from Redis, to be
        read again from PostgreSQL."""
        pool = await self._db("changing a workflow")
        published: set[int] = set()
        try:
            async with pool.acquire() as conn, conn.transaction():
                yield conn, published
        except BaseException:
            with contextlib.suppress(Exception):
                for workflow_id in published:
                    await self.redis.delete(self.keys.workflow(workflow_id))
            raise

    async def _publish(self, workflow: StoredWorkflow, head: WorkflowHead) -> None:
        # The version first: a head in Redis always names a version Redis (or PostgreSQL) has.
        await self._cache_version(workflow)
        await self._write_head(head)

    async def _write_head(self, head: WorkflowHead) -> None:
        await self.redis.set(self.keys.workflow(head.id), dumps(head.as_json()))
        self._heads[head.id] = head

    async def _live_id(self, name: str) -> int | None:
        pool = await self._db("reading a workflow")
        return await pool.fetchval("SELECT id FROM workflows WHERE name = $1 AND deleted_at IS NULL", name)

    # ---- reads ------------------------------------------------------------------------------------

    async def head(self, workflow_id: int) -> WorkflowHead | None:
        """The workflow's current version and state (deleted ones too); None if it never existed."""
        head = await self._read_head(workflow_id)
        if head is None:
            self._heads.pop(workflow_id, None)
        else:
            self._heads[workflow_id] = head
        return head

    async def _read_head(self, workflow_id: int) -> WorkflowHead | None:
        raw = await self.redis.get(self.keys.workflow(workflow_id))
        data = loads(raw) if raw else None
        # A copy written before workflows had versions has no "version": PostgreSQL says.
        if isinstance(data, dict) and "version" in data:
            return WorkflowHead.from_json(data)
        if self.pool is None:
            return None
        row = await self._fetch(workflow_id, f"SELECT {_HEAD_COLUMNS} FROM workflows WHERE id = $1", workflow_id)
        if row is None:
            return None
        head = _head(row)
        # NX: a head an update or delete wrote meanwhile is newer than what was just read.
        await self.redis.set(self.keys.workflow(workflow_id), dumps(head.as_json()), nx=data is None)
        return head

    def last_seen(self, workflow_id: int) -> WorkflowHead | None:
        """The live head this process last read or wrote for the workflow, without a round trip; it may
        be stale (another replica changed it since), so only for a step that checks it again atomically,
        as the enqueue does (NewExecution.check_head). One small entry per workflow executed here."""
        head = self._heads.get(workflow_id)
        return None if head is None or head.deleted else head

    async def current(self, workflow_id: int) -> WorkflowHead | None:
        """The head of a live workflow; None if it does not exist or was deleted."""
        head = await self.head(workflow_id)
        return None if head is None or head.deleted else head

    async def get(self, workflow_id: int, version: int | None = None) -> StoredWorkflow | None:
        """A version of a workflow (deleted workflows' too: their executions stay readable), or with no
        version its current one (None once it is deleted)."""
        if version is None:
            head = await self.current(workflow_id)
            if head is None:
                return None
            version = head.version
        cached = self._versions.get((workflow_id, version))
        if cached is not None:
            return cached
        raw = await self.redis.get(self.keys.workflow_version(workflow_id, version))
        if raw:
            data = loads(raw)
            workflow = StoredWorkflow(
                id=int(data["id"]),
                name=data["name"],
                description=data.get("description"),
                definition=data["graph_definition"],
                created_at=data["created_at"],
                version=int(data["version"]),
                updated_at=data["updated_at"],
            )
            self._versions[(workflow_id, version)] = workflow
            return workflow
        if self.pool is None:
            return None
        row = await self._fetch(
            workflow_id,
            """SELECT w.id, v.name, v.description, v.definition, w.created_at, v.version, v.created_at AS updated_at
               FROM workflow_versions v JOIN workflows w ON w.id = v.workflow_id
               WHERE v.workflow_id = $1 AND v.version = $2""",
            workflow_id,
            version,
        )
        if row is None:
            return None
        workflow = _current(row)
        await self._cache_version(workflow)
        return workflow

    async def _fetch(self, workflow_id: int, query: str, *args: Any) -> asyncpg.Record | None:
        try:
            pool = await self._db("reading a workflow")
            return await pool.fetchrow(query, *args)
        except POSTGRES_UNREACHABLE as exc:
            raise CatalogUnavailable(
                f"workflow {workflow_id} is not in Redis and PostgreSQL is unreachable ({type(exc).__name__}: {exc})"
            ) from exc

    async def list(self, *, limit: int = 100, offset: int = 0) -> tuple[list[StoredWorkflow], int]:
        """Live workflows in id order, their current versions, and how many live workflows there are."""
        pool = await self._db("listing workflows")
        rows = await pool.fetch(
            f"""SELECT {_CURRENT_COLUMNS}, count(*) OVER () AS total FROM workflows
                WHERE deleted_at IS NULL ORDER BY id LIMIT $1 OFFSET $2""",
            limit,
            offset,
        )
        if rows:
            total = int(rows[0]["total"])
        else:
            # A page past the end still says how many there are.
            total = int(await pool.fetchval("SELECT count(*) FROM workflows WHERE deleted_at IS NULL"))
        return [_current(r) for r in rows], total

    async def highest_execution_id(self) -> int:
        """The largest execution id PostgreSQL holds: the floor of Redis's id sequence."""
        pool = await self._db("raising the execution id sequence")
        return int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM executions"))

    async def holds_any_task(self, task_ids: list[str]) -> bool:
        """Whether PostgreSQL holds an execution of one of `task_ids`: a schedule's tick that already ran
        (its task id names the tick), which a Redis that lost data would fire again. One lookup in the
        unique index on executions.task_id. Raises what reaching PostgreSQL raises while it is down."""
        pool = await self._db("checking whether a schedule's tick ran")
        found = await pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM executions WHERE task_id = ANY($1::text[]))", task_ids
        )
        return bool(found)

    async def _cache_version(self, workflow: StoredWorkflow) -> None:
        await self.redis.set(self.keys.workflow_version(workflow.id, workflow.version), dumps(workflow.as_json()))
        self._versions[(workflow.id, workflow.version)] = workflow
