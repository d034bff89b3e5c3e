"""Executions and their chain of work: from PostgreSQL (the projection of the results stream), or from
Redis for an execution the projector has not written yet."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import Caller, Res
from api.errors import ApiError, unavailable
from api.schemas import (
    BIGINT_MAX,
    EXECUTION_STATUS_DESCRIPTION,
    SLUG_PATTERN,
    ChainOut,
    ExecuteOut,
    ExecutionList,
    ExecutionOut,
    ExecutionSummary,
    PathId,
    QueryId,
    errors,
)
from shared.clients import Principal
from shared.executions import (
    POSTGRES_UNAVAILABLE,
    STATUS_FILTER_WORDS,
    ExecutionFilter,
    Executions,
    NotRetryable,
    retry_failure,
    status_filter,
)

router = APIRouter(tags=["executions"])

_STATUS_PATTERN = "^(" + "|".join(STATUS_FILTER_WORDS) + ")$"


def _executions(res: Res) -> Executions:
    return Executions(res.redis, res.keys, res.pool, res.catalog)


def _visible(caller: Principal, client: str | None, execution_id: int) -> None:
    if client is None or not caller.may_see(client):
        raise ApiError(404, f"Execution {execution_id} not found")


@router.get("/executions/{execution_id}", response_model=ExecutionOut, responses=errors(401, 404, 503))
async def get_execution(execution_id: PathId, res: Res, caller: Caller) -> ExecutionOut:
    try:
        execution = await _executions(res).get(execution_id)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    _visible(caller, execution["client_slug"] if execution else None, execution_id)
    assert execution is not None
    return ExecutionOut(**execution)


@router.get("/executions/{execution_id}/chain", response_model=ChainOut, responses=errors(401, 404, 503))
async def get_chain(execution_id: PathId, res: Res, caller: Caller) -> ChainOut:
    """NOVA's chain of work: one entry per node run, in order."""
    try:
        chain = await _executions(res).chain(execution_id)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    _visible(caller, chain["client_slug"] if chain else None, execution_id)
    assert chain is not None
    return ChainOut(**chain)


@router.get("/executions", response_model=ExecutionList, responses=errors(401, 503))
async def list_executions(
    res: Res,
    caller: Caller,
    workflow_id: QueryId = None,
    # Patterned, so that text PostgreSQL cannot hold (a NUL byte) is refused here as 422, not there as 500.
    client_slug: Annotated[str | None, Query(pattern=SLUG_PATTERN)] = None,
    status: Annotated[
        str | None,
        Query(
            pattern=_STATUS_PATTERN,
            description=f"{EXECUTION_STATUS_DESCRIPTION}; also the earlier queued, success and failure",
        ),
    ] = None,
    skip: Annotated[int, Query(ge=0, le=BIGINT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ExecutionList:
    if not caller.admin:
        client_slug = caller.client
    where = ExecutionFilter(
        workflow_id=workflow_id,
        client_slug=client_slug,
        status=status_filter(status) if status else None,
        limit=limit,
        skip=skip,
    )
    try:
        rows, total = await _executions(res).store().list(where)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    items = [ExecutionSummary(**r) for r in rows]
    return ExecutionList(executions=items, total=total, count=len(items))


@router.post(
    "/executions/{execution_id}/retry", status_code=202, response_model=ExecuteOut, responses=errors(401, 404, 409, 503)
)
async def retry_execution(execution_id: PathId, res: Res, caller: Caller) -> ExecuteOut:
    """Run a FAILURE again from its failed node, with the context it had there and the same workflow version."""
    try:
        owner = await _executions(res).owner(execution_id)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    _visible(caller, owner.client if owner else None, execution_id)
    assert owner is not None
    if await res.catalog.current(owner.workflow_id) is None:
        # A deleted workflow has no executions in flight, and gets none.
        raise ApiError(409, f"workflow {owner.workflow_id} was deleted: its executions can no longer be retried")
    try:
        reopened = await retry_failure(res.scripts, execution_id, owner)
    except NotRetryable as exc:
        raise ApiError(409, str(exc)) from None
    return ExecuteOut(
        task_id=reopened.task_id,
        status="queued",
        workflow_id=reopened.workflow_id,
        workflow_name=reopened.workflow_name,
        workflow_version=owner.workflow_version,
        execution_id=execution_id,
        message=f"Retrying from the failed node. Use GET /tasks/{reopened.task_id} to check status.",
    )
