"""Run control (shared/control.py): cancel executions and tasks (a client its own, the operators any),
pause and resume a workflow or the whole queue, and drain the workers (operators only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import Admin, Caller, Res, Resources
from api.errors import ApiError, unavailable
from api.schemas import BIGINT_MAX, SLUG_PATTERN, PathId, errors, is_task_id
from shared.clients import Principal
from shared.control import BULK_LIMIT, QUEUE, CancelFilter, Cancelled, RunControl, workflow_scope
from shared.executions import POSTGRES_UNAVAILABLE, ProjectionBehind
from shared.scripts import CancelOutcome
from shared.streams import ACTIVE_EXECUTION_STATUSES

router = APIRouter(tags=["control"])

_ACTIVE_PATTERN = "^(" + "|".join(sorted(s.value for s in ACTIVE_EXECUTION_STATUSES)) + ")$"


def _control(res: Resources) -> RunControl:
    return RunControl(
        res.redis,
        res.keys,
        task_ttl=res.settings.task_ttl,
        visibility_timeout=res.settings.visibility_timeout,
        pool=res.pool,
    )


def _who(caller: Principal) -> tuple[str | None, str]:
    """The client a caller may cancel for (None: any) and how the cancel is recorded."""
    return (None, "operator") if caller.admin else (caller.client, f"client {caller.client}")


class CancelOut(BaseModel):
    task_id: str
    execution_id: int | None
    status: str = Field(description="The task's status now: REVOKED, or the terminal status it reached first")
    cancelled: bool = Field(description="Whether this call cancelled it (false: it had finished already)")
    message: str


def _answer(result: Cancelled) -> CancelOut:
    cancelled = result.outcome == CancelOutcome.CANCELLED
    already = "already cancelled" if result.status == "REVOKED" else f"already finished as {result.status}"
    return CancelOut(
        task_id=result.task_id,
        execution_id=result.execution_id,
        status=result.status,
        cancelled=cancelled,
        message="Cancelled" if cancelled else f"Nothing to cancel: {already}",
    )


@router.post("/executions/{execution_id}/cancel", response_model=CancelOut, responses=errors(401, 404, 503))
async def cancel_execution(execution_id: PathId, res: Res, caller: Caller) -> CancelOut:
    """Cancel a queued or running execution: a queued one never starts, a running one stops (its node's
    sandbox is killed, no further node starts). Idempotent; racing its finish, one outcome wins."""
    client, by = _who(caller)
    try:
        result = await _control(res).cancel_execution(execution_id, client=client, by=by)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    if not result.found:
        raise ApiError(404, f"Execution {execution_id} not found")
    return _answer(result)


@router.post("/tasks/{task_id}/cancel", response_model=CancelOut, responses=errors(401, 404))
async def cancel_task(task_id: str, res: Res, caller: Caller) -> CancelOut:
    """The same cancel, by task id (Celery's revoke)."""
    if not is_task_id(task_id):
        raise ApiError(404, f"task {task_id} not found")
    client, by = _who(caller)
    result = await _control(res).cancel_task(task_id, client=client, by=by)
    if not result.found:
        raise ApiError(404, f"task {task_id} not found")
    return _answer(result)


class BulkCancelIn(BaseModel):
    """Which executions to cancel: the listed ids, and every unfinished one matching all the filter
    fields given. An empty body cancels nothing."""

    ids: Annotated[list[Annotated[int, Field(ge=1, le=BIGINT_MAX)]], Field(max_length=BULK_LIMIT)] = []
    workflow_id: Annotated[int | None, Field(ge=1, le=BIGINT_MAX)] = None
    client_slug: Annotated[str | None, Field(pattern=SLUG_PATTERN)] = None
    status: Annotated[str | None, Field(pattern=_ACTIVE_PATTERN, description="pending, running or retrying")] = None


class BulkCancelOut(BaseModel):
    cancelled: int
    already_finished: int
    not_found: list[int]
    items: list[CancelOut]


@router.post("/executions/cancel", response_model=BulkCancelOut, responses=errors(401, 422, 503))
async def cancel_executions(body: BulkCancelIn, res: Res, caller: Caller) -> BulkCancelOut:
    """Cancel many executions at once (at most 1000 per call; call again for more)."""
    client, by = _who(caller)
    where = CancelFilter(
        execution_ids=body.ids, workflow_id=body.workflow_id, client_slug=body.client_slug, status=body.status
    )
    if where.by_query and res.pool is None:
        await res.ensure_pool()
    try:
        results = await _control(res).cancel_many(where, client=client, by=by)
    except POSTGRES_UNAVAILABLE:
        raise unavailable("PostgreSQL") from None
    except ProjectionBehind as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    found = [r for r in results if r.found]
    return BulkCancelOut(
        cancelled=sum(1 for r in found if r.outcome == CancelOutcome.CANCELLED),
        already_finished=sum(1 for r in found if r.outcome == CancelOutcome.ALREADY_TERMINAL),
        not_found=[r.execution_id or 0 for r in results if not r.found],
        items=[_answer(r) for r in found],
    )


@router.post("/workflows/{workflow_id}/pause", responses=errors(404))
async def pause_workflow(workflow_id: PathId, res: Res, _: Admin) -> dict[str, Any]:
    """New executions are accepted and queued, but none starts until resumed (none is lost)."""
    if await res.catalog.current(workflow_id) is None:
        raise ApiError(404, f"Workflow {workflow_id} not found")
    await _control(res).pause(workflow_scope(workflow_id))
    return {"workflow_id": workflow_id, "paused": True}


@router.post("/workflows/{workflow_id}/resume", responses=errors(404))
async def resume_workflow(workflow_id: PathId, res: Res, _: Admin) -> dict[str, Any]:
    """Start what was held back, in the order it was queued."""
    moved = await _control(res).resume(workflow_scope(workflow_id))
    return {"workflow_id": workflow_id, "paused": False, "resumed": moved}


@router.post("/queue/pause", responses=errors())
async def pause_queue(res: Res, _: Admin) -> dict[str, Any]:
    """Pause every workflow: executions are accepted and queued, none starts until resumed."""
    await _control(res).pause(QUEUE)
    return {"paused": True}


@router.post("/queue/resume", responses=errors())
async def resume_queue(res: Res, _: Admin) -> dict[str, Any]:
    moved = await _control(res).resume(QUEUE)
    return {"paused": False, "resumed": moved}


@router.post("/queue/drain", responses=errors())
async def drain(res: Res, _: Admin) -> dict[str, Any]:
    """Workers finish what they hold and take nothing new (for deploys); progress in the answer and
    in GET /queue/control, /inspect and /metrics."""
    control = _control(res)
    await control.drain(True)
    return await control.state()


@router.delete("/queue/drain", responses=errors())
async def undrain(res: Res, _: Admin) -> dict[str, Any]:
    """End a drain: workers read again."""
    control = _control(res)
    await control.drain(False)
    return await control.state()


@router.get("/queue/control", responses=errors())
async def control_state(res: Res, _: Admin) -> dict[str, Any]:
    """Paused workflows and queue, what they hold back, and drain progress."""
    return await _control(res).state()
