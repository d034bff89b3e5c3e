"""Request and response bodies; the OpenAPI schema is generated from these."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, Field

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
BIGINT_MAX = 2**63 - 1

# Ids are PostgreSQL bigints: anything larger is refused as invalid, not passed down to fail there.
PathId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]
QueryId = Annotated[int | None, Query(ge=1, le=BIGINT_MAX)]
# A Redis stream entry id (ms-seq), checked here so that Redis never sees a malformed one.
STREAM_ID_PATTERN = r"^[0-9]{1,19}-[0-9]{1,19}$"
StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="A stream entry id, e.g. 1700000000000-0")]
# Task ids as issued: 32 hex digits (execute, DLQ replay), or sched-<schedule id>-<tick ms> (the
# scheduler). A task id becomes part of Redis key names ("<prefix>:task:<id>" and its ":events" list),
# so anything else, a ':' above all, must never reach Redis.
TASK_ID_PATTERN = r"^(?:[0-9a-f]{32}|sched-[0-9a-f]{1,32}-[0-9]{1,20})$"
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


class WorkflowIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=5000)
    definition: dict[str, Any] = Field(description="NOVA's graph format: nodes and edges")


class WorkflowOut(BaseModel):
    id: int
    name: str
    description: str | None
    definition: dict[str, Any]
    created_at: str


class WorkflowList(BaseModel):
    items: list[WorkflowOut]
    count: int


class ExecuteIn(BaseModel):
    client_slug: str | None = Field(
        default=None, pattern=SLUG_PATTERN, description="The client to run as; a client key may omit it"
    )
    initial_context: dict[str, Any] = Field(default_factory=dict)


class ExecuteOut(BaseModel):
    task_id: str
    status: Literal["queued"]
    workflow_id: int
    workflow_name: str
    execution_id: int
    message: str


class TaskOut(BaseModel):
    task_id: str
    status: Literal["PENDING", "RUNNING", "RETRY", "SUCCESS", "FAILURE", "DEAD"]
    message: str
    execution_id: int | None = None
    workflow_id: int | None = None
    workflow_name: str | None = None
    client_slug: str | None = None
    enqueued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    meta: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class NodeRunOut(BaseModel):
    step: int
    node_id: str
    node_type: str
    status: str
    input_context: dict[str, Any] | None
    output_context: dict[str, Any] | None
    stdout: str | None
    stderr: str | None
    decision: bool | None
    next_node: str | None
    error: dict[str, Any] | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None


class ExecutionSummary(BaseModel):
    id: int
    task_id: str
    workflow_id: int
    workflow_name: str | None
    client_slug: str
    status: str
    nodes_executed: int
    current_node: str | None
    attempt: int
    enqueued_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None


class ExecutionOut(ExecutionSummary):
    initial_context: dict[str, Any] | None
    final_context: dict[str, Any] | None
    error: dict[str, Any] | None
    chain: list[NodeRunOut]


class ExecutionList(BaseModel):
    items: list[ExecutionSummary]
    count: int


class CheckOut(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    redis: CheckOut
    postgres: CheckOut


class ClientIn(BaseModel):
    slug: str = Field(pattern=SLUG_PATTERN)
    name: str = Field(min_length=1, max_length=200)


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
