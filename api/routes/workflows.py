"""Workflows: create, list, read, update (a new version), delete, and execute (append one request to the
stream and return)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from pydantic import ValidationError

from api.deps import Admin, Caller, Res, Resources
from api.errors import ApiError, unavailable
from api.schemas import (
    BIGINT_MAX,
    ExecuteIn,
    ExecuteOut,
    GraphEdgeOut,
    GraphNodeOut,
    GraphWarning,
    MessageOut,
    PathId,
    WorkflowGraphOut,
    WorkflowIn,
    WorkflowList,
    WorkflowOut,
    WorkflowSaved,
    WorkflowUpdate,
    errors,
)
from shared.catalog import (
    CatalogUnavailable,
    DuplicateName,
    StoredWorkflow,
    WorkflowBusy,
    WorkflowHead,
    definition_warnings,
)
from shared.clients import Principal
from shared.db import jsonb_problem
from shared.durability import NotDurable
from shared.enqueue import RESERVED_KEY_PREFIXES, Admission, NewExecution, SequenceUnavailable, enqueue_execution
from shared.executions import NO_CLIENT, ProjectionBehind, UnknownClient, unprojected_active
from shared.lanes import lane_of
from shared.scripts import AtCapacity, EnqueueResult, RateLimited, WorkflowChanged
from shared.streams import Lane, TaskField
from shared.workflow import Definition, InvalidDefinition, validate_definition, workflow_lane

router = APIRouter(tags=["workflows"])

MAX_CONTEXT_BYTES = 256 * 1024
IDEMPOTENCY_KEY_MAX = 200
# Tries of one execute request's enqueue while the workflow keeps changing under it (each reads its head again).
ENQUEUE_TRIES = 3


def _out(workflow: StoredWorkflow) -> WorkflowOut:
    return WorkflowOut(**workflow.as_json())


def _saved(workflow: StoredWorkflow, warnings: list[GraphWarning]) -> WorkflowSaved:
    return WorkflowSaved(**workflow.as_json(), warnings=warnings)


def _checked(graph: dict[str, Any], max_node_timeout: float) -> list[GraphWarning]:
    """Validate a graph (422 naming the node); returns its warnings."""
    if problem := jsonb_problem(graph, "graph_definition"):
        raise ApiError(422, f"invalid workflow definition: {problem}")
    try:
        definition = validate_definition(graph, max_node_timeout=max_node_timeout)
    except InvalidDefinition as exc:
        problems = [p.model_dump() for p in exc.problems]
        raise ApiError(422, f"invalid workflow definition: {exc}", details=problems) from None
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            node = _node_at(graph, e["loc"])
            where = f" (node '{node}')" if node else ""
            message = f"graph_definition.{'.'.join(str(p) for p in e['loc'])}{where}: {e['msg']}"
            problems.append({"node": node, "message": message})
        raise ApiError(422, f"invalid workflow definition: {problems[0]['message']}", details=problems) from None
    return [GraphWarning(**w.model_dump()) for w in definition_warnings(definition)]


def _node_at(graph: dict[str, Any], loc: tuple[Any, ...]) -> str | None:
    """The id of the node a validation error's location points into (`nodes.3.retry.on`), if it has one."""
    if len(loc) < 2 or loc[0] != "nodes" or not isinstance(loc[1], int):
        return None
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not 0 <= loc[1] < len(nodes) or not isinstance(nodes[loc[1]], dict):
        return None
    node_id = nodes[loc[1]].get("id")
    return node_id if isinstance(node_id, str) and node_id else None


def _duplicate(exc: DuplicateName) -> ApiError:
    # NOVA answered 400; its loader scripts look the workflow up by name after a refusal.
    return ApiError(409, f"Workflow '{exc.name}' already exists", details={"existing_id": exc.existing_id})


@router.post("/workflows", status_code=201, response_model=WorkflowSaved, responses=errors(401, 403, 409, 422, 503))
async def create_workflow(body: WorkflowIn, res: Res, _: Admin) -> WorkflowSaved:
    warnings = _checked(body.graph_definition, res.settings.max_node_timeout)
    res.db()
    try:
        # Stored as the client wrote it, other keys of a fixture file included.
        workflow = await res.catalog.create(body.name, body.description, body.graph_definition)
    except DuplicateName as exc:
        raise _duplicate(exc) from None
    return _saved(workflow, warnings)


@router.get("/workflows", response_model=WorkflowList, responses=errors(401, 503))
async def list_workflows(
    res: Res,
    _: Caller,
    skip: Annotated[int | None, Query(ge=0, le=BIGINT_MAX, description="Workflows to skip")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int | None, Query(ge=0, le=BIGINT_MAX, description="Another name for skip")] = None,
) -> WorkflowList:
    res.db()
    items, total = await res.catalog.list(limit=limit, offset=skip if skip is not None else offset or 0)
    return WorkflowList(workflows=[_out(w) for w in items], total=total, count=len(items))


async def _workflow(res: Res, workflow_id: int) -> StoredWorkflow:
    workflow = await res.catalog.get(workflow_id)
    if workflow is None:
        raise ApiError(404, f"Workflow {workflow_id} not found")
    return workflow


@router.get("/workflows/{workflow_id}", response_model=WorkflowOut, responses=errors(401, 404, 503))
async def get_workflow(workflow_id: PathId, res: Res, _: Caller) -> WorkflowOut:
    return _out(await _workflow(res, workflow_id))


@router.get("/workflows/{workflow_id}/graph", response_model=WorkflowGraphOut, responses=errors(401, 404, 409, 503))
async def get_workflow_graph(
    workflow_id: PathId,
    res: Res,
    _: Caller,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="A stored version; default current")] = None,
) -> WorkflowGraphOut:
    """The graph as the engine reads it, for drawing: nodes, and edges with their branch labels (a
    decision's true/false, NOVA's labelled edges), whichever way the definition spells them."""
    workflow = await res.catalog.get(workflow_id, version)
    if workflow is None:
        raise ApiError(404, f"Workflow {workflow_id} not found" + (f" at version {version}" if version else ""))
    try:
        definition = Definition.model_validate(workflow.definition)
    except ValidationError:
        raise ApiError(409, f"workflow {workflow_id} v{workflow.version} has no readable graph") from None
    nodes = [GraphNodeOut(id=n.id, type=n.type.value, label=n.label or n.name) for n in definition.nodes]
    edges: list[GraphEdgeOut] = []
    for node in definition.nodes:
        if definition.is_branching(node):
            # Several labels may lead to one node: one edge, its labels joined.
            labels: dict[str, list[str]] = {}
            for label, target in definition.branches(node):
                labels.setdefault(target, []).append(label)
            edges.extend(GraphEdgeOut(source=node.id, target=t, label=" / ".join(ls)) for t, ls in labels.items())
        else:
            edges.extend(GraphEdgeOut(source=node.id, target=t) for t in definition.targets(node))
    return WorkflowGraphOut(
        workflow_id=workflow.id, name=workflow.name, version=workflow.version, nodes=nodes, edges=edges
    )


@router.put("/workflows/{workflow_id}", response_model=WorkflowSaved, responses=errors(401, 403, 404, 409, 422, 503))
async def update_workflow(workflow_id: PathId, body: WorkflowUpdate, res: Res, _: Admin) -> WorkflowSaved:
    """Store a new version; executions already queued keep running the version they were queued with."""
    warnings = (
        _checked(body.graph_definition, res.settings.max_node_timeout) if body.graph_definition is not None else []
    )
    res.db()
    if body.name is None and body.description is None and body.graph_definition is None:
        return _saved(await _workflow(res, workflow_id), [])  # nothing to change: no new version
    try:
        workflow = await res.catalog.update(
            workflow_id, name=body.name, description=body.description, definition=body.graph_definition
        )
    except DuplicateName as exc:
        raise _duplicate(exc) from None
    if workflow is None:
        raise ApiError(404, f"Workflow {workflow_id} not found")
    return _saved(workflow, warnings)


@router.delete("/workflows/{workflow_id}", response_model=MessageOut, responses=errors(401, 403, 404, 409, 503))
async def delete_workflow(workflow_id: PathId, res: Res, _: Admin) -> MessageOut:
    """Remove a workflow from listings and from execution; its executions stay readable. Refused (409)
    while any of its executions is queued or running."""
    res.db()
    try:
        deleted = await res.catalog.delete(workflow_id, lambda wid: unprojected_active(res.redis, res.keys, wid))
    except WorkflowBusy as exc:
        raise ApiError(409, str(exc), details={"active_executions": exc.active}) from None
    except ProjectionBehind as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from None
    if not deleted:
        raise ApiError(404, f"Workflow {workflow_id} not found")
    return MessageOut(message=f"Workflow {workflow_id} deleted successfully")


async def _client_of(res: Res, caller_client: str | None, admin: bool, requested: str | None) -> str:
    """Who the execution runs as: a client key's own client; for the admin key, the named client (which
    must exist), or none (NO_CLIENT: no client's credentials) as NOVA did without client_slug."""
    if not admin:
        if requested is not None and requested != caller_client:
            raise ApiError(403, f"this key belongs to client '{caller_client}', not '{requested}'")
        assert caller_client is not None
        return caller_client
    if requested is None:
        return NO_CLIENT
    return await existing_client(res, requested)


def encoded_context(encode: Callable[[], str]) -> str:
    """What `encode` makes of a request's initial context, refused as the execute route refuses it: 422
    for valid JSON the event encoding cannot carry (an integer beyond 64 bits), 413 past the limit."""
    try:
        encoded = encode()
    except TypeError as exc:
        raise ApiError(422, f"initial_context: {exc}") from None
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise ApiError(413, f"initial_context is about {len(encoded)} bytes; the limit is {MAX_CONTEXT_BYTES}")
    return encoded


async def existing_client(res: Res, slug: str) -> str:
    """`slug`, if such a client exists (404 if not; 503 when only PostgreSQL could say, and is down)."""
    try:
        await res.known_clients.require(res.pool, slug)
    except UnknownClient:
        raise ApiError(404, f"Client '{slug}' not found") from None
    except CatalogUnavailable:
        raise unavailable("PostgreSQL") from None
    return slug


async def _same_request(
    res: Resources, result: EnqueueResult, workflow_id: int, lane: Lane, asked: Lane | None, key: str | None
) -> Lane:
    """The lane of the task an Idempotency-Key named already, after checking it was queued for the same
    workflow, and the same priority if the request names one (`asked`; without one, the priority is the
    workflow's, which may have changed since: the same request sent again is still the same): a key
    stands for one request, and the answer describes the task queued (before, a key used again for
    another workflow answered 202 with that workflow, which never ran). A task expired from Redis (its
    key outlives it) can no longer be compared: answered as asked."""
    task_key = res.keys.of_task(result.task_id).task(result.task_id)
    stored = await res.redis.hmget(task_key, [TaskField.WORKFLOW_ID, TaskField.LANE])
    if stored[0] is None:
        return lane
    stored_lane = lane_of({"lane": stored[1] or ""})
    if int(stored[0]) != workflow_id or (asked is not None and stored_lane != asked):
        raise ApiError(
            409,
            f"Idempotency-Key '{key}' was used for task {result.task_id} of workflow {stored[0]} "
            f"(priority {stored_lane.value}): a key stands for one request; use another key for this one",
            details={"task_id": result.task_id, "workflow_id": int(stored[0]), "priority": stored_lane.value},
        )
    return stored_lane


async def _workflow_lane(res: Resources, workflow: WorkflowHead) -> Lane:
    """The lane the workflow's definition names (its version is cached in the process after one read)."""
    stored = await res.catalog.get(workflow.id, workflow.version)
    return workflow_lane(stored.definition) if stored is not None else Lane.NORMAL


@router.post(
    "/workflows/{workflow_id}/execute",
    status_code=202,
    response_model=ExecuteOut,
    responses=errors(404, 409, 422, 429, 503),
)
async def execute_workflow(
    workflow_id: PathId,
    body: ExecuteIn,
    res: Res,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=IDEMPOTENCY_KEY_MAX)] = None,
) -> ExecuteOut:
    return await execute(res, workflow_id, body, caller, idempotency_key)


async def _current_workflow(res: Resources, workflow_id: int) -> WorkflowHead:
    workflow = await res.catalog.current(workflow_id)
    if workflow is None:
        raise ApiError(404, f"Workflow {workflow_id} not found")
    return workflow


async def _enqueue_version(
    res: Resources,
    workflow: WorkflowHead,
    body: ExecuteIn,
    client: str,
    idempotency_key: str | None,
    checked: bool,
) -> tuple[EnqueueResult, Lane]:
    """Enqueue the request for this version of the workflow (with `checked`, only while it is still
    the live one: raises WorkflowChanged otherwise); the result and the lane it went to."""
    lane = body.priority or await _workflow_lane(res, workflow)
    execution = NewExecution(
        workflow_id=workflow.id,
        workflow_name=workflow.name,
        workflow_version=workflow.version,
        client=client,
        initial_context=body.initial_context or {},
        idempotency_key=idempotency_key,
        admission=Admission(
            max_inflight=res.settings.client_max_inflight,
            rate=res.settings.client_rate,
            burst=res.settings.client_burst,
        ),
        lane=lane,
        check_head=checked,
    )
    payload = encoded_context(execution.payload)
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
    return result, lane


async def execute(
    res: Resources, workflow_id: int, body: ExecuteIn, caller: Principal, idempotency_key: str | None
) -> ExecuteOut:
    """The execute route's work once its request is validated: shared with api/fast_paths.py, which
    answers the plain requests of this route without FastAPI's layers.

    On a single Redis the request is built from the workflow's head as this process last saw it, and
    the enqueue step checks in Redis that the workflow is still live at that version: one round trip,
    and an update or a delete cannot slip in between a read and the enqueue. A head it finds changed
    is read again. On a cluster the head is in another slot than the client's shard: it is read first.
    """
    if idempotency_key is not None and idempotency_key.startswith(RESERVED_KEY_PREFIXES):
        reserved = "', '".join(RESERVED_KEY_PREFIXES)
        raise ApiError(
            422, f"Idempotency-Key values that start with '{reserved}' are the scheduler's and replays'; choose another"
        )
    checked = not res.keys.cluster
    workflow = res.catalog.last_seen(workflow_id) if checked else None
    if workflow is None:
        workflow = await _current_workflow(res, workflow_id)
    client = await _client_of(res, caller.client, caller.admin, body.client_slug)
    for _ in range(ENQUEUE_TRIES):
        try:
            result, lane = await _enqueue_version(res, workflow, body, client, idempotency_key, checked)
            break
        except WorkflowChanged:
            workflow = await _current_workflow(res, workflow_id)
    else:
        raise ApiError(
            503, f"Workflow {workflow_id} kept changing while it was queued; retry", headers={"Retry-After": "1"}
        )
    if not result.created:
        lane = await _same_request(res, result, workflow.id, lane, body.priority, idempotency_key)
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
        # A repeated Idempotency-Key answers the task queued first, whose version may be older.
        workflow_version=workflow.version if result.created else None,
        execution_id=result.execution_id,
        priority=lane,
        message=message,
    )
