"""The projector against real Redis and PostgreSQL: every event it reads is either written or kept,
with its reason, in the projector's dead-letter stream; it never merges two executions into one row,
and concurrent projectors do not deadlock each other."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from cli.embedded import PostgresServer
from consumer.projector import Projector, apply_events
from shared.connections import create_redis, ensure_groups, read_group
from shared.db import create_pool, migrate_url
from shared.events import Event, event_fields
from shared.settings import Settings
from shared.streams import DeadLetterField, EventType, Keys, TaskField, loads
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    node_event,
    wait_projected,
    wait_terminal,
)

NUL, REPLACEMENT = "\x00", "\ufffd"


def dead_letter_key(settings: Settings) -> str:
    return f"{Keys.from_settings(settings).prefix}:projector:dlq"


class Emitter:
    """Appends well-formed events of one execution to the results stream, as a worker would."""

    def __init__(
        self, redis: Redis, settings: Settings, *, execution_id: int, task_id: str, client: str, workflow_id: int
    ) -> None:
        self.redis, self.settings = redis, settings
        self.ids = {"execution_id": execution_id, "task_id": task_id, "client": client, "workflow_id": workflow_id}

    async def emit(self, type_: EventType, data: dict[str, Any], **override: Any) -> str:
        fields = event_fields(type_, **{**self.ids, **override}, data=data)  # type: ignore[arg-type]
        return str(await self.redis.xadd(self.settings.results_stream, fields))  # type: ignore[arg-type]

    async def whole_run(self, initial: dict[str, Any], final: dict[str, Any], stdout: str = "") -> None:
        t = "2024-05-01T10:00:00.000Z"
        await self.emit(EventType.QUEUED, {"workflow_name": "wf", "enqueued_at": t, "initial_context": initial})
        await self.emit(
            EventType.STARTED,
            {"workflow_name": "wf", "enqueued_at": t, "started_at": t, "consumer": "w1", "delivery": 1, "attempt": 0},
        )
        node = {"step": 1, "node_id": "a1", "node_type": "action", "started_at": t}
        await self.emit(EventType.NODE_STARTED, {**node, "input_context": initial})
        await self.emit(
            EventType.NODE_FINISHED,
            {
                **node,
                "status": "success",
                "finished_at": t,
                "duration_ms": 1.0,
                "output_context": final,
                "stdout": stdout,
            },
        )
        await self.emit(
            EventType.SUCCEEDED,
            {"started_at": t, "finished_at": t, "duration_ms": 1.0, "final_context": final, "nodes_executed": 1},
        )


async def drain(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, kind: type[Projector] = Projector, reader: Redis | None = None
) -> None:
    """Run a projector (reading with `reader`, else `redis`) until it has acknowledged every entry of the
    results stream."""
    await ensure_groups(redis, Keys.from_settings(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(kind(settings, reader or redis, pool, consumer="p-test").run(stop))
    try:
        await wait_read(redis, settings, task, acked=True)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def wait_read(redis: Redis, settings: Settings, projector: asyncio.Task[None], *, acked: bool) -> None:
    """Until the projectors' group has read every entry of the results stream and acknowledged them
    all (`acked`), or holds at least one read but unacknowledged: Redis's own record, polled."""
    keys = Keys.from_settings(settings)
    deadline = time.monotonic() + 30
    while True:
        if projector.done():
            projector.result()
            raise AssertionError("the projector stopped by itself")
        last = (await redis.xinfo_stream(keys.results))["last-generated-id"]
        group = next(g for g in await redis.xinfo_groups(keys.results) if g["name"] == keys.projector_group)
        if acked and group["last-delivered-id"] == last and group["pending"] == 0:
            return
        if not acked and group["pending"] > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"projector did not read the results stream: {group}")
        await asyncio.sleep(0.02)


async def dead_letters(redis: Redis, settings: Settings) -> list[dict[str, str]]:
    return [fields for _id, fields in await redis.xrange(dead_letter_key(settings))]


# ---- A: U+0000 ----------------------------------------------------------------------------------


async def test_nul_characters_are_replaced_in_postgresql_only(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    run = Emitter(redis, settings, execution_id=1, task_id="t-nul", client="acme", workflow_id=wf.id)
    initial = {"pdf": f"%PDF{NUL}1", f"key{NUL}": [{"deep": NUL}]}
    final = {**initial, "pages": [f"a{NUL}b"]}
    await run.whole_run(initial, final, stdout=f"printed{NUL}")

    await drain(redis, settings, pool)

    row = await pool.fetchrow("SELECT status, initial_context, final_context FROM executions WHERE id = 1")
    assert row["status"] == "completed"
    assert row["initial_context"] == {"pdf": f"%PDF{REPLACEMENT}1", f"key{REPLACEMENT}": [{"deep": REPLACEMENT}]}
    assert row["final_context"]["pages"] == [f"a{REPLACEMENT}b"]
    node = await pool.fetchrow("SELECT input_context, output_context, stdout FROM node_runs WHERE execution_id = 1")
    assert node["input_context"] == row["initial_context"]
    assert node["output_context"]["pages"] == [f"a{REPLACEMENT}b"]
    assert node["stdout"] == f"printed{REPLACEMENT}"
    # Redis keeps what the run produced, byte for byte.
    events = [Event.from_entry(i, f) for i, f in await redis.xrange(settings.results_stream)]
    assert events[-1].type == EventType.SUCCEEDED and events[-1].data["final_context"] == final
    assert await dead_letters(redis, settings) == []


async def test_a_run_whose_context_carries_nul_lands_its_terminal_status(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['text'] = context['pdf'].upper()"))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {"pdf": f"page{NUL}one"})
        done = await wait_terminal(redis, settings, [task.task_id])
        assert done[task.task_id].type == EventType.SUCCEEDED
        await wait_projected(pool, [task.execution_id], {"completed"})
    result = loads(await redis.hget(Keys.from_settings(settings).task(task.task_id), TaskField.RESULT))
    assert result["final_context"] == {"pdf": f"page{NUL}one", "text": f"PAGE{NUL}ONE"}
    final = await pool.fetchval("SELECT final_context FROM executions WHERE id = $1", task.execution_id)
    assert final == {"pdf": f"page{REPLACEMENT}one", "text": f"PAGE{REPLACEMENT}ONE"}


def test_only_an_entry_whose_text_shows_no_nul_skips_the_replacement() -> None:
    def event(client: str, data: dict[str, Any]) -> Event:
        fields = event_fields(EventType.SUCCEEDED, task_id="t", execution_id=1, workflow_id=1, client=client, data=data)
        return Event.from_entry("1-0", fields)

    assert event("acme", {"final_context": {"a": "b"}}).nul_free
    assert not event("acme", {"final_context": {"a": f"x{NUL}"}}).nul_free
    assert not event("acme", {"final_context": {f"k{NUL}": 1}}).nul_free
    assert not event(f"ac{NUL}me", {"final_context": {}}).nul_free
    # The text of the escape, not the character: a false alarm, which only costs the scan.
    lookalike = event("acme", {"final_context": {"a": "\\u0000"}})
    assert not lookalike.nul_free and lookalike.data["final_context"]["a"] == "\\u0000"
    # Built otherwise than from an entry: not known, so replaced.
    assert not Event("1-0", EventType.SUCCEEDED, "t", 1, 1, "acme", "2024-05-01T10:00:00.000Z", {}).nul_free


@pytest.mark.parametrize("client", ["RESP3", "RESP2", "bytes"])
async def test_events_are_projected_whatever_their_field_order_and_the_clients_protocol(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, client: str
) -> None:
    # The projector reads a worker's events by the position of their fields (Event.from_pairs), from
    # replies taken as the protocol parser gives them (read_group); an entry written by hand in another
    # field order, and a client answering RESP2 or bytes, go the whole way and land the same.
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await Emitter(redis, settings, execution_id=1, task_id="t1", client="acme", workflow_id=wf.id).whole_run(
        {"a": 1}, {"a": 2}
    )
    by_hand = Emitter(redis, settings, execution_id=2, task_id="t2", client="acme", workflow_id=wf.id)
    emit = by_hand.emit

    async def reversed_fields(type_: EventType, data: dict[str, Any], **override: Any) -> str:
        fields = event_fields(type_, **{**by_hand.ids, **override}, data=data)  # type: ignore[arg-type]
        return str(await redis.xadd(settings.results_stream, dict(reversed(list(fields.items())))))  # type: ignore[arg-type]

    by_hand.emit = reversed_fields  # type: ignore[method-assign]
    await by_hand.whole_run({"a": 1}, {"a": 2})
    by_hand.emit = emit  # type: ignore[method-assign]
    options = {"RESP3": {}, "RESP2": {"protocol": 2}, "bytes": {"decode_responses": False}}[client]
    reader = create_redis(settings, prompt_writes=True, batch_commands=True, **options)  # type: ignore[arg-type]
    try:
        await drain(redis, settings, pool, reader=reader)
    finally:
        await reader.aclose()
    rows = await pool.fetch("SELECT id, status, final_context FROM executions ORDER BY id")
    assert [(r["id"], r["status"], r["final_context"]) for r in rows] == [
        (1, "completed", {"a": 2}),
        (2, "completed", {"a": 2}),
    ]
    runs = await pool.fetch("SELECT execution_id, status, input_context FROM node_runs ORDER BY execution_id")
    assert [tuple(r) for r in runs] == [(1, "success", {"a": 1}), (2, "success", {"a": 1})]
    assert await dead_letters(redis, settings) == []


async def test_events_postgresql_refuses_are_logged_and_kept_not_dropped(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    good = Emitter(redis, settings, execution_id=1, task_id="t-good", client="acme", workflow_id=wf.id)
    bad = Emitter(redis, settings, execution_id=2, task_id="t-bad", client="acme", workflow_id=wf.id)
    await good.whole_run({"n": 1}, {"n": 2})
    # More nodes than an integer column holds: PostgreSQL refuses the row.
    too_big = await bad.emit(
        EventType.SUCCEEDED,
        {"finished_at": "2024-05-01T10:00:00Z", "final_context": {}, "nodes_executed": 2**40},
    )
    # A timestamp that is not one: the row cannot even be built.
    bad_time = await bad.emit(EventType.STARTED, {"started_at": "yesterday"}, execution_id=3, task_id="t-time")
    # Not an event at all.
    junk = str(await redis.xadd(settings.results_stream, {"hello": "world"}))

    with caplog.at_level(logging.ERROR, logger="consumer.projector"):
        await drain(redis, settings, pool)

    assert await pool.fetchval("SELECT status FROM executions WHERE id = 1") == "completed"
    letters = {f["dlq_original_id"]: f for f in await dead_letters(redis, settings)}
    assert set(letters) == {too_big, bad_time, junk}
    assert letters[too_big]["task_id"] == "t-bad" and letters[too_big]["dlq_reason"] == "rejected"
    assert "out of int32 range" in letters[too_big]["dlq_error"]
    assert letters[bad_time]["dlq_reason"] == "malformed" and "yesterday" in letters[bad_time]["dlq_error"]
    assert letters[junk]["dlq_reason"] == "malformed" and letters[junk]["hello"] == "world"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for entry_id in (too_big, bad_time, junk):
        assert entry_id in logged


# ---- B: execution ids handed out again ------------------------------------------------------------


async def test_an_execution_id_given_out_again_is_refused_not_merged(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    acme = Emitter(redis, settings, execution_id=7, task_id="t-acme", client="acme", workflow_id=wf.id)
    await acme.whole_run({"owner": "acme"}, {"owner": "acme", "secret": "acme's"})
    await drain(redis, settings, pool)
    before = dict(await pool.fetchrow("SELECT * FROM executions WHERE id = 7"))
    runs_before = [dict(r) for r in await pool.fetch("SELECT * FROM node_runs WHERE execution_id = 7")]

    # Redis lost its data and handed id 7 out again, to another client's task.
    globex = Emitter(redis, settings, execution_id=7, task_id="t-globex", client="globex", workflow_id=wf.id)
    await globex.whole_run({"owner": "globex"}, {"owner": "globex", "secret": "globex's"})
    with caplog.at_level(logging.ERROR, logger="consumer.projector"):
        await drain(redis, settings, pool)

    assert dict(await pool.fetchrow("SELECT * FROM executions WHERE id = 7")) == before
    assert [dict(r) for r in await pool.fetch("SELECT * FROM node_runs WHERE execution_id = 7")] == runs_before
    letters = await dead_letters(redis, settings)
    assert len(letters) == 5
    assert {f["task_id"] for f in letters} == {"t-globex"}
    assert {f["dlq_reason"] for f in letters} == {"execution_id_reused"}
    assert all("t-acme" in f["dlq_error"] for f in letters)
    assert "t-globex" in caplog.text


async def test_an_execution_id_reused_within_one_batch_keeps_the_first_task(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    first = Emitter(redis, settings, execution_id=9, task_id="t-first", client="acme", workflow_id=wf.id)
    second = Emitter(redis, settings, execution_id=9, task_id="t-second", client="globex", workflow_id=wf.id)
    await first.whole_run({"who": "first"}, {"who": "first"})
    await second.whole_run({"who": "second"}, {"who": "second"})

    await drain(redis, settings, pool)

    row = await pool.fetchrow("SELECT task_id, client_slug, final_context FROM executions WHERE id = 9")
    assert (row["task_id"], row["client_slug"], row["final_context"]) == ("t-first", "acme", {"who": "first"})
    assert await pool.fetchval("SELECT output_context FROM node_runs WHERE execution_id = 9") == {"who": "first"}
    assert {f["task_id"] for f in await dead_letters(redis, settings)} == {"t-second"}


# ---- E: concurrent projectors ---------------------------------------------------------------------


def started(execution_id: int, entry_id: str, workflow_id: int) -> Event:
    t = "2024-05-01T10:00:00.000Z"
    fields = event_fields(
        EventType.STARTED,
        task_id=f"t{execution_id}",
        execution_id=execution_id,
        workflow_id=workflow_id,
        client="acme",
        data={"workflow_name": "wf", "started_at": t, "consumer": entry_id, "attempt": 0},
    )
    return Event.from_entry(entry_id, fields)


async def wait_blocked(pool: asyncpg.Pool, database: str, count: int) -> None:
    """Until `count` sessions of the test database wait on a lock (PostgreSQL's own view of it)."""
    deadline = time.monotonic() + 30
    while True:
        n = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", database
        )
        if n >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} of {count} sessions blocked")
        await asyncio.sleep(0.01)


async def test_two_projectors_writing_overlapping_rows_do_not_deadlock(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with pool.acquire() as conn:
        await apply_events(conn, [started(i, f"1-{i}", wf.id) for i in (1, 2, 3)])
    # Two batches touching executions 1 and 2, whose stream order differs: A has 1 before 2 (with 3
    # in between), B has 2 before 1.
    batch_a = [started(1, "10-0", wf.id), started(3, "11-0", wf.id), started(2, "12-0", wf.id)]
    batch_b = [started(2, "10-1", wf.id), started(1, "11-1", wf.id)]
    database = await pool.fetchval("SELECT current_database()")

    holder, conn_a, conn_b = [await pool.acquire() for _ in range(3)]
    try:
        # A third session holds row 3 so that A stops inside its batch: B then gets as far as it can.
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT 1 FROM executions WHERE id = 3 FOR UPDATE")
        write_a = asyncio.create_task(apply_events(conn_a, batch_a))
        await wait_blocked(pool, database, 1)
        write_b = asyncio.create_task(apply_events(conn_b, batch_b))
        await wait_blocked(pool, database, 2)
        await holding.rollback()
        results = await asyncio.gather(write_a, write_b, return_exceptions=True)
    finally:
        for conn in (holder, conn_a, conn_b):
            await pool.release(conn)

    assert results == [[], []]
    consumers = dict(await pool.fetch("SELECT id, consumer FROM executions ORDER BY id"))
    assert consumers == {1: "11-1", 2: "12-0", 3: "11-0"}


# ---- outages -------------------------------------------------------------------------------------


async def test_after_a_postgresql_outage_the_projector_writes_the_events_it_held_and_newer_ones(
    redis: Redis, settings: Settings, pg_factory: Callable[..., PostgresServer]
) -> None:
    pg = pg_factory()
    await migrate_url(pg.url)
    settings = settings.model_copy(update={"database_url": pg.url})
    pool = await create_pool(pg.url, min_size=1, max_size=2)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await ensure_groups(redis, Keys.from_settings(settings))
    stop = asyncio.Event()
    projector = asyncio.create_task(Projector(settings, redis, pool, consumer="p-test").run(stop))
    try:
        runs = [
            Emitter(redis, settings, execution_id=i, task_id=f"t{i}", client="acme", workflow_id=wf.id)
            for i in (1, 2, 3)
        ]
        await runs[0].whole_run({}, {"n": 1})
        await wait_read(redis, settings, projector, acked=True)
        pg.stop()
        # Read while PostgreSQL is down: they stay pending for this projector.
        await runs[1].whole_run({}, {"n": 2})
        await wait_read(redis, settings, projector, acked=False)
        pg.start()
        # Events appended after the outage must be read too, not only the held ones.
        await runs[2].whole_run({}, {"n": 3})
        await wait_read(redis, settings, projector, acked=True)
    finally:
        stop.set()
        await asyncio.wait_for(projector, 10)
        await pool.close()
    assert await _statuses(pg.url) == {1: "completed", 2: "completed", 3: "completed"}


async def test_an_unexpected_error_in_a_batch_does_not_end_the_projector(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Seen in `nova chaos`: a connection broken by a PostgreSQL restart raised asyncpg's
    InternalClientError, which ended the projector and with it the whole worker."""

    class BrokenOnce(Projector):
        failed = False

        async def _write(self, conn: asyncpg.Connection, events: list[Event]) -> Any:
            if not BrokenOnce.failed:
                BrokenOnce.failed = True
                raise asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress")
            return await super()._write(conn, events)

    wf = await create_workflow(redis, settings, pool, linear("pass"))
    emitter = Emitter(redis, settings, execution_id=7, task_id="t-7", client="acme", workflow_id=wf.id)
    await emitter.whole_run({"a": 1}, {"a": 2})
    await drain(redis, settings, pool, BrokenOnce)
    assert BrokenOnce.failed
    assert await pool.fetchval("SELECT status FROM executions WHERE id = 7") == "completed"


# ---- pipelined batches ---------------------------------------------------------------------------


class Gated(Projector):
    """Holds its first write until released (the next batch is read meanwhile), and counts the
    batches whose write failed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writing, self.release = asyncio.Event(), asyncio.Event()
        self.failures = 0

    async def _write(self, conn: asyncpg.Connection, events: list[Event]) -> Any:
        if not self.writing.is_set():
            self.writing.set()
            await self.release.wait()
        return await super()._write(conn, events)

    async def _write_batch(self, batch: Any) -> None:
        try:
            await super()._write_batch(batch)
        except Exception:
            self.failures += 1
            raise


async def pending_ids(redis: Redis, settings: Settings) -> set[str]:
    keys = Keys.from_settings(settings)
    return {p["message_id"] for p in await redis.xpending_range(keys.results, keys.projector_group, "-", "+", 1000)}


async def until(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + 30
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


async def test_postgresql_stopping_under_a_batch_in_flight_loses_and_repeats_nothing(
    redis: Redis, settings: Settings, pg_factory: Callable[..., PostgresServer]
) -> None:
    pg = pg_factory()
    await migrate_url(pg.url)
    settings = settings.model_copy(update={"database_url": pg.url, "projector_batch": 5})
    pool = await create_pool(pg.url, min_size=1, max_size=2)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await ensure_groups(redis, Keys.from_settings(settings))
    runs = [
        Emitter(redis, settings, execution_id=i, task_id=f"t{i}", client="acme", workflow_id=wf.id) for i in (1, 2, 3)
    ]
    await runs[0].whole_run({}, {"n": 1})  # five events: the first batch, whole
    first = {i for i, _ in await redis.xrange(settings.results_stream)}
    stop = asyncio.Event()
    projector = Gated(settings, redis, pool, consumer="p-test")
    task = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.wait_for(projector.writing.wait(), 30)
        await runs[1].whole_run({}, {"n": 2})

        async def read_ahead() -> bool:
            return len(await pending_ids(redis, settings)) > len(first)

        # The next batch is read while the first is being written.
        await until(read_ahead, "the next batch was not read during the write")
        pg.stop()
        projector.release.set()

        async def failed() -> bool:
            return projector.failures > 0

        await until(failed, "the write did not fail")
        # A batch whose commit failed stays pending, every entry of it.
        assert first <= await pending_ids(redis, settings)
        pg.start()
        await runs[2].whole_run({}, {"n": 3})
        await wait_read(redis, settings, task, acked=True)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.close()
    statuses, node_runs = await _statuses(pg.url), await _node_runs(pg.url)
    assert statuses == {1: "completed", 2: "completed", 3: "completed"}
    assert node_runs == {1: 1, 2: 1, 3: 1}
    assert await dead_letters(redis, settings) == []


async def test_a_stop_lets_the_batch_in_flight_commit_and_be_acknowledged(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await ensure_groups(redis, Keys.from_settings(settings))
    await Emitter(redis, settings, execution_id=4, task_id="t4", client="acme", workflow_id=wf.id).whole_run({}, {})
    stop = asyncio.Event()
    projector = Gated(settings, redis, pool, consumer="p-test")
    task = asyncio.create_task(projector.run(stop))
    await asyncio.wait_for(projector.writing.wait(), 30)
    stop.set()
    projector.release.set()
    await asyncio.wait_for(task, 10)
    assert await pending_ids(redis, settings) == set()
    assert await pool.fetchval("SELECT status FROM executions WHERE id = 4") == "completed"


async def test_a_projector_dying_between_commit_and_ack_is_taken_over_and_changes_nothing(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """As a kill -9 after the commit: the batch stays pending, another projector reclaims and writes it
    again, and the rows are exactly those of the first write."""

    class DiesBeforeAck(Projector):
        committed = asyncio.Event()

        async def _dead_letter_and_ack(self, entries: Any, refused: Any) -> None:
            DiesBeforeAck.committed.set()
            await asyncio.Event().wait()  # never acknowledges

    settings = settings.model_copy(update={"visibility_timeout": 0.5})
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await ensure_groups(redis, Keys.from_settings(settings))
    await Emitter(redis, settings, execution_id=5, task_id="t5", client="acme", workflow_id=wf.id).whole_run(
        {"a": 1}, {"a": 2}
    )
    task = asyncio.create_task(DiesBeforeAck(settings, redis, pool, consumer="p-dies").run(asyncio.Event()))
    await asyncio.wait_for(DiesBeforeAck.committed.wait(), 30)
    task.cancel()
    # Bounded: a projector that does not end when cancelled fails here, by name, not at the suite's timeout.
    await asyncio.wait([task], timeout=30)
    assert task.done(), "the projector did not end when cancelled"
    assert len(await pending_ids(redis, settings)) == 5
    execution = dict(await pool.fetchrow("SELECT * FROM executions WHERE id = 5"))
    runs = [dict(r) for r in await pool.fetch("SELECT * FROM node_runs WHERE execution_id = 5")]
    assert execution["status"] == "completed"

    await drain(redis, settings, pool)

    assert dict(await pool.fetchrow("SELECT * FROM executions WHERE id = 5")) == execution
    assert [dict(r) for r in await pool.fetch("SELECT * FROM node_runs WHERE execution_id = 5")] == runs
    assert await dead_letters(redis, settings) == []


async def _statuses(url: str) -> dict[int, str]:
    """Each execution's status in the PostgreSQL at `url`, read on a connection of its own."""
    conn = await asyncpg.connect(url)
    try:
        return dict(await conn.fetch("SELECT id, status FROM executions ORDER BY id"))
    finally:
        await conn.close()


async def _node_runs(url: str) -> dict[int, int]:
    """How many node runs each execution has in the PostgreSQL at `url`."""
    conn = await asyncpg.connect(url)
    try:
        return dict(await conn.fetch("SELECT execution_id, count(*) FROM node_runs GROUP BY execution_id"))
    finally:
        await conn.close()


class Batches(Projector):
    """Records how many entries each batch it writes holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    async def _write_batch(self, batch: Any) -> None:
        self.sizes.append(len(batch.entries))
        await super()._write_batch(batch)


async def test_after_a_short_read_the_projector_lingers_and_takes_a_runs_next_events_in_one_batch(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # The longest linger: the events below, 20 ms apart, all come during it even on a busy machine.
    settings = settings.model_copy(update={"results_linger_ms": 1000})
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await ensure_groups(redis, Keys.from_settings(settings))
    run = Emitter(redis, settings, execution_id=5, task_id="t5", client="acme", workflow_id=wf.id)
    stop = asyncio.Event()
    projector = Batches(settings, redis, pool, consumer="p-test")
    task = asyncio.create_task(projector.run(stop))
    try:
        t = "2024-05-01T10:00:00.000Z"
        await run.emit(EventType.QUEUED, {"workflow_name": "wf", "enqueued_at": t, "initial_context": {}})
        await wait_read(redis, settings, task, acked=True)
        started = {"workflow_name": "wf", "enqueued_at": t, "started_at": t, "consumer": "w1", "delivery": 1}
        await run.emit(EventType.STARTED, {**started, "attempt": 0})
        node = {"step": 1, "node_id": "a1", "node_type": "action", "started_at": t}
        for type_, data in (
            (EventType.NODE_STARTED, {**node, "input_context": {}}),
            (EventType.NODE_FINISHED, {**node, "status": "success", "finished_at": t, "output_context": {}}),
            (EventType.SUCCEEDED, {"started_at": t, "finished_at": t, "final_context": {}, "nodes_executed": 1}),
        ):
            await asyncio.sleep(0.02)  # a run's steps, each flushed on its own
            await run.emit(type_, data)
        await wait_read(redis, settings, task, acked=True)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    # The first read found one event; the run's next four waited out the linger and came in one batch.
    assert projector.sizes == [1, 4]
    assert await pool.fetchval("SELECT status FROM executions WHERE id = 5") == "completed"


async def node_run_77_after(
    projector: Projector, pool: asyncpg.Pool, batches: list[list[Event]]
) -> tuple[list[str], dict[str, object] | None]:
    """The entries refused and node_event's row (its status and input context) once `batches` are written
    in turn from nothing, as the projector writes a batch."""
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM node_runs WHERE execution_id = 77")
        await conn.execute("DELETE FROM executions WHERE id = 77")
        refused: list[str] = []
        for batch in batches:
            refused += [r.entry_id for r in await projector._write(conn, batch)]
        row = await conn.fetchrow("SELECT status, input_context FROM node_runs WHERE execution_id = 77")
        return refused, None if row is None else dict(row)


async def test_a_node_event_postgresql_refuses_is_refused_when_it_shares_a_batch_with_the_next(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # A node run's two events in one batch go as one row, which carries only some of the older one's
    # values: an attempt PostgreSQL refuses went unseen, and the event was written in part instead of
    # being dead-lettered, as it is alone.
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    started = node_event(EventType.NODE_STARTED, "100-0", wf.id, input_context={"v": 1}, attempt="x")
    finished = node_event(EventType.NODE_FINISHED, "100-1", wf.id, status="success", attempt=1)
    projector = Projector(settings, redis, pool, consumer="p-test")

    one_by_one = await node_run_77_after(projector, pool, [[started], [finished]])
    assert one_by_one == (["100-0"], {"status": "success", "input_context": None})
    assert await node_run_77_after(projector, pool, [[started, finished]]) == one_by_one


async def test_pending_entries_behind_a_page_of_deleted_ones_are_read_again_at_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # A re-read of the projector's own pending entries that met a page of entries deleted while pending
    # took it for the end of them: the live ones behind waited for a reclaim (a visibility timeout), and
    # the deleted ones stayed pending, never dead-lettered nor acknowledged.
    settings = settings.model_copy(update={"projector_batch": 2, "visibility_timeout": 60.0})
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    queued = {"workflow_name": "wf", "enqueued_at": "2024-05-01T10:00:00.000Z", "initial_context": {"a": 1}}

    async def emit(n: int) -> str:
        emitter = Emitter(redis, settings, execution_id=n, task_id=f"t{n}", client="acme", workflow_id=wf.id)
        return await emitter.emit(EventType.QUEUED, queued)

    # XAUTOCLAIM scans ten times its count of pending entries a call: these keep the reclaim from them.
    for n in range(10, 30):
        await emit(n)
    gone = [await emit(2), await emit(3)]
    await emit(1)
    await redis.xreadgroup(keys.projector_group, "p-test", {keys.results: ">"})  # pending, as a crash leaves them
    await redis.xdel(keys.results, *gone)
    stop = asyncio.Event()
    task = asyncio.create_task(Projector(settings, redis, pool, consumer="p-test").run(stop))
    try:
        await until(
            lambda: pool.fetchval("SELECT count(*) FROM executions WHERE id = 1"), "the entry behind the deleted ones"
        )
        await until(lambda: pending_none(redis, settings), "every pending entry settled")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert sorted(f[DeadLetterField.ORIGINAL_ID] for f in await dead_letters(redis, settings)) == sorted(gone)


async def pending_none(redis: Redis, settings: Settings) -> bool:
    keys = Keys.from_settings(settings)
    return (await redis.xpending(keys.results, keys.projector_group))["pending"] == 0


@pytest.mark.parametrize("client", ["RESP3 by default", "RESP2", "RESP3 by name", "bytes", "bytes and RESP3"])
async def test_read_group_answers_alike_on_every_client(redis: Redis, settings: Settings, client: str) -> None:
    # The projector's reads: taken as the parser gives them on a plain client answering text, through
    # redis-py on any other; an entry deleted while pending comes with no fields on each.
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    ids = [await redis.xadd(keys.results, {"a": str(n), "b": "é"}) for n in range(3)]
    options = {
        "RESP3 by default": {},
        "RESP2": {"protocol": 2},
        "RESP3 by name": {"protocol": 3},
        "bytes": {"decode_responses": False},
        "bytes and RESP3": {"decode_responses": False, "protocol": 3},
    }[client]
    reader = create_redis(settings, prompt_writes=True, batch_commands=True, **options)  # type: ignore[arg-type]
    try:
        new = await read_group(reader, keys.projector_group, "c", keys.results, ">", count=10)
        await redis.xdel(keys.results, ids[1])
        again = await read_group(reader, keys.projector_group, "c", keys.results, "0", count=10)
    finally:
        await reader.aclose()
    entries = [(i, ["a", str(n), "b", "é"]) for n, i in enumerate(ids)]
    assert new == entries
    assert again == [entries[0], (ids[1], []), entries[2]]


async def test_an_older_node_event_that_is_not_a_start_is_written_alone(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # Only a node_started event folds with the next: a node_finished without its outcome (a status of
    # null, which PostgreSQL refuses) folded all the same, and went unseen rather than dead-lettered.
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    finished = node_event(EventType.NODE_FINISHED, "100-0", wf.id, status=None)
    started = node_event(EventType.NODE_STARTED, "100-1", wf.id, input_context={"v": 1})
    projector = Projector(settings, redis, pool, consumer="p-test")

    one_by_one = await node_run_77_after(projector, pool, [[finished], [started]])
    assert one_by_one == (["100-0"], {"status": "running", "input_context": {"v": 1}})
    assert await node_run_77_after(projector, pool, [[finished, started]]) == one_by_one


async def test_a_read_of_new_events_whose_reply_is_lost_leaves_none_waiting_for_a_reclaim(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis delivered the entries (pending for the projector now) and the reply was lost: reading new
    # entries again, as a retry did, never sees them, and they waited for a reclaim (a visibility timeout)
    # while later events were written before them. The projector reads its own pending entries instead.
    import shared.connections as connections

    settings = settings.model_copy(update={"visibility_timeout": 60.0})
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    real = connections.lean_command
    lost: list[Any] = []

    async def loses_a_reply(client: Redis, *args: Any) -> Any:
        reply = await real(client, *args)
        if args[0] == "XREADGROUP" and args[-1] == ">" and reply and not lost:
            lost.append(reply)
            raise RedisConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(connections, "lean_command", loses_a_reply)
    queued = {"workflow_name": "wf", "enqueued_at": "2024-05-01T10:00:00.000Z", "initial_context": {"a": 1}}
    emitter = Emitter(redis, settings, execution_id=1, task_id="t1", client="acme", workflow_id=wf.id)
    await emitter.emit(EventType.QUEUED, queued)
    stop = asyncio.Event()
    task = asyncio.create_task(Projector(settings, redis, pool, consumer="p-test").run(stop))
    try:
        await until(lambda: pool.fetchval("SELECT count(*) FROM executions WHERE id = 1"), "the lost entry projected")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert lost
