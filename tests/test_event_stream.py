"""SSE streams at the generator level: replay then live, resume without gap or repeat, fan-out, lag drop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from redis.asyncio import Redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request

from api.app import NovaApi
from api.event_hub import EventHub
from api.event_streams import _feed_sse, _sse, feed_filter, feed_stream, task_event_stream
from api.routes.events import SERVER_SEND, HeldStream
from shared.connections import create_redis
from shared.control import QUEUE, RunControl
from shared.events import Event, event_fields
from shared.executions import Owner, retry_failure
from shared.settings import Settings
from shared.streams import EventType, Keys
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    make_settings,
    stop_in_a_lost_cancel_window,
    wait_terminal,
)


async def collect(
    stream: AsyncIterator[ServerSentEvent], limit: int = 100, timeout: float = 20
) -> list[ServerSentEvent]:
    out: list[ServerSentEvent] = []

    async def run() -> None:
        async for item in stream:
            out.append(item)
            if len(out) >= limit:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def started_hub(redis: Redis, settings: Settings) -> EventHub:
    hub = EventHub(redis, Keys.from_settings(settings), block_ms=100)
    await hub.start()
    return hub


async def test_task_stream_replays_then_follows_live_then_closes(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    keys = Keys.from_settings(settings)
    hub = await started_hub(redis, settings)
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(0.3)", "context['x'] = 1"))
    try:
        task = await enqueue(redis, settings, wf)
        # Subscribed before any worker runs: the queued event is replayed, the rest arrive live.
        stream = task_event_stream(redis, keys, hub, task.task_id, None)
        first = await anext(stream)
        assert first.event == "queued"
        async with in_process_worker(settings):
            rest = await collect(stream)
        types = [first.event] + [e.event for e in rest]
        assert types[0] == "queued" and types[-1] == "succeeded"
        assert "node_started" in types and "node_finished" in types
        ids = [first.id] + [e.id for e in rest]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)
        data = orjson.loads(rest[-1].data)
        assert data["task_id"] == task.task_id and data["data"]["final_context"] == {"x": 1}

        # A finished task replays in full and closes; resuming from the middle gives exactly the rest.
        replay = await collect(task_event_stream(redis, keys, hub, task.task_id, None))
        assert [e.id for e in replay] == ids
        middle = ids[len(ids) // 2]
        resumed = await collect(task_event_stream(redis, keys, hub, task.task_id, middle))
        assert [e.id for e in resumed] == ids[len(ids) // 2 + 1 :]
    finally:
        await hub.stop()


async def test_feed_filters_by_workflow_and_resumes(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    keys = Keys.from_settings(settings)
    hub = await started_hub(redis, settings)
    one = await create_workflow(redis, settings, pool, linear("pass"), name="one")
    two = await create_workflow(redis, settings, pool, linear("pass"), name="two")
    try:
        feed = feed_stream(redis, keys, hub, feed_filter(two.id, None), None)
        first = asyncio.ensure_future(anext(feed))
        await asyncio.sleep(0)  # let the generator subscribe before anything is published
        async with in_process_worker(settings):
            a = await enqueue(redis, settings, one)
            b = await enqueue(redis, settings, two)
            await wait_terminal(redis, settings, [a.task_id, b.task_id])
        got = [await asyncio.wait_for(first, 10)]
        while orjson.loads(got[-1].data)["type"] != "succeeded":
            got.append(await asyncio.wait_for(anext(feed), 10))
        await feed.aclose()
        assert {orjson.loads(e.data)["workflow_id"] for e in got} == {two.id}
        # Resume after the first event: the backlog is replayed from Redis, filtered the same way.
        resumed_feed = feed_stream(redis, keys, hub, feed_filter(two.id, None), got[0].id)
        resumed = [await asyncio.wait_for(anext(resumed_feed), 10) for _ in range(len(got) - 1)]
        await resumed_feed.aclose()
        assert [e.id for e in resumed] == [e.id for e in got[1:]]
    finally:
        await hub.stop()


async def test_a_hub_reader_survives_an_error_nobody_expected(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's cluster client can fail a read with an AttributeError when it closes its own connections
    # under a command (its close race); a reader that died on it left the API without live events for good.
    client = create_redis(settings)
    hub = EventHub(client, Keys.from_settings(settings), block_ms=100)
    read = client.xread
    failures = 0

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if not failures:
            failures += 1
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return await read(*args, **kwargs)

    monkeypatch.setattr(client, "xread", failing_once)
    await hub.start()
    try:
        with hub.subscribe() as sub:
            for _ in range(500):
                if failures:
                    break
                await asyncio.sleep(0.01)
            assert failures == 1
            await redis.xadd(
                settings.results_stream,
                event_fields(EventType.QUEUED, task_id="after", execution_id=1, workflow_id=1, client="c", data={}),
            )
            event = await sub.get(10)
            assert event is not None and event.task_id == "after"
    finally:
        await hub.stop()
        await client.aclose()


async def test_hub_fans_out_with_one_reader_and_drops_laggards(redis: Redis, settings: Settings) -> None:
    hub = await started_hub(redis, settings)
    try:
        fast = [hub.subscribe() for _ in range(200)]
        slow = hub.subscribe(maxsize=2)
        for i in range(5):
            await redis.xadd(
                settings.results_stream,
                {
                    "type": "queued",
                    "task_id": f"t{i}",
                    "execution_id": "1",
                    "workflow_id": "1",
                    "client": "c",
                    "ts": "x",
                    "data": "{}",
                },
            )
        for sub in fast:
            got = [await sub.get(5) for _ in range(5)]
            assert [e.task_id for e in got if e] == [f"t{i}" for i in range(5)]
        # The slow subscriber overflowed: it is told to go (None) instead of holding memory.
        seen = []
        while (item := await slow.get(5)) is not None:
            seen.append(item)
        assert slow.overflowed and len(seen) < 5
    finally:
        await hub.stop()


async def test_stop_ends_the_hub_even_when_its_cancel_is_swallowed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py sends each command through asyncio.wait_for, which on Python 3.11 returns normally when
    the task is cancelled just as the send completes: the cancel is lost. stop() must end the hub anyway
    (a lost cancel once left an API lifespan exit awaiting the reader loop forever)."""
    client = create_redis(settings)  # as the API opens it: a socket timeout, so sends go through wait_for
    hub = EventHub(client, Keys.from_settings(settings), block_ms=100)
    await hub.start()
    [reader] = hub._tasks
    stopping: list[asyncio.Task[None]] = []
    try:
        # The hub's next XREAD (every 100 ms) trips it.
        stopping.append(await stop_in_a_lost_cancel_window(monkeypatch, hub.stop, "the hub"))
        done, _ = await asyncio.wait(stopping, timeout=5)
        assert done, "EventHub.stop() is still waiting for a reader loop that lost its cancel"
        assert reader.done()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(reader, *stopping), 5)
        await client.aclose()


async def test_a_task_ending_between_the_replay_and_the_status_read_still_sends_its_end(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """The task's terminal event and status are written in one step: a task that ends after its events
    were replayed but before its status is read is terminal there, and its end must still be sent (it
    once closed the stream after the events replayed, the terminal one never sent)."""
    from shared.control import RunControl

    keys = Keys.from_settings(settings)
    hub = await started_hub(redis, settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    task = await enqueue(redis, settings, wf)
    real_hget = redis.hget
    ended = False

    async def hget_after_the_end(name: str, key: str) -> Any:
        nonlocal ended
        if not ended and name == keys.task(task.task_id):
            # The task ends right here, between the replay and the status read (a cancel: one step).
            ended = True
            assert (await RunControl(redis, keys, task_ttl=0).cancel_task(task.task_id)).outcome == 1
        return await real_hget(name, key)

    redis.hget = hget_after_the_end  # type: ignore[method-assign]
    try:
        sent = await collect(task_event_stream(redis, keys, hub, task.task_id, None))
    finally:
        redis.hget = real_hget  # type: ignore[method-assign]
        await hub.stop()
    assert ended and [e.event for e in sent] == ["queued", "cancelled"]


def test_an_event_is_framed_once_as_the_library_would_frame_it() -> None:
    """Every subscriber is sent the event's frame built once; it must be the bytes sse-starlette would
    write for the same id, type and data, line breaks and non-ASCII text in the data included."""
    data = {"stdout": "line one\nline two\r\nthree\r", "text": "caf\u00e9 \u2028 \U0001f600", "nul": "a\u0000b"}
    fields = event_fields(
        EventType.NODE_FINISHED, task_id="t1", execution_id=7, workflow_id=3, client="acme", data=data
    )
    event = Event.from_entry("1700000000000-5", fields)
    library = ServerSentEvent(event.encoded, event=event.type.value, id=event.id).encode()
    assert _sse(event).encode() == library
    # The same event to a subscriber of a sharded feed: its own cursor as the id, the rest shared.
    cursor = [(1700000000000, 5), (1699999999999, 2)]
    sharded = _feed_sse(event, cursor)
    assert sharded.id == "1700000000000-5,1699999999999-2"
    assert sharded.encode() == ServerSentEvent(event.encoded, event=event.type.value, id=sharded.id).encode()
    assert _feed_sse(event, cursor[:1]).encode() == library


def test_the_stream_response_overrides_the_library_send_it_means_to() -> None:
    # HeldStream replaces sse-starlette's per-send wrapper to skip a cancel scope per event; a release
    # of the library without that method would keep streams working but silently lose the saving.
    assert "_send_with_timeout" in vars(EventSourceResponse)
    assert "_send_with_timeout" in vars(HeldStream)


async def test_events_go_to_the_server_past_the_middlewares_and_the_end_through_them() -> None:
    # The middlewares' send wrappers look only at a response's start (and see how it ends); the events
    # between go to the server's own send, which NovaApi leaves in the scope.
    through_layers: list[dict[str, Any]] = []
    to_server: list[dict[str, Any]] = []

    async def layered_send(message: Any) -> None:
        through_layers.append(message)

    async def server_send(message: Any) -> None:
        to_server.append(message)

    async def receive() -> Any:
        await asyncio.Event().wait()  # the client never leaves

    async def two_events() -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent("1", event="a")
        yield ServerSentEvent("2", event="b")

    released: list[bool] = []
    response = HeldStream(two_events(), lambda: released.append(True))
    scope = {"type": "http", "method": "GET", "path": "/events", "headers": [], SERVER_SEND: server_send}
    await asyncio.wait_for(response(scope, receive, layered_send), 10)
    assert [m["type"] for m in through_layers] == ["http.response.start", "http.response.body"]
    assert through_layers[-1].get("more_body", False) is False
    assert [m["body"] for m in to_server] == [b"event: a\r\ndata: 1\r\n\r\n", b"event: b\r\ndata: 2\r\n\r\n"]
    assert released == [True]


async def test_the_application_leaves_the_servers_send_in_each_http_scope() -> None:
    seen: list[Any] = []
    app = NovaApi()

    @app.get("/probe")
    async def probe(request: Request) -> dict[str, bool]:
        seen.append(request.scope.get(SERVER_SEND))
        return {"ok": True}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        assert (await client.get("/probe")).status_code == 200
    assert len(seen) == 1 and callable(seen[0])


def test_an_event_read_from_its_entry_is_the_event_made_from_its_values() -> None:
    # Events read from a stream are made without the dataclass's __init__ (for speed): every field must
    # still be set as __init__ sets it, and what is not an event must still be refused.
    fields = event_fields(
        EventType.SUCCEEDED, task_id="t1", execution_id=7, workflow_id=3, client="acme", data={"a": [1, "x"]}
    )
    event = Event.from_entry(b"1700000000000-5", fields, shard=2)
    values = ("1700000000000-5", EventType.SUCCEEDED, "t1", 7, 3, "acme", fields["ts"], {"a": [1, "x"]})
    made = Event(*values, shard=2, nul_free=True)
    assert event == made and type(event.type) is EventType
    assert vars(event) == vars(made)
    with pytest.raises(ValueError):
        Event.from_entry("1-0", {**fields, "type": "no_such_type"})
    with pytest.raises(KeyError):
        Event.from_entry("1-0", {k: v for k, v in fields.items() if k != "task_id"})


def test_an_event_read_by_position_is_the_event_read_by_name() -> None:
    # The projector reads an entry event_fields made by the position of its fields (from_pairs); any
    # other entry (another order, another format) is left to the reader's whole way, from_fields.
    fields = event_fields(
        EventType.NODE_FINISHED, task_id="t1", execution_id=7, workflow_id=3, client="acme", data={"a": "\x00"}
    )
    pairs = [x for pair in fields.items() for x in pair]
    event = Event.from_pairs("1700000000000-5", pairs, shard=2)
    assert event is not None
    assert vars(event) == vars(Event.from_fields("1700000000000-5", fields, shard=2))
    assert event.nul_free is False and type(event.type) is EventType
    assert Event.from_pairs("1-0", [x for pair in reversed(fields.items()) for x in pair]) is None
    assert Event.from_pairs("1-0", [*pairs[:-1], "2"]) is None  # a newer format
    # What is not an event's is refused as from_fields refuses it.
    for field, value in (("type", "no_such_type"), ("data", "[1]"), ("data", "{"), ("execution_id", "x")):
        broken = [value if i > 0 and pairs[i - 1] == field else x for i, x in enumerate(pairs)]
        with pytest.raises(ValueError):
            Event.from_pairs("1-0", broken)
        with pytest.raises(ValueError):
            Event.from_fields("1-0", {**fields, field: value})


@pytest.mark.parametrize("undone", ["before the stream opens", "between its subscription and its replay"])
async def test_a_task_stream_of_a_retried_task_goes_on_past_the_end_the_retry_undid(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, undone: str
) -> None:
    """A cancel, then a retry. Before the stream opens: the replay stopped at the first terminal event in
    the task's list, and the client got `queued`, `cancelled` and the end of the stream while the task
    was about to run again. Between the stream's subscription and its replay: both events reach it twice,
    replayed and queued, and the queued copy of the undone `cancelled`, already sent, was still taken for
    the end: the stream closed after `retry`, and the retried run went unseen."""
    import api.event_streams as event_streams

    keys = Keys.from_settings(settings)
    hub = EventHub(redis, keys, block_ms=100)
    await hub.start()
    try:
        wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
        control = RunControl(redis, keys, task_ttl=settings.task_ttl, pool=pool)
        await control.pause(QUEUE)  # nothing runs until the stream is open
        task = await enqueue(redis, settings, wf)

        async def cancel_and_retry() -> None:
            await control.cancel_task(task.task_id)
            await retry_failure(control.scripts, task.execution_id, Owner(task.task_id, "acme", wf.id, wf.version))

        if undone == "before the stream opens":
            await cancel_and_retry()
        else:
            replay = event_streams.task_events
            done: list[bool] = []

            async def undone_after_the_subscription(*args: Any) -> Any:
                if not done:
                    done.append(True)
                    await cancel_and_retry()
                return await replay(*args)

            monkeypatch.setattr(event_streams, "task_events", undone_after_the_subscription)
        stream = task_event_stream(redis, keys, hub, task.task_id, None)
        replayed = [await asyncio.wait_for(anext(stream), 5) for _ in range(3)]
        assert [e.event for e in replayed] == ["queued", "cancelled", "retry"]
        async with in_process_worker(settings):
            await control.resume(QUEUE)
            rest = await collect(stream)
        assert rest and rest[-1].event == "succeeded", [e.event for e in rest]
    finally:
        await hub.stop()


async def test_a_fresh_sharded_feed_sends_an_event_appended_while_it_reads_the_shards_ends(
    redis: Redis, redis_url: str, db_url: str
) -> None:
    """A new feed over several shards reads each shard's end (its starting position) before it
    subscribed to the hub: an event appended to a shard after its end was read, and published by the hub
    before the subscription, was never sent, and the next event's id claimed that shard had been sent
    up to past it, so no reconnect replayed it."""
    keys = Keys.from_settings(make_settings(redis_url, db_url, shards=2))
    first, second = keys.all_shards

    async def append(stream: str, n: int) -> str:
        fields = event_fields(EventType.QUEUED, task_id=f"t{n}", execution_id=n, workflow_id=1, client="acme", data={})
        return str(await redis.xadd(stream, fields))

    await append(first.results, 0)
    await append(second.results, 100)
    hub = EventHub(redis, keys, block_ms=100, shards=keys.all_shards)
    await hub.start()
    appended: list[str] = []
    read_end = redis.xrevrange

    async def end_read_while_the_first_shard_moves(name: str, *args: Any, **kwargs: Any) -> Any:
        reply = await read_end(name, *args, **kwargs)
        if name == second.results and not appended:
            # The first shard's end is read already: an event appended now, and published by the hub.
            with hub.subscribe(lambda _: True) as published:
                appended.append(await append(first.results, 1))
                while (event := await published.next()) is not None and event.id != appended[0]:
                    pass
        return reply

    redis.xrevrange = end_read_while_the_first_shard_moves  # type: ignore[method-assign]
    try:
        feed = feed_stream(redis, keys, hub, feed_filter(None, None), None, shards=keys.all_shards)
        sent = [await asyncio.wait_for(anext(feed), 5)]
        later = await append(first.results, 2)
        sent.append(await asyncio.wait_for(anext(feed), 5))
        await feed.aclose()
    finally:
        redis.xrevrange = read_end  # type: ignore[method-assign]
        await hub.stop()
    assert [orjson.loads(e.data)["id"] for e in sent] == [appended[0], later]
