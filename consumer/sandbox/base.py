"""The interface every sandbox implements, and the errors that tell a retry from a failure.

A sandbox runs one execution's node code outside the worker's interpreter. It is opened per
execution, reused across that execution's nodes and closed when the execution ends, whatever the
outcome. NOVA started a fresh sandbox for every node, so only the JSON context carried over; reuse is a
superset of that (the local sandbox also keeps imports and globals between an execution's nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class NodeResult:
    """What one node run gave back."""

    context: dict[str, Any]
    stdout: str = ""
    stderr: str = ""
    duration_ms: float = 0.0
    # The value of a decision expression: a bool or a string picks its branch; None for an action, or
    # when the expression gave None (the engine then reads the key the code may have set, as NOVA does).
    decision: bool | str | None = None


@dataclass
class NodeError(Exception):
    """The workflow's own code failed (raised, timed out, broke a limit). Never retried by the worker;
    only a node's own retry policy (shared/workflow.py RetryPolicy) may run that node again."""

    type: str
    message: str
    traceback: str = ""
    # Machine-readable cause: "exception", "timeout", "limit:memory", "output", "serialization", ...
    reason: str = "exception"
    stdout: str = ""
    stderr: str = ""
    # The error's class and its bases, qualified (from the runner; empty for errors a sandbox or the
    # engine makes): what a node's retry policy matches. Not part of the shown error.
    bases: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def as_json(self, node_id: str | None) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "type": self.type,
            "message": self.message,
            "traceback": self.traceback,
            "reason": self.reason,
        }


class SandboxInfraError(Exception):
    """The sandbox itself failed (could not start, died, E2B unreachable). Transient: retried."""


class SandboxBusy(SandboxInfraError):
    """No sandbox can be had now (a plan's limit, a cap shared by the workers): nothing failed. The
    worker hands the run back to wait `retry_after` seconds in the delayed set, spending no retry and
    holding no worker slot; it resumes from its checkpoint."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SandboxSpec:
    """What a sandbox is opened for."""

    execution_id: int
    client: str
    executor: str = "local"
    # Per-client secrets, visible only inside this execution's sandbox as environment variables.
    secrets: dict[str, str] = field(default_factory=dict)
    # Seconds the execution may run (the workflow's own timeout, else NOVA_EXECUTION_TIMEOUT); a cloud
    # sandbox is given this lifetime. None: the provider's default.
    timeout: float | None = None


# How long past a node's time limit the engine waits for a sandbox's answer (consumer/engine.py): the
# engine's bound on each node call is `timeout + CALL_MARGIN`. It is a backstop for a sandbox that failed
# to bound the call itself, and it can only call the node timed out. So a sandbox bounds its own waits
# (its service's silence: an infrastructure error, retried) inside this margin, where it can still tell
# them from the node's timeout: consumer/sandbox/e2b.py derives its budget from it.
CALL_MARGIN = 5.0
# (A sandbox may need more, in proportion to what its calls carry: it then has a `call_margin` of its own,
# which the engine uses instead; consumer/sandbox/e2b.py.)


class Sandbox(Protocol):
    """A node call (run_action, evaluate) with a time limit `timeout` ends within timeout + CALL_MARGIN."""

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        """Run action code with `context` bound to a dict; returns the context it left."""
        ...

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        """Evaluate a decision's expression against `context`; `decision` holds its value (a bool or a
        string, anything else as its truth), `context` what the expression left."""
        ...

    async def close(self) -> None: ...


class SandboxProvider(Protocol):
    """Hands out sandboxes of one kind (local, e2b); lives as long as the worker."""

    async def start(self) -> None:
        """Prepare before the first open (e.g. pre-start a pool); may do nothing."""
        ...

    async def open(self, spec: SandboxSpec) -> Sandbox: ...

    async def aclose(self) -> None: ...

    # Optional (the worker reads it with getattr, so providers without it still serve):
    # `def problem(self) -> str | None`, a lasting fault an operator must fix (a refused key, an
    # unknown template), which the worker reports to health and metrics; None while the provider is fine.


class UnavailableProvider:
    """Stands for an executor this worker cannot offer: every node that needs it fails at once, with
    `message`, instead of retrying an open that can never succeed."""

    def __init__(self, executor: str, message: str) -> None:
        self.executor = executor
        self.message = message

    async def start(self) -> None:
        return None

    async def open(self, spec: SandboxSpec) -> Sandbox:
        raise NodeError(type="ExecutorUnavailable", message=self.message, reason="executor_unavailable")

    async def aclose(self) -> None:
        return None


class AliasProvider:
    """Serves one executor with another's provider (NOVA_E2B_FALLBACK=local); that provider is started
    and closed under its own name, not again here."""

    def __init__(self, target: SandboxProvider) -> None:
        self.target = target

    async def start(self) -> None:
        return None

    async def open(self, spec: SandboxSpec) -> Sandbox:
        return await self.target.open(spec)

    async def aclose(self) -> None:
        return None
