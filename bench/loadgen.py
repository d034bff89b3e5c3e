"""A small HTTP/1.1 keep-alive load generator and SSE listener, run as its own process.

The benchmarks need a client that costs less than the server it measures; a raw asyncio client with
persistent connections does, where a general-purpose HTTP client would be the bottleneck on 2 cores.

    python -m bench.loadgen post URL BODY_JSON CONCURRENCY SECONDS [HEADER ...]
    python -m bench.loadgen sse URL SUBSCRIBERS EXPECTED_EVENTS [HEADER ...]
Each prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


def _request(method: str, path: str, host: str, headers: list[str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
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
    if length:
        await reader.readexactly(length)
    return status


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


async def sse(url: str, subscribers: int, expected: int, headers: list[str]) -> dict[str, object]:
    """Each subscriber reads events whose data carries `sent_at` (epoch seconds); reports delivery latency."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = _request("GET", path, parts.netloc, [*headers, "Accept: text/event-stream"])
    latencies: list[float] = []
    ready = 0
    all_ready = asyncio.Event()

    async def subscriber() -> None:
        nonlocal ready
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
        writer.write(request)
        await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        ready += 1
        if ready == subscribers:
            all_ready.set()
        got = 0
        while got < expected:
            line = await reader.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                sent = json.loads(line[5:])["data"].get("sent_at")
                if sent is not None:
                    latencies.append(time.time() - sent)
                    got += 1
        writer.close()

    tasks = [asyncio.create_task(subscriber()) for _ in range(subscribers)]
    await all_ready.wait()
    print(json.dumps({"ready": subscribers}), flush=True)
    await asyncio.gather(*tasks)
    latencies.sort()
    n = len(latencies)
    return {
        "received": n,
        "p50_ms": latencies[n // 2] * 1000 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
        "max_ms": latencies[-1] * 1000 if n else None,
    }


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "post":
        url, body, concurrency, seconds, *headers = args
        result = asyncio.run(post(url, body, int(concurrency), float(seconds), headers))
    else:
        url, subscribers, expected, *headers = args
        result = asyncio.run(sse(url, int(subscribers), int(expected), headers))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
