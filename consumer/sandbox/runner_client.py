"""The client side of consumer/sandbox/runner.py, shared by every sandbox that runs it: requests in,
NodeResults out.

A sandbox only has to deliver a request dict to the runner and bring back its response dict
(`_call`); turning responses into results or NodeErrors is the same wherever the runner runs.
"""

from __future__ import annotations

from typing import Any

from consumer.sandbox.base import NodeError, NodeResult


def reply_problem(reply: dict[str, Any]) -> str | None:
    """What makes a node's reply unusable, or None.

    The runner lives in node code's own interpreter: a node can write a frame of its own on the reply
    pipe, or change the runner. A reply of another shape than the runner's must fail that node here; let
    through, it raised in the worker (a missing context, an error that is not an object), which leaves the
    entry pending, so the node ran again on every redelivery.
    """
    if not isinstance(reply.get("ok"), bool):
        return "a reply without a boolean 'ok'"
    for key in ("stdout", "stderr"):
        if not isinstance(reply.get(key, ""), str):
            return f"a reply whose {key} is not a string"
    duration = reply.get("duration_ms", 0.0)
    if not isinstance(duration, int | float) or isinstance(duration, bool):
        # Stored as the node run's duration: text there was refused by PostgreSQL, and the row was lost.
        return "a reply whose duration_ms is not a number"
    if reply["ok"]:
        return None if isinstance(reply.get("context"), dict) else "a reply whose context is not an object"
    error = reply.get("error")
    if not isinstance(error, dict):
        return "a failure whose error is not an object"
    if not all(isinstance(error.get(key, ""), str) for key in ("type", "message", "traceback", "reason")):
        return "a failure whose error has a field that is not a string"
    if not isinstance(error.get("bases", []), list):
        return "a failure whose error's bases are not a list"
    return None


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply (of the runner's shape: reply_problem found nothing), or the NodeError it reports."""
    if reply["ok"]:
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

    async def _distrust(self) -> None:
        """Called when a reply was not of the runner's shape: node code wrote it, so the sandbox's
        protocol may be out of step (a sandbox that keeps a conversation closes itself here)."""

    async def _reply(self, request: dict[str, Any], node_id: str, timeout: float) -> dict[str, Any]:
        reply = await self._call(request, node_id, timeout)
        problem = reply_problem(reply)
        if problem is not None:
            # The node's own doing: a failure of that node, not of the sandbox service (not retried).
            await self._distrust()
            raise NodeError(type="BadReply", message=f"node '{node_id}' sent {problem}", reason="output")
        return checked(reply)

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        request = {"op": "action", "node_id": node_id, "code": code, "context": context}
        reply = await self._reply(request, node_id, timeout)
        return NodeResult(
            context=reply["context"],
            stdout=reply.get("stdout", ""),
            stderr=reply.get("stderr", ""),
            duration_ms=reply.get("duration_ms", 0.0),
        )

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        request = {"op": "evaluate", "node_id": node_id, "code": expression, "context": context}
        reply = await self._reply(request, node_id, timeout)
        value = reply.get("value")
        return NodeResult(
            # What the expression left (a call may change the context; NOVA keeps a decision's changes).
            context=reply.get("context", context),
            stdout=reply.get("stdout", ""),
            stderr=reply.get("stderr", ""),
            duration_ms=reply.get("duration_ms", 0.0),
            decision=value if value is None or isinstance(value, bool | str) else bool(value),
        )
