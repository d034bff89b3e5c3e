"""Runs one workflow graph node by node, passing the JSON context along.

The engine knows nothing of Redis: the worker hands it hooks that record each step, and a
checkpoint to resume from when a run was interrupted. Node code runs only through sandboxes;
errors in the workflow's own code end the run as a failure (NodeError), while SandboxInfraError
escapes to the worker, which decides whether to retry.

The rules, NOVA's unless said otherwise:
- Merge: what a node leaves is merged into the context. Keys it sets are added or replaced; keys it
  deleted stay (NOVA's dict.update: a node's output cannot express a deletion).
- Output protocol: when the last line a node prints (blank lines and bare {}, [] or null skipped) is a
  JSON object with "context_updates", that object is the node's output: its context_updates are merged
  (and nothing else of what the code did to `context`); "status": "error" fails the node with its
  "message". Any other printing is only output (NOVA merged a stray JSON line or failed the node on it).
- Decisions: an expression's value picks the branch (ours: its truth, or a string when the decision's
  branches carry labels); statements must set context[<decision id>] to a bool or a string, lower-cased
  and matched against the branch labels. A decision that sets nothing, sets another type, or matches no
  branch fails at that node (NOVA raised those out of its engine).
- Loops: at most 2 x the node count steps (NOVA's bound), unless some node sets max_visits: then each
  such node may be entered that often, and MAX_STEPS bounds the whole run.
- Timeouts: a node's `timeout` or the default, never past the execution's own limit.
- Node retries (ours): a node with a `retry` policy whose attempt fails with a qualifying error runs
  again, alone, from the context it was given (what the failed attempt changed is dropped), after the
  policy's backoff, for at most its `attempts`. Each attempt is a step of its own in the chain of work
  (`attempt` numbers it), with one idempotency key for all of them; a retry is not a new visit (loop
  bounds count the node once). The failed attempt's record and a checkpoint naming the node and the
  attempts made are durable before the wait, so a worker that dies during it resumes at that node with
  the count kept. A wait that would end past the execution's deadline is not started: the node fails
  with its last error. The wait counts against the execution's time limit, also when the run resumes
  at the node on another pass (a parked wait, a worker's crash): the checkpoint carries the time left.
  A dead sandbox (a node killed at its time limit) is replaced for the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from consumer.sandbox.base import CALL_MARGIN, NodeError, NodeResult, Sandbox, SandboxSpec
from shared.streams import now_iso
from shared.workflow import BOOLEAN_LABELS, RETRYABLE_REASONS, Definition, Node, NodeType

# A safety net for graphs whose cycles are bounded only per node: no run takes more steps.
MAX_STEPS = 10_000
# Output lines NOVA's executor skipped when looking for a node's result.
_EMPTY_JSON = frozenset({"{}", "[]", "null"})
# Keys named in a "did not set" error, at most (the context may be large).
_KEYS_SHOWN = 50


@dataclass
class PendingRetry:
    """A node whose attempt failed and that will run again (its retry policy): part of the checkpoint."""

    node_id: str
    failed: int  # attempts made so far, all failed
    first_step: int  # the step of its first attempt: the idempotency key every attempt shares
    due_ms: int  # wall-clock time (ms since the epoch) before which the next attempt does not start
    # What is left of the execution's time limit once the wait is over: a run resumed at the node (after a
    # parked wait, or on another worker) keeps its deadline instead of starting the clock again. Only the
    # wait itself is counted, not a late pickup or a pause. None in checkpoints of older workers.
    time_left_ms: int | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "node_id": self.node_id,
            "failed": self.failed,
            "first_step": self.first_step,
            "due_ms": self.due_ms,
        }
        if self.time_left_ms is not None:
            data["time_left_ms"] = self.time_left_ms
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PendingRetry:
        left = data.get("time_left_ms")
        return cls(
            str(data["node_id"]),
            int(data["failed"]),
            int(data["first_step"]),
            int(data["due_ms"]),
            int(left) if left is not None else None,
        )


@dataclass
class Checkpoint:
    """Where a run stands after a completed node (or a failed attempt to retry): enough to resume it
    elsewhere."""

    step: int  # node runs completed so far
    next_node: str | None
    context: dict[str, Any]
    visits: dict[str, int] = field(default_factory=dict)
    # Steps that were retries of a node (the loop bounds do not count them).
    retries: int = 0
    # The next node's attempts so far, when it is to run again under its retry policy.
    retry: PendingRetry | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "step": self.step,
            "next_node": self.next_node,
            "context": self.context,
            "visits": self.visits,
        }
        # Only runs that retried carry these: every other checkpoint keeps its earlier shape.
        if self.retries:
            data["retries"] = self.retries
        if self.retry is not None:
            data["retry"] = self.retry.as_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        retry = data.get("retry")
        return cls(
            step=int(data["step"]),
            next_node=data.get("next_node"),
            context=dict(data.get("context") or {}),
            visits={str(k): int(v) for k, v in (data.get("visits") or {}).items()},
            retries=int(data.get("retries") or 0),
            retry=PendingRetry.from_json(retry) if isinstance(retry, dict) else None,
        )


@dataclass(frozen=True)
class Attempt:
    """Which attempt of a node with a retry policy a run is (None for nodes without one)."""

    number: int  # 1-based
    of: int  # the policy's attempts
    first_step: int  # the step of attempt 1


@dataclass
class NodeRecord:
    """One entry of the chain of work."""

    step: int
    node_id: str
    node_type: str
    status: str  # "success" | "failure"
    started_at: str
    finished_at: str
    duration_ms: float
    output_context: dict[str, Any] | None
    stdout: str = ""
    stderr: str = ""
    # A true/false result as a bool (None for a label or a non-branching node) ...
    decision: bool | None = None
    # ... and every result as NOVA's `decision_result` text: "true", "false" or the label.
    decision_result: str | None = None
    next_node: str | None = None
    error: dict[str, Any] | None = None
    # Nodes with a retry policy: which attempt this was, of how many, and, for a failed one that will
    # run again, when (ISO-8601 UTC).
    attempt: int | None = None
    max_attempts: int | None = None
    retry_at: str | None = None

    def as_json(self) -> dict[str, Any]:
        data = {
            "step": self.step,
            "node_id": self.node_id,
            "node_type": self.node_type,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
            "output_context": self.output_context,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "decision": self.decision,
            "decision_result": self.decision_result,
            "next_node": self.next_node,
            "error": self.error,
        }
        if self.attempt is not None:
            data.update(attempt=self.attempt, max_attempts=self.max_attempts, retry_at=self.retry_at)
        return data


@dataclass
class Outcome:
    status: str  # "success" | "failure"
    final_context: dict[str, Any]
    nodes_executed: int
    error: dict[str, Any] | None = None


class RetryParked(Exception):
    """A node's next attempt is due after a wait long enough to give the worker's slot back for it
    (run_workflow's `park_retries_after`): its failed attempt and the checkpoint that runs it again are
    durable (the hooks' node_finished), and the caller parks the run until `due_ms`."""

    def __init__(self, node_id: str, next_attempt: int, max_attempts: int, due_ms: int, error: dict[str, Any]) -> None:
        super().__init__(f"node '{node_id}' retries at {_iso_ms(due_ms)} (attempt {next_attempt} of {max_attempts})")
        self.node_id = node_id
        self.next_attempt = next_attempt
        self.max_attempts = max_attempts
        self.due_ms = due_ms
        self.error = error

    def as_json(self) -> dict[str, Any]:
        """What GET /tasks and the retry event show of the wait."""
        return {
            "node_id": self.node_id,
            "attempt": self.next_attempt,
            "max_attempts": self.max_attempts,
            "retry_at": _iso_ms(self.due_ms),
        }


class Hooks(Protocol):
    async def node_started(
        self, step: int, node: Node, started_at: str, context: dict[str, Any], attempt: Attempt | None = None
    ) -> None: ...

    async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None:
        """A node run ended. When `record.retry_at` is set (a failed attempt to be retried), the
        checkpoint must be durable before this returns: the engine waits next, and a worker that dies
        then must resume with the attempt counted."""
        ...


OpenSandbox = Callable[[SandboxSpec], Awaitable[Sandbox]]
ExtraContext = Callable[[int, Node, Attempt | None], dict[str, Any]]


class _Sandboxes:
    """Opens at most one sandbox per executor for the run, lazily, and closes them all."""

    def __init__(self, open_sandbox: OpenSandbox, spec: SandboxSpec) -> None:
        self._open = open_sandbox
        self._spec = spec
        self._open_ones: dict[str, Sandbox] = {}

    async def get(self, executor: str) -> Sandbox:
        sandbox = self._open_ones.get(executor)
        # A sandbox that died with a node (killed at its time limit, crashed) is replaced: only a node
        # retry runs code after such a failure.
        if sandbox is None or getattr(sandbox, "dead", False):
            if sandbox is not None:
                with contextlib.suppress(Exception):
                    await sandbox.close()
            spec = SandboxSpec(
                execution_id=self._spec.execution_id,
                client=self._spec.client,
                executor=executor,
                secrets=self._spec.secrets,
                timeout=self._spec.timeout,
            )
            sandbox = await self._open(spec)
            self._open_ones[executor] = sandbox
        return sandbox

    async def close(self) -> None:
        for sandbox in self._open_ones.values():
            # Closing must not mask the run's own outcome; a sandbox that will not close is leaked
            # to its provider's reaper rather than failing a finished execution.
            try:
                await sandbox.close()
            except Exception:
                pass
        self._open_ones.clear()


def execution_limit(definition: Definition, execution_timeout: float) -> float:
    """Seconds a run of `definition` may take: its own timeout, else the worker's execution_timeout."""
    return definition.timeout or execution_timeout


async def run_workflow(
    definition: Definition,
    context: dict[str, Any],
    *,
    open_sandbox: OpenSandbox,
    spec: SandboxSpec,
    hooks: Hooks,
    default_executor: str = "local",
    node_timeout: float = 60.0,
    execution_timeout: float = 600.0,
    resume: Checkpoint | None = None,
    extra_context: ExtraContext | None = None,
    park_retries_after: float | None = None,
    finish: Callable[[Outcome], Awaitable[None]] | None = None,
) -> Outcome:
    """Run the graph from start (or from `resume`) to an end node or the first failure.

    `extra_context(step, node)` adds read-only keys to the context a node sees (such as its stable
    idempotency key); they are removed from what the node leaves behind. A node retry whose wait is
    at least `park_retries_after` seconds raises RetryParked instead of waiting (None: always wait).
    `finish(outcome)` records the outcome before the run's sandboxes close: the result waits for no
    sandbox's teardown (its processes killed and gone), which nothing in it depends on.
    """
    limit = execution_limit(definition, execution_timeout)
    deadline = time.monotonic() + limit
    if resume is not None and resume.retry is not None and resume.retry.time_left_ms is not None:
        # Resumed at a node's retry: the limit is what the run had left after the wait, not a new one,
        # counted from when the wait ends (a run resumed before it is due waits the rest first).
        node = definition.node(resume.retry.node_id)
        wait = _wait_left(resume.retry.due_ms, node)
        deadline = time.monotonic() + wait + min(resume.retry.time_left_ms / 1000, limit)
    run = _Run(
        definition,
        hooks,
        # Copied only when its limit differs (dataclasses.replace costs a few microseconds per run).
        _Sandboxes(open_sandbox, spec if spec.timeout == limit else dataclasses.replace(spec, timeout=limit)),
        # A fresh run is a resume from before the start node.
        resume or Checkpoint(step=0, next_node=definition.start.id, context=context),
        default_executor=default_executor,
        node_timeout=node_timeout,
        deadline=deadline,
        extra_context=extra_context,
        park_retries_after=park_retries_after,
    )
    try:
        outcome = await run.to_end()
        if finish is not None:
            await finish(outcome)
        return outcome
    finally:
        await run.sandboxes.close()


@dataclass
class _Visit:
    """One node run in progress: what its record and the run's outcome are built from."""

    node: Node
    started_at: str
    t0: float
    attempt: Attempt | None = None
    # The context after the node's output was merged (None until it ran).
    merged: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""


class _Run:
    def __init__(
        self,
        definition: Definition,
        hooks: Hooks,
        sandboxes: _Sandboxes,
        start: Checkpoint,
        *,
        default_executor: str,
        node_timeout: float,
        deadline: float,
        extra_context: ExtraContext | None,
        park_retries_after: float | None = None,
    ) -> None:
        self.definition = definition
        self.hooks = hooks
        self.sandboxes = sandboxes
        self.default_executor = default_executor
        self.node_timeout = node_timeout
        self.deadline = deadline
        self.extra_context = extra_context
        self.park_retries_after = park_retries_after
        self.step = start.step
        self.current = start.next_node
        self.ctx = dict(start.context)
        self.visits = dict(start.visits)
        self.retries = start.retries
        # A node to run again (resumed from a checkpoint taken after its failed attempt).
        self.pending: PendingRetry | None = start.retry if start.retry and start.retry.node_id == self.current else None
        self.step_limit = MAX_STEPS if definition.uses_max_visits else 2 * len(definition.nodes)

    async def to_end(self) -> Outcome:
        while self.current is not None:
            node = self.definition.node(self.current)
            self.step += 1
            pending, self.pending = self.pending, None
            if pending is not None:
                # A retry: the same visit, counted and bounded on its first attempt.
                self.retries += 1
                await _sleep_until(time.time() + _wait_left(pending.due_ms, node))
                attempt = _attempt(node, pending.failed + 1, pending.first_step)
            else:
                self.visits[node.id] = self.visits.get(node.id, 0) + 1
                over = self._over_bound(node)
                if over is not None:
                    return Outcome("failure", self.ctx, self.step - 1, over.as_json(node.id))
                attempt = _attempt(node, 1, self.step)
            failed = await self._visit(node, attempt)
            if failed is not None:
                return failed
        return Outcome("success", self.ctx, self.step)

    def _over_bound(self, node: Node) -> NodeError | None:
        if node.max_visits is not None and self.visits[node.id] > node.max_visits:
            return NodeError(
                type="LoopLimitExceeded",
                message=f"node '{node.id}' entered more than {node.max_visits} times (its max_visits)",
                reason="max_visits",
            )
        if self.step - self.retries > self.step_limit:
            rule = (
                f"at most {MAX_STEPS} steps in all"
                if self.definition.uses_max_visits
                else f"at most 2 x {len(self.definition.nodes)} nodes; set max_visits on a node of the loop for more"
            )
            return NodeError(
                type="LoopLimitExceeded",
                message=f"workflow exceeded max iterations ({self.step_limit}) entering node '{node.id}' ({rule})",
                reason="max_steps",
            )
        return None

    async def _visit(self, node: Node, attempt: Attempt | None) -> Outcome | None:
        """Run one node and record it; returns the run's outcome when the node failed for good."""
        started_at = now_iso()
        await self.hooks.node_started(self.step, node, started_at, self.ctx, attempt)
        visit = _Visit(node, started_at, time.perf_counter(), attempt)
        try:
            result = await self._execute(node, attempt)
            visit.merged, visit.stdout, visit.stderr = result.context, result.stdout, result.stderr
            nxt, decision, label = self._choose_next(node, result)
        except NodeError as exc:
            delay, stopped = self._retry_delay(node, attempt, exc)
            if delay is not None and attempt is not None:
                await self._retry_later(visit, attempt, exc, delay)
                return None
            return await self._failed(visit, exc, stopped)
        record = self._record(visit, "success", visit.merged, decision=decision, decision_result=label, next_node=nxt)
        self.ctx, self.current = result.context, nxt
        await self.hooks.node_finished(record, Checkpoint(self.step, nxt, self.ctx, self.visits, self.retries))
        return None

    def _retry_delay(self, node: Node, attempt: Attempt | None, exc: NodeError) -> tuple[float | None, str | None]:
        """Seconds to wait before the node's next attempt, or None when it fails for good (with why, when
        the policy would have run it again)."""
        policy = node.retry
        if policy is None or attempt is None or attempt.number >= policy.attempts:
            return None, None
        if exc.reason not in RETRYABLE_REASONS or not policy.matches(exc.type, exc.bases):
            return None, None
        delay = policy.delay(attempt.number)
        # The wait must end with time left to run the node; past the deadline it only delays the failure.
        if time.monotonic() + delay >= self.deadline:
            return None, "deadline"
        return delay, None

    async def _retry_later(self, visit: _Visit, attempt: Attempt, exc: NodeError, delay: float) -> None:
        """Record the failed attempt and a checkpoint that runs the node again, from the context it was
        given, once `delay` has passed; the hooks make both durable before the loop waits."""
        due_ms = int((time.time() + delay) * 1000)
        time_left_ms = int((self.deadline - time.monotonic() - delay) * 1000)
        if visit.merged is None:
            visit.stdout, visit.stderr = exc.stdout, exc.stderr
        record = self._record(visit, "failure", visit.merged, error=self._error(visit, exc))
        record.retry_at = _iso_ms(due_ms)
        node_id = visit.node.id
        self.pending = PendingRetry(node_id, attempt.number, attempt.first_step, due_ms, time_left_ms)
        # The context stays the node's input: nothing of the failed attempt is kept.
        await self.hooks.node_finished(
            record, Checkpoint(self.step, node_id, self.ctx, self.visits, self.retries, self.pending)
        )
        if self.park_retries_after is not None and delay >= self.park_retries_after:
            raise RetryParked(node_id, attempt.number + 1, attempt.of, due_ms, record.error or {})

    def _error(self, visit: _Visit, exc: NodeError, stopped: str | None = None) -> dict[str, Any]:
        error = exc.as_json(visit.node.id)
        if visit.attempt is not None:
            error["attempt"] = visit.attempt.number
            error["max_attempts"] = visit.attempt.of
            if stopped:
                # Attempts were left, but the next wait would have ended past the execution's deadline.
                error["retry_stopped"] = stopped
        return error

    async def _failed(self, visit: _Visit, exc: NodeError, stopped: str | None = None) -> Outcome:
        error = self._error(visit, exc, stopped)
        if visit.merged is None:
            # The node's code failed: whatever it printed came with the error.
            visit.stdout, visit.stderr = exc.stdout, exc.stderr
        record = self._record(visit, "failure", visit.merged, error=error)
        # The failed node is not a completed step: a retry of the execution starts at it, with the
        # context it was given, and counts its visit again on entry. The failed visit is therefore taken
        # out of the checkpoint, or a node with max_visits 1 could never be retried. A retry of the
        # execution gives a node with a retry policy all its attempts again.
        node_id = visit.node.id
        retry_visits = {**self.visits, node_id: self.visits[node_id] - 1}
        was_retry = visit.attempt is not None and visit.attempt.number > 1
        checkpoint = Checkpoint(self.step - 1, node_id, self.ctx, retry_visits, self.retries - was_retry)
        await self.hooks.node_finished(record, checkpoint)
        # A decision that ran but could not branch leaves its changes in the final context, as in NOVA.
        return Outcome("failure", visit.merged if visit.merged is not None else self.ctx, self.step, error)

    def _record(
        self,
        visit: _Visit,
        status: str,
        output_context: dict[str, Any] | None,
        *,
        decision: bool | None = None,
        decision_result: str | None = None,
        next_node: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> NodeRecord:
        attempt = visit.attempt
        return NodeRecord(
            attempt=attempt.number if attempt else None,
            max_attempts=attempt.of if attempt else None,
            step=self.step,
            node_id=visit.node.id,
            node_type=visit.node.type.value,
            status=status,
            started_at=visit.started_at,
            finished_at=now_iso(),
            duration_ms=(time.perf_counter() - visit.t0) * 1000,
            output_context=output_context,
            stdout=visit.stdout,
            stderr=visit.stderr,
            decision=decision,
            decision_result=decision_result,
            next_node=next_node,
            error=error,
        )

    # ---- running a node ------------------------------------------------------------------------

    async def _execute(self, node: Node, attempt: Attempt | None) -> NodeResult:
        """Run the node's code; the result's context is the run's context with the node's output merged."""
        if node.type in (NodeType.START, NodeType.END):
            return NodeResult(context=self.ctx)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise NodeError(
                type="TimeoutError",
                message=f"execution time limit reached before node '{node.id}'",
                reason="timeout",
            )
        timeout = min(node.timeout or self.node_timeout, remaining)
        sandbox = await self.sandboxes.get(_executor(node, self.default_executor))
        extra = self.extra_context(self.step, node, attempt) if self.extra_context else None
        given = {**self.ctx, **extra} if extra else self.ctx
        code = node.code or ""
        try:
            if node.is_expression_decision:
                call = sandbox.evaluate(node.id, code, given, timeout)
            else:
                call = sandbox.run_action(node.id, code, given, timeout)
            # A sandbox whose calls move large payloads over a network says how much longer it needs.
            result = await asyncio.wait_for(call, timeout + getattr(sandbox, "call_margin", CALL_MARGIN))
        except TimeoutError:
            # The sandbox enforces the limit, and bounds its own waits, itself (within CALL_MARGIN, where it
            # can tell its service's silence from the node's timeout); this only fires if it failed to.
            raise NodeError(
                type="TimeoutError", message=f"node '{node.id}' exceeded {timeout:g}s", reason="timeout"
            ) from None
        output = _node_output(node, result)
        for key in extra or ():
            output.pop(key, None)
        result.context = {**self.ctx, **output}
        return result

    def _choose_next(self, node: Node, result: NodeResult) -> tuple[str | None, bool | None, str | None]:
        """The next node, and for a branching node its result (as a bool when true/false, and as text)."""
        if not self.definition.is_branching(node):
            return self.definition.successor(node), None, None
        label = self._result_label(node, result)
        nxt = self.definition.branch(node, label)
        if nxt is None:
            conditions = [candidate for candidate, _ in self.definition.branches(node)]
            raise NodeError(
                type="DecisionError",
                message=f"No edge found for decision result '{label}' from node {node.id}. "
                f"Available conditions: {conditions}",
                reason="decision",
            )
        decision = label == "true" if label in BOOLEAN_LABELS else None
        return nxt, decision, label

    def _result_label(self, node: Node, result: NodeResult) -> str:
        if node.is_expression_decision:
            value = result.decision
            if isinstance(value, str) and self.definition.has_labels(node):
                return value.lower()
            if value is not None or result.context.get(node.id) is None:
                # Truth, as before labels existed: a string on a true/false decision counts as non-empty.
                return "true" if value else "false"
            # An expression that gave None but set the decision's key (a call, a protocol print).
        value = result.context.get(node.id)
        kind = {NodeType.DECISION: "DecisionNode", NodeType.ACTION: "ActionNode"}.get(node.type, "Node")
        if value is None:
            keys = list(result.context)
            shown = keys[:_KEYS_SHOWN] + (["..."] if len(keys) > _KEYS_SHOWN else [])
            raise NodeError(
                type="DecisionError",
                message=f"{kind} {node.id} did not set '{node.id}' in context. Available context keys: {shown}",
                reason="decision",
            )
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return value.lower()
        raise NodeError(
            type="DecisionError",
            message=f"{kind} {node.id} set '{node.id}' to unsupported type: {type(value).__name__} = "
            f"{_short(value)}. Expected bool or str.",
            reason="decision",
        )


def _attempt(node: Node, number: int, first_step: int) -> Attempt | None:
    return Attempt(number, node.retry.attempts, first_step) if node.retry is not None else None


def _wait_left(due_ms: int, node: Node) -> float:
    """Seconds until a retry of `node` is due, by the wall clock (the time it was set by may be another
    worker's), capped by the policy's largest wait should this worker's clock be behind that one's."""
    longest = node.retry.backoff.max if node.retry else 0.0
    return min(max(due_ms / 1000 - time.time(), 0.0), longest)


async def _sleep_until(until: float) -> None:
    """Wait until `until` (wall clock, seconds since the epoch); a cancel ends the wait at once (it is a
    plain sleep)."""
    # The sleep keeps the monotonic clock, which may end it a hair before the wall clock's due time
    # (or the wall clock may be stepped meanwhile): sleep what is left, a few times at most.
    for _ in range(3):
        remaining = until - time.time()
        if remaining <= 0:
            return
        await asyncio.sleep(remaining)


def _iso_ms(epoch_ms: int) -> str:
    seconds, ms = divmod(epoch_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def _executor(node: Node, default: str) -> str:
    executor = node.sandbox_executor or default
    # NOVA's AI executors as a default still mean "code in E2B".
    return "e2b" if executor in ("cached", "ai") else executor


def _node_output(node: Node, result: NodeResult) -> dict[str, Any]:
    """What the node gives to merge: its protocol object's context_updates, else the context it left."""
    line = _last_output_line(result.stdout)
    if line is None or not line.startswith("{"):
        return dict(result.context)
    try:
        printed = json.loads(line)
    except ValueError:
        return dict(result.context)
    if not isinstance(printed, dict) or "context_updates" not in printed:
        return dict(result.context)
    if printed.get("status") == "error":
        raise NodeError(
            type="CodeExecutionError",
            message=f"Code execution error: {printed.get('message')}",
            reason="reported",
            stdout=result.stdout,
            stderr=result.stderr,
        )
    updates = printed["context_updates"]
    if not isinstance(updates, dict):
        raise NodeError(
            type="TypeError",
            message=f"node '{node.id}' printed context_updates as {type(updates).__name__}, not an object",
            reason="output",
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return updates


def _last_output_line(stdout: str) -> str | None:
    for raw in reversed(stdout.splitlines()):
        line = raw.strip()
        if line and line not in _EMPTY_JSON:
            return line
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
