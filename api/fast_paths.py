"""The two hot routes, POST /workflows/{id}/execute and GET /tasks/{id}, answered without FastAPI's own
layers when their request is a plain one.

Measured in-process on the bench machine (the same Redis work, 16 requests at a time): through FastAPI
the execute route cost 0.47-0.63 ms of CPU per request, about half of it routing (the app's routers are
searched, then searched again inside the one that matched), dependency solving and validation; through
this path 0.29-0.34 ms. One API process's ceiling is that CPU on one core. GET /tasks/{id} is what
NOVA's clients poll while a run goes on: there FastAPI's layers were about half of the API's CPU per poll
(py-spy), and on a shared machine every poll's CPU is taken from the run it waits for.

This middleware sits innermost (inside the request id, body size and JSON guards, which apply as
before) and takes a request only when everything FastAPI would check is plainly fine: a Bearer key, no
cookie, no query string; for execute a JSON object body with no other keys than the route's, each of the
expected type and pattern, and an Idempotency-Key within its limit. It then calls the route's own
function (routes.workflows.execute, routes.tasks.get_task) and answers errors through the application's
exception handlers, as the route would. Anything else, including every request FastAPI would refuse,
goes on to FastAPI unchanged: its answers (422 and the rest) stay FastAPI's. The routes stay declared
there, for the OpenAPI schema.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import Resources, authenticate
from api.limits import is_json, read_body, replaying
from api.routes.tasks import get_task
from api.routes.workflows import IDEMPOTENCY_KEY_MAX, execute
from api.schemas import BIGINT_MAX, SLUG_PATTERN, ExecuteIn

_EXECUTE = re.compile(r"^/workflows/([1-9][0-9]{0,18})/execute$")
# One path segment, as FastAPI's `{task_id}` matches; get_task itself refuses an id no task can have.
_TASK = re.compile(r"^/tasks/([^/]+)$")
_SLUG = re.compile(SLUG_PATTERN)
# The body keys this path checks itself. Any other key, a field ExecuteIn has gained included (such as
# `priority`), makes the request not plain: FastAPI validates it, so a new field is never dropped here.
_FIELDS = frozenset({"client_slug", "initial_context"})


class FastPaths:
    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app = app
        # The application whose state (resources) and exception handlers the routes would use.
        self.fastapi = fastapi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["method"] == "POST" and (match := _EXECUTE.match(scope["path"])):
            await self._execute(scope, receive, send, int(match.group(1)))
        elif scope["method"] == "GET" and (match := _TASK.match(scope["path"])):
            await self._task(scope, receive, send, match.group(1))
        else:
            await self.app(scope, receive, send)

    async def _execute(self, scope: Scope, receive: Receive, send: Send, workflow_id: int) -> None:
        body = await read_body(receive)
        if body is None:
            return  # the client left before sending its body: nobody to answer
        plain = _plain(scope, body, workflow_id)
        res = self._resources()
        if plain is None or res is None:
            await self.app(scope, replaying(body, receive), send)
            return
        workflow_id, key, request, idempotency_key = plain

        async def answer() -> BaseModel:
            caller = await authenticate(res, key)
            return await execute(res, workflow_id, request, caller, idempotency_key)

        await self._answer(scope, receive, send, answer, 202)

    async def _task(self, scope: Scope, receive: Receive, send: Send, task_id: str) -> None:
        headers = _headers(scope)
        res = self._resources()
        if headers is None or res is None:
            await self.app(scope, receive, send)
            return
        key = headers[0]

        async def answer() -> BaseModel:
            return await get_task(task_id, res, await authenticate(res, key))

        await self._answer(scope, receive, send, answer, 200)

    def _resources(self) -> Resources | None:
        res: Resources = self.fastapi.state.resources
        # FastAPI's dependency also retries PostgreSQL when it was down at start: left to it.
        return None if res.pool is None else res

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, answer: Callable[[], Awaitable[BaseModel]], status: int
    ) -> None:
        try:
            out = await answer()
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            reply = handler(Request(scope), exc)
            response: Response = await reply if inspect.isawaitable(reply) else reply
        else:
            # by_alias, as FastAPI serializes a response model.
            response = Response(out.model_dump_json(by_alias=True), status, media_type="application/json")
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Any:
        # As Starlette's ExceptionMiddleware picks one: the handler of the nearest class in the
        # exception's MRO. Not Exception's: that one is the 500 path, left to RequestContext here.
        for cls in type(exc).__mro__:
            if cls in (Exception, BaseException):
                return None
            if cls in self.fastapi.exception_handlers:
                return self.fastapi.exception_handlers[cls]
        return None


def _headers(scope: Scope) -> tuple[str, str | None] | None:
    """The Bearer key and the Idempotency-Key of a request FastAPI would read as they are, else None:
    no query string (the routes take none; `access_token` is refused there), no cookie (the dashboard's
    session), one Authorization header of the Bearer scheme, at most one Content-Type and one
    Idempotency-Key."""
    if scope.get("query_string") or scope.get("root_path"):
        return None
    authorization: bytes | None = None
    idempotency_key: bytes | None = None
    content_types = 0
    for name, value in scope["headers"]:
        if name == b"content-type":
            # Two of them: FastAPI reads the first, is_json any; not plain.
            content_types += 1
            if content_types > 1:
                return None
        elif name == b"authorization":
            if authorization is not None:
                return None
            authorization = value
        elif name == b"idempotency-key":
            if idempotency_key is not None:
                return None
            idempotency_key = value
        elif name == b"cookie":
            return None
    if authorization is None or not authorization.startswith(b"Bearer "):
        return None
    try:
        key = authorization[7:].decode("latin-1").strip()
        idempotency = None if idempotency_key is None else idempotency_key.decode("latin-1")
    except UnicodeDecodeError:
        return None
    return (key, idempotency) if key else None


def _plain(scope: Scope, body: bytes, workflow_id: int) -> tuple[int, str, ExecuteIn, str | None] | None:
    """The execute request's parts when FastAPI would accept it as it is, else None."""
    if workflow_id > BIGINT_MAX or not is_json(scope) or (headers := _headers(scope)) is None:
        return None
    key, idempotency = headers
    try:
        # The standard library's parser, as FastAPI's: orjson reads an integer beyond 64 bits as a float,
        # which would then pass where the route refuses it.
        data = json.loads(body)
    except ValueError:
        return None
    if idempotency is not None and len(idempotency) > IDEMPOTENCY_KEY_MAX:
        return None
    if not isinstance(data, dict) or not _FIELDS.issuperset(data):
        return None
    client_slug = data.get("client_slug")
    initial_context = data.get("initial_context")
    # fullmatch: `$` alone would let a trailing newline through, which the route's validator refuses.
    if client_slug is not None and not (isinstance(client_slug, str) and _SLUG.fullmatch(client_slug)):
        return None
    if initial_context is not None and not isinstance(initial_context, dict):
        return None
    request = ExecuteIn.model_construct(client_slug=client_slug, initial_context=initial_context)
    return workflow_id, key, request, idempotency
