"""The client side of consumer/sandbox/runner.py, shared by every sandbox that runs it: requests in,
NodeResults out.

A sandbox only has to deliver a request dict to the runner and bring back its response dict
(`_call`); turning responses into results or NodeErrors is the same wherever the runner runs, and so is
the worker's own check of a reply's size (max_reply_bytes, decode_reply): the runner lives in the node's
own interpreter, where node code can lift its caps or write a reply of its own.
"""

from __future__ import annotations

from typing import Any

import orjson

from consumer.sandbox.base import NodeError, NodeResult

# Room in a reply beyond its context and captured output: the JSON around them and a traceback.
_REPLY_SLACK = 1 << 20


def max_reply_bytes(max_context_bytes: int, max_output_bytes: int) -> int:
    """The largest reply a worker reads: a context, stdout and stderr, each capped by the runner, and room
    around them. A sandbox refuses a larger one before reading it (oversized_reply): node code controls it."""
    return max_context_bytes + 2 * max_output_bytes + _REPLY_SLACK


class BadReply(Exception):
    """A reply the worker refuses: too large, not JSON, or a context over its cap."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def error(self, node_id: str) -> NodeError:
        """The node's failure (its own doing: not retried or redelivered)."""
        return NodeError(type="BadReply", message=f"node '{node_id}' sent {self.args[0]}", reason=self.reason)


def oversized_reply(size: int, limit: int, *, at_least: bool = False) -> BadReply:
    """A reply over max_reply_bytes; `at_least`: `size` is what was read of it before it was refused."""
    size_text = f"at least {size}" if at_least else str(size)
    return BadReply(f"a reply of {size_text} bytes, over the limit of {limit}", "limit:output")


def decode_reply(payload: bytes, max_context_bytes: int) -> dict[str, Any]:
    """A reply (read whole, within max_reply_bytes) as a dict, its context within the cap; else BadReply."""
    try:
        reply = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadReply(f"a reply that is not JSON ({exc})", "output") from None
    if not isinstance(reply, dict):
        raise BadReply("a reply that is not a JSON object", "output")
    if len(payload) > max_context_bytes and "context" in reply:
        # Measured only when the reply could hold a context over the cap: the usual reply is small.
        context_size = len(orjson.dumps(reply["context"]))
        if context_size > max_context_bytes:
            raise BadReply(f"a context of {context_size} bytes, over the limit of {max_context_bytes}", "limit:context")
    return reply


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
            raise BadReply(problem, "output").error(node_id)
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
