"""Executions and their chain of work, from PostgreSQL (the projection of the results stream)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query

from api.deps import Caller, Res
from api.errors import ApiError, unavailable
from api.schemas import (
    SLUG_PATTERN,
    ExecuteOut,
    ExecutionList,
    ExecutionOut,
    ExecutionSummary,
    NodeRunOut,
    PathId,
    QueryId,
    errors,
)
from shared.clients import Principal
from shared.events import event_fields
from shared.streams import EventType, RequestField, TaskField, dumps

router = APIRouter(tags=["executions"])

_SUMMARY = """id, task_id, workflow_id, workflow_name, client_slug, status, nodes_executed, current_node,
              attempt, enqueued_at, started_at, finished_at"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _summary(row: asyncpg.Record) -> dict[str, Any]:
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


def _node_run(row: asyncpg.Record) -> NodeRunOut:
    data = dict(row)
    data["started_at"] = _iso(row["started_at"])
    data["finished_at"] = _iso(row["finished_at"])
    return NodeRunOut(**data)


async def _fetch(res: Res, query: str, *args: Any) -> list[asyncpg.Record]:
    try:
        return await res.db().fetch(query, *args)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError):
        raise unavailable("PostgreSQL") from None


def _visible(caller: Principal, row: asyncpg.Record | None, execution_id: int) -> asyncpg.Record:
    if row is None or not caller.may_see(row["client_slug"]):
        raise ApiError(404, f"execution {execution_id} not found (it may not be projected yet)")
    return row


@router.get("/executions/{execution_id}", response_model=ExecutionOut, responses=errors(401, 404, 503))
async def get_execution(execution_id: PathId, res: Res, caller: Caller) -> ExecutionOut:
    rows = await _fetch(
        res, f"SELECT {_SUMMARY}, initial_context, final_context, error FROM executions WHERE id = $1", execution_id
    )
    row = _visible(caller, rows[0] if rows else None, execution_id)
    chain = await _fetch(
        res,
        """SELECT step, node_id, node_type, status, input_context, output_context, stdout, stderr, decision,
                  next_node, error, started_at, finished_at, duration_ms
           FROM node_runs WHERE execution_id = $1 ORDER BY step""",
        execution_id,
    )
    return ExecutionOut(
        **_summary(row),
        initial_context=row["initial_context"],
        final_context=row["final_context"],
        error=row["error"],
        chain=[_node_run(r) for r in chain],
    )


@router.get("/executions", response_model=ExecutionList, responses=errors(401, 503))
async def list_executions(
    res: Res,
    caller: Caller,
    workflow_id: QueryId = None,
    # Patterned, so that text PostgreSQL cannot hold (a NUL byte) is refused here as 422, not there as 500.
    client_slug: Annotated[str | None, Query(pattern=SLUG_PATTERN)] = None,
    status: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> ExecutionList:
    if not caller.admin:
        client_slug = caller.client
    rows = await _fetch(
        res,
        f"""SELECT {_SUMMARY} FROM executions
            WHERE ($1::bigint IS NULL OR workflow_id = $1) AND ($2::text IS NULL OR client_slug = $2)
              AND ($3::text IS NULL OR status = $3)
            ORDER BY id DESC LIMIT $4""",
        workflow_id,
        client_slug,
        status,
        limit,
    )
    items = [ExecutionSummary(**_summary(r)) for r in rows]
    return ExecutionList(items=items, count=len(items))


@router.post(
    "/executions/{execution_id}/retry", status_code=202, response_model=ExecuteOut, responses=errors(401, 404, 409, 503)
)
async def retry_execution(execution_id: PathId, res: Res, caller: Caller) -> ExecuteOut:
    """Run a FAILURE again from its failed node, with the context it had there."""
    rows = await _fetch(res, "SELECT task_id, client_slug FROM executions WHERE id = $1", execution_id)
    row = _visible(caller, rows[0] if rows else None, execution_id)
    task_id = row["task_id"]
    task = await res.redis.hgetall(res.keys.task(task_id))
    if not task:
        raise ApiError(409, f"execution {execution_id} has expired from Redis and can no longer be retried")
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
    previous = await res.scripts.reopen(
        task_id=task_id, client=client, token=uuid.uuid4().hex, event=event, request=request
    )
    if previous != "FAILURE":
        raise ApiError(409, f"execution {execution_id} is {previous or 'unknown'}, not FAILURE: nothing to retry")
    return ExecuteOut(
        task_id=task_id,
        status="queued",
        workflow_id=workflow_id,
        workflow_name=task.get(TaskField.WORKFLOW_NAME, ""),
        execution_id=execution_id,
        message=f"Retrying from the failed node. Use GET /tasks/{task_id} to check status.",
    )
