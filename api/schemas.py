"""Request and response bodies; the OpenAPI schema is generated from these."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import AliasChoices, BaseModel, Field

from shared.dead_letters import LETTER_ID_PATTERN
from shared.streams import Lane

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# PostgreSQL text cannot hold U+0000: refused here with a 422 rather than there with a 500.
NO_NUL = r"^[^\x00]*$"
BIGINT_MAX = 2**63 - 1

# Ids are PostgreSQL bigints: anything larger is refused as invalid, not passed down to fail there.
PathId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
QueryId = Annotated[int | None, Query(ge=1, le=BIGINT_MAX)]
# A Redis stream entry id (ms-seq), checked here so that Redis never sees a malformed one.
STREAM_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="A stream entry id, e.g. 1700000000000-0")]
# A dead letter's id: its entry id, after `s<shard>-` with several shards (shared/dead_letters.py).
DEAD_LETTER_ID_PATTERN = rf"^{LETTER_ID_PATTERN}$"
DeadLetterId = Annotated[
    str,
    Path(
        pattern=DEAD_LETTER_ID_PATTERN, description="A dead letter's id as GET /dlq lists it, e.g. s1-1700000000000-0"
    ),
]
# Task ids as issued: 32 hex digits (execute, DLQ replay), or sched-<schedule id>-<tick ms> (the
# scheduler). A task id becomes part of Redis key names ("<prefix>:task:<id>" and its ":events" list),
# so anything else, a ':' above all, must never reach Redis.
# A schedule's tick, with several shards followed by its shard (8 hex digits: Keys.placed_task_id).
TASK_ID_PATTERN = r"^(?:[0-9a-f]{32}|sched-[0-9a-f]{1,32}-[0-9]{1,20}(?:-[0-9a-f]{8})?)$"
_TASK_ID = re.compile(TASK_ID_PATTERN)


def is_task_id(value: str) -> bool:
    return _TASK_ID.fullmatch(value) is not None


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorOut(BaseModel):
    error: ErrorDetail


# Any authenticated route may answer these: no or a bad key, a client key on an operator route, a
# body over the size limit, invalid input, and Redis or PostgreSQL being unavailable.
COMMON_ERRORS = (401, 403, 413, 422, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorOut} for status in sorted({*COMMON_ERRORS, *statuses})}


# NOVA's body key is graph_definition; ours was definition, still accepted.
_GRAPH = AliasChoices("graph_definition", "definition")
_GRAPH_DESCRIPTION = (
    "The workflow graph (nodes and edges); a whole NOVA fixture file may be sent, other keys are kept. "
    "`definition` is accepted as another name for it."
)


class WorkflowIn(BaseModel):
    name: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    description: str | None = Field(default=None, max_length=5000, pattern=NO_NUL)
    graph_definition: dict[str, Any] = Field(validation_alias=_GRAPH, description=_GRAPH_DESCRIPTION)


class WorkflowUpdate(BaseModel):
    """Fields left out (or null) stay as they are; any change stores a new version."""

    name: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NUL)
    description: str | None = Field(default=None, max_length=5000, pattern=NO_NUL)
    graph_definition: dict[str, Any] | None = Field(
        default=None, validation_alias=_GRAPH, description=_GRAPH_DESCRIPTION
    )


class WorkflowOut(BaseModel):
    id: int
    name: str
    description: str | None
    graph_definition: dict[str, Any]
    created_at: str
    updated_at: str
    version: int = Field(description="Increases with each update; executions run the version they were queued with")


class GraphWarning(BaseModel):
    node: str | None
    message: str


class WorkflowSaved(WorkflowOut):
    warnings: list[GraphWarning] = Field(description="Accepted, but worth a look (e.g. nodes no path reaches)")


class WorkflowList(BaseModel):
    workflows: list[WorkflowOut]
    total: int = Field(description="Live workflows in all, whatever skip and limit")
    count: int = Field(description="Workflows in this page")


class MessageOut(BaseModel):
    message: str


class ExecuteIn(BaseModel):
    client_slug: str | None = Field(
        default=None,
        pattern=SLUG_PATTERN,
        description="The client to run as (its credentials); a client key runs as its own client, and the "
        "admin key without one runs with no client's credentials",
    )
    initial_context: dict[str, Any] | None = Field(default=None, description="null is the same as {}")
    priority: Lane | None = Field(
        default=None,
        description="The priority lane the run joins: high, normal or low (default: the workflow's `priority`, "
        "else normal). Workers start runs from busy lanes 4:2:1 (NOVA_LANE_WEIGHTS); no lane is starved",
    )


class ExecuteOut(BaseModel):
    task_id: str
    status: Literal["queued"]
    workflow_id: int
    workflow_name: str
    workflow_version: int | None = None
    execution_id: int
    priority: Lane = Lane.NORMAL
    message: str


class TaskOut(BaseModel):
    task_id: str
    status: Literal["PENDING", "RUNNING", "RETRY", "SUCCESS", "FAILURE", "DEAD", "REVOKED"]
    message: str
    execution_id: int | None = None
    workflow_id: int | None = None
    workflow_name: str | None = None
    client_slug: str | None = None
    enqueued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    waiting_for: str | None = Field(
        default=None,
        description="The workflow's concurrency key this queued run waits for a slot of (status PENDING)",
    )
    priority: Lane = Field(default=Lane.NORMAL, description="The priority lane the run was queued in")
    meta: dict[str, Any] | None = None
    result: dict[str, Any] | None = Field(
        default=None,
        description="Once finished: execution_id, status (success or failed), final_context, execution_trace, "
        "nodes_executed, error",
    )
    error: str | None = Field(default=None, description="What went wrong, as one line of text")
    error_detail: dict[str, Any] | None = Field(
        default=None, description="The same error: node_id, type, message, traceback, reason"
    )


class NodeRunOut(BaseModel):
    step: int
    node_id: str
    node_type: str
    status: str
    input_context: dict[str, Any] | None
    output_context: dict[str, Any] | None
    stdout: str | None
    stderr: str | None
    decision: bool | str | None
    next_node: str | None
    error: dict[str, Any] | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    attempt: int | None = Field(default=None, description="A node with a retry policy: which attempt this run was")
    max_attempts: int | None = Field(default=None, description="A node with a retry policy: its attempts in all")


EXECUTION_STATUS_DESCRIPTION = (
    "pending, running, completed or failed (NOVA's words), retrying (a transient error, to be retried), "
    "dead (dead-lettered) or cancelled"
)


class ExecutionSummary(BaseModel):
    id: int
    task_id: str
    workflow_id: int
    workflow_name: str | None
    workflow_version: int | None = Field(description="The version of the workflow the execution runs")
    client_slug: str
    status: str = Field(description=EXECUTION_STATUS_DESCRIPTION)
    nodes_executed: int
    current_node: str | None
    attempt: int
    enqueued_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    created_at: str | None = Field(description="When it was queued (NOVA's name for enqueued_at)")
    completed_at: str | None = Field(description="When it finished (NOVA's name for finished_at)")
    error: str | None = Field(description="What went wrong, as one line of text")


class ExecutionOut(ExecutionSummary):
    initial_context: dict[str, Any] | None
    final_context: dict[str, Any] | None
    result: dict[str, Any] | None = Field(description="The final context (NOVA's name)")
    error_detail: dict[str, Any] | None = Field(description="The error: node_id, type, message, traceback, reason")
    chain: list[NodeRunOut]
    projected: bool = Field(description="false: read from Redis, PostgreSQL has not recorded it yet")


class ExecutionList(BaseModel):
    executions: list[ExecutionSummary]
    total: int = Field(description="Executions matching the filters in all, whatever skip and limit")
    count: int = Field(description="Executions in this page")


class ChainEntryOut(BaseModel):
    id: int
    execution_id: int
    node_id: str
    node_type: str
    code_executed: str | None
    input_context: dict[str, Any] | None
    output_result: dict[str, Any] | None
    execution_time: float = Field(description="Seconds")
    status: str = Field(description="success, failed or running")
    error_message: str | None
    decision_result: str | None
    path_taken: str | None
    ai_metadata: dict[str, Any]
    timestamp: str | None
    steps: list[dict[str, Any]]
    step: int
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    attempt: int | None = Field(default=None, description="A node with a retry policy: which attempt this run was")
    max_attempts: int | None = Field(default=None, description="A node with a retry policy: its attempts in all")


class ChainOut(BaseModel):
    execution_id: int
    entries: list[ChainEntryOut]
    total: int


class CheckOut(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class ExecutorProblemOut(BaseModel):
    consumer: str
    executor: str
    error: str


class WorkersHealthOut(BaseModel):
    live: int = Field(description="Workers whose report is fresh (written within NOVA_VISIBILITY_TIMEOUT)")
    ok: bool = Field(description="False while any worker reports a lasting executor fault")
    problems: list[ExecutorProblemOut] = Field(
        default_factory=list, description="Lasting executor faults (a refused E2B key, an unknown template)"
    )


class HealthOut(BaseModel):
    status: Literal["healthy", "degraded"]
    service: str
    version: str
    redis: CheckOut
    postgres: CheckOut
    # What the workers report; None when it could not be read (Redis down: `redis` says so).
    workers: WorkersHealthOut | None = None


class ClientIn(BaseModel):
    slug: str = Field(pattern=SLUG_PATTERN)
    name: str = Field(min_length=1, max_length=200, pattern=NO_NUL)


class ClientKeyOut(BaseModel):
    slug: str
    api_key: str = Field(description="Shown once: store it now")


class CredentialIn(BaseModel):
    # Any JSON value, kept as typed (a port stays an int); the store checks its encoded size.
    value: (
        Annotated[str, Field(min_length=1, max_length=64 * 1024)]
        | int
        | float
        | bool
        | list[Any]
        | dict[str, Any]
        | None
    )
    secret: bool | None = Field(
        default=None,
        description="Masked wherever a run shows it (default: true, except NOVA's host, port, user and "
        "whitelist names)",
    )


class SessionIn(BaseModel):
    key: str = Field(min_length=1, max_length=512, description="The admin key or a client's API key")


class SessionOut(BaseModel):
    admin: bool
    client: str | None = Field(description="The client signed in; null for the operator (admin key)")
    csrf_token: str = Field(description="Send it as X-CSRF-Token on every request that changes something")
    expires_in: int | None = Field(default=None, description="Seconds the session has left")


class GraphNodeOut(BaseModel):
    id: str
    type: str
    label: str | None = None


class GraphEdgeOut(BaseModel):
    source: str = Field(serialization_alias="from")
    target: str = Field(serialization_alias="to")
    label: str | None = Field(default=None, description="The branch label(s) of a decision's edge")


class WorkflowGraphOut(BaseModel):
    workflow_id: int
    name: str
    version: int
    nodes: list[GraphNodeOut]
    edges: list[GraphEdgeOut]
