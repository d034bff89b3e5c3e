"""One error shape for every failure: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import OutOfMemoryError, ReadOnlyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.catalog import CatalogUnavailable
from shared.connections import REDIS_UNAVAILABLE

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.details = details
        self.headers = headers


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def unavailable(what: str) -> ApiError:
    return ApiError(
        503,
        f"{what} is unavailable right now; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def raised_by_asyncpg(exc: BaseException) -> bool:
    """Whether `exc` was raised from asyncpg's code (a frame of its traceback is asyncpg's)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return any(str(frame.f_globals.get("__name__", "")).startswith("asyncpg") for frame in frames)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": _location(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        return JSONResponse(error_body("invalid", message, problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(
            error_body(_CODES.get(exc.status_code, "error"), message), exc.status_code, headers=exc.headers
        )

    def retry_shortly(message: str) -> JSONResponse:
        return JSONResponse(error_body("unavailable", message), 503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(CatalogUnavailable)
    async def catalog_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # A workflow only PostgreSQL knows while PostgreSQL is down: unknown for now, not missing.
        log.warning("catalog unavailable: %s", exc)
        return retry_shortly("PostgreSQL is unavailable right now; retry shortly")

    for error in REDIS_UNAVAILABLE:

        @app.exception_handler(error)
        async def redis_down(_: Request, exc: Exception) -> JSONResponse:
            # REDIS_UNAVAILABLE holds the built-in OSError and ConnectionError, which asyncpg raises too
            # (a refused connection): the server is named by where the error was raised.
            server = "PostgreSQL" if raised_by_asyncpg(exc) else "Redis"
            log.warning("%s unavailable: %s", server, exc)
            return retry_shortly(f"{server} is unavailable right now; retry shortly")

    # After the loop, which registers a handler for ReadOnlyError and OutOfMemoryError too (both are
    # REDIS_UNAVAILABLE): these, which say why, replace it.
    @app.exception_handler(OutOfMemoryError)
    async def redis_full(_: Request, exc: Exception) -> JSONResponse:
        # maxmemory reached under noeviction: nothing was written; retrying later is right.
        log.error("Redis is out of memory: %s", exc)
        return retry_shortly("Redis is out of memory; retry shortly")

    @app.exception_handler(ReadOnlyError)
    async def redis_read_only(_: Request, exc: Exception) -> JSONResponse:
        # The server this API reaches is a replica now (a failover under way, or the address points at
        # a demoted master): nothing was written; the same request goes through once writes are back.
        log.error("Redis refuses writes (read-only replica): %s", exc)
        return retry_shortly("Redis is read-only right now (a replica, or a failover under way); retry shortly")
