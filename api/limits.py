"""Request limits: body size, enforced while the body streams in (a lying Content-Length does not
help), and JSON bodies that are well-formed and not too deeply nested."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from shared.streams import dumps


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        message = f"request body exceeds the limit of {self.max_bytes} bytes"
        await _send_error(send, 413, error_body("payload_too_large", message))


async def _send_error(send: Send, status: int, error: dict[str, Any]) -> None:
    body = dumps(error).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class JsonBodyGuard:
    """JSON request bodies checked before FastAPI parses them, so that they fail as 422, never as 500.

    FastAPI parses with the standard library, which recurses once per nesting level (thousands of
    levels exhaust the stack) and accepts lone surrogates and NaN, which nothing downstream can encode
    (orjson, PostgreSQL's jsonb). orjson is strict and bounded (it stops at 1024 levels), so it checks
    the body first; a walk of the parsed value then applies our own, lower nesting limit. Sits inside
    BodySizeLimit, so the body it buffers is already bounded.
    """

    def __init__(self, app: ASGIApp, max_depth: int) -> None:
        self.app = app
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_json(scope):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before sending its body: nobody to answer
        problem = json_problem(body, self.max_depth) if body else None
        if problem is not None:
            await _send_error(send, 422, error_body("invalid", problem))
            return
        await self.app(scope, replaying(body, receive), send)


async def read_body(receive: Receive) -> bytes | None:
    """A request's whole body (bounded by BodySizeLimit outside), or None if the client left first."""
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app a body already read, then whatever comes next (a disconnect)."""
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse the body as JSON: application/json and application/*+json. With
    several Content-Type headers, whether any says so: FastAPI reads the first, and a check of only
    the last let a JSON body through unchecked (NaN became null)."""
    for name, value in scope.get("headers") or []:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json")):
                return True
    return False


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why `body` is not acceptable JSON, or None."""
    too_deep = f"request body is nested too deeply: arrays and objects beyond the limit of {max_depth} levels"
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            return too_deep
        return f"request body is not valid JSON: {exc}"
    return too_deep if _deeper_than(value, max_depth) else None


def _deeper_than(value: object, limit: int) -> bool:
    # Level by level, without recursion; stops as soon as the limit is passed.
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        children: list[object] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            children.extend(item for item in items if isinstance(item, dict | list))  # type: ignore[attr-defined]
        level = children
    return False


class StreamSlots:
    """Open event streams per API key, so that one key cannot hold the process's connections.

    Counted per API process, not across replicas: each replica allows the limit on its own. A shared
    count (in Redis) would outlive a crashed process's connections and need leases; per process is
    enough to keep one key from exhausting a process.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        held = self.open.get(key, 0)
        if held >= self.limit:
            return False
        self.open[key] = held + 1
        return True

    def release(self, key: str) -> None:
        held = self.open.get(key, 0) - 1
        if held > 0:
            self.open[key] = held
        else:
            self.open.pop(key, None)
