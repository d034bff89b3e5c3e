"""A TCP proxy in front of Redis that breaks the network on command, for `nova chaos` and the tests.

Clients connect to the proxy (127.0.0.1, a free port) instead of Redis; every connection gets its
own connection to Redis and bytes are copied both ways unchanged. Three faults can be switched on at
run time, from the event loop the proxy runs in:

* `drop_replies(count, probability)`: a *lost reply*. The client's command reaches Redis and runs,
  but the next chunk Redis sends back is thrown away and the client's connection closed, so the
  client sees a connection error for a command that did happen. This is byte-level on purpose: one
  chunk is one reply for a single command and one or more replies for a pipeline, and either way
  the client learns nothing of the outcome, which is exactly the case a retry must survive.
* `sever()`: every connection closed at once, as a restarting load balancer or NAT would.
* `pause()` / `resume()`: a partition. Connections stay open but no byte moves either way (new
  connections are accepted and left waiting), so clients hang until their own timeouts fire; after
  `resume()` whatever was held is delivered.

The proxy knows nothing of RESP; it is deliberately dumb so that what it does is easy to reason about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One client connection and, once opened, its connection to Redis."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        # abort(), not close(): "now" means without flushing what is still buffered.
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port`, with faults switchable at run time.

    Control methods are plain (not async) and must be called from the proxy's own event loop.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
        credentials: str = "",
    ) -> None:
        self.target_host = target_host
        # "user:password" for `url`: the proxy forwards bytes, so clients log in to Redis through it.
        self.credentials = credentials
        self.target_port = target_port
        self.host = host
        self.port = port
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        # Set while bytes may flow; cleared by pause().
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._drop_count = 0
        self._drop_probability = 0.0
        # Bytes a second each direction may carry (None: as fast as they come).
        self._rate: float | None = None
        # Counters for reports and tests.
        self.accepted = 0
        self.replies_dropped = 0
        self.severed = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [link.task for link in self._links if link.task is not None]
        self.sever()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def url(self) -> str:
        """A Redis URL that goes through the proxy."""
        login = f"{self.credentials}@" if self.credentials else ""
        return f"redis://{login}{self.host}:{self.port}/0"

    @property
    def connections(self) -> int:
        return len(self._links)

    # ---- faults --------------------------------------------------------------------------------

    def drop_replies(self, count: int = 0, probability: float = 0.0) -> None:
        """Lose the next `count` replies, then each later one with `probability` (replaces earlier settings)."""
        if count < 0 or not 0.0 <= probability <= 1.0:
            raise ValueError("count must be >= 0 and probability within [0, 1]")
        self._drop_count = count
        self._drop_probability = probability

    def stop_dropping(self) -> None:
        self.drop_replies(0, 0.0)

    def sever(self) -> int:
        """Close every open connection now; returns how many. New connections are still accepted."""
        links = list(self._links)
        for link in links:
            link.abort()
            for pump in link.pumps:
                pump.cancel()
        self.severed += len(links)
        return len(links)

    def throttle(self, bytes_per_second: float | None) -> None:
        """Carry at most this many bytes a second each way (None: as fast as they come): a slow but
        healthy link. A rate that is not a positive number is refused (0 read as no throttle at all)."""
        if bytes_per_second is not None and not bytes_per_second > 0:
            raise ValueError(f"a throttle is a positive number of bytes a second, not {bytes_per_second!r}")
        self._rate = bytes_per_second

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def _lose_this_reply(self) -> bool:
        if self._drop_count > 0:
            self._drop_count -= 1
            return True
        return self._drop_probability > 0 and self._rng.random() < self._drop_probability

    # ---- forwarding ----------------------------------------------------------------------------

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        link = _Link(client_writer, task=asyncio.current_task())
        self._links.add(link)
        self.accepted += 1
        try:
            # A partitioned client may connect, but must not reach Redis until the partition heals.
            await self._flowing.wait()
            try:
                up_reader, link.upstream = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError as exc:
                # Redis is down: the client sees its connection closed, as it would without a proxy.
                log.debug("proxy: upstream %s:%s unreachable: %s", self.target_host, self.target_port, exc)
                return
            link.pumps = [
                asyncio.create_task(self._pump(client_reader, link.upstream, replies=False)),
                asyncio.create_task(self._pump(up_reader, client_writer, replies=True)),
            ]
            # Either side closing (or a lost reply) ends the whole link.
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            link.abort()
            self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                # Read, then hold: during a pause at most one chunk per direction waits here, and
                # TCP back-pressure stops the rest at the sender.
                await self._flowing.wait()
                if replies and self._lose_this_reply():
                    self.replies_dropped += 1
                    return
                writer.write(data)
                await writer.drain()
                if self._rate:
                    await asyncio.sleep(len(data) / self._rate)
