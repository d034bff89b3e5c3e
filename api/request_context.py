"""Per-request context: an X-Request-ID on every response and on every log record of the request, and a
500 in our error shape (with that id) for an unexpected error, instead of a bare text body.

The id is the caller's `X-Request-ID` when it sends a sensible one (NOVA's clients and proxies may),
else a new one. Log records carry it as `request_id` (None outside a request): `nova api` prints it.
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body
from shared.streams import dumps, random_id

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

HEADER = b"x-request-id"
# What a caller's id may be: echoed into a header and into logs, so nothing that could forge either.
_ACCEPTABLE = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,200}$")


def _install_log_record_factory() -> None:
    """Every log record gets `request_id`; installed once per process, wrapping whatever factory was set."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "adds_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    factory.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_install_log_record_factory()


class RequestIdLogFilter(logging.Filter):
    """For a handler whose format shows %(request_id)s: "-" outside a request, and for records made
    without the factory (logging.makeLogRecord)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or "-"
        return True


def _incoming(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == HEADER:
            return value.decode("ascii") if _ACCEPTABLE.match(value) else None
    return None


class RequestContext:
    """Outermost middleware: sets the request id for the request's task, adds it to the response, and
    turns an exception no handler took into a logged 500 that names the id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming(scope) or random_id()
        token = REQUEST_ID.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers") or [] if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                body = dumps(
                    error_body(
                        "internal",
                        f"unexpected error; the logs say more under request id {request_id}",
                        {"request_id": request_id},
                    )
                ).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
                await send_with_id({"type": "http.response.body", "body": body})
            # Once the response has started (an event stream) it can only be cut short, as it is now.
        finally:
            REQUEST_ID.reset(token)
