"""The interface every sandbox implements, and the errors that tell a retry from a failure.

A sandbox runs one execution's node code outside the worker's interpreter. It is opened per
execution, reused across that execution's nodes (so imports and globals persist between nodes, as
NOVA's users expect), and closed when the execution ends, whatever the outcome.
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
    # A decision's outcome; None for an action.
    decision: bool | None = None


@dataclass
class NodeError(Exception):
    """The workflow's own code failed (raised, timed out, broke a limit). Deterministic: not retried."""

    type: str
    message: str
    traceback: str = ""
    # Machine-readable cause: "exception", "timeout", "limit:memory", "output", "serialization", ...
    reason: str = "exception"
    stdout: str = ""
    stderr: str = ""

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


@dataclass
class SandboxSpec:
    """What a sandbox is opened for."""

    execution_id: int
    client: str
    executor: str = "local"
    # Per-client secrets, visible only inside this execution's sandbox as environment variables.
    secrets: dict[str, str] = field(default_factory=dict)


class Sandbox(Protocol):
    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        """Run action code with `context` bound to a dict; returns the context it left."""
        ...

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        """Evaluate a decision's boolean expression against `context`; `decision` holds the result."""
        ...

    async def close(self) -> None: ...


class SandboxProvider(Protocol):
    """Hands out sandboxes of one kind (local, e2b); lives as long as the worker."""

    async def start(self) -> None:
        """Prepare before the first open (e.g. pre-start a pool); may do nothing."""
        ...

    async def open(self, spec: SandboxSpec) -> Sandbox: ...

    async def aclose(self) -> None: ...
