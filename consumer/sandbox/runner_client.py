"""The client side of consumer/sandbox/runner.py, shared by every sandbox that runs it: requests in,
NodeResults out.

A sandbox only has to deliver a request dict to the runner and bring back its response dict
(`_call`); turning responses into results or NodeErrors is the same wherever the runner runs.
"""

from __future__ import annotations

from typing import Any

from consumer.sandbox.base import NodeError, NodeResult


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or the NodeError it reports."""
    if reply.get("ok"):
        return reply
    error = reply.get("error") or {}
    raise NodeError(
        type=error.get("type", "Error"),
        message=error.get("message", ""),
        traceback=error.get("traceback", ""),
        reason=error.get("reason", "exception"),
        bases=tuple(b for b in error.get("bases") or () if isinstance(b, str)),
        stdout=reply.get("stdout", ""),
        stderr=reply.get("stderr", ""),
    )


class RunnerSandbox:
    async def _call(self, request: dict[str, Any], node_id: str, timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        request = {"op": "action", "node_id": node_id, "code": code, "context": context}
        reply = checked(await self._call(request, node_id, timeout))
        return NodeResult(
            context=reply["context"],
            stdout=reply.get("stdout", ""),
            stderr=reply.get("stderr", ""),
            duration_ms=reply.get("duration_ms", 0.0),
        )

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        request = {"op": "evaluate", "node_id": node_id, "code": expression, "context": context}
        reply = checked(await self._call(request, node_id, timeout))
        value = reply.get("value")
        return NodeResult(
            # What the expression left (a call may change the context; NOVA keeps a decision's changes).
            context=reply.get("context", context),
            stdout=reply.get("stdout", ""),
            stderr=reply.get("stderr", ""),
            duration_ms=reply.get("duration_ms", 0.0),
            decision=value if value is None or isinstance(value, bool | str) else bool(value),
        )
