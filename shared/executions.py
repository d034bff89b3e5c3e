"""Reading executions (the PostgreSQL projection) and re-opening a failed one; routes and the CLI call
these, so the SQL and the retry's request are written once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.events import event_fields
from shared.scripts import Scripts
from shared.streams import EventType, RequestField, TaskField, TaskStatus, decode_fields, dumps

# Errors that mean "PostgreSQL is unreachable", as opposed to a bad query.
POSTGRES_UNAVAILABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)

_SUMMARY = """id, task_id, workflow_id, workflow_name, client_slug, status, nodes_executed, current_node,
              attempt, enqueued_at, started_at, finished_at"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def summary(row: asyncpg.Record) -> dict[str, Any]:
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": row["id"],
        "task_id": row["task_id"],
        "workflow_id": row["workflow_id"],
        "workflow_name": row["workflow_name"],
        "client_slug": row["client_slug"],
        "status": row["status"],
        "nodes_executed": row["nodes_executed"],
        "current_node": row["current_node"],
        "attempt": row["attempt"],
        "enqueued_at": _iso(row["enqueued_at"]),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_ms": (finished - started).total_seconds() * 1000 if started and finished else None,
    }


def node_run(row: asyncpg.Record) -> dict[str, Any]:
    data = dict(row)
    data["started_at"] = _iso(row["started_at"])
    data["finished_at"] = _iso(row["finished_at"])
    return data


@dataclass(frozen=True)
class ExecutionFilter:
    workflow_id: int | None = None
    client_slug: str | None = None
    status: str | None = None
    limit: int = 50


class ExecutionStore:
    """Executions as PostgreSQL holds them. Raises POSTGRES_UNAVAILABLE errors as they come."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, execution_id: int) -> dict[str, Any] | None:
        """One execution with its contexts, error and chain of work; None if not projected (yet)."""
        row = await self.pool.fetchrow(
            f"SELECT {_SUMMARY}, initial_context, final_context, error FROM executions WHERE id = $1", execution_id
        )
        if row is None:
            return None
        chain = await self.pool.fetch(
            """SELECT step, node_id, node_type, status, input_context, output_context, stdout, stderr, decision,
                      next_node, error, started_at, finished_at, duration_ms
               FROM node_runs WHERE execution_id = $1 ORDER BY step""",
            execution_id,
        )
        return {
            **summary(row),
            "initial_context": row["initial_context"],
            "final_context": row["final_context"],
            "error": row["error"],
            "chain": [node_run(r) for r in chain],
        }

    async def owner(self, execution_id: int) -> tuple[str, str] | None:
        """(task id, client) of an execution, or None."""
        row = await self.pool.fetchrow("SELECT task_id, client_slug FROM executions WHERE id = $1", execution_id)
        return (row["task_id"], row["client_slug"]) if row else None

    async def list(self, where: ExecutionFilter) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"""SELECT {_SUMMARY} FROM executions
                WHERE ($1::bigint IS NULL OR workflow_id = $1) AND ($2::text IS NULL OR client_slug = $2)
                  AND ($3::text IS NULL OR status = $3)
                ORDER BY id DESC LIMIT $4""",
            where.workflow_id,
            where.client_slug,
            where.status,
            where.limit,
        )
        return [summary(r) for r in rows]


class NotRetryable(Exception):
    """The execution cannot be retried as it stands (expired from Redis, or not a FAILURE)."""


@dataclass(frozen=True)
class Reopened:
    task_id: str
    workflow_id: int
    workflow_name: str


async def retry_failure(scripts: Scripts, execution_id: int, task_id: str) -> Reopened:
    """Run a FAILURE again from its failed node, with the context it had there (its checkpoint)."""
    task = decode_fields(await scripts.redis.hgetall(scripts.keys.task(task_id)))
    if not task:
        raise NotRetryable(f"execution {execution_id} has expired from Redis and can no longer be retried")
    workflow_id, client = int(task[TaskField.WORKFLOW_ID]), task[TaskField.CLIENT]
    request = {
        RequestField.TASK_ID: task_id,
        RequestField.EXECUTION_ID: str(execution_id),
        RequestField.WORKFLOW_ID: str(workflow_id),
        RequestField.WORKFLOW_NAME: task.get(TaskField.WORKFLOW_NAME, ""),
        RequestField.CLIENT: client,
        RequestField.ENQUEUED_AT: task.get(TaskField.ENQUEUED_AT, ""),
        # The checkpoint in the task hash carries the context; this payload only says why.
        RequestField.PAYLOAD: dumps({"initial_context": {}, "retry_of": "failure"}),
    }
    attempt = int(task.get(TaskField.ATTEMPT) or 0) + 1
    event = event_fields(
        EventType.RETRY,
        task_id=task_id,
        execution_id=execution_id,
        workflow_id=workflow_id,
        client=client,
        data={"attempt": attempt, "error": None, "retry_at": None, "manual": True},
    )
    previous = await scripts.reopen(
        task_id=task_id, client=client, token=uuid.uuid4().hex, event=event, request=request
    )
    if previous != TaskStatus.FAILURE:
        raise NotRetryable(f"execution {execution_id} is {previous or 'unknown'}, not FAILURE: nothing to retry")
    return Reopened(task_id=task_id, workflow_id=workflow_id, workflow_name=task.get(TaskField.WORKFLOW_NAME, ""))
