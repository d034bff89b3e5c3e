"""Runs one workflow graph node by node, passing the JSON context along.

The engine knows nothing of Redis: the worker hands it hooks that record each step, and a
checkpoint to resume from when a run was interrupted. Node code runs only through sandboxes;
errors in the workflow's own code end the run as a failure (NodeError), while SandboxInfraError
escapes to the worker, which decides whether to retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from consumer.sandbox.base import NodeError, NodeResult, Sandbox, SandboxSpec
from shared.streams import now_iso
from shared.workflow import Definition, Node, NodeType

# A safety net for graphs whose cycles are bounded only per node: no run takes more steps.
MAX_STEPS = 10_000


@dataclass
class Checkpoint:
    """Where a run stands after a completed node: enough to resume it elsewhere."""

    step: int  # node runs completed so far
    next_node: str | None
    context: dict[str, Any]
    visits: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "next_node": self.next_node, "context": self.context, "visits": self.visits}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(
            step=int(data["step"]),
            next_node=data.get("next_node"),
            context=dict(data.get("context") or {}),
            visits={str(k): int(v) for k, v in (data.get("visits") or {}).items()},
        )


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
    decision: bool | None = None
    next_node: str | None = None
    error: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
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
            "next_node": self.next_node,
            "error": self.error,
        }


@dataclass
class Outcome:
    status: str  # "success" | "failure"
    final_context: dict[str, Any]
    nodes_executed: int
    error: dict[str, Any] | None = None


class Hooks(Protocol):
    async def node_started(self, step: int, node: Node, started_at: str, context: dict[str, Any]) -> None: ...

    async def node_finished(self, record: NodeRecord, checkpoint: Checkpoint) -> None: ...


OpenSandbox = Callable[[SandboxSpec], Awaitable[Sandbox]]


class _Sandboxes:
    """Opens at most one sandbox per executor for the run, lazily, and closes them all."""

    def __init__(self, open_sandbox: OpenSandbox, spec: SandboxSpec) -> None:
        self._open = open_sandbox
        self._spec = spec
        self._open_ones: dict[str, Sandbox] = {}

    async def get(self, executor: str) -> Sandbox:
        sandbox = self._open_ones.get(executor)
        if sandbox is None:
            spec = SandboxSpec(
                execution_id=self._spec.execution_id,
                client=self._spec.client,
                executor=executor,
                secrets=self._spec.secrets,
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


async def run_workflow(
    definition: Definition,
    context: dict[str, Any],
    *,
    open_sandbox: OpenSandbox,
    spec: SandboxSpec,
    hooks: Hooks,
    default_executor: str = "local",
    node_timeout: float = 120.0,
    execution_timeout: float = 600.0,
    resume: Checkpoint | None = None,
    extra_context: Callable[[int, Node], dict[str, Any]] | None = None,
) -> Outcome:
    """Run the graph from start (or from `resume`) to an end node or the first failure.

    `extra_context(step, node)` adds read-only keys to the context a node sees (such as its stable
    idempotency key); they are removed from what the node leaves behind.
    """
    deadline = time.monotonic() + (definition.timeout or execution_timeout)
    if resume is not None:
        step, current, ctx, visits = resume.step, resume.next_node, dict(resume.context), dict(resume.visits)
    else:
        step, current, ctx, visits = 0, definition.start.id, dict(context), {}
    sandboxes = _Sandboxes(open_sandbox, spec)
    try:
        while current is not None:
            node = definition.node(current)
            step += 1
            visits[node.id] = visits.get(node.id, 0) + 1
            if step > MAX_STEPS or (node.max_visits is not None and visits[node.id] > node.max_visits):
                limit = node.max_visits if node.max_visits is not None else MAX_STEPS
                error = NodeError(
                    type="LoopLimitExceeded",
                    message=f"node '{node.id}' entered more than {limit} times",
                    reason="max_visits",
                )
                return Outcome("failure", ctx, step - 1, error.as_json(node.id))
            started_at = now_iso()
            await hooks.node_started(step, node, started_at, ctx)
            t0 = time.perf_counter()
            decision: bool | None = None
            stdout = stderr = ""
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NodeError(
                        type="TimeoutError",
                        message=f"execution time limit reached before node '{node.id}'",
                        reason="timeout",
                    )
                result = await _run_node(
                    node,
                    ctx,
                    sandboxes,
                    default_executor,
                    node_timeout,
                    remaining,
                    extra_context(step, node) if extra_context else None,
                )
                ctx = result.context
                decision = result.decision
                stdout, stderr = result.stdout, result.stderr
            except NodeError as exc:
                duration = (time.perf_counter() - t0) * 1000
                error = exc.as_json(node.id)
                record = NodeRecord(
                    step=step,
                    node_id=node.id,
                    node_type=node.type.value,
                    status="failure",
                    started_at=started_at,
                    finished_at=now_iso(),
                    duration_ms=duration,
                    output_context=None,
                    stdout=exc.stdout,
                    stderr=exc.stderr,
                    error=error,
                )
                # The failed node is not a completed step: a retry of the execution starts at it, and
                # counts its visit again on entry. The failed visit is therefore taken out of the
                # checkpoint, or a node with max_visits 1 could never be retried.
                retry_visits = {**visits, node.id: visits[node.id] - 1}
                await hooks.node_finished(record, Checkpoint(step - 1, node.id, ctx, retry_visits))
                return Outcome("failure", ctx, step, error)
            nxt = definition.branch(node, decision) if node.type == NodeType.DECISION else definition.successor(node)
            duration = (time.perf_counter() - t0) * 1000
            record = NodeRecord(
                step=step,
                node_id=node.id,
                node_type=node.type.value,
                status="success",
                started_at=started_at,
                finished_at=now_iso(),
                duration_ms=duration,
                output_context=ctx,
                stdout=stdout,
                stderr=stderr,
                decision=decision,
                next_node=nxt,
            )
            await hooks.node_finished(record, Checkpoint(step, nxt, ctx, visits))
            current = nxt
        return Outcome("success", ctx, step)
    finally:
        await sandboxes.close()


async def _run_node(
    node: Node,
    ctx: dict[str, Any],
    sandboxes: _Sandboxes,
    default_executor: str,
    node_timeout: float,
    remaining: float,
    extra: dict[str, Any] | None,
) -> NodeResult:
    if node.type in (NodeType.START, NodeType.END):
        return NodeResult(context=ctx)
    timeout = min(node.timeout or node_timeout, remaining)
    sandbox = await sandboxes.get(node.executor or default_executor)
    given = {**ctx, **extra} if extra else ctx
    code = node.code or ""
    try:
        if node.type == NodeType.DECISION:
            result = await asyncio.wait_for(sandbox.evaluate(node.id, code, given, timeout), timeout + 5)
            result.context = ctx
            return result
        result = await asyncio.wait_for(sandbox.run_action(node.id, code, given, timeout), timeout + 5)
    except TimeoutError:
        # The sandbox enforces the limit itself; this only fires if it failed to.
        raise NodeError(
            type="TimeoutError", message=f"node '{node.id}' exceeded {timeout:g}s", reason="timeout"
        ) from None
    if extra:
        for key in extra:
            result.context.pop(key, None)
    return result
