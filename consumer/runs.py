"""One delivery of one execution request, from claim to acknowledgement.

Every state change goes through one atomic script (shared/scripts.py): a status event on the results
stream plus the task hash that GET /tasks reads. The request entry is acknowledged only together with
its terminal event, its parking for a retry, or its dead letter, so a crash at any point leaves it
pending for reclaim, and the checkpoint in the task hash lets the next delivery resume after the last
completed node instead of repeating finished side effects.

Node code sees its client's credentials (shared/clients.py) in its context and environment; what the
run shows goes through the client's Masker (shared/masking.py), applied where events and task fields
are built here, and a checkpoint that may hold a copied secret is encrypted with the secrets key.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from consumer.engine import (
    Attempt,
    Checkpoint,
    NodeRecord,
    OpenSandbox,
    Outcome,
    RetryParked,
    execution_limit,
    run_workflow,
)
from consumer.requests import ExecutionRequest, MalformedRequest, parse_fields
from consumer.sandbox.base import NodeError, Sandbox, SandboxBusy, SandboxInfraError, SandboxSpec
from shared.catalog import CatalogUnavailable, WorkflowCatalog
from shared.clients import ClientCredentials, ClientError, Vault
from shared.connections import REDIS_UNAVAILABLE
from shared.events import event_fields
from shared.executions import NO_CLIENT
from shared.masking import Masker
from shared.scripts import ConcurrencyOutcome, RecordOutcome, RunEvent, Scripts
from shared.settings import Settings
from shared.streams import (
    FORMAT_VERSION,
    TERMINAL_STATUSES,
    DeadLetterField,
    EventType,
    Keys,
    RequestField,
    TaskField,
    TaskStatus,
    decode_fields,
    dumps,
    entry_id_parts,
    format_version,
    loads,
    now_iso,
    parse_iso,
    printable,
    random_id,
)
from shared.workflow import (
    Concurrency,
    ConcurrencyKeyError,
    Definition,
    InvalidDefinition,
    Node,
    NodeType,
    validate_definition,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldSlot:
    """A run's slot of its workflow's concurrency key; its task id is the holder, the same across
    redeliveries and reclaims, so that a reclaimed run takes its own slot back rather than a second one."""

    key: str
    limit: int
    task_id: str


@dataclass
class RunContext:
    """What every run shares with its worker."""

    settings: Settings
    redis: Redis
    keys: Keys
    scripts: Scripts
    catalog: WorkflowCatalog
    open_sandbox: OpenSandbox
    consumer: str
    # Validated definitions by (workflow id, version): a version never changes, so they are kept.
    definitions: dict[tuple[int, int], Definition]
    # The client's decrypted credentials, for its node code only (never events, logs or PostgreSQL).
    client_credentials: Callable[[str], Awaitable[ClientCredentials]] | None = None
    # The concurrency-key slot each in-flight entry holds: the worker's heartbeat refreshes them, and a
    # cancelled run's is given back once its run has stopped.
    held: dict[str, HeldSlot] = field(default_factory=dict)
    # Entries whose run has recorded its outcome (the entry is acknowledged) and is still ending (its
    # sandboxes closing): not heartbeated, so never mistaken for entries another worker took over.
    settled: set[str] = field(default_factory=set)

    @cached_property
    def vault(self) -> Vault:
        """Encrypts checkpoints that may hold secrets (the same key as the credentials)."""
        return Vault.from_settings(self.settings)


# A checkpoint encrypted at rest: this prefix, then a Fernet token of its JSON. JSON never starts so.
SEALED_CHECKPOINT = "sealed:"


class CheckpointUnreadable(Exception):
    """A sealed checkpoint this worker cannot decrypt (no key, or another one): a deployment problem."""


def checkpoint_field(checkpoint: Checkpoint, vault: Vault, seal: bool) -> str:
    """The checkpoint as stored in the task hash: the true context (resume needs it), encrypted when
    `seal` (the run has secrets) and a key is configured."""
    text = dumps(checkpoint.as_json())
    return SEALED_CHECKPOINT + vault.encrypt(text) if seal and vault.has_key else text


def read_checkpoint(stored: str | None, vault: Vault) -> Checkpoint | None:
    if not stored:
        return None
    if stored.startswith(SEALED_CHECKPOINT):
        try:
            stored = vault.decrypt(stored.removeprefix(SEALED_CHECKPOINT))
        except ClientError:
            raise CheckpointUnreadable(
                "the checkpoint does not decrypt with this worker's NOVA_SECRETS_KEY (missing or changed)"
            ) from None
    data = loads(stored)
    return Checkpoint.from_json(data) if data else None


def backoff_seconds(settings: Settings, attempt: int) -> float:
    """Exponential backoff with full jitter for retry number `attempt` (1-based)."""
    ceiling = min(settings.retry_backoff_max, settings.retry_backoff * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _counting(action: Any, sends: list[int]) -> Any:
    """`action`, counting its calls in sends[0]."""

    def call() -> Any:
        sends[0] += 1
        return action()

    return call


async def _durably(action: Any, settings: Settings, sends: list[int] | None = None) -> Any:
    """Redis writes a run cannot skip: retried through a short outage, then given up (entry stays pending).

    A Redis at its memory limit (OOM under noeviction) refuses them for as long as it stays full, and
    the run waits for room however long that is: its heartbeats still go (they add nothing), so its
    entry stays this worker's, and a takeover cancels the wait. Ended instead, the run left its entry
    to be reclaimed every visibility timeout, each reclaim a delivery, until max_deliveries buried
    requests that never failed. A script refused so wrote nothing: Redis refuses only a script's first
    write, so the same call is sent again whole. `sends`, if given, counts the calls made ([0] += 1 each):
    after more than one, an answer may be about what a first call, its reply lost, already did."""
    call = action if sends is None else _counting(action, sends)
    try:
        # The common case pays for one call, not for setting up a retry loop.
        return await call()
    except OutOfMemoryError:
        log.warning("Redis is at its memory limit: a run waits for room (its entry stays this worker's)")
    except REDIS_UNAVAILABLE:
        pass

    # An outage is timed from its start: after a wait for memory (however long), from its first failure.
    outage_since = time.monotonic()
    waited_for_memory = False

    def outage_too_long(state: RetryCallState) -> bool:
        nonlocal outage_since, waited_for_memory
        if state.outcome is not None and isinstance(state.outcome.exception(), OutOfMemoryError):
            waited_for_memory = True
            return False
        if waited_for_memory:
            outage_since, waited_for_memory = time.monotonic(), False
        return time.monotonic() - outage_since >= settings.visibility_timeout

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(REDIS_UNAVAILABLE),
        wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
        stop=outage_too_long,
        reraise=True,
    ):
        with attempt:
            return await call()
    return None  # unreachable: tenacity reraises


@dataclass(frozen=True)
class Delivery:
    """One delivery of a requests-stream entry to this worker."""

    entry_id: str
    raw: dict[Any, Any]
    deliveries: int  # how many times the entry has been delivered, this one included


async def run_delivery(ctx: RunContext, delivery: Delivery) -> None:
    """Parse the entry and run it; an entry that is not a request is dead-lettered with the reason,
    and one of a format newer than this worker reads is left to the workers that read it."""
    fields = decode_fields(delivery.raw)
    version = format_version(fields)
    if version is not None and version > ctx.settings.readable_format:
        # Before parsing: a newer format need not parse here, and is never this worker's to judge.
        await leave_to_newer(ctx, delivery, fields, version)
        return
    try:
        request = parse_fields(delivery.entry_id, fields)
    except MalformedRequest as exc:
        await dead_letter(ctx, delivery, None, "malformed", str(exc), None)
        return
    home = ctx.keys.shard_index
    if ctx.keys.of_task(request.task_id).shard_index != home or ctx.keys.of_client(request.client).shard_index != home:
        # Written by hand into another shard's stream: its task and client keys live elsewhere, and
        # no atomic step can span the two (on a cluster, two slots).
        reason = f"task {request.task_id} of client {request.client} belongs to another shard than {ctx.keys.requests}"
        await dead_letter(ctx, delivery, None, "malformed", reason, None)
        return
    run = Run(ctx, delivery, request)
    try:
        await run.execute()
    except (AlreadyFinished, TakenOver, *REDIS_UNAVAILABLE):
        raise
    except Exception as exc:
        masker = run.recorder.masker
        if not masker.active:
            raise
        # The worker logs an unexpected error with its traceback, whose values may include a secret.
        raise RunCrashed(masker.text("".join(traceback.format_exception(exc)))) from None


class RunCrashed(Exception):
    """An unexpected error of a run that has secrets, its traceback masked (the entry stays pending)."""


class Run:
    """One delivery of a parsed request: claim, run the workflow, record the outcome."""

    def __init__(self, ctx: RunContext, delivery: Delivery, request: ExecutionRequest) -> None:
        self.ctx = ctx
        self.delivery = delivery
        self.request = request
        self.started_at = ""
        self.recorder = Recorder(ctx, delivery, request)
        self.credentials = ClientCredentials(request.client)
        # The concurrency-key slot this run holds, if its workflow declares a key.
        self.slot: HeldSlot | None = None
        # Set when the entry turned out to be another worker's: whatever it holds is that worker's too.
        self.taken_over = False

    async def execute(self) -> None:
        if await self._execute_as_first_run():
            return
        task = await self._task_state()
        if task is None:
            return
        ready = await self._ready(task)
        if ready is None:
            # Dead-lettered, or waiting for PostgreSQL: a slot held for this run (woken from a concurrency
            # key's wait set) goes to the key's next waiter now, not a visibility timeout later.
            await self._give_back_woken_slot(task)
            return
        definition, attempt = ready
        if definition.concurrency is not None and not await self._take_slot(definition.concurrency, task, attempt):
            return
        try:
            await self._execute_holding(definition, task, attempt)
        except AlreadyFinished as exc:
            # Finished elsewhere or cancelled meanwhile: this run holds the slot no longer. Not when the
            # task goes on (a retry re-opened it past this run's request): the slot, held under the task's
            # id, is the retry's run's now.
            if not exc.superseded:
                await self._release_slot()
            raise
        # Any outcome recorded (terminal, or parked for a retry): the slot goes to the next waiter. A
        # retrying run does not keep it: nothing refreshes a slot while its run sits out a backoff, and
        # holding it through NOVA_RETRY_BACKOFF_MAX would idle the key; it queues again when due.
        # Exceptions (cancel, shutdown, Redis lost, taken over) keep it: the entry stays pending and
        # whoever runs it next takes the same slot back, or the slot expires with its holder.
        if not self.taken_over:
            await self._release_slot()

    async def _ready(self, task: dict[str, str]) -> tuple[Definition, int] | None:
        """The definition to run and the task's attempt; None when the run does not go ahead (dead-lettered
        past its deliveries or for its workflow, or handed back to wait for PostgreSQL)."""
        if self.delivery.deliveries > self.ctx.settings.max_deliveries:
            await self._dead_letter(
                "max_deliveries",
                f"delivered {self.delivery.deliveries} times (max_deliveries={self.ctx.settings.max_deliveries})",
                task,
            )
            return None
        attempt = int(task.get(TaskField.ATTEMPT) or 0)
        try:
            definition = await self._definition(task)
        except CatalogUnavailable as exc:
            # Only PostgreSQL knows the workflow and it is unreachable: wait for it without spending
            # a retry (nothing of the workflow ran), rather than bury the request as unknown.
            await self._transient_failure(attempt, exc, spend_retry=False)
            return None
        return None if definition is None else (definition, attempt)

    async def _give_back_woken_slot(self, task: dict[str, str]) -> None:
        """A waiter woken from a concurrency key's wait set has the key's slot held for it, which its run
        takes over at its acquire. A delivery that does not get that far (parked for a pause, left to a
        newer worker, dead-lettered, waiting for PostgreSQL) gives it back to the key's next waiter at once:
        held, it idled the key for a visibility timeout, every workflow sharing the key included. The run
        waits its turn again (in its first place) when it comes back. The task names the key it waited for
        until its acquire."""
        key = task.get(TaskField.WAITING_FOR)
        if self.taken_over or not key or not self.request.fields.get(RequestField.CONCURRENCY_ORDER):
            # Taken over: the entry, and the slot held under the task's id, are another worker's run's.
            return
        try:
            limit = int(self.request.fields.get(RequestField.CONCURRENCY_LIMIT) or 1)
        except ValueError:
            limit = 1
        await release_slot(self.ctx, HeldSlot(key, limit, self.request.task_id))

    async def _execute_as_first_run(self) -> bool:
        """Run a first delivery without reading its task first, as the task is after its enqueue; False
        when it may not, or the task turned out otherwise (nothing written: the caller reads it and runs).

        Most deliveries are first runs of a workflow this worker has run before: their task holds nothing
        the run needs, and the first write (before any action code) checks, in the same step, what a read
        would have shown. That saves a round trip per run. Runs holding a concurrency key read first.
        """
        definition = self._known_definition()
        first = self.delivery.deliveries == 1 <= self.ctx.settings.max_deliveries
        if definition is None or definition.concurrency is not None or not first:
            return False
        self.recorder.assumed_first_run = True
        try:
            await self._execute_holding(definition, {}, 0)
        except FirstRunStale:
            # Start over from what the task holds (a retry, a resume, a pause): nothing was written.
            self.recorder = Recorder(self.ctx, self.delivery, self.request)
            self.credentials = ClientCredentials(self.request.client)
            return False
        return True

    async def _execute_holding(self, definition: Definition, task: dict[str, str], attempt: int) -> None:
        try:
            resume = read_checkpoint(task.get(TaskField.CHECKPOINT), self.ctx.vault)
            await self._load_credentials(definition)
        except (CheckpointUnreadable, SandboxInfraError) as exc:
            if self.recorder.assumed_first_run:
                # The failure is handled with the task's true state (its attempt), read first.
                raise FirstRunStale from exc
            await self._transient_failure(attempt, exc)
            return
        self._start(task, attempt, resume)
        try:
            await self._run_workflow(definition, resume)
        except SandboxBusy as exc:
            # Nothing failed: no sandbox can be had now. The run waits in the delayed set, not in
            # this worker's slot, and resumes from its checkpoint.
            await self.recorder.flush()
            await self._transient_failure(attempt, exc, spend_retry=False, delay=exc.retry_after)
            return
        except RetryParked as parked:
            # A node retry with a long wait: likewise, it resumes at the node, from the checkpoint the
            # engine made durable with the failed attempt, once due.
            await self.recorder.flush()
            await self._park_node_retry(attempt, parked)
            return
        except SandboxInfraError as exc:
            await self.recorder.flush()
            await self._transient_failure(attempt, exc)
            return

    async def _task_state(self) -> dict[str, str] | None:
        """The task hash, or None when the task is finished already (the entry is then acknowledged)
        or its workflow or the queue is paused (the request is then parked until resumed)."""
        ctx, request = self.ctx, self.request
        # The pause flags ride in the same round trip as the task: a delivery costs nothing more.
        task, paused = await ctx.scripts.task_state(request.task_id, request.workflow_id)
        if task.get(TaskField.STATUS) in TERMINAL_STATUSES or superseded(task, request):
            # A redelivery of work already finished (or cancelled while queued), or a request a retry
            # has replaced (a cancelled run's, left queued or pending): acknowledge, never run.
            await ctx.redis.xack(ctx.keys.requests, ctx.keys.worker_group, self.delivery.entry_id)
            return None
        hash_format = format_version(task)
        if hash_format is None or hash_format > ctx.settings.readable_format:
            # A newer worker ran this task and wrote its state (its checkpoint above all) in a format
            # this one does not read: resuming from it could repeat or skip nodes. A value that is not
            # a format at all is treated as newer than this worker: it is not this worker's to judge.
            if not await leave_to_newer(
                ctx, self.delivery, request.fields, hash_format or ctx.settings.readable_format + 1
            ):
                self.taken_over = True
            await self._give_back_woken_slot(task)
            return None
        if paused and await self._park():
            await self._give_back_woken_slot(task)
            return None
        return task

    async def _park(self) -> bool:
        """Park the request while paused; False when the pause ended meanwhile (the run goes ahead)."""
        ctx, request = self.ctx, self.request
        sends = [0]
        parked = await _durably(
            lambda: ctx.scripts.park(
                entry_id=self.delivery.entry_id,
                consumer=ctx.consumer,
                workflow_id=request.workflow_id,
                score=_entry_score(self.delivery.entry_id),
                request=request.fields,
            ),
            ctx.settings,
            sends,
        )
        if parked == 1:
            log.info("task %s parked: its workflow or the queue is paused", request.task_id)
        elif parked == -1:
            if await done_by_a_lost_call(ctx, self.delivery, sends):
                return True
            # Another worker's entry now (reclaimed): what the run holds is not ours to give back.
            self.taken_over = True
        return bool(parked != 0)

    async def _take_slot(self, concurrency: Concurrency, task: dict[str, str], attempt: int) -> bool:
        """Take a slot of the run's concurrency key; False when the run does not go ahead here: parked
        in the key's wait set (its entry acknowledged), not this worker's entry, or failed because its
        context cannot fill the key."""
        ctx, request = self.ctx, self.request
        try:
            key = concurrency.render(request.client, request.initial_context)
        except ConcurrencyKeyError as exc:
            # Deterministic: the same context fails the same way, so the run fails now, once, naming the
            # field, rather than retrying.
            self._start(task, attempt, None)
            error = NodeError(type(exc).__name__, str(exc), reason="concurrency_key").as_json(None)
            await self._finish(Outcome("failure", request.initial_context, 0, error))
            return False
        try:
            # A run that waited keeps its first entry's place whenever it comes back.
            order = int(request.fields.get(RequestField.CONCURRENCY_ORDER) or _entry_score(self.delivery.entry_id))
        except ValueError:
            order = _entry_score(self.delivery.entry_id)
        # Counted as held from before the call: a cancel that stops this run while the call is out (its
        # reply not read) then releases the slot the step may have taken, once the run has stopped
        # (consumer/worker.py _stop_cancelled). Releasing a slot the task does not hold is harmless.
        self.slot = HeldSlot(key, concurrency.limit, request.task_id)
        ctx.held[self.delivery.entry_id] = self.slot
        outcome = await _durably(
            lambda: ctx.scripts.concurrency_acquire(
                key=key,
                limit=concurrency.limit,
                task_id=request.task_id,
                entry_id=self.delivery.entry_id,
                consumer=ctx.consumer,
                order=order,
                request=request.fields,
                ttl_ms=int(ctx.settings.visibility_timeout * 1000),
            ),
            ctx.settings,
        )
        if outcome == ConcurrencyOutcome.ACQUIRED:
            return True
        if outcome == ConcurrencyOutcome.FINISHED:
            # Cancelled since its task was read: a slot held for it (a woken waiter) goes to the next.
            log.info("task %s ended before it took its concurrency slot", request.task_id)
            await self._release_slot()
            return False
        self.slot = None
        ctx.held.pop(self.delivery.entry_id, None)
        if outcome == ConcurrencyOutcome.PARKED:
            log.info("task %s waits for concurrency key %r (limit %d)", request.task_id, key, concurrency.limit)
        return False

    async def _release_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is None:
            return
        ctx = self.ctx
        ctx.held.pop(self.delivery.entry_id, None)
        await release_slot(ctx, slot)

    def _requested_version(self) -> int | None:
        """The version the request was queued with; a request from before versions runs the current one."""
        version = self.request.payload.get("workflow_version")
        return version if isinstance(version, int) and not isinstance(version, bool) else None

    def _known_definition(self) -> Definition | None:
        """The requested version's definition if this worker has validated it already."""
        version = self._requested_version()
        return self.ctx.definitions.get((self.request.workflow_id, version)) if version is not None else None

    async def _definition(self, task: dict[str, str]) -> Definition | None:
        ctx = self.ctx
        workflow_id = self.request.workflow_id
        version = self._requested_version()
        definition = self._known_definition()
        if definition is not None:
            return definition
        workflow = await ctx.catalog.get(workflow_id, version)
        if workflow is None:
            await self._dead_letter("unknown_workflow", f"workflow {workflow_id} does not exist", task)
            return None
        # A request without a version runs the current one: validated once per version all the same.
        definition = ctx.definitions.get((workflow_id, workflow.version))
        if definition is not None:
            return definition
        try:
            definition = validate_definition(workflow.definition)
        except (InvalidDefinition, ValueError) as exc:
            await self._dead_letter("invalid_definition", str(exc), task)
            return None
        ctx.definitions[(workflow_id, workflow.version)] = definition
        return definition

    def _start(self, task: dict[str, str], attempt: int, resume: Checkpoint | None) -> None:
        ctx, request = self.ctx, self.request
        started_at = self.started_at = task.get(TaskField.STARTED_AT) or now_iso()
        self.recorder.buffer(
            EventType.STARTED,
            {
                "workflow_name": request.workflow_name,
                "enqueued_at": request.enqueued_at,
                "started_at": started_at,
                "consumer": ctx.consumer,
                "delivery": self.delivery.deliveries,
                "attempt": attempt,
                "resumed_from_step": resume.step if resume else 0,
            },
            {
                TaskField.STATUS: TaskStatus.RUNNING,
                TaskField.STARTED_AT: started_at,
                TaskField.CONSUMER: ctx.consumer,
                TaskField.EXECUTION_ID: str(request.execution_id),
                TaskField.WORKFLOW_ID: str(request.workflow_id),
                TaskField.WORKFLOW_NAME: request.workflow_name,
                TaskField.CLIENT: request.client,
                TaskField.TASK_ID: request.task_id,
                # Not waiting for a node retry any more (if it was).
                TaskField.NODE_RETRY: "",
                # The format this worker writes the task's state in (its checkpoint): an older worker
                # that reclaims the entry leaves it to workers that read it.
                TaskField.VERSION: str(FORMAT_VERSION),
            },
        )

    async def _run_workflow(self, definition: Definition, resume: Checkpoint | None) -> Outcome:
        ctx, request = self.ctx, self.request
        # With the limit run_workflow gives it (it copies a spec with another one).
        limit = execution_limit(definition, ctx.settings.execution_timeout)
        return await run_workflow(
            definition,
            request.initial_context,
            open_sandbox=self._open_sandbox,
            spec=SandboxSpec(execution_id=request.execution_id, client=request.client, timeout=limit),
            hooks=RecordingHooks(self.recorder, ctx.vault, seal=self.credentials.has_secrets),
            default_executor=ctx.settings.default_executor,
            node_timeout=ctx.settings.node_timeout,
            execution_timeout=ctx.settings.execution_timeout,
            resume=resume,
            extra_context=self._node_context,
            park_retries_after=ctx.settings.node_retry_park_after,
            # The terminal event first: the client sees the result without waiting for the sandbox's end.
            finish=self._finish,
        )

    async def _open_sandbox(self, spec: SandboxSpec) -> Sandbox:
        spec.secrets = self.credentials.environment()
        return await self.ctx.open_sandbox(spec)

    async def _load_credentials(self, definition: Definition) -> None:
        """Read the client's credentials before the first node: every node's context carries them,
        and the masker must know them before anything is shown."""
        client = self.request.client
        # Only action and decision code sees credentials: runs without any cost no round trip.
        if self.ctx.client_credentials is None or not definition.runs_code():
            return
        try:
            self.credentials = await self.ctx.client_credentials(client)
        except ClientError as exc:
            # A configuration problem of the deployment, not of the workflow: retried, then dead-lettered.
            raise SandboxInfraError(f"credentials of client '{client}' unavailable: {exc}") from None
        self.recorder.masker = self.credentials.masker()

    def _node_context(self, step: int, node: Node, attempt: Attempt | None) -> dict[str, Any]:
        """Read-only keys the engine adds to the context a node sees and removes from what it leaves:
        the node's identity, the client's credentials (NOVA's names, as stored), and client_slug."""
        client = self.request.client
        return {
            **self._node_identity(step, node, attempt),
            **self.credentials.context(),
            # Last: no credential and no node can pass for another tenant. A run without a client (the
            # admin key without client_slug) has none, as in NOVA.
            **({"client_slug": client} if client != NO_CLIENT else {}),
        }

    def _node_identity(self, step: int, node: Node, attempt: Attempt | None) -> dict[str, Any]:
        request = self.request
        # Stable across redeliveries and retries, and the same for every attempt of a node under its retry
        # policy (an attempt that failed after its side effect is deduplicated by it): the step of attempt 1.
        key = f"{request.execution_id}:{node.id}:{attempt.first_step if attempt else step}"
        identity: dict[str, Any] = {
            "execution_id": request.execution_id,
            "task_id": request.task_id,
            "node_id": node.id,
            "step": step,
            "idempotency_key": key,
            # Which worker runs it (its consumer name): sandboxes have their own PID namespace, so
            # node code cannot tell otherwise; operators and `nova chaos` read it from node logs.
            "worker": self.ctx.consumer,
        }
        if attempt is not None:
            identity["attempt"] = attempt.number
        return {"_nova": identity}

    # ---- outcomes ------------------------------------------------------------------------------

    async def _finish(self, outcome: Outcome) -> None:
        finished_at = now_iso()
        timing = {
            "started_at": self.started_at,
            "finished_at": finished_at,
            "duration_ms": _ms_between(self.started_at, finished_at),
        }
        # Masked once; the task hash (GET /tasks) stores the same shown values as the event.
        shown = self.recorder.shown({"final_context": outcome.final_context, "error": outcome.error})
        if outcome.status == "success":
            result = {"final_context": shown["final_context"], "nodes_executed": outcome.nodes_executed}
            self.recorder.buffer(
                EventType.SUCCEEDED,
                {**timing, **result},
                {
                    TaskField.STATUS: TaskStatus.SUCCESS,
                    TaskField.FINISHED_AT: finished_at,
                    TaskField.RESULT: dumps(result),
                    TaskField.NODES_EXECUTED: str(outcome.nodes_executed),
                },
                shown=True,
            )
        else:
            self.recorder.buffer(
                EventType.FAILED,
                {
                    **timing,
                    "final_context": shown["final_context"],
                    "nodes_executed": outcome.nodes_executed,
                    "error": shown["error"],
                },
                {
                    TaskField.STATUS: TaskStatus.FAILURE,
                    TaskField.FINISHED_AT: finished_at,
                    TaskField.ERROR: dumps(shown["error"]),
                    TaskField.NODES_EXECUTED: str(outcome.nodes_executed),
                },
                shown=True,
            )
        await self.recorder.flush(terminal=True)
        self.ctx.settled.add(self.delivery.entry_id)

    async def _transient_failure(
        self, attempt: int, exc: Exception, *, spend_retry: bool = True, delay: float | None = None
    ) -> None:
        """Park the request for another delivery (`delay` seconds, else the backoff), or dead-letter it
        once its retries are spent; a wait that spends no retry is reason "waiting"."""
        ctx, request = self.ctx, self.request
        masker = self.recorder.masker
        reason = "transient" if spend_retry else "waiting"
        error = masker.value(NodeError(type(exc).__name__, str(exc), reason=reason).as_json(None))
        if spend_retry and attempt >= ctx.settings.max_retries:
            task = decode_fields(await ctx.redis.hgetall(ctx.keys.task(request.task_id)))
            await self._dead_letter(
                "retries_exhausted", f"{error['type']}: {error['message']} after {attempt} retries", task
            )
            return
        next_attempt = attempt + 1 if spend_retry else attempt
        if delay is None:
            delay = backoff_seconds(ctx.settings, max(next_attempt, 1))
        # Shown to people only; the due time itself is Redis's clock plus the delay.
        retry_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + delay)) + "Z"
        if spend_retry:
            log.warning(
                "task %s: transient error, retry %d in %.2fs: %s",
                request.task_id,
                next_attempt,
                delay,
                error["message"],
            )
        else:
            log.info("task %s: handed back for %.2fs: %s", request.task_id, delay, error["message"])
        event = self.recorder.event(
            EventType.RETRY, {"attempt": next_attempt, "error": error, "retry_at": retry_at}, shown=True
        )
        await self._delay(event, delay, {TaskField.ATTEMPT: str(next_attempt), TaskField.ERROR: dumps(error)})

    async def _park_node_retry(self, attempt: int, parked: RetryParked) -> None:
        """Park the run until a node's next attempt is due (its retry policy's wait), freeing the slot.
        The execution's own attempt is unchanged: no execution retry is spent."""
        request = self.request
        waiting = parked.as_json()
        error = self.recorder.shown({"error": parked.error})["error"]
        delay = max(parked.due_ms / 1000 - time.time(), 0.0)
        log.info(
            "task %s: node %s waits %.2fs for attempt %d", request.task_id, parked.node_id, delay, parked.next_attempt
        )
        event = self.recorder.event(
            EventType.RETRY,
            {"attempt": attempt, "error": error, "retry_at": waiting["retry_at"], "node_retry": waiting},
            shown=True,
        )
        await self._delay(event, delay, {TaskField.ERROR: dumps(error), TaskField.NODE_RETRY: dumps(waiting)})

    async def _delay(self, event: dict[str, str], delay: float, task_fields: dict[str, str]) -> None:
        """The run waits `delay` seconds in the delayed set (status RETRY), its entry acknowledged."""
        ctx, request = self.ctx, self.request
        sends = [0]
        parked = await _durably(
            lambda: ctx.scripts.retry_later(
                task_id=request.task_id,
                entry_id=self.delivery.entry_id,
                consumer=ctx.consumer,
                request=request.fields,
                delay_ms=int(delay * 1000),
                event=event,
                task_fields={TaskField.STATUS: TaskStatus.RETRY, **task_fields, TaskField.UPDATED_AT: now_iso()},
            ),
            ctx.settings,
            sends,
        )
        if parked == -1 and not await done_by_a_lost_call(ctx, self.delivery, sends):
            # Another worker's entry: what the run holds is not ours to give back.
            self.taken_over = True

    async def _dead_letter(self, reason: str, message: str, task: dict[str, str]) -> None:
        written = await dead_letter(
            self.ctx, self.delivery, self.request, reason, self.recorder.masker.text(message), task
        )
        if not written:
            # Not this worker's entry (or finished already): what the run holds is not ours to give back.
            self.taken_over = True


async def done_by_a_lost_call(ctx: RunContext, delivery: Delivery, sends: list[int]) -> bool:
    """For a step that answered "not this worker's entry": whether its own first call did the work, its
    reply lost (`sends`, _durably's count: it was sent again), rather than another worker taking the entry
    over. Only a takeover leaves the entry pending, under another consumer's name."""
    if sends[0] < 2:
        return False
    pending = await ctx.redis.xpending_range(
        ctx.keys.requests, ctx.keys.worker_group, min=delivery.entry_id, max=delivery.entry_id, count=1
    )
    return not pending or pending[0]["consumer"] == ctx.consumer


async def release_slot(ctx: RunContext, slot: HeldSlot) -> None:
    """Give a run's concurrency-key slot back and wake the key's next waiters, in one step."""
    woken = await _durably(
        lambda: ctx.scripts.concurrency_release(
            key=slot.key,
            limit=slot.limit,
            task_id=slot.task_id,
            ttl_ms=int(ctx.settings.visibility_timeout * 1000),
        ),
        ctx.settings,
    )
    if woken:
        log.info("concurrency key %r: %d waiting run(s) woken", slot.key, woken)


async def leave_to_newer(ctx: RunContext, delivery: Delivery, fields: dict[str, str], version: int) -> bool:
    """Leave a request of a newer format to the workers that read it: never run here, never
    dead-lettered (see shared/lua/leave_to_newer.lua for why it is parked rather than handed back).
    False when the entry is not this worker's (another took it over), or stays pending."""
    try:
        member = dumps(fields)
    except TypeError:
        # Bytes that are not UTF-8 cannot be kept as JSON: the entry stays pending, and is reclaimed
        # (by a newer worker, or again by an older one) after the visibility timeout.
        log.warning("entry %s of format %d has bytes that are not UTF-8; left pending", delivery.entry_id, version)
        return False
    sends = [0]
    left = await _durably(
        lambda: ctx.scripts.leave_to_newer(
            entry_id=delivery.entry_id,
            consumer=ctx.consumer,
            version=version,
            score=_entry_score(delivery.entry_id),
            member=member,
        ),
        ctx.settings,
        sends,
    )
    if left == -1 and await done_by_a_lost_call(ctx, delivery, sends):
        left = 1
    if left == 1:
        log.info(
            "entry %s has format %d (this worker reads up to %d): left to newer workers",
            delivery.entry_id,
            version,
            ctx.settings.readable_format,
        )
    return left == 1


async def dead_letter(
    ctx: RunContext,
    delivery: Delivery,
    request: ExecutionRequest | None,
    reason: str,
    message: str,
    task: dict[str, str] | None,
) -> bool:
    """Move the entry to the dead-letter stream; a parsed request's task ends as DEAD with it. False
    when nothing was written (the entry was not this worker's, or its task had finished)."""
    attempts = task.get(TaskField.ATTEMPT, "0") if task else "0"
    letter = {
        **decode_fields(delivery.raw),
        DeadLetterField.REASON: reason,
        DeadLetterField.ERROR: message,
        DeadLetterField.ATTEMPTS: attempts,
        DeadLetterField.DELIVERIES: str(delivery.deliveries),
        DeadLetterField.ORIGINAL_ID: delivery.entry_id,
        DeadLetterField.DEAD_AT: now_iso(),
    }
    log.warning("entry %s dead-lettered (%s): %s", delivery.entry_id, reason, printable(message))
    event = task_fields = None
    if request is not None:
        finished_at = now_iso()
        error = NodeError(reason, message, reason=reason).as_json(None)
        event = Recorder(ctx, delivery, request).event(
            EventType.DEAD, {"finished_at": finished_at, "reason": reason, "error": error, "attempts": int(attempts)}
        )
        task_fields = {
            TaskField.STATUS: TaskStatus.DEAD,
            TaskField.FINISHED_AT: finished_at,
            TaskField.ERROR: dumps(error),
            TaskField.UPDATED_AT: finished_at,
        }
    sends = [0]
    _, letter_id = await _durably(
        lambda: ctx.scripts.dead_letter(
            entry_id=delivery.entry_id,
            consumer=ctx.consumer,
            letter=letter,
            task_id=request.task_id if request else None,
            client=request.client if request else None,
            event=event,
            task_fields=task_fields,
            task_ttl=ctx.settings.task_ttl,
        ),
        ctx.settings,
        sends,
    )
    return bool(letter_id) or await done_by_a_lost_call(ctx, delivery, sends)


# The masker of a run without credentials: shared, as a Masker never changes once built.
NO_SECRETS = Masker()


class Recorder:
    """A run's status events and task fields, buffered and written in one atomic step per flush."""

    def __init__(self, ctx: RunContext, delivery: Delivery, request: ExecutionRequest) -> None:
        self.ctx = ctx
        self.delivery = delivery
        self.request = request
        self._events: list[RunEvent] = []
        self._fields: dict[str, str] = {}
        # The run's credentials, once loaded; until then there is nothing to hide.
        self.masker = NO_SECRETS
        # Set while the run assumes a first run without having read its task: the first write checks it.
        self.assumed_first_run = False

    def shown(self, data: dict[str, Any]) -> dict[str, Any]:
        """Event data as it may be shown: credential keys dropped from contexts, secrets masked."""
        return self.masker.event_data(data)

    def event(self, type_: EventType, data: dict[str, Any], *, shown: bool = False) -> dict[str, str]:
        """An event, its data masked unless already `shown` (as buffer masks those of a run)."""
        request = self.request
        return event_fields(
            type_,
            task_id=request.task_id,
            execution_id=request.execution_id,
            workflow_id=request.workflow_id,
            client=request.client,
            data=data if shown else self.shown(data),
        )

    def buffer(
        self, type_: EventType, data: dict[str, Any], task_fields: dict[str, str], *, shown: bool = False
    ) -> None:
        # As event() makes it, but for the fields every event of the run shares: record() adds them.
        self._events.append((type_.value, now_iso(), dumps(data if shown else self.shown(data))))
        self._fields.update(task_fields)

    async def flush(self, *, terminal: bool = False) -> None:
        """Write the buffered events and task fields in one atomic step.

        Runs flush right before action code starts (so the previous node's checkpoint is durable
        before anything with side effects runs) and at the end; events of start, end and decision
        nodes ride along, so a run costs one round trip per action node, plus one.
        """
        if not self._events:
            return
        ctx, request = self.ctx, self.request
        events, fields = self._events, {**self._fields, TaskField.UPDATED_AT: self._events[-1][1]}
        self._events, self._fields = [], {}
        # One token per write, kept across re-sends: a call whose reply was lost and that is sent
        # again (by the client's retry or _durably) is answered without writing twice.
        token = random_id()
        result = await _durably(
            lambda: ctx.scripts.record(
                task_id=request.task_id,
                client=request.client,
                events=events,
                task_fields=fields,
                terminal=terminal,
                ack_entry_id=self.delivery.entry_id,
                consumer=ctx.consumer,
                token=token,
                task_ttl=ctx.settings.task_ttl,
                first_run_of=request.workflow_id if self.assumed_first_run else None,
                readable=ctx.settings.readable_format,
                of_run=(request.execution_id, request.workflow_id),
                # A retry of a cancelled run re-opens the task with a request of its own: a run of the
                # earlier request (its cancel missed) stops at its next write, before any more action code.
                reopen_token=reopen_token_of(request),
            ),
            ctx.settings,
        )
        if result.outcome == RecordOutcome.NOT_OWNER:
            raise TakenOver(request.task_id, self.delivery.entry_id)
        if result.outcome == RecordOutcome.STALE:
            raise FirstRunStale(request.task_id)
        # Written: the task is this run's as assumed, and later writes need no check.
        self.assumed_first_run = False
        if not result.written:
            raise AlreadyFinished(request.task_id, result.status)


def reopen_token_of(request: ExecutionRequest) -> str:
    """The re-open token a request carries: a retry's (shared/executions.py retry_failure), else ''."""
    return str(request.payload.get("reopen_token") or "")


def superseded(task: dict[str, str], request: ExecutionRequest) -> bool:
    """Whether a retry re-opened the task after this request: the task has a re-open token, and the
    request carries another (a request of a cancelled run, left behind queued or on a worker that
    missed the cancel). The rule record.lua applies at each write of a run."""
    current = task.get(TaskField.REOPEN_TOKEN)
    return bool(current) and reopen_token_of(request) != current


class AlreadyFinished(Exception):
    """Another delivery of this task reached a terminal state first, or a retry re-opened the task past
    this run's request (superseded: the task goes on in the retry's run); this one stops quietly."""

    def __init__(self, task_id: str, status: str = "") -> None:
        super().__init__(task_id, status)
        self.superseded = bool(status) and status not in TERMINAL_STATUSES


class FirstRunStale(Exception):
    """A run that assumed its task as enqueued found it otherwise at its first write (nothing written)."""


class TakenOver(Exception):
    """Another worker reclaimed this run's entry (this one was silent too long): it owns the run now."""


class RecordingHooks:
    """The engine's hooks: each step becomes events, and action code starts only once they are durable."""

    def __init__(self, recorder: Recorder, vault: Vault, *, seal: bool = False) -> None:
        self.recorder = recorder
        self.vault = vault
        # Whether checkpoints are encrypted: when the run has secrets, which node code may have copied
        # into its context in forms no masker recognises.
        self.seal = seal

    async def node_started(
        self, step: int, node: Node, started_at: str, context: dict[str, Any], attempt: Attempt | None = None
    ) -> None:
        data: dict[str, Any] = {
            "step": step,
            "node_id": node.id,
            "node_type": node.type.value,
            "started_at": started_at,
            "input_context": context,
        }
        if attempt is not None:
            data.update(attempt=attempt.number, max_attempts=attempt.of)
        self.recorder.buffer(EventType.NODE_STARTED, data, {TaskField.CURRENT_NODE: node.id})
        # Only action code has side effects; everything before it must be durable before it runs.
        if node.type == NodeType.ACTION:
            await self.recorder.flush()

    async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None:
        self.recorder.buffer(
            EventType.NODE_FINISHED,
            record.as_json(),
            {
                # Internal state, never shown: true values, so that a resumed node sees real ones.
                TaskField.CHECKPOINT: checkpoint_field(checkpoint, self.vault, self.seal),
                TaskField.NODES_EXECUTED: str(record.step),
            },
        )
        if record.retry_at is not None:
            # The engine waits for the node's next attempt now: the failed attempt and the checkpoint that
            # counts it must be durable first, or a worker dying in the wait would run that attempt again.
            await self.recorder.flush()


def _entry_score(entry_id: str) -> int:
    """An entry id as one number in its order (ms and sequence), exact in a sorted set's double."""
    ms, seq = entry_id_parts(entry_id)
    return ms * 1000 + min(seq, 999)


def _ms_between(start: str, end: str) -> float | None:
    a, b = parse_iso(start), parse_iso(end)
    return round((b - a).total_seconds() * 1000, 3) if a and b else None
