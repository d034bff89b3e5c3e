"""Workflows: create, list, read, and execute (append one request to the stream and return)."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Header, Query
from pydantic import ValidationError

from api.deps import Admin, Caller, Res
from api.errors import ApiError
from api.schemas import BIGINT_MAX, ExecuteIn, ExecuteOut, PathId, WorkflowIn, WorkflowList, WorkflowOut, errors
from shared.catalog import StoredWorkflow
from shared.durability import NotDurable
from shared.enqueue import Admission, NewExecution, SequenceUnavailable, enqueue_execution
from shared.scripts import AtCapacity, RateLimited
from shared.workflow import InvalidDefinition, validate_definition

router = APIRouter(tags=["workflows"])

MAX_CONTEXT_BYTES = 256 * 1024


def _out(workflow: StoredWorkflow) -> WorkflowOut:
    return WorkflowOut(**workflow.as_json())


@router.post("/workflows", status_code=201, response_model=WorkflowOut, responses=errors(401, 403, 422, 503))
async def create_workflow(body: WorkflowIn, res: Res, _: Admin) -> WorkflowOut:
    try:
        definition = validate_definition(body.definition)
    except InvalidDefinition as exc:
        problems = [p.model_dump() for p in exc.problems]
        raise ApiError(422, f"invalid workflow definition: {exc}", details=problems) from None
    except ValidationError as exc:
        problems = [
            {"node": None, "message": f"definition.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"}
            for e in exc.errors()
        ]
        raise ApiError(422, f"invalid workflow definition: {problems[0]['message']}", details=problems) from None
    del definition  # validated; stored as the client wrote it
    workflow = await res.catalog.create(body.name, body.description, body.definition)
    return _out(workflow)


@router.get("/workflows", response_model=WorkflowList, responses=errors(401, 503))
async def list_workflows(
    res: Res,
    _: Caller,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=BIGINT_MAX)] = 0,
) -> WorkflowList:
    res.db()
    items = [_out(w) for w in await res.catalog.list(limit=limit, offset=offset)]
    return WorkflowList(items=items, count=len(items))


async def _workflow(res: Res, workflow_id: int) -> StoredWorkflow:
    workflow = await res.catalog.get(workflow_id)
    if workflow is None:
        raise ApiError(404, f"workflow {workflow_id} not found")
    return workflow


@router.get("/workflows/{workflow_id}", response_model=WorkflowOut, responses=errors(401, 404, 503))
async def get_workflow(workflow_id: PathId, res: Res, _: Caller) -> WorkflowOut:
    return _out(await _workflow(res, workflow_id))


@router.post(
    "/workflows/{workflow_id}/execute",
    status_code=202,
    response_model=ExecuteOut,
    responses=errors(404, 429, 503),
)
async def execute_workflow(
    workflow_id: PathId,
    body: ExecuteIn,
    res: Res,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> ExecuteOut:
    client = body.client_slug
    if not caller.admin:
        if client is not None and client != caller.client:
            raise ApiError(403, f"this key belongs to client '{caller.client}', not '{client}'")
        client = caller.client
    if client is None:
        raise ApiError(422, "client_slug: required when executing with the admin key")
    workflow = await _workflow(res, workflow_id)
    execution = NewExecution(
        workflow_id=workflow.id,
        workflow_name=workflow.name,
        client=client,
        initial_context=body.initial_context,
        idempotency_key=idempotency_key,
        admission=Admission(
            max_inflight=res.settings.client_max_inflight,
            rate=res.settings.client_rate,
            burst=res.settings.client_burst,
        ),
    )
    try:
        payload = execution.payload()
    except TypeError as exc:
        # Valid JSON that the event encoding cannot carry, e.g. an integer beyond 64 bits.
        raise ApiError(422, f"initial_context: {exc}") from None
    if len(payload) > MAX_CONTEXT_BYTES:
        raise ApiError(413, f"initial_context is about {len(payload)} bytes; the limit is {MAX_CONTEXT_BYTES}")
    try:
        result = await enqueue_execution(
            res.scripts, execution, floor=res.catalog.highest_execution_id, payload=payload, strict=res.strict
        )
    except SequenceUnavailable as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    except NotDurable as exc:
        # The request may still run: a client that retries with the same Idempotency-Key gets this task.
        raise ApiError(
            503,
            f"accepted but not confirmed durable: {exc}; retry with the same Idempotency-Key",
            headers={"Retry-After": "1"},
        ) from None
    except RateLimited as exc:
        retry_after = max(1, math.ceil(exc.wait_ms / 1000))
        raise ApiError(429, f"{exc}; retry in {retry_after}s", headers={"Retry-After": str(retry_after)}) from None
    except AtCapacity as exc:
        # One client cannot fill the queue: its share is capped, so others' requests stay close to the front.
        raise ApiError(429, str(exc), headers={"Retry-After": "1"}) from None
    message = (
        f"Workflow queued for execution. Use GET /tasks/{result.task_id} to check status."
        if result.created
        else f"Already queued with this Idempotency-Key. Use GET /tasks/{result.task_id} to check status."
    )
    return ExecuteOut(
        task_id=result.task_id,
        status="queued",
        workflow_id=workflow.id,
        workflow_name=workflow.name,
        execution_id=result.execution_id,
        message=message,
    )
