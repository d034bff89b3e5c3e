"""Delivery promises of the API under hostile input: bounded SSE replay and connections, 4xx (never a
5xx) for pathological bodies and ids, a header size limit, and the query-string token only on SSE."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from redis.asyncio import Redis

from api.app import create_app
from api.event_hub import EventHub
from api.event_streams import feed_filter, feed_stream, task_event_stream
from api.server import COALESCE_MAX_BYTES, CoalescedWrites, uvicorn_options
from cli.embedded import free_port
from shared.events import event_fields
from shared.settings import Settings
from shared.streams import EventType, Keys, Layout
from tests.support import ADMIN_KEY, linear, make_settings
from tests.test_api import add_clients, assert_error, create
from tests.test_live_api import _client_key, read_sse


def nested(depth: int) -> str:
    """A JSON value `depth` objects deep: {"a":{"a":...{}...}}."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


async def execute_raw(api: httpx.AsyncClient, workflow_id: int, context_json: str) -> httpx.Response:
    body = '{"client_slug":"acme","initial_context":' + context_json + "}"
    return await api.post(
        f"/workflows/{workflow_id}/execute", content=body.encode(), headers={"Content-Type": "application/json"}
    )


async def test_deeply_nested_context_is_refused_with_422(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    for depth in (300, 5000):
        error = assert_error(await execute_raw(api, wf, nested(depth)), 422, "nest", "limit of 64")
        assert error["code"] == "invalid"
    # Within the limit (the body's own object is one level): accepted.
    assert (await execute_raw(api, wf, nested(63))).status_code == 202


async def test_lone_surrogate_in_context_is_refused_with_422(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    for text in ('{"k":"\\ud800"}', '{"\\udfff":1}'):
        error = assert_error(await execute_raw(api, wf, text), 422, "not valid JSON")
        assert error["code"] == "invalid"
    # A proper surrogate pair is a character like any other.
    assert (await execute_raw(api, wf, '{"k":"\\ud83d\\ude00"}')).status_code == 202


async def test_a_second_content_type_does_not_let_a_body_past_the_json_checks(api: httpx.AsyncClient) -> None:
    """FastAPI parses by the first Content-Type header; the checks looked at the last: with a second
    header saying text, a NaN was stored as null and a deeply nested body was a bare 400."""
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    for context, fragment in (('{"amount":NaN}', "not valid JSON"), (nested(5000), "limit of 64")):
        response = await api.post(
            f"/workflows/{wf}/execute",
            content=('{"client_slug":"acme","initial_context":' + context + "}").encode(),
            headers=[("Content-Type", "application/json"), ("Content-Type", "text/plain")],
        )
        assert_error(response, 422, fragment)


async def test_integer_beyond_64_bits_in_context_is_refused_with_422(api: httpx.AsyncClient) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    error = assert_error(await execute_raw(api, wf, '{"n":' + str(2**64) + "}"), 422, "initial_context", "64-bit")
    assert error["code"] == "invalid"


async def test_text_postgresql_cannot_hold_is_refused_in_execution_filters(api: httpx.AsyncClient) -> None:
    for params in ({"status": "succ\x00ess"}, {"client_slug": "ac\x00me"}):
        assert_error(await api.get("/executions", params=params), 422)
    assert (await api.get("/executions", params={"status": "success", "client_slug": "acme"})).status_code == 200


async def test_task_ids_outside_the_issued_format_are_not_found(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    wf = await create(api, linear("pass"))
    await add_clients(api, "acme")
    task_id = (await api.post(f"/workflows/{wf}/execute", json={"client_slug": "acme"})).json()["task_id"]
    keys = Keys.from_settings(settings)
    # The task's event list lives at "<task key>:events": an id ending in ":events" must never reach Redis.
    assert await redis.type(keys.task_events(task_id)) == "list"
    for path in (f"/tasks/{task_id}:events", f"/tasks/{task_id}:events/events"):
        assert_error(await api.get(path), 404, "not found")
    assert (await api.get(f"/tasks/{task_id}")).status_code == 200


async def test_access_token_query_is_refused_off_the_sse_routes(anonymous: httpx.AsyncClient) -> None:
    token = {"access_token": ADMIN_KEY}
    for path in ("/workflows", "/executions", "/tasks/" + "0" * 32):
        error = assert_error(await anonymous.get(path, params=token), 401, "Authorization")
        assert error["code"] == "unauthorized"
    # On the SSE routes the token still authenticates (an unknown task: 404, not 401).
    assert_error(await anonymous.get("/tasks/" + "0" * 32 + "/events", params=token), 404, "not found")


@contextlib.asynccontextmanager
async def serving(settings: Settings, **options: Any) -> AsyncIterator[str]:
    """The API under uvicorn on a free port, as in test_live_api."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def results_entry(client: str, task_id: str, padding: int = 0) -> dict[str, str]:
    data: dict[str, Any] = {"workflow_name": "wf", "enqueued_at": "t", "initial_context": {"pad": "x" * padding}}
    return event_fields(EventType.QUEUED, task_id=task_id, execution_id=1, workflow_id=1, client=client, data=data)


async def add_entries(redis: Redis, settings: Settings, entries: list[dict[str, str]]) -> list[str]:
    pipe = redis.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(settings.results_stream, fields)  # type: ignore[arg-type]
    return [str(i) for i in await pipe.execute()]


async def test_feed_resume_holds_one_page_of_other_clients_events_and_stops_at_the_byte_bound(
    redis: Redis, settings: Settings
) -> None:
    # 12 MiB of another client's events after one of ours: a resume from the start must neither load
    # them all at once nor stream on past the byte bound (4 MiB by default).
    [ours] = await add_entries(redis, settings, [results_entry("acme", "mine")])
    theirs = await add_entries(redis, settings, [results_entry("globex", f"t{i}", 8192) for i in range(1500)])
    hub = EventHub(redis, Keys.from_settings(settings), block_ms=100)
    await hub.start()
    feed = feed_stream(redis, Keys.from_settings(settings), hub, feed_filter(None, "acme"), "1-0")
    tracemalloc.start()
    try:
        first = await asyncio.wait_for(anext(feed), 10)
        assert tracemalloc.get_traced_memory()[1] < 3 << 20, "the first event came with the whole backlog"
        notice = await asyncio.wait_for(anext(feed), 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert first.id == ours
        assert peak < 3 << 20, f"replay peaked at {peak} bytes"
        assert notice.event == "replay_truncated" and notice.id is None
        stopped = orjson.loads(notice.data)
        assert stopped["reason"] == "bytes" and stopped["stopped_after"] in theirs
        assert 4 << 20 <= stopped["scanned_bytes"] < (4 << 20) + 16384
        # Then live: a new event of ours arrives.
        [live] = await add_entries(redis, settings, [results_entry("acme", "later")])
        assert (await asyncio.wait_for(anext(feed), 10)).id == live
    finally:
        await feed.aclose()
        await hub.stop()


async def test_feed_resume_stops_at_the_entry_bound_and_says_where(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    acme = await _client_key(redis, pool, settings, "acme")
    entries = [results_entry("acme" if i in (10, 150) else "globex", f"t{i}") for i in range(200)]
    ids = await add_entries(redis, settings, entries)
    bounded = settings.model_copy(update={"sse_replay_max_entries": 50})
    async with serving(bounded) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        headers = {**acme, "Last-Event-ID": "1-0"}
        async with http.stream("GET", "/events", headers=headers) as response:
            assert response.status_code == 200
            replayed = await read_sse(response, limit=2)
    assert replayed[0]["id"] == ids[10]
    assert replayed[1]["event"] == "replay_truncated"
    stopped = orjson.loads(replayed[1]["data"])
    assert stopped["reason"] == "entries" and stopped["stopped_after"] == ids[49] and stopped["scanned_entries"] == 50


async def test_a_last_event_id_that_is_no_position_is_ignored(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Ids past 64 bits, or the greatest id, made Redis refuse the resume's range: the feed's connection
    was cut after its 200, and a browser reconnected with the same id for ever. Such an id (as one that
    is no id at all) is taken as none: the feed starts live, replaying nothing. A task's stream with an
    id ahead of all its events sent only pings, and stayed open after the task ended."""
    acme = await _client_key(redis, pool, settings, "acme")
    [first] = await add_entries(redis, settings, [results_entry("acme", "t1")])
    ahead = ("99999999999999999999-0", "1-99999999999999999999999", "18446744073709551615-18446744073709551615", "x")
    async with serving(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        for last_event_id in ahead:
            async with http.stream("GET", "/events", headers={**acme, "Last-Event-ID": last_event_id}) as response:
                assert response.status_code == 200
                reading = asyncio.create_task(read_sse(response, limit=1))
                for _ in range(300):  # live events until one arrives (the feed subscribes after its 200)
                    await add_entries(redis, settings, [results_entry("acme", "live")])
                    done, _ = await asyncio.wait({reading}, timeout=0.1)
                    if done:
                        break
                [received] = await reading
            assert received["id"] != first, last_event_id
    hub = EventHub(redis, Keys.from_settings(settings))
    await hub.start()
    try:
        stream = task_event_stream(redis, Keys.from_settings(settings), hub, "t2", "9999999999999-0")
        waiting = asyncio.create_task(anext(stream, None))
        for _ in range(1000):  # until subscribed: what comes then reaches it live
            if hub.subscribers:
                break
            await asyncio.sleep(0.01)
        done = event_fields(EventType.SUCCEEDED, task_id="t2", execution_id=2, workflow_id=1, client="acme", data={})
        await add_entries(redis, settings, [done])
        assert await asyncio.wait_for(waiting, 10) is None
    finally:
        await hub.stop()


async def test_a_sharded_feed_started_live_sends_ids_a_reconnect_resumes_from(
    redis: Redis, redis_url: str, db_url: str
) -> None:
    """A feed's id names its position in every shard. Started live, it named (0, 0) for a shard it had
    no event of yet, and a reconnect with that id replayed the shard's whole history."""
    layout = Layout.from_settings(make_settings(redis_url, db_url, shards=2))
    first_shard, second_shard = layout.shards
    for i in range(5):
        await redis.xadd(first_shard.results, results_entry("acme", f"old{i}"))  # type: ignore[arg-type]
    hub = EventHub(redis, layout.home, block_ms=100, shards=layout.shards)
    await hub.start()
    accept = feed_filter(None, "acme")
    try:
        feed = feed_stream(redis, layout.home, hub, accept, None, shards=layout.shards)
        waiting = asyncio.create_task(anext(feed))
        for _ in range(1000):  # until subscribed
            if hub.subscribers:
                break
            await asyncio.sleep(0.01)
        await redis.xadd(second_shard.results, results_entry("acme", "live"))  # type: ignore[arg-type]
        sent = await asyncio.wait_for(waiting, 10)
        await feed.aclose()
        again = feed_stream(redis, layout.home, hub, accept, sent.id, shards=layout.shards)
        waiting = asyncio.create_task(anext(again))
        for _ in range(1000):
            if hub.subscribers:
                break
            await asyncio.sleep(0.01)
        new = await redis.xadd(first_shard.results, results_entry("acme", "new"))  # type: ignore[arg-type]
        resumed = await asyncio.wait_for(waiting, 10)
        await again.aclose()
    finally:
        await hub.stop()
    assert orjson.loads(resumed.data)["task_id"] == "new" and str(new) in str(resumed.id), resumed.id


async def test_event_streams_are_capped_per_api_key(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    acme = await _client_key(redis, pool, settings, "acme")
    capped = settings.model_copy(update={"sse_max_connections_per_key": 2})
    async with serving(capped) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        async with contextlib.AsyncExitStack() as streams:
            first = await streams.enter_async_context(http.stream("GET", "/events", headers=acme))
            # A refused stream (an unknown task) holds no slot.
            missing = await streams.enter_async_context(
                http.stream("GET", "/tasks/" + "0" * 32 + "/events", headers=acme)
            )
            assert (first.status_code, missing.status_code) == (200, 404)
            token = acme["Authorization"].removeprefix("Bearer ")
            third = await streams.enter_async_context(http.stream("GET", "/events", params={"access_token": token}))
            assert third.status_code == 200
            async with http.stream("GET", "/events", headers=acme) as refused:
                assert refused.status_code == 429
                await refused.aread()
            error = assert_error(refused, 429, "2 open event streams", "per API process")
            assert error["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
            # Another key is counted on its own.
            async with http.stream("GET", "/events", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as other:
                assert other.status_code == 200
        # Closed streams give their slots back (the server notices the disconnect on its own time).
        deadline = time.monotonic() + 10
        while True:
            async with http.stream("GET", "/events", headers=acme) as again:
                if again.status_code == 200:
                    break
                assert again.status_code == 429 and time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def raw_request(base: str, head: bytes, filler: int = 0) -> bytes:
    """Send a request head over a plain socket, with `filler` bytes of one header value inserted; returns
    what the server answered before closing. The server may close while we are still sending."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            if filler:
                writer.write(b"X-Filler: ")
                chunk = b"a" * 65536
                for _ in range(filler // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                writer.write(b"\r\n")
            writer.write(b"Connection: close\r\n\r\n")
            await writer.drain()

    sending = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        await sending
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer


async def test_oversized_request_heads_are_refused_with_431(settings: Settings) -> None:
    # The options `nova api` passes to uvicorn (the httptools implementation, as in production).
    async with serving(settings, **uvicorn_options(settings)) as base:
        request = b"GET /health HTTP/1.1\r\nHost: nova\r\n"
        # One 32 MiB header, and many small ones adding up past the limit (64 KiB).
        big = await raw_request(base, request, filler=32 << 20)
        many = await raw_request(base, request + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(2000)))
        # Just past the limit, in one write: read whole at once, the head was complete before counted.
        once = await raw_request(base, request + b"X-Big: " + b"v" * 70_000 + b"\r\n")
        # A sizeable but reasonable head (a 16 KiB cookie) is served.
        fine = await raw_request(base, request + b"Cookie: " + b"c" * 16384 + b"\r\n")
    for answer in (big, many, once):
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
        error = orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "headers_too_large" and "65536 bytes" in error["message"]
    assert fine.startswith(b"HTTP/1.1 200 "), fine[:200]


async def test_large_bodies_are_not_taken_for_request_heads(
    settings: Settings, api: httpx.AsyncClient, redis: Redis
) -> None:
    """The head limit counts the head only: a 100 kB body read with its head (whole, chunked, or after
    a head whose blank line was split between two reads) is served, once. Counted whole, such reads were
    answered 431 after their request had been queued."""
    wf = await create(api, linear("pass"))
    body = orjson.dumps({"initial_context": {"pad": "x" * 100_000}})
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with serving(settings, **uvicorn_options(settings)) as base:
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as http:
            json_type = {"Content-Type": "application/json"}
            whole = await http.post(f"/workflows/{wf}/execute", content=body, headers=json_type)

            async def pieces() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 30_000):
                    yield body[i : i + 30_000]

            chunked = await http.post(f"/workflows/{wf}/execute", content=pieces(), headers=json_type)
        head = (
            f"POST /workflows/{wf}/execute HTTP/1.1\r\nHost: nova\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head[:-2])  # the blank line split: its second half comes with the body
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(head[-2:] + body)
        split = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        # Pipelined: a read ends one request and holds the next one's head but for its last byte; the
        # next read is that byte and a 100 kB body. (The server shares this loop: blocked while both
        # writes land, it reads each whole.)
        health = b"GET /health HTTP/1.1\r\nHost: nova\r\n\r\n"
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(health + head[:-1])
        await writer.drain()
        time.sleep(0.2)  # blocks the server too: it finds the whole write in one read
        await asyncio.sleep(0.2)  # it answers /health; the next head waits incomplete
        writer.write(head[-1:] + body)
        await writer.drain()
        time.sleep(0.2)  # likewise
        pipelined = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert (whole.status_code, chunked.status_code) == (202, 202), (whole.text, chunked.text)
    assert split.startswith(b"HTTP/1.1 202 "), split[:200]
    assert pipelined.count(b"HTTP/1.1 200 ") == 1 and pipelined.count(b"HTTP/1.1 202 ") == 1, pipelined[-300:]
    assert await redis.xlen(settings.requests_stream) == 4


async def test_trailer_fields_are_held_to_the_head_limit(
    settings: Settings, api: httpx.AsyncClient, redis: Redis
) -> None:
    """Fields after a chunked body (a trailer) went into the request's headers whatever their size: a
    32 MiB one was taken. Past the head limit the connection is closed (the request is under way: no
    431 can be sent) and the request not served."""
    wf = await create(api, linear("pass"))
    async with serving(settings, **uvicorn_options(settings)) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        with contextlib.suppress(ConnectionError):
            writer.write(
                f"POST /workflows/{wf}/execute HTTP/1.1\r\nHost: nova\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                "2\r\n{}\r\n0\r\nX-Trailer: ".encode()
            )
            for _ in range(16):  # 1 MiB
                writer.write(b"t" * 65536)
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError):  # closed with the client's bytes unread: a reset
            answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert not answer.startswith(b"HTTP/1.1 202"), answer[:200]
    assert await redis.xlen(settings.requests_stream) == 0


async def test_writes_made_in_one_pass_of_the_loop_go_out_together_and_in_order() -> None:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(cast(asyncio.Transport, transport))

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    peer = socket.create_connection(server.sockets[0].getsockname()[:2])
    peer.setblocking(False)
    try:
        transport = await accepted
        writes = CoalescedWrites(transport, loop)
        writes.write(b"head|")
        writes.write(b"body|")
        # Nothing is sent until the pass ends: the two writes are one.
        with pytest.raises(BlockingIOError):
            peer.recv(1024)
        await asyncio.sleep(0.05)
        assert peer.recv(1024) == b"head|body|"
        # A large write goes at once, after what was pending; close() sends what is left first.
        writes.write(b"small|")
        writes.write(b"x" * (COALESCE_MAX_BYTES + 1))
        writes.write(b"|last")
        writes.close()
        received = b""
        while not received.endswith(b"|last"):
            await asyncio.sleep(0.01)
            with contextlib.suppress(BlockingIOError):
                received += peer.recv(1 << 20)
        assert received == b"small|" + b"x" * (COALESCE_MAX_BYTES + 1) + b"|last"
    finally:
        peer.close()
        server.close()
        await server.wait_closed()


async def test_keep_alive_requests_are_answered_whole_through_the_coalesced_writes(settings: Settings) -> None:
    async with serving(settings, **uvicorn_options(settings)) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for _ in range(3):
                writer.write(b"GET /health HTTP/1.1\r\nHost: nova\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 "), head
                length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
                assert orjson.loads(await reader.readexactly(length))
        finally:
            writer.close()


async def test_text_postgresql_cannot_hold_is_a_422_not_a_500(api: httpx.AsyncClient) -> None:
    """Found by the schema fuzz test: a NUL in a client's or a workflow's name reached PostgreSQL."""
    client = await api.post("/clients", json={"slug": "nul", "name": "a\u0000b"})
    assert client.status_code == 422, client.text
    workflow = await api.post("/workflows", json={"name": "wf\u0000", "graph_definition": {"nodes": [], "edges": []}})
    assert workflow.status_code == 422, workflow.text
    described = await api.post(
        "/workflows",
        json={"name": "wf", "description": "\u0000", "graph_definition": {"nodes": [], "edges": []}},
    )
    assert described.status_code == 422, described.text


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"note": "a\u0000b"}, "graph_definition.note: text cannot contain U+0000"),
        ({"k\u0000": 1}, "a key cannot contain U+0000"),
        ({"big": 2**70}, "graph_definition.big: 1180591620717411303424 is beyond the 64-bit integers"),
        ({"meta": [{"n": -(2**64)}]}, "graph_definition.meta.0.n"),
    ],
)
async def test_a_graph_postgresql_cannot_store_is_a_422_not_a_500(
    api: httpx.AsyncClient, extra: dict[str, Any], fragment: str
) -> None:
    """A fixture file's other keys are stored as sent: a NUL or an integer beyond 64 bits anywhere in it
    failed in PostgreSQL or the jsonb codec, creating and updating alike."""
    created = await api.post("/workflows", json={"name": "g", "graph_definition": {**linear("pass"), **extra}})
    assert created.status_code == 422 and fragment in created.json()["error"]["message"], created.text
    wf = await create(api, linear("pass"), "g")
    updated = await api.put(f"/workflows/{wf}", json={"graph_definition": {**linear("pass"), **extra}})
    assert updated.status_code == 422 and fragment in updated.json()["error"]["message"], updated.text
    assert (await api.get(f"/workflows/{wf}")).json()["version"] == 1
