"""The pipeline end to end against real servers: requests stream -> worker -> results stream -> PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest
from redis.asyncio import Redis

from consumer.projector import apply_events
from consumer.worker import serve
from shared.events import Event
from shared.scripts import EnqueueResult
from shared.settings import Settings
from shared.streams import EventType, Keys, TaskField, TaskStatus, loads
from tests.support import (
    BRANCHING,
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    node_event,
    wait_for_events,
    wait_projected,
    wait_terminal,
)


async def test_linear_workflow_succeeds_and_is_projected(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    double = "context['n'] = context['n'] * 2\nprint('doubled')"
    root = "import math\ncontext['root'] = math.isqrt(context['n'])"
    wf = await create_workflow(redis, settings, pool, linear(double, root))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {"n": 8})
        events = await wait_terminal(redis, settings, [task.task_id])
        assert events[task.task_id].type == EventType.SUCCEEDED
        state = await redis.hgetall(Keys.from_settings(settings).task(task.task_id))
        assert state[TaskField.STATUS] == TaskStatus.SUCCESS
        result = loads(state[TaskField.RESULT])
        assert result == {"final_context": {"n": 16, "root": 4}, "nodes_executed": 4}
        await wait_projected(pool, [task.execution_id], {"completed"})
    row = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", task.execution_id)
    assert row["task_id"] == task.task_id and row["final_context"] == {"n": 16, "root": 4}
    assert row["nodes_executed"] == 4 and row["started_at"] <= row["finished_at"]
    chain = await pool.fetch("SELECT * FROM node_runs WHERE execution_id = $1 ORDER BY step", task.execution_id)
    assert [(r["step"], r["node_id"], r["status"]) for r in chain] == [
        (1, "start", "success"),
        (2, "a1", "success"),
        (3, "a2", "success"),
        (4, "end", "success"),
    ]
    assert chain[1]["input_context"] == {"n": 8} and chain[1]["output_context"] == {"n": 16}
    assert chain[1]["stdout"] == "doubled\n"
    # The worker's per-node identity is visible to node code but not left in the context.
    assert "_nova" not in row["final_context"]


async def test_branching_workflow_takes_each_branch(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, BRANCHING)
    async with in_process_worker(settings):
        big = await enqueue(redis, settings, wf, {"items": [60, 70]})
        small = await enqueue(redis, settings, wf, {"items": [10, 20]})
        events = await wait_terminal(redis, settings, [big.task_id, small.task_id])
        assert events[big.task_id].data["final_context"] == {"items": [60, 70], "total": 130, "route": "manual"}
        assert events[small.task_id].data["final_context"] == {"items": [10, 20], "total": 30, "route": "auto"}
        await wait_projected(pool, [big.execution_id, small.execution_id], {"completed"})
    for task, decision, taken in ((big, True, "approve"), (small, False, "auto")):
        row = await pool.fetchrow(
            "SELECT decision, next_node FROM node_runs WHERE execution_id = $1 AND node_id = 'big'", task.execution_id
        )
        assert (row["decision"], row["next_node"]) == (decision, taken)


async def test_failing_node_fails_the_execution_once(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(
        redis, settings, pool, linear("context['a'] = 1", "raise ValueError('bad invoice ' + context['id'])")
    )
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {"id": "INV-7"})
        events = await wait_terminal(redis, settings, [task.task_id])
        failed = events[task.task_id]
        assert failed.type == EventType.FAILED
        error = failed.data["error"]
        assert error["node_id"] == "a2" and error["type"] == "ValueError"
        assert error["message"] == "bad invoice INV-7"
        assert "a2" in error["traceback"] and "ValueError" in error["traceback"]
        await wait_projected(pool, [task.execution_id], {"failed"})
    state = await redis.hgetall(Keys.from_settings(settings).task(task.task_id))
    assert state[TaskField.STATUS] == TaskStatus.FAILURE and state[TaskField.ATTEMPT] == "0"
    # Deterministic failures are not retried.
    kinds = [e.type for e in await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 1)]
    assert EventType.RETRY not in kinds
    row = await pool.fetchrow("SELECT status, error, final_context FROM executions WHERE id = $1", task.execution_id)
    assert row["status"] == "failed" and row["error"]["node_id"] == "a2"
    assert row["final_context"] == {"id": "INV-7", "a": 1}
    failed_run = await pool.fetchrow(
        "SELECT status, error FROM node_runs WHERE execution_id = $1 AND node_id = 'a2'", task.execution_id
    )
    assert failed_run["status"] == "failure" and failed_run["error"]["type"] == "ValueError"


async def unprojected_run(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, items: list[int]
) -> tuple[EnqueueResult, list[Event]]:
    """A BRANCHING run's task and its events, run by a worker without a projector (nothing written yet)."""
    wf = await create_workflow(redis, settings, pool, BRANCHING)
    async with in_process_worker(settings, run_projector=False):
        task = await enqueue(redis, settings, wf, {"items": items})
        await wait_terminal(redis, settings, [task.task_id])
    return task, [Event.from_entry(i, f) for i, f in await redis.xrange(settings.results_stream)]


async def test_projector_is_idempotent_and_order_independent(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    task, events = await unprojected_run(redis, settings, pool, [500])
    assert len(events) >= 10

    async def snapshot() -> tuple[object, object]:
        execution = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", task.execution_id)
        runs = await pool.fetch("SELECT * FROM node_runs WHERE execution_id = $1 ORDER BY step", task.execution_id)
        return dict(execution), [dict(r) for r in runs]

    async with pool.acquire() as conn:
        await apply_events(conn, events)
        once = await snapshot()
        # The same events again, one at a time, newest first: nothing changes.
        for event in reversed(events):
            await apply_events(conn, [event])
        await apply_events(conn, events)
    assert await snapshot() == once
    execution, runs = once
    assert execution["status"] == "completed" and execution["final_context"]["route"] == "manual"  # type: ignore[index]
    assert len(runs) == 5  # type: ignore[arg-type]


async def test_projector_applies_events_in_any_order_to_the_same_rows(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    task, events = await unprojected_run(redis, settings, pool, [1])
    async with pool.acquire() as conn:
        for event in reversed(events):
            await apply_events(conn, [event])
    row = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", task.execution_id)
    assert row["status"] == "completed" and row["initial_context"] == {"items": [1]}
    assert row["enqueued_at"] is not None and row["started_at"] is not None
    statuses = [
        r["status"] for r in await pool.fetch("SELECT status FROM node_runs WHERE execution_id = $1", task.execution_id)
    ]
    assert statuses == ["success"] * 5


async def test_a_batch_holding_events_older_and_newer_than_the_row_ends_as_one_by_one(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # A batch's events of one execution are written as one row when all are newer than the stored row; a
    # batch that also holds older ones (a redelivered or reclaimed event) must end as their upserts one by
    # one do, e.g. the current node of the newest node_started, not of the batch's last one.
    task, events = await unprojected_run(redis, settings, pool, [500])

    async def after(conn: asyncpg.Connection, first: list[Event], batches: list[list[Event]]) -> dict[str, object]:
        await conn.execute("DELETE FROM node_runs WHERE execution_id = $1", task.execution_id)
        await conn.execute("DELETE FROM executions WHERE id = $1", task.execution_id)
        for batch in [first, *batches]:
            if batch:
                await apply_events(conn, batch)
        return dict(await conn.fetchrow("SELECT * FROM executions WHERE id = $1", task.execution_id))

    async with pool.acquire() as conn:
        # All newer than the row (none stored yet): as one by one.
        assert await after(conn, [], [events]) == await after(conn, [], [[e] for e in events])
        for k in range(len(events)):
            rest = events[:k] + events[k + 1 :]
            one_by_one = await after(conn, [events[k]], [[e] for e in rest])
            assert await after(conn, [events[k]], [rest]) == one_by_one, f"event {k} ({events[k].type}) first"
        for k in range(1, len(events)):
            # The stored event read again with older ones never written (a reclaim of a dead projector's
            # entries beside one a live one wrote but did not acknowledge): the older ones still land.
            again = events[: k + 1]
            one_by_one = await after(conn, [events[k]], [[e] for e in again])
            assert await after(conn, [events[k]], [again]) == one_by_one, f"event {k} ({events[k].type}) again"
    assert one_by_one["status"] == "completed"


async def test_a_batchs_events_of_one_node_run_end_as_one_by_one_whatever_the_row_holds(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    # A node run's events in one batch are written two by two, folded; the fold must end as their upserts
    # one by one do for any stored row: none, or one whose last event is older than both, between them, or
    # newer. The input context and the start time keep the first value met, so the events here differ in
    # both, and only some carry them.
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    events = [
        node_event(EventType.NODE_STARTED, "100-0", wf.id, input_context={"v": 1}, started_at="2024-05-01T10:00:01Z"),
        node_event(EventType.NODE_FINISHED, "100-1", wf.id, status="success", output_context={"v": 2},
                   started_at="2024-05-01T10:00:02Z", finished_at="2024-05-01T10:00:03Z", duration_ms=1.5),
        # The node run again (a crash before its checkpoint), without a start time the first time round.
        node_event(EventType.NODE_STARTED, "200-0", wf.id, input_context={"v": 3}),
        node_event(EventType.NODE_FINISHED, "200-5", wf.id, status="failure", error={"type": "E"},
                   started_at="2024-05-01T10:00:04Z", finished_at="2024-05-01T10:00:05Z"),
        node_event(EventType.NODE_STARTED, "300-0", wf.id, started_at="2024-05-01T10:00:06Z"),
    ]  # fmt: skip

    async def after(conn: asyncpg.Connection, stored: list[Event], batches: list[list[Event]]) -> dict[str, object]:
        await conn.execute("DELETE FROM node_runs WHERE execution_id = 77")
        await conn.execute("DELETE FROM executions WHERE id = 77")
        for batch in [stored, *batches]:
            if batch:
                await apply_events(conn, batch)
        return dict(await conn.fetchrow("SELECT * FROM node_runs WHERE execution_id = 77"))

    async with pool.acquire() as conn:
        # Every batch of two or more of them (a batch holds some of a run's events: the others were
        # written before, or come later), over a stored row made by each of the events, or none.
        for size in range(2, len(events) + 1):
            for batch in itertools.combinations(events, size):
                for stored in [[], *([e] for e in events)]:
                    one_by_one = await after(conn, stored, [[e] for e in batch])
                    folded = await after(conn, stored, [list(batch)])
                    assert folded == one_by_one, f"{[e.id for e in batch]} over {[e.id for e in stored]}"


async def test_reads_only_as_many_entries_as_free_slots(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(0.5)"))
    async with in_process_worker(settings, concurrency=2):
        tasks = [await enqueue(redis, settings, wf) for _ in range(6)]
        await wait_for_events(
            redis, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1", 2
        )
        pending = await redis.xpending(settings.requests_stream, settings.worker_group)
        # Two in flight; the other four wait in the stream for any worker with a free slot.
        assert pending["pending"] == 2
        [group] = await redis.xinfo_groups(settings.requests_stream)
        undelivered = await redis.xrange(settings.requests_stream, min=f"({group['last-delivered-id']}", max="+")
        assert len(undelivered) == 4
        await wait_terminal(redis, settings, [t.task_id for t in tasks])


async def test_a_part_that_fails_stops_the_whole_worker(
    redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One part of a worker process ending on an unexpected error (seen: the cluster client failing
    under a step that recreates a group) ends the process, rather than leaving its readers running on
    the sandbox providers and pool that are closed as it ends."""

    async def broken(self: object, stop: asyncio.Event) -> None:
        raise RuntimeError("projector broke")

    monkeypatch.setattr("consumer.projector.Projector.run", broken)
    with pytest.raises(RuntimeError, match="projector broke"):
        await asyncio.wait_for(serve(settings, stop=asyncio.Event()), 30)
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(("worker ", "scheduler", "webhooks"))]
    assert left == []
