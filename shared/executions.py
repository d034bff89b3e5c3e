"""Executions as the API shows them: from PostgreSQL (the projection) or, until the projector has
written one, from Redis (its task hash and events); in our shapes and in NOVA's (the chain of work's
`entries`, a task's `execution_trace`, `error` as one line of text). Also re-opening a failed execution,
which client an execution runs as, and whether a workflow still has executions in flight.

Routes and the CLI call these, so the SQL, the Redis reads and the shapes are written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.catalog import POSTGRES_UNREACHABLE, CatalogUnavailable, WorkflowCatalog
from shared.events import Event, event_fields
from shared.scripts import Scripts
from shared.streams import (
    EXECUTION_STATUS_BY_TASK_STATUS,
    FORMAT_VERSION,
    LEGACY_EXECUTION_STATUSES,
    TERMINAL_EVENTS,
    TERMINAL_STATUSES,
    EventType,
    ExecutionStatus,
    Keys,
    RequestField,
    TaskField,
    TaskStatus,
    decode_fields,
    dumps,
    lane_of,
    loads,
    parse_iso,
    random_id,
)

# Errors that mean "PostgreSQL is unreachable", as opposed to a bad query.
POSTGRES_UNAVAILABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)

# The client an execution runs as when the operator names none (NOVA ran such executions without a
# client). Not a valid slug, so no client can be created with it, nor hold credentials or a key.
NO_CLIENT = "_default"

# NOVA's word for a node run's status ("failed"); ours ("failure") stays in node_runs and events.
NODE_STATUS_WORDS = {"success": "success", "failure": "failed", "running": "running"}

_SUMMARY = """id, task_id, workflow_id, workflow_name, workflow_version, client_slug, status, nodes_executed,
              current_node, attempt, enqueued_at, started_at, finished_at, error"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _ms(started: datetime | None, finished: datetime | None) -> float | None:
    return (finished - started).total_seconds() * 1000 if started and finished else None


def error_message(error: Any) -> str | None:
    """NOVA's `error`: one line of text, e.g. "Node a2 failed: ValueError: no vendor"."""
    if not error:
        return None
    if not isinstance(error, dict):
        return str(error)
    kind, message = error.get("type"), str(error.get("message") or "")
    text = f"{kind}: {message}" if kind else message
    node = error.get("node_id")
    return f"Node {node} failed: {text}" if node else text


def status_filter(word: str) -> ExecutionStatus:
    """An execution status as a filter may name it (NOVA's words, ours, or the earlier ones)."""
    legacy = LEGACY_EXECUTION_STATUSES.get(word)
    return legacy if legacy is not None else ExecutionStatus(word)


STATUS_FILTER_WORDS = sorted({*(s.value for s in ExecutionStatus), *LEGACY_EXECUTION_STATUSES})


def summary(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": row["id"],
        "task_id": row["task_id"],
        "workflow_id": row["workflow_id"],
        "workflow_name": row["workflow_name"],
        "workflow_version": row["workflow_version"],
        "client_slug": row["client_slug"],
        "status": row["status"],
        "nodes_executed": row["nodes_executed"],
        "current_node": row["current_node"],
        "attempt": row["attempt"],
        "enqueued_at": _iso(row["enqueued_at"]),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_ms": _ms(started, finished),
        # NOVA's names for the same moments, and its error as text.
        "created_at": _iso(row["enqueued_at"]),
        "completed_at": _iso(finished),
        "error": error_message(row["error"]),
    }


def node_run(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    data = dict(row)
    data["started_at"] = _iso(row["started_at"])
    data["finished_at"] = _iso(row["finished_at"])
    return data


def _node_code(definition: dict[str, Any] | None) -> dict[str, str]:
    """Each node's code in a stored definition (NOVA's `code_executed`); tolerant of any shape."""
    nodes = definition.get("nodes") if isinstance(definition, dict) else None
    code: dict[str, str] = {}
    for node in nodes if isinstance(nodes, list) else []:
        if isinstance(node, dict) and isinstance(node.get("code"), str) and isinstance(node.get("id"), str):
            code[node["id"]] = node["code"]
    return code


def nova_trace_entry(run: dict[str, Any], code: dict[str, str]) -> dict[str, Any]:
    """One node run as NOVA's engine traced it (its task result's `execution_trace`)."""
    decision = run.get("decision")
    if isinstance(decision, bool):
        decision_result: str | None = "true" if decision else "false"
    else:
        decision_result = None if decision is None else str(decision)
    executed = code.get(run["node_id"]) if run["node_type"] in ("action", "decision") else None
    status = NODE_STATUS_WORDS.get(run["status"], run["status"])
    error = run.get("error")
    return {
        "node_id": run["node_id"],
        "node_type": run["node_type"],
        "status": status,
        "error_message": f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else None,
        "input_context": run.get("input_context"),
        "output_result": run.get("output_context"),
        # Seconds, always a number: NOVA's clients format it.
        "execution_time": (run.get("duration_ms") or 0) / 1000,
        "code_executed": executed,
        "decision_result": decision_result,
        "path_taken": run.get("next_node") if run["node_type"] == "decision" else None,
        # Ours: which attempt of a node with a retry policy this run was, of how many (else None).
        "attempt": run.get("attempt"),
        "max_attempts": run.get("max_attempts"),
        "ai_metadata": (
            {
                "_execution_metadata": {
                    "stdout": run.get("stdout") or "",
                    "stderr": run.get("stderr") or "",
                    "exit_code": 0 if status == "success" else 1,
                }
            }
            if executed is not None and status != "running"
            else {}
        ),
    }


def nova_chain_entry(execution_id: int, run: dict[str, Any], code: dict[str, str]) -> dict[str, Any]:
    """One node run as NOVA's `GET /executions/{id}/chain` listed it, with our timing beside it."""
    return {
        "id": run["step"],
        "execution_id": execution_id,
        **nova_trace_entry(run, code),
        "timestamp": run.get("finished_at") or run.get("started_at"),
        "steps": [],
        "step": run["step"],
        "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"),
        "duration_ms": run.get("duration_ms"),
    }


# ---- Redis: a task's events, and an execution before PostgreSQL has it -------------------------------


async def task_events(redis: Redis, keys: Keys, task_id: str) -> list[Event]:
    """The task's events in order, from its list of results-stream ids (no scan). Entries trimmed from
    the stream are missing."""
    keys = keys.of_task(task_id)
    ids = await redis.lrange(keys.task_events(task_id), 0, -1)
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(keys.results, min=entry_id, max=entry_id, count=1)
    events = []
    for reply in await pipe.execute():
        for entry_id, fields in reply:
            events.append(Event.from_entry(entry_id, fields))
    return events


def runs_from_events(events: Iterable[Event]) -> list[dict[str, Any]]:
    """The chain of work (node runs, in node_runs' shape) as a task's events tell it; the same rules as
    the projector: a node started again after a crash is running again, with its first input kept."""
    runs: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.type not in (EventType.NODE_STARTED, EventType.NODE_FINISHED):
            continue
        d = event.data
        step = int(d["step"])
        run = runs.setdefault(
            step,
            {
                "step": step,
                "input_context": d.get("input_context"),
                "started_at": d.get("started_at"),
            },
        )
        finished = event.type == EventType.NODE_FINISHED
        run.update(
            node_id=d["node_id"],
            node_type=d["node_type"],
            status=d.get("status", "success") if finished else "running",
            output_context=d.get("output_context") if finished else None,
            stdout=d.get("stdout") if finished else None,
            stderr=d.get("stderr") if finished else None,
            decision=d.get("decision") if finished else None,
            next_node=d.get("next_node") if finished else None,
            error=d.get("error") if finished else None,
            finished_at=d.get("finished_at") if finished else None,
            duration_ms=d.get("duration_ms") if finished else None,
            attempt=d.get("attempt"),
            max_attempts=d.get("max_attempts"),
        )
        run["input_context"] = run.get("input_context") or d.get("input_context")
        run["started_at"] = run.get("started_at") or d.get("started_at")
    return [runs[step] for step in sorted(runs)]


def _queued_version(events: list[Event]) -> int | None:
    for event in events:
        if event.type == EventType.QUEUED:
            version = event.data.get("workflow_version")
            return int(version) if isinstance(version, int) else None
    return None


async def execution_from_redis(redis: Redis, keys: Keys, execution_id: int) -> dict[str, Any] | None:
    """An execution as Redis knows it (its task hash and events), in GET /executions/{id}'s shape; None
    when Redis has no record of it (never enqueued, or long finished and expired)."""
    task_id = await redis.get(keys.execution(execution_id))
    if not task_id:
        return None
    task = decode_fields(await redis.hgetall(keys.task(task_id)))
    if not task.get(TaskField.STATUS):
        return None
    events = await task_events(redis, keys, task_id)
    queued = next((e for e in events if e.type == EventType.QUEUED), None)
    terminal = next((e for e in reversed(events) if e.type in TERMINAL_EVENTS), None)
    task_status = TaskStatus(task[TaskField.STATUS])
    final_context = None
    if task_status == TaskStatus.SUCCESS:
        final_context = (loads(task.get(TaskField.RESULT)) or {}).get("final_context")
    elif terminal is not None:
        final_context = terminal.data.get("final_context")
    row = {
        "id": execution_id,
        "task_id": task_id,
        "workflow_id": int(task[TaskField.WORKFLOW_ID]),
        "workflow_name": task.get(TaskField.WORKFLOW_NAME),
        "workflow_version": _queued_version(events),
        "client_slug": task.get(TaskField.CLIENT, ""),
        "status": EXECUTION_STATUS_BY_TASK_STATUS[task_status].value,
        "nodes_executed": int(task.get(TaskField.NODES_EXECUTED) or 0),
        "current_node": task.get(TaskField.CURRENT_NODE) or None,
        "attempt": int(task.get(TaskField.ATTEMPT) or 0),
        "enqueued_at": parse_iso(task.get(TaskField.ENQUEUED_AT)),
        "started_at": parse_iso(task.get(TaskField.STARTED_AT)),
        "finished_at": parse_iso(task.get(TaskField.FINISHED_AT)),
        "error": loads(task.get(TaskField.ERROR)),
    }
    return _full(
        row,
        initial_context=queued.data.get("initial_context") if queued else None,
        final_context=final_context,
        runs=runs_from_events(events),
        projected=False,
    )


def _full(
    row: dict[str, Any] | asyncpg.Record,
    *,
    initial_context: Any,
    final_context: Any,
    runs: list[dict[str, Any]],
    projected: bool,
) -> dict[str, Any]:
    return {
        **summary(row),
        "initial_context": initial_context,
        "final_context": final_context,
        # NOVA's `result` is the final context; our structured error keeps its own name.
        "result": final_context,
        "error_detail": row["error"],
        "chain": runs,
        "projected": projected,
    }


class ProjectionBehind(Exception):
    """Too many events wait for the projector to tell which executions are still in flight."""


# How many not-yet-projected events a delete looks through before it answers "try again later".
UNPROJECTED_SCAN_LIMIT = 10_000


async def unprojected_active(redis: Redis, keys: Keys, workflow_id: int) -> int:
    """Unfinished executions of a workflow that the projector has not written yet (PostgreSQL cannot
    count them): those with an event among the ones its group has not acknowledged, whose task is
    not finished, in every shard. Raises ProjectionBehind past UNPROJECTED_SCAN_LIMIT such events."""
    return len(await unprojected_unfinished(redis, keys, workflow_id=workflow_id))


@dataclass(frozen=True)
class Unprojected:
    task_id: str
    execution_id: int
    status: ExecutionStatus


async def unprojected_unfinished(
    redis: Redis, keys: Keys, *, workflow_id: int | None = None, client: str | None = None
) -> list[Unprojected]:
    """The unfinished executions (of a workflow, of a client) that have an event the projector has not
    written yet, in every shard, with their status as Redis has it. Raises ProjectionBehind past
    UNPROJECTED_SCAN_LIMIT such events in a shard."""
    found: list[Unprojected] = []
    for shard in keys.all_shards:
        found.extend(await _unprojected_unfinished(redis, shard, workflow_id, client))
    return found


async def _unprojected_unfinished(
    redis: Redis, keys: Keys, workflow_id: int | None, client: str | None
) -> list[Unprojected]:
    try:
        groups = await redis.xinfo_groups(keys.results)
    except ResponseError:
        return []  # no results stream: nothing was ever enqueued
    group = next((g for g in groups if g["name"] == keys.projector_group), None)
    start = "-"
    if group is not None:
        start = "(" + str(group["last-delivered-id"])
        if int(group["pending"]):
            oldest = await redis.xpending(keys.results, keys.projector_group)
            start = str(oldest["min"])
    entries = await redis.xrange(keys.results, min=start, max="+", count=UNPROJECTED_SCAN_LIMIT + 1)
    if len(entries) > UNPROJECTED_SCAN_LIMIT:
        raise ProjectionBehind(
            f"more than {UNPROJECTED_SCAN_LIMIT} events wait for the projector; retry once it has caught up"
        )
    tasks: dict[str, int] = {}
    for _, f in entries:
        if "task_id" not in f or (workflow_id is not None and f.get("workflow_id") != str(workflow_id)):
            continue
        if client is not None and f.get("client") != client:
            continue
        with contextlib.suppress(KeyError, ValueError):
            tasks.setdefault(f["task_id"], int(f["execution_id"]))
    if not tasks:
        return []
    pipe = redis.pipeline(transaction=False)
    for task_id in tasks:
        pipe.hget(keys.task(task_id), TaskField.STATUS)
    statuses = await pipe.execute()
    found = []
    for (task_id, execution_id), status in zip(tasks.items(), statuses, strict=True):
        if status is None or status in TERMINAL_STATUSES:
            continue
        with contextlib.suppress(ValueError):  # a status this version does not know: not counted
            found.append(Unprojected(task_id, execution_id, EXECUTION_STATUS_BY_TASK_STATUS[TaskStatus(status)]))
    return found


# ---- PostgreSQL ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExecutionFilter:
    workflow_id: int | None = None
    client_slug: str | None = None
    status: ExecutionStatus | None = None
    limit: int = 100
    skip: int = 0


@dataclass(frozen=True)
class Owner:
    task_id: str
    client: str
    workflow_id: int
    workflow_version: int | None


_RUN_COLUMNS = """step, node_id, node_type, status, input_context, output_context, stdout, stderr, decision,
                  next_node, error, started_at, finished_at, duration_ms, attempt, max_attempts"""


class ExecutionStore:
    """Executions as PostgreSQL holds them. Raises POSTGRES_UNAVAILABLE errors as they come."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, execution_id: int) -> dict[str, Any] | None:
        """One execution with its contexts, error and chain of work; None if not projected (yet)."""
        row = await self.pool.fetchrow(
            f"SELECT {_SUMMARY}, initial_context, final_context FROM executions WHERE id = $1", execution_id
        )
        if row is None:
            return None
        return _full(
            row,
            initial_context=row["initial_context"],
            final_context=row["final_context"],
            runs=await self.runs(execution_id),
            projected=True,
        )

    async def runs(self, execution_id: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"SELECT {_RUN_COLUMNS} FROM node_runs WHERE execution_id = $1 ORDER BY step", execution_id
        )
        return [node_run(r) for r in rows]

    async def owner(self, execution_id: int) -> Owner | None:
        row = await self.pool.fetchrow(
            "SELECT task_id, client_slug, workflow_id, workflow_version FROM executions WHERE id = $1", execution_id
        )
        if row is None:
            return None
        return Owner(row["task_id"], row["client_slug"], row["workflow_id"], row["workflow_version"])

    async def list(self, where: ExecutionFilter) -> tuple[list[dict[str, Any]], int]:
        """A page of executions, newest first, and how many match the filter in all."""
        condition = """($1::bigint IS NULL OR workflow_id = $1) AND ($2::text IS NULL OR client_slug = $2)
                       AND ($3::text IS NULL OR status = $3)"""
        args = (where.workflow_id, where.client_slug, where.status)
        rows = await self.pool.fetch(
            f"SELECT {_SUMMARY} FROM executions WHERE {condition} ORDER BY id DESC LIMIT $4 OFFSET $5",
            *args,
            where.limit,
            where.skip,
        )
        if 0 < len(rows) < where.limit or (not rows and where.skip == 0):
            # A short page is the last one: the count is known without counting.
            total = where.skip + len(rows)
        else:
            total = int(await self.pool.fetchval(f"SELECT count(*) FROM executions WHERE {condition}", *args))
        return [summary(r) for r in rows], total


T = TypeVar("T")


async def _preferring_postgres(
    from_postgres: Callable[[], Awaitable[T | None]], from_redis: Callable[[], Awaitable[T | None]]
) -> T | None:
    """PostgreSQL's answer, else Redis's; raises POSTGRES_UNAVAILABLE only when Redis has none either."""
    unreachable: Exception | None = None
    try:
        found = await from_postgres()
        if found is not None:
            return found
    except POSTGRES_UNAVAILABLE as exc:
        unreachable = exc
    found = await from_redis()
    if found is None and unreachable is not None:
        raise unreachable
    return found


class Executions:
    """Reads that prefer PostgreSQL and fall back to Redis for what it has not projected yet."""

    def __init__(self, redis: Redis, keys: Keys, pool: asyncpg.Pool | None, catalog: WorkflowCatalog) -> None:
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.catalog = catalog

    def store(self) -> ExecutionStore:
        if self.pool is None:
            raise ConnectionError("PostgreSQL is unavailable")
        return ExecutionStore(self.pool)

    async def get(self, execution_id: int) -> dict[str, Any] | None:
        """PostgreSQL's record, else Redis's (an execution the projector has not written yet); raises
        POSTGRES_UNAVAILABLE only when Redis does not know it either."""
        return await _preferring_postgres(
            lambda: self.store().get(execution_id), lambda: execution_from_redis(self.redis, self.keys, execution_id)
        )

    async def owner(self, execution_id: int) -> Owner | None:
        """Whose execution it is, as get() finds it: an execution the projector has not written yet
        (a failure that just happened) can be retried or cancelled as soon as GET shows it."""

        async def from_redis() -> Owner | None:
            found = await execution_from_redis(self.redis, self.keys, execution_id)
            if found is None:
                return None
            return Owner(found["task_id"], found["client_slug"], found["workflow_id"], found["workflow_version"])

        return await _preferring_postgres(lambda: self.store().owner(execution_id), from_redis)

    async def chain(self, execution_id: int) -> dict[str, Any] | None:
        """NOVA's chain of work: {"execution_id", "entries", "total"}, plus the owner's slug."""
        execution = await self.get(execution_id)
        if execution is None:
            return None
        code = await self._code(execution["workflow_id"], execution["workflow_version"])
        entries = [nova_chain_entry(execution_id, run, code) for run in execution["chain"]]
        return {
            "execution_id": execution_id,
            "entries": entries,
            "total": len(entries),
            "client_slug": execution["client_slug"],
        }

    async def trace(self, task: dict[str, str]) -> tuple[list[dict[str, Any]], Any]:
        """A finished task's NOVA `execution_trace` and its final context, from its events (fresh,
        whether or not PostgreSQL has them), or from PostgreSQL when they were trimmed away."""
        events = await task_events(self.redis, self.keys, task[TaskField.TASK_ID])
        runs = runs_from_events(events)
        terminal = next((e for e in reversed(events) if e.type in TERMINAL_EVENTS), None)
        final_context = terminal.data.get("final_context") if terminal else None
        execution_id = int(task.get(TaskField.EXECUTION_ID) or 0)
        if not runs and self.pool is not None and execution_id:
            try:
                runs = await ExecutionStore(self.pool).runs(execution_id)
            except POSTGRES_UNAVAILABLE:
                runs = []
        code = await self._code(int(task.get(TaskField.WORKFLOW_ID) or 0), _queued_version(events))
        return [nova_trace_entry(run, code) for run in runs], final_context

    async def _code(self, workflow_id: int, version: int | None) -> dict[str, str]:
        # Without a version (executions from before versions) the current one is the best guess.
        try:
            workflow = await self.catalog.get(workflow_id, version)
        except (CatalogUnavailable, *POSTGRES_UNREACHABLE, RuntimeError):
            return {}  # the code is a courtesy: never fail a status read for it
        return _node_code(workflow.definition) if workflow else {}


# ---- clients ---------------------------------------------------------------------------------------


class UnknownClient(LookupError):
    pass


class KnownClients:
    """Which clients exist, for the execute path: a process memory of the ones seen, then a Redis set,
    then PostgreSQL (the record). Clients are never deleted, so a client once seen stays known: after
    the first execution, naming a client costs no round trip at all, and needs no PostgreSQL."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._seen: set[str] = set()

    async def require(self, pool: asyncpg.Pool | None, slug: str) -> None:
        """Raise UnknownClient unless the client exists; CatalogUnavailable when only PostgreSQL could
        say and it cannot be reached."""
        if slug in self._seen:
            return
        if not await self.redis.sismember(self.keys.clients, slug):
            if pool is None:
                raise CatalogUnavailable(f"client '{slug}' is not in Redis and PostgreSQL is unreachable")
            try:
                found = await pool.fetchval("SELECT 1 FROM clients WHERE slug = $1", slug)
            except POSTGRES_UNREACHABLE as exc:
                raise CatalogUnavailable(
                    f"client '{slug}' is not in Redis and PostgreSQL is unreachable ({exc})"
                ) from exc
            if not found:
                raise UnknownClient(f"client '{slug}' not found")
            await self.redis.sadd(self.keys.clients, slug)
        self._seen.add(slug)

    async def remember(self, slug: str) -> None:
        """A client just created: known to every API replica's execute path at once."""
        await self.redis.sadd(self.keys.clients, slug)
        self._seen.add(slug)


# ---- retry ----------------------------------------------------------------------------------------


class NotRetryable(Exception):
    """The execution cannot be retried as it stands (expired from Redis, or not a FAILURE)."""


@dataclass(frozen=True)
class Reopened:
    task_id: str
    workflow_id: int
    workflow_name: str


async def retry_failure(scripts: Scripts, execution_id: int, owner: Owner) -> Reopened:
    """Run a FAILURE again from its failed node, or a cancelled (REVOKED) run from the node after the last
    one it completed, with the context it had there (its checkpoint), and with the workflow version it ran."""
    task_id = owner.task_id
    task = decode_fields(await scripts.redis.hgetall(scripts.keys.task(task_id)))
    if not task:
        raise NotRetryable(f"execution {execution_id} has expired from Redis and can no longer be retried")
    workflow_id, client = int(task[TaskField.WORKFLOW_ID]), task[TaskField.CLIENT]
    token = random_id()
    payload: dict[str, Any] = {
        "initial_context": {},
        "retry_of": "cancel" if task.get(TaskField.STATUS) == TaskStatus.REVOKED else "failure",
        # A cancelled run may leave its request behind (queued, or pending on a dead worker); the token
        # tells the workers which request is the retry's, so that the old one is only acknowledged.
        "reopen_token": token,
    }
    if owner.workflow_version is not None:
        payload["workflow_version"] = owner.workflow_version
    request = {
        RequestField.TASK_ID: task_id,
        RequestField.EXECUTION_ID: str(execution_id),
        RequestField.WORKFLOW_ID: str(workflow_id),
        RequestField.WORKFLOW_NAME: task.get(TaskField.WORKFLOW_NAME, ""),
        RequestField.CLIENT: client,
        RequestField.ENQUEUED_AT: task.get(TaskField.ENQUEUED_AT, ""),
        # The checkpoint in the task hash carries the context; this payload only says why, and which version.
        RequestField.PAYLOAD: dumps(payload),
        RequestField.VERSION: str(FORMAT_VERSION),
    }
    if task.get(TaskField.LANE):
        # Back into the lane it was queued in.
        request[RequestField.LANE] = lane_of(task)
    attempt = int(task.get(TaskField.ATTEMPT) or 0) + 1
    event = event_fields(
        EventType.RETRY,
        task_id=task_id,
        execution_id=execution_id,
        workflow_id=workflow_id,
        client=client,
        data={"attempt": attempt, "error": None, "retry_at": None, "manual": True},
    )
    previous = await scripts.reopen(task_id=task_id, client=client, token=token, event=event, request=request)
    if previous not in (TaskStatus.FAILURE, TaskStatus.REVOKED):
        raise NotRetryable(
            f"execution {execution_id} is {previous or 'unknown'}, not FAILURE or REVOKED: nothing to retry"
        )
    return Reopened(task_id=task_id, workflow_id=workflow_id, workflow_name=task.get(TaskField.WORKFLOW_NAME, ""))
