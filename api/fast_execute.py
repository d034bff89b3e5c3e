"""POST /workflows/{id}/execute, the hot route, answered without FastAPI's own layers when its request
is a plain one.

Measured in-process on the bench machine (the same Redis work, 16 requests at a time): through FastAPI
the route cost 0.47-0.63 ms of CPU per request, about half of it routing (the app's routers are searched,
then searched again inside the one that matched), dependency solving and validation; through this path
0.29-0.34 ms. One API process's ceiling is that CPU on one core.

This middleware sits innermost (inside the request id, body size and JSON guards, which apply as
before) and takes a request only when everything FastAPI would check is plainly fine: a Bearer key, a
JSON object body with no other keys than the route's, each of the expected type and pattern, an
Idempotency-Key within its limit, no query string. It then calls the route's own function
(routes.workflows.execute) and answers errors through the application's exception handlers, as the
route would. Anything else, including every request FastAPI would refuse, goes on to FastAPI unchanged:
its answers (422 and the rest) stay FastAPI's. The route stays declared there, for the OpenAPI schema.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import authenticate
from api.limits import is_json, read_body, replaying
from api.routes.workflows import IDEMPOTENCY_KEY_MAX, execute
from api.schemas import BIGINT_MAX, SLUG_PATTERN, ExecuteIn

_PATH = re.compile(r"^/workflows/([1-9][0-9]{0,18})/execute$")
_SLUG = re.compile(SLUG_PATTERN)
# The body keys this path checks itself. Any other key, a field ExecuteIn has gained included (such as
# `priority`), makes the request not plain: FastAPI validates it, so a new field is never dropped here.
_FIELDS = frozenset({"client_slug", "initial_context"})


class ExecuteFastPath:
    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app = app
        # The application whose state (resources) and exception handlers the route would use.
        self.fastapi = fastapi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not (match := _PATH.match(scope["path"])):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left before sending its body: nobody to answer
        plain = _plain(scope, body, int(match.group(1)))
        if plain is None or self.fastapi.state.resources.pool is None:
            # FastAPI's dependency also retries PostgreSQL when it was down at start: left to it.
            await self.app(scope, replaying(body, receive), send)
            return
        workflow_id, key, request, idempotency_key = plain
        res = self.fastapi.state.resources
        try:
            caller = await authenticate(res, key)
            out = await execute(res, workflow_id, request, caller, idempotency_key)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            answer = handler(Request(scope), exc)
            response: Response = await answer if inspect.isawaitable(answer) else answer
        else:
            response = Response(out.model_dump_json(), 202, media_type="application/json")
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


def _plain(scope: Scope, body: bytes, workflow_id: int) -> tuple[int, str, ExecuteIn, str | None] | None:
    """The request's parts when FastAPI would accept it as it is, else None."""
    if workflow_id > BIGINT_MAX or scope.get("query_string") or scope.get("root_path") or not is_json(scope):
        return None
    authorization: bytes | None = None
    idempotency_key: bytes | None = None
    content_types = 0
    for name, value in scope["headers"]:
        if name == b"content-type":
            # Two of them: FastAPI reads the first, is_json the last; not plain.
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
        # The standard library's parser, as FastAPI's: orjson reads an integer beyond 64 bits as a float,
        # which would then pass where the route refuses it.
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not key or (idempotency is not None and len(idempotency) > IDEMPOTENCY_KEY_MAX):
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
