"""How uvicorn serves the API: the HTTP implementation and its limits, shared by `nova api` and tests.

uvicorn's httptools protocol (the fast one, used in production) has no limit on the size of a request
head: llhttp parses without one, and uvicorn's only such option, h11_max_incomplete_event_size,
applies to h11 alone. A client could make the process buffer any amount of headers (32 MiB were
accepted). The protocol below counts the bytes received while a request head is incomplete and
answers 431 past the limit.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import error_body
from shared.settings import Settings
from shared.streams import dumps

# After refusing, how long the connection keeps reading (and discarding) before it closes: closing at
# once, with the client still sending, resets the connection and can destroy the 431 in flight.
LINGER_SECONDS = 2.0


# A write this large goes out at once (after what is pending): joining it to others would copy it.
COALESCE_MAX_BYTES = 64 * 1024


class CoalescedWrites:
    """A connection's transport whose writes made in one pass of the event loop go out as one.

    uvicorn writes a response's head and its body separately, and uvloop sends each at once: two system
    calls and two TCP segments per response, where one does. On the loopback the kernel also delivers
    each segment to the reader in the writer's system call, so at a few thousand requests a second
    the second write was several percent of the API's CPU (and a second read for the client). The
    writes are joined and sent at the end of the pass (call_soon), before anything else the loop runs
    for this connection; close() and write_eof() send what is pending first. Everything else is the
    transport's own.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if len(data) > COALESCE_MAX_BYTES:
            self.flush()
            self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeadLimitedHttpTools(HttpToolsProtocol):
    max_head_bytes = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0
        # The last bytes of a head read so far: its end (a blank line) may be split between two reads.
        self._tail = b""
        # Whether a request ended in the chunk being parsed (its bytes are then not all head), and whether
        # another began after it.
        self._ended = False
        self._begun = False
        # After the head: whether the read held body bytes (or the head's end), and the bytes of reads
        # since that held neither (a chunked body's trailer fields, which the parser buffers whole
        # before it hands them on); past the limit the connection is dropped and the rest discarded.
        self._read_accounted = False
        self._bodiless_bytes = 0
        self._discarding = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CoalescedWrites(transport, self.loop)))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._begun = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._read_accounted = True
        self._bodiless_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._read_accounted = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What comes next on the connection is the next request's head.
        self._ended = True
        self._begun = False
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""

    def data_received(self, data: bytes) -> None:
        if self._linger is not None or self._discarding:
            return  # refused: the rest is discarded, never parsed nor kept
        if self._in_head:
            # Before parsing, the head's part of this read: a head that ends in it was never counted after
            # parsing (complete by then), so a head of any size arriving in one read went through. Only
            # up to its end: a body after it is not head.
            joined = self._tail + data
            end = joined.find(b"\r\n\r\n")
            head_here = len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            if self._head_bytes + head_here > self.max_head_bytes:
                self._refuse()
                return
        self._ended = False
        self._read_accounted = False
        super().data_received(data)
        if self._ended and self._in_head:
            # A request ended in this read: the rest of it (if any) starts the next head, counted from
            # its next read on (a pipelined head's part in this read is not). Its blank line may still
            # be split: the read's last bytes are kept for the next one's check.
            self._tail = data[-3:] if self._begun else b""
            return
        if self.transport.is_closing():
            return
        if not self._in_head:
            self._count_trailer(data)
            return
        self._head_bytes += len(data)
        self._tail = (self._tail + data)[-3:]
        if self._head_bytes > self.max_head_bytes:
            self._refuse()

    def _count_trailer(self, data: bytes) -> None:
        """Bytes after the head that carry no body: trailer fields (or chunk framing). The head's limit
        covers them too: uvicorn adds trailer fields to the request's headers, and a 32 MiB one went
        through. The request is under way by then, so no 431 can be sent: the connection is closed."""
        if self._read_accounted:
            self._bodiless_bytes = 0
            return
        self._bodiless_bytes += len(data)
        if self._bodiless_bytes > self.max_head_bytes:
            self._discarding = True
            self.transport.close()

    def _refuse(self) -> None:
        message = f"request line and headers exceed the limit of {self.max_head_bytes} bytes"
        body = dumps(error_body("headers_too_large", message)).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def http_protocol(max_head_bytes: int) -> type[asyncio.Protocol]:
    # A subclass per limit: uvicorn instantiates the protocol class itself, once per connection.
    return type("HeadLimitedHttpTools", (HeadLimitedHttpTools,), {"max_head_bytes": max_head_bytes})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The protocol options for uvicorn.run / uvicorn.Config."""
    return {
        "http": http_protocol(settings.max_header_bytes),
        # Unused with the protocol above; keeps the same limit should h11 ever be chosen instead.
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
