"""A small HTTP/1.1 keep-alive load generator and SSE listener, run as its own process.

The benchmarks need a client that costs less than the server it measures; a raw asyncio client with
persistent connections does, where a general-purpose HTTP client would be the bottleneck on 2 cores.

    python -m bench.loadgen post URL BODY_JSON CONCURRENCY SECONDS [HEADER ...]
    python -m bench.loadgen open URL BODY_JSON RATE SECONDS CONNECTIONS [HEADER ...]
    python -m bench.loadgen sse URL SUBSCRIBERS EXPECTED_EVENTS [HEADER ...]
    python -m bench.loadgen roundtrip BASE_URL EXECUTE_PATH BODY_JSON RUNS WARM [HEADER ...]
Each prints one JSON line (`sse` prints `{"ready": ...}` first, and after its result waits for a line
on stdin before it lets its connections go).

`post` is a closed loop: each connection sends its next request when the previous one is answered,
so a slow server slows the arrivals down and its slow answers are under-sampled (coordinated
omission). `open` is an open loop: requests arrive at fixed intended times, RATE per second,
whatever the server does; each goes out on an idle keep-alive connection of the pool, or waits for
one, and its latency counts from its intended time, so waiting in the client counts too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import resource
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from typing import Any, cast
from urllib.parse import urlsplit


def _request(
    method: str, path: str, host: str, headers: list[str], body: bytes = b"", connection: str = "keep-alive"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Connection: {connection}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    return (await _read_answer(reader))[0]


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A response's status and body (of a Content-Length; the routes measured answer so)."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length) if length else b""


async def post(url: str, body: str, concurrency: int, seconds: float, headers: list[str]) -> dict[str, object]:
    parts = urlsplit(url)
    request = _request("POST", parts.path, parts.netloc, headers, body.encode())
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
        "statuses": statuses,
    }


END_STATUSES = frozenset({"SUCCESS", "FAILURE", "DEAD", "REVOKED"})


async def round_trips(
    base: str, execute: str, body: str, runs: int, warm: int, headers: list[str]
) -> dict[str, object]:
    """Idle round trips, one at a time: POST `execute`, then learn the task's end, alternately by polling
    GET /tasks/{id} every millisecond (as NOVA's clients poll, only faster) and by following
    GET /tasks/{id}/events, which closes after the end event. Each run waits 50 ms first (the worker's
    warm pool refills; nothing else runs) and the first `warm` runs warm caches and count for nothing."""
    parts = urlsplit(base)
    host, port = parts.hostname, parts.port
    post_request = _request("POST", execute, parts.netloc, headers, body.encode())
    reader, writer = await asyncio.open_connection(host, port)
    polled: list[float] = []
    followed: list[float] = []
    requests = 0
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(runs + warm):
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        writer.write(post_request)
        status, answer = await _read_answer(reader)
        if status != 202:
            raise RuntimeError(f"execute answered {status}: {answer[:200]!r}")
        task_id = json.loads(answer)["task_id"]
        requests += 1
        if i % 2 == 0:
            poll = _request("GET", f"/tasks/{task_id}", parts.netloc, headers)
            while True:
                writer.write(poll)
                _, answer = await _read_answer(reader)
                requests += 1
                if json.loads(answer)["status"] in END_STATUSES:
                    break
                await asyncio.sleep(0.001)
        else:
            events_reader, events_writer = await asyncio.open_connection(host, port)
            events_writer.write(_request("GET", f"/tasks/{task_id}/events", parts.netloc, headers, connection="close"))
            while await events_reader.read(65536):
                pass  # the server closes the stream after the task's end event
            events_writer.close()
            requests += 1
        if i >= warm:
            (polled if i % 2 == 0 else followed).append((time.perf_counter() - t0) * 1000)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    writer.close()
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "polled_ms": polled,
        "followed_ms": followed,
        "requests": requests,
        "cpu_ms_per_request": cpu * 1000 / requests,
    }


# Linux's SO_TIMESTAMPNS (asm-generic, x86-64 and arm64 alike; Python's socket module does not name it):
# each read then carries the time the kernel received its data, as a struct timespec.
SO_TIMESTAMPNS = 35
_TIMESTAMP_SPACE = socket.CMSG_SPACE(16)


class _Subscriber:
    """One SSE connection, parsed only as far as latency needs: each event's `id:` line.

    The id is the event's results-stream entry id, `<ms>-<seq>`, whose first part is the time Redis
    wrote the entry (its clock, in whole milliseconds). Two receipt times are kept per event: when the
    kernel received its bytes on this socket (SO_TIMESTAMPNS: the listener's own scheduling and
    queueing are no part of it) and when this process read them. No JSON is parsed: the listener must
    cost far less than the server it measures.
    """

    def __init__(self, state: _Listener, sock: socket.socket) -> None:
        self.state = state
        self.sock = sock
        self.buffer = b""
        self.head = True
        self.got = 0
        self.left = False

    def readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, _TIMESTAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.closed(str(exc))
            return
        read_ms = time.time() * 1000
        if not data:
            self.closed("closed by the server")
            return
        arrived_ms = read_ms
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = struct.unpack("qq", value[:16])
                arrived_ms = seconds * 1000 + nanoseconds / 1e6
        self.received(data, arrived_ms, read_ms)

    def received(self, data: bytes, arrived_ms: float, read_ms: float) -> None:
        buffer = self.buffer + data
        if self.head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = int(buffer.split(b" ", 2)[1])
            if status != 200:
                self.state.failed(self, f"status {status}")
                return
            self.head = False
            self.state.subscribed()
            # Keep the CRLF that ends the head: every `id:` line then follows a CRLF, the first one too.
            buffer = buffer[end + 2 :]
        # Every `id:` line starts after a CRLF (the previous line's or a chunk-size line's) and is whole
        # once its own CRLF has arrived; a line cut by the segment's end waits for the next segment.
        pos = 0
        while (at := buffer.find(b"\nid: ", pos)) >= 0:
            line_end = buffer.find(b"\r", at + 5)
            if line_end < 0:
                pos = at
                break
            written_ms = int(buffer[at + 5 : buffer.index(b"-", at + 5, line_end)])
            self.state.arrived.append(arrived_ms - written_ms)
            self.state.read.append(read_ms - written_ms)
            pos = line_end
            self.got += 1
        else:
            pos = max(pos, buffer.rfind(b"\n"))
        self.buffer = buffer[pos:]
        if self.got >= self.state.expected:
            # Kept open until the run ends: closing now would add the server's clean-up to its fan-out.
            self.state.leave(self)

    def closed(self, why: str) -> None:
        if self.got < self.state.expected:
            self.state.failed(self, f"{why} after {self.got} events")
        else:
            self.stop()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


class _Listener:
    def __init__(self, request: bytes, subscribers: int, expected: int) -> None:
        self.request = request
        self.subscribers = subscribers
        self.expected = expected
        # Write-to-receipt latencies (ms): by the kernel's receive time, and by this process's read.
        self.arrived: list[float] = []
        self.read: list[float] = []
        self.ready = 0
        self.open = subscribers
        self.errors: list[str] = []
        self.all_ready = asyncio.Event()
        self.done = asyncio.Event()
        self.connections: list[_Subscriber] = []

    def subscribed(self) -> None:
        self.ready += 1
        if self.ready == self.subscribers:
            self.all_ready.set()

    def failed(self, sub: _Subscriber, why: str) -> None:
        if sub.left:
            return
        self.errors.append(why)
        if sub.head:
            # It never subscribed: do not wait for it to.
            self.subscribed()
        self.leave(sub)
        sub.stop()

    def leave(self, sub: _Subscriber) -> None:
        if sub.left:
            return
        sub.left = True
        self.open -= 1
        if self.open == 0:
            self.done.set()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def sse(url: str, subscribers: int, expected: int, headers: list[str]) -> dict[str, object]:
    """Holds `subscribers` SSE connections until each has had `expected` events; prints `{"ready": n}`
    once all are subscribed, and at the end the delivery latencies (ms, write to receipt: to the
    kernel's receipt on the socket, and to this process's read) with this process's CPU over the
    fan-out window (from ready to the last event)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = _request("GET", path, parts.netloc, [*headers, "Accept: text/event-stream"])
    state = _Listener(request, subscribers, expected)
    loop = asyncio.get_running_loop()
    for _ in range(subscribers):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
        await loop.sock_sendall(sock, request)
        sub = _Subscriber(state, sock)
        loop.add_reader(sock.fileno(), sub.readable)
        state.connections.append(sub)
    await asyncio.wait_for(state.all_ready.wait(), 60)
    print(json.dumps({"ready": state.ready, "errors": state.errors[:5]}), flush=True)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    try:
        await asyncio.wait_for(state.done.wait(), 120)
    except TimeoutError:
        state.errors.append("timed out")
    cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    arrived, read = sorted(state.arrived), sorted(state.read)
    n = len(arrived)
    return {
        "loop": type(loop).__module__.split(".")[0],
        "subscribers": subscribers,
        "received": n,
        "errors": state.errors[:5],
        "p50_ms": percentile(arrived, 0.50),
        "p99_ms": percentile(arrived, 0.99),
        "max_ms": arrived[-1] if n else None,
        "read_p99_ms": percentile(read, 0.99),
        # This process's CPU over the window and its share of it: well below 1, it was not what delayed events.
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 4),
        "utilisation": round(cpu / wall, 4) if wall > 0 else None,
        "cpu_us_per_event": round(cpu * 1e6 / n, 2) if n else None,
        # For merging with the other listener processes' percentiles: how many latencies fell in each
        # tenth of a millisecond (the write time is whole milliseconds: finer would be false precision).
        "arrived_hist": _histogram(arrived),
        "read_hist": _histogram(read),
    }


def percentile(ordered: list[float], q: float, scale: float = 1.0) -> float | None:
    """The `q` quantile of sorted samples (the sample at rank len * q), times `scale`; None for none."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * scale if ordered else None


def _histogram(values: list[float]) -> dict[str, int]:
    return dict(collections.Counter(f"{v:.1f}" for v in values))


def merged_percentile(histograms: list[dict[str, int]], q: float) -> float:
    """The q-quantile (as _percentile_ms picks it) of the latencies behind several `_histogram`s."""
    counts: collections.Counter[float] = collections.Counter()
    for histogram in histograms:
        for value, count in histogram.items():
            counts[float(value)] += count
    rank = int(sum(counts.values()) * q)
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen > rank:
            return value
    return max(counts)


class _OpenLoop:
    """The open loop's state, driven by callbacks rather than a coroutine per request: at thousands of
    requests a second the generator must stay cheaper than the server it measures."""

    def __init__(self, request: bytes, rate: float, seconds: float) -> None:
        self.request = request
        self.interval = 1.0 / rate
        self.total = int(rate * seconds)
        # Idle connections, the longest idle first: one left idle past the server's keep-alive timeout
        # (uvicorn's 5 s) is closed by the server, and a request sent as the close crosses it is lost (an
        # error here, never a request the API took). Used in turn, none idles that long at these rates,
        # as in a client pool that drops connections before the server's timeout.
        self.idle: collections.deque[_Connection] = collections.deque()
        # Intended times of the requests that found every connection busy, oldest first.
        self.backlog: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.send_lag: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.late = 0
        self.scheduled = 0
        self.outstanding = 0
        self.done = asyncio.Event()
        self.t0 = 0.0
        self.last_answer = 0.0

    def tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Release every request whose intended time has come, then sleep until the next one's."""
        now = time.perf_counter()
        while self.scheduled < self.total:
            intended = self.t0 + self.scheduled * self.interval
            if intended > now:
                # Only the difference crosses between the two clocks, rounded up to whole milliseconds:
                # uvloop rounds a delay to milliseconds and runs one under half of one at once, so at
                # 3,000 req/s (0.33 ms apart) the generator spun through empty ticks, most of its CPU.
                # A request so goes out up to a millisecond after its time, which its latency includes
                # (send_lag). A timer that fires early (uvloop's clock is cached per iteration) finds
                # nothing due and sets another.
                loop.call_later(math.ceil((intended - now) * 1000) / 1000, self.tick, loop)
                return
            self.scheduled += 1
            self.outstanding += 1
            if self.idle:
                self.idle.popleft().send(intended, now)
            else:
                self.late += 1
                self.backlog.append(intended)
        self._maybe_done()

    def answered(self, connection: _Connection, intended: float, status: int | None) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        if status is None:
            self.errors += 1
        else:
            self.latencies.append(now - intended)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.last_answer = now
        if self.backlog and connection.usable:
            connection.send(self.backlog.popleft(), now)
        elif connection.usable:
            self.idle.append(connection)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.scheduled >= self.total and self.outstanding == 0:
            self.done.set()


def _content_length(head: bytes) -> int:
    # The head's end (the blank line) is not in `head`: its last header line has no CRLF after it.
    head = head.lower() + b"\r\n"
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    return int(head[at + 17 : head.index(b"\r\n", at + 2)])


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time, its response parsed from
    Content-Length (the API never answers in chunks)."""

    def __init__(self, state: _OpenLoop) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.intended: float | None = None
        self.usable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, intended: float, now: float) -> None:
        assert self.transport is not None
        self.intended = intended
        self.state.send_lag.append(now - intended)
        self.transport.write(self.state.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.intended is not None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            end = head_end + 4 + _content_length(self.buffer[:head_end])
            if len(self.buffer) < end:
                return
            status = int(self.buffer.split(b" ", 2)[1])
            self.buffer = self.buffer[end:]
            intended, self.intended = self.intended, None
            self.state.answered(self, intended, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self.intended is not None:
            intended, self.intended = self.intended, None
            self.state.answered(self, intended, None)


async def open_loop(
    url: str, body: str, rate: float, seconds: float, connections: int, headers: list[str]
) -> dict[str, object]:
    parts = urlsplit(url)
    state = _OpenLoop(_request("POST", parts.path, parts.netloc, headers, body.encode()), rate, seconds)
    loop = asyncio.get_running_loop()
    for _ in range(connections):
        _, protocol = await loop.create_connection(lambda: _Connection(state), parts.hostname, parts.port)
        state.idle.append(protocol)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    state.t0 = time.perf_counter()
    state.tick(loop)
    # Arrivals stop after `seconds`; what is still in flight may take a while longer, not for ever.
    try:
        await asyncio.wait_for(state.done.wait(), seconds + 15)
    except TimeoutError:
        state.errors += state.outstanding
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    latencies = sorted(state.latencies)
    send_lag = sorted(state.send_lag)
    n = len(latencies)
    elapsed = (state.last_answer or time.perf_counter()) - state.t0
    return {
        "loop": type(loop).__module__.split(".")[0],
        "intended_rps": rate,
        "requests": n,
        "rps": n / elapsed if elapsed > 0 else None,
        "p50_ms": percentile(latencies, 0.50, 1000),
        "p90_ms": percentile(latencies, 0.90, 1000),
        "p99_ms": percentile(latencies, 0.99, 1000),
        "p999_ms": percentile(latencies, 0.999, 1000),
        "max_ms": latencies[-1] * 1000 if n else None,
        "statuses": state.statuses,
        "errors": state.errors,
        # Requests that found every connection busy at their intended time and waited for one.
        "late": state.late,
        # How long after its intended time each request went out (the generator's timer slack included).
        "send_lag_p99_ms": percentile(send_lag, 0.99, 1000),
        "send_lag_max_ms": send_lag[-1] * 1000 if send_lag else None,
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_request": cpu * 1000 / n if n else None,
    }


def _uvloop_run(run: Coroutine[Any, Any, dict[str, object]]) -> dict[str, object]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run)
    # uvloop's loop costs less CPU per request than asyncio's: the generator stays cheaper than the server.
    return uvloop.run(run)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "post":
        url, body, concurrency, seconds, *headers = args
        result = asyncio.run(post(url, body, int(concurrency), float(seconds), headers))
    elif mode == "open":
        url, body, rate, seconds, connections, *headers = args
        result = _uvloop_run(open_loop(url, body, float(rate), float(seconds), int(connections), headers))
    elif mode == "roundtrip":
        base, execute, body, runs, warm, *headers = args
        result = _uvloop_run(round_trips(base, execute, body, int(runs), int(warm), headers))
    else:
        url, subscribers, expected, *headers = args
        result = _uvloop_run(sse(url, int(subscribers), int(expected), headers))
        print(json.dumps(result), flush=True)
        # The connections stay open until the caller has read the server's CPU: their closing is no
        # part of the fan-out it measures.
        sys.stdin.readline()
        return
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
