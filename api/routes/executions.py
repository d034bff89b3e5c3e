"""Executions and their chain of work, from PostgreSQL (the projection of the results stream)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import Caller, Res
from api.errors import ApiError, unavailable
from api.schemas import (
    SLUG_PATTERN,
    ExecuteOut,
    ExecutionList,
    ExecutionOut,
    ExecutionSummary,
    PathId,
    QueryId,
    errors,
)
from shared.clients import Principal
from shared.executions import POSTGRES_UNAVAILABLE, ExecutionFilter, ExecutionStore, NotRetryable, retry_failure

router = APIRouter(tags=["executions"])


def _store(res: Res) -> ExecutionStore:
    return ExecutionStore(res.db())


def _visible(caller: Principal, client: str | None, execution_id: int) -> None:
    if client is None or not caller.may_see(client):
        raise ApiError(404, f"execution {execution_id} not found (it may not be projected yet)")


@router.get("/executions/{execution_id}", response_model=ExecutionOut, responses=errors(401, 404, 503))
async def get_execution(execution_id: PathId, res: Res, caller: Caller) -> ExecutionOut:
    try:
        execution = await _store(res).get(execution_id)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    _visible(caller, execution["client_slug"] if execution else None, execution_id)
    assert execution is not None
    return ExecutionOut(**execution)


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
    where = ExecutionFilter(workflow_id=workflow_id, client_slug=client_slug, status=status, limit=limit)
    try:
        rows = await _store(res).list(where)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    items = [ExecutionSummary(**r) for r in rows]
    return ExecutionList(items=items, count=len(items))


@router.post(
    "/executions/{execution_id}/retry", status_code=202, response_model=ExecuteOut, responses=errors(401, 404, 409, 503)
)
async def retry_execution(execution_id: PathId, res: Res, caller: Caller) -> ExecuteOut:
    """Run a FAILURE again from its failed node, with the context it had there."""
    try:
        owner = await _store(res).owner(execution_id)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    _visible(caller, owner[1] if owner else None, execution_id)
    assert owner is not None
    try:
        reopened = await retry_failure(res.scripts, execution_id, owner[0])
    except NotRetryable as exc:
        raise ApiError(409, str(exc)) from None
    return ExecuteOut(
        task_id=reopened.task_id,
        status="queued",
        workflow_id=reopened.workflow_id,
        workflow_name=reopened.workflow_name,
        execution_id=execution_id,
        message=f"Retrying from the failed node. Use GET /tasks/{reopened.task_id} to check status.",
    )
