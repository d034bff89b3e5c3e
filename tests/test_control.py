"""Run control: cancel, pause and resume, drain.

The atomic steps (cancel, park, resume) with their races on every Redis version available here, as in
tests/test_scripts.py; then the real pipeline: a worker stopping a cancelled run (its sandbox killed),
a queued run that never starts, a cancel racing a finish, retry of a cancelled run from its last node,
a paused workflow that starts nothing until resumed and loses nothing, and a drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from shared.control import QUEUE, CancelFilter, RunControl, drained_field, workflow_scope
from shared.events import event_fields
from shared.executions import NotRetryable, Owner, retry_failure
from shared.scripts import CancelOutcome, EnqueueResult, RecordOutcome, Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, Lane, TaskField, TaskStatus, dumps, now_iso
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    kill9,
    linear,
    make_settings,
    process_alive,
    ready_for_scripts,
    script_keys,
    start_worker_process,
    wait_for_events,
    wait_projected,
    wait_terminal,
)

KEYS = script_keys("c")


@pytest.fixture
async def r(versioned_redis: Redis) -> Redis:
    return await ready_for_scripts(versioned_redis, KEYS)


def _control(r: Redis) -> RunControl:
    return RunControl(r, KEYS, task_ttl=3600)


async def _enqueue(r: Redis, task_id: str, client: str = "acme", workflow_id: int = 1) -> str:
    result = await Scripts(r, KEYS).enqueue(
        task_id=task_id,
        workflow_id=workflow_id,
        workflow_name="wf",
        client=client,
        enqueued_at=now_iso(),
        payload=dumps({"initial_context": {}}),
        queued_data=dumps({"workflow_name": "wf"}),
    )
    assert result.entry_id
    return result.entry_id


def _succeeded(task_id: str) -> dict[str, str]:
    return event_fields(EventType.SUCCEEDED, task_id=task_id, execution_id=1, workflow_id=1, client="acme", data={})


# ---- the atomic steps -------------------------------------------------------------------------------


async def test_cancel_ends_a_queued_task_once_and_frees_its_slot(r: Redis) -> None:
    await _enqueue(r, "a")
    assert await r.get(KEYS.inflight("acme")) == "1"
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(KEYS.control_channel)
    first = await _control(r).cancel_task("a", by="test")
    again = await _control(r).cancel_task("a", by="test")
    assert (first.outcome, first.status) == (CancelOutcome.CANCELLED, TaskStatus.REVOKED)
    assert (again.outcome, again.status) == (CancelOutcome.ALREADY_TERMINAL, TaskStatus.REVOKED)
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.REVOKED
    # Released once, not twice: the counter is gone, not negative.
    assert await r.get(KEYS.inflight("acme")) is None
    types = [f["type"] for _, f in await r.xrange(KEYS.results)]
    assert types == ["queued", "cancelled"]
    messages = [await pubsub.get_message(timeout=1.0) for _ in range(3)]
    # The subscribe confirmation reads as None; then one push per call (a repeat is harmless).
    assert [m["data"] for m in messages if m] == ["cancel a", "cancel a"]
    await pubsub.aclose()


async def test_cancel_racing_a_finish_leaves_exactly_one_outcome(r: Redis) -> None:
    scripts = Scripts(r, KEYS)
    for i in range(20):
        task_id = f"race{i}"
        entry = await _enqueue(r, task_id)
        await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=1)
        finish = scripts.record(
            task_id=task_id,
            client="acme",
            events=[_succeeded(task_id)],
            task_fields={TaskField.STATUS: TaskStatus.SUCCESS},
            terminal=True,
            ack_entry_id=entry,
            consumer="w1",
            token=uuid.uuid4().hex,
            task_ttl=3600,
        )
        recorded, cancelled = await asyncio.gather(finish, _control(r).cancel_task(task_id))
        winners = [recorded.outcome == RecordOutcome.WRITTEN, cancelled.outcome == CancelOutcome.CANCELLED]
        assert winners.count(True) == 1, (recorded, cancelled)
        status = await r.hget(KEYS.task(task_id), TaskField.STATUS)
        assert status == (TaskStatus.SUCCESS if winners[0] else TaskStatus.REVOKED)
        events = [await r.xrange(KEYS.results, i, i) for i in await r.lrange(KEYS.task_events(task_id), 0, -1)]
        terminal = [e[0][1]["type"] for e in events if e[0][1]["type"] in ("succeeded", "cancelled")]
        assert len(terminal) == 1
    # Every task released its in-flight slot exactly once.
    assert await r.get(KEYS.inflight("acme")) is None


async def test_a_client_cancels_only_its_own_and_unknown_is_missing(r: Redis) -> None:
    await _enqueue(r, "theirs", client="globex")
    mine = await _control(r).cancel_task("theirs", client="acme")
    assert mine.outcome == CancelOutcome.MISSING
    assert await r.hget(KEYS.task("theirs"), TaskField.STATUS) == TaskStatus.PENDING
    assert (await _control(r).cancel_task("nope")).outcome == CancelOutcome.MISSING
    assert (await _control(r).cancel_task("theirs", client="globex")).outcome == CancelOutcome.CANCELLED


async def test_record_and_dead_letter_write_nothing_over_a_cancel(r: Redis) -> None:
    scripts = Scripts(r, KEYS)
    entry = await _enqueue(r, "a")
    await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=1)
    await _control(r).cancel_task("a")
    late = await scripts.record(
        task_id="a",
        client="acme",
        events=[_succeeded("a")],
        task_fields={TaskField.STATUS: TaskStatus.SUCCESS},
        terminal=True,
        ack_entry_id=entry,
        consumer="w1",
        token="t",
        task_ttl=3600,
    )
    assert late.outcome == RecordOutcome.FINISHED and late.status == TaskStatus.REVOKED
    # The late finisher acknowledged the entry: nothing is left pending.
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    written, letter = await scripts.dead_letter(
        entry_id=entry, consumer="w1", letter={"x": "y"}, task_id="a", client="acme", event=None,
        task_fields=None, task_ttl=3600,
    )  # fmt: skip
    assert not written and letter == ""
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.REVOKED


async def test_park_respects_the_flag_and_resume_moves_each_once_in_order(r: Redis) -> None:
    scripts = Scripts(r, KEYS)
    control = _control(r)
    entries = [await _enqueue(r, f"p{i}") for i in range(5)]
    delivered = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=5)
    fields = {e: f for e, f in delivered[0][1]}
    # Not paused: a delivery is not parked.
    assert await scripts.park(entry_id=entries[0], consumer="w1", workflow_id=1, score=1, request={}) == 0
    await control.pause(workflow_scope(1))
    for i, entry in reversed(list(enumerate(entries))):  # parked out of order; resumed in order
        score = int(entry.split("-")[0]) * 1000 + i
        assert await scripts.park(entry_id=entry, consumer="w1", workflow_id=1, score=score, request=fields[entry]) == 1
    # Twice is once: the entry is no longer this worker's.
    assert await scripts.park(entry_id=entries[0], consumer="w1", workflow_id=1, score=0, request={}) == -1
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    state = await control.state()
    assert state["paused_workflows"][0]["parked"] == 5 and state["parked"] == 5
    # Resuming the queue moves nothing of a paused workflow.
    assert await control.resume(QUEUE) == 0
    moved = await asyncio.gather(control.resume(workflow_scope(1)), control.resume(workflow_scope(1)))
    assert sorted(moved) == [0, 5]
    back = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=10)
    assert [f["task_id"] for _, f in back[0][1]] == [f"p{i}" for i in range(5)]
    assert (await control.state())["parked"] == 0


async def test_a_resume_in_between_leaves_nothing_parked_for_ever(r: Redis) -> None:
    """Pause, resume and park racing: whatever the order, nothing stays parked once resumed."""
    scripts = Scripts(r, KEYS)
    control = _control(r)
    for i in range(20):
        entry = await _enqueue(r, f"q{i}")
        [[_, [(_, fields)]]] = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=1)
        await control.pause(QUEUE)
        parked, _ = await asyncio.gather(
            scripts.park(entry_id=entry, consumer="w1", workflow_id=1, score=i, request=fields),
            control.resume(QUEUE),
        )
        assert parked in (0, 1)
        if parked == 1:
            # Parked before the resume: the resume moved it back.
            back = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=1)
            assert back and back[0][1][0][1]["task_id"] == f"q{i}"
        # Finish the round: what this test's worker holds is acknowledged.
        for pending in await r.xpending_range(KEYS.requests, KEYS.worker_group, "-", "+", 10):
            await r.xack(KEYS.requests, KEYS.worker_group, pending["message_id"])
    assert await r.zcard(KEYS.parked(QUEUE)) == 0


async def test_reopen_retries_a_revoked_task_and_only_once(r: Redis) -> None:
    await _enqueue(r, "a")
    await _control(r).cancel_task("a")
    owner = Owner(task_id="a", client="acme", workflow_id=1, workflow_version=1)
    await r.set(KEYS.execution(1), "a")
    reopened = await retry_failure(Scripts(r, KEYS), 1, owner)
    assert reopened.task_id == "a"
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.RETRY
    assert await r.get(KEYS.inflight("acme")) == "1"
    # A second retry finds it no longer cancelled: nothing more is queued.
    with pytest.raises(NotRetryable, match="not FAILURE or REVOKED"):
        await retry_failure(Scripts(r, KEYS), 1, owner)
    assert await r.xlen(KEYS.requests) == 2 and await r.get(KEYS.inflight("acme")) == "1"


# ---- the pipeline -----------------------------------------------------------------------------------


@pytest.fixture
def settings(settings: Settings, shared_dir: Path) -> Settings:
    # Sandboxes see the host read-only but for folders an operator shares.
    return settings.model_copy(update={"sandbox_writable": str(shared_dir)})


# Node code names its sandbox by uid (leased per live sandbox when the worker is root) and pid: the pid
# is its own PID namespace's, meaningless here, so the uid is what is checked when there is one.
WHO = "import os\nopen({path!r}, 'a').write(f'{{os.getuid()}}:{{os.getpid()}} ')\n"


def _sandboxes(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [(int(u), int(p)) for u, p in (item.split(":") for item in path.read_text().split())]


def _sandbox_alive(uid: int, pid: int) -> bool:
    if uid == os.getuid():
        return process_alive(pid)
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        uids = next((line.split()[1:] for line in lines if line.startswith("Uid:")), [])
        state = next((line.split()[1] for line in lines if line.startswith("State:")), "")
        if uids and int(uids[0]) == uid and state != "Z":
            return True
    return False


SLOW = "import time\nfor _ in range(300): time.sleep(0.1)\ncontext['slow'] = True"


async def test_cancel_stops_a_running_node_and_kills_its_sandbox(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    pids = shared_dir / "pids"
    record = WHO.format(path=str(pids)) + "context['first'] = 1"
    wf = await create_workflow(redis, settings, pool, linear(record, SLOW, "context['never'] = 1"))
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a2",
        )  # fmt: skip
        result = await control.cancel_execution(task.execution_id, by="test")
        assert result.outcome == CancelOutcome.CANCELLED
        # The worker stops the run by the push: the node's process is gone without waiting for it.
        for _ in range(250):
            if not any(_sandbox_alive(*who) for who in _sandboxes(pids)):
                break
            await asyncio.sleep(0.02)
        assert _sandboxes(pids) and not any(_sandbox_alive(*who) for who in _sandboxes(pids))
        await wait_projected(pool, [task.execution_id], {"cancelled"})
        # The cancelled event is written (and may be projected) before the worker has stopped the run and
        # acknowledged its entry: wait for the acknowledgement rather than race it.
        for _ in range(500):
            pending = await redis.xpending(settings.requests_stream, settings.worker_group)
            if pending["pending"] == 0:
                break
            await asyncio.sleep(0.02)
        assert pending["pending"] == 0
    events = [e for e in await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id, 6)]
    types = [e.type for e in events]
    assert EventType.CANCELLED in types and EventType.SUCCEEDED not in types
    assert not any(e.type == EventType.NODE_STARTED and e.data.get("node_id") == "a3" for e in events)
    assert await redis.hget(Keys.from_settings(settings).task(task.task_id), TaskField.STATUS) == TaskStatus.REVOKED
    row = await pool.fetchrow("SELECT status, finished_at, error FROM executions WHERE id = $1", task.execution_id)
    assert row["status"] == "cancelled" and row["finished_at"] is not None


async def test_a_cancelled_queued_run_never_starts(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    cancelled = await enqueue(redis, settings, wf, {})
    other = await enqueue(redis, settings, wf, {})
    assert (await control.cancel_task(cancelled.task_id)).outcome == CancelOutcome.CANCELLED
    async with in_process_worker(settings):
        await wait_terminal(redis, settings, [other.task_id])
        await wait_projected(pool, [cancelled.execution_id], {"cancelled"})
        await wait_projected(pool, [other.execution_id], {"completed"})
        pending = await redis.xpending(settings.requests_stream, settings.worker_group)
        assert pending["pending"] == 0
    events = await wait_for_events(redis, settings, lambda e: e.task_id == cancelled.task_id, 2)
    assert [e.type for e in events] == [EventType.QUEUED, EventType.CANCELLED]


async def test_a_cancelled_run_is_retried_from_its_last_completed_node(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    flag = shared_dir / "go"
    wait = f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.05)\ncontext['b'] = 2"
    wf = await create_workflow(redis, settings, pool, linear("context['a'] = context.get('a', 0) + 1", wait))
    keys = Keys.from_settings(settings)
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, pool=pool)
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a2",
        )  # fmt: skip
        await control.cancel_task(task.task_id)
        await wait_projected(pool, [task.execution_id], {"cancelled"})
        flag.write_text("")
        owner = Owner(task.task_id, "acme", wf.id, wf.version)
        await retry_failure(control.scripts, task.execution_id, owner)
        await wait_projected(pool, [task.execution_id], {"completed"})
    result = await pool.fetchval("SELECT final_context FROM executions WHERE id = $1", task.execution_id)
    # a1 ran once: the retry resumed after it, from its checkpoint.
    assert result == {"a": 1, "b": 2}


async def until_parked(redis: Redis, keys: Keys, control: RunControl, held: list[EnqueueResult]) -> None:
    """Until every run of `held` is parked (delivered, put back, not started)."""
    for _ in range(500):
        if (await control.state())["parked"] == len(held):
            break
        await asyncio.sleep(0.02)
    assert (await control.state())["parked"] == len(held)
    for t in held:
        assert await redis.hget(keys.task(t.task_id), TaskField.STATUS) == TaskStatus.PENDING


async def test_a_paused_workflow_starts_nothing_until_resumed_and_loses_nothing(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    paused = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    running = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    keys = Keys.from_settings(settings)
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, pool=pool)
    await control.pause(workflow_scope(paused.id))
    # One slot: runs start one after another, so the order they start in is the order they were put back.
    async with in_process_worker(settings, concurrency=1):
        held = [await enqueue(redis, settings, paused, {"i": i}) for i in range(6)]
        other = await enqueue(redis, settings, running, {})
        await wait_terminal(redis, settings, [other.task_id])
        # Every paused request was delivered and parked, none started.
        await until_parked(redis, keys, control, held)
        assert (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"] == 0
        assert await control.resume(workflow_scope(paused.id)) == len(held)
        done = await wait_terminal(redis, settings, [t.task_id for t in held])
    assert all(e.type == EventType.SUCCEEDED for e in done.values())
    starts = await wait_for_events(
        redis, settings, lambda e: e.type == EventType.STARTED and e.workflow_id == paused.id, len(held)
    )
    # Resumed in the order they were queued.
    assert [e.execution_id for e in starts] == [t.execution_id for t in held]


async def test_a_workflow_paused_after_a_worker_ran_it_parks_its_next_runs(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A worker that knows a workflow runs its first deliveries without reading their task first; the
    pause must hold them all the same (the first write checks it)."""
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    keys = Keys.from_settings(settings)
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, pool=pool)
    async with in_process_worker(settings):
        first = await enqueue(redis, settings, wf, {})
        await wait_terminal(redis, settings, [first.task_id])
        await control.pause(workflow_scope(wf.id))
        held = [await enqueue(redis, settings, wf, {"i": i}) for i in range(3)]
        await until_parked(redis, keys, control, held)
        assert not [e for e in await redis.xrange(keys.results) if e[1]["type"] == "started" and e[1]["task_id"] in
                    {t.task_id for t in held}]  # fmt: skip
        assert await control.resume(workflow_scope(wf.id)) == len(held)
        done = await wait_terminal(redis, settings, [t.task_id for t in held])
    assert all(e.type == EventType.SUCCEEDED for e in done.values())


async def test_a_paused_queue_parks_every_workflow(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    await control.pause(QUEUE)
    async with in_process_worker(settings):
        tasks = [await enqueue(redis, settings, wf, {}) for _ in range(3)]
        for _ in range(500):
            if (await control.state())["parked"] == 3:
                break
            await asyncio.sleep(0.02)
        assert (await control.state())["queue_paused"] and (await control.state())["parked"] == 3
        assert await control.resume(QUEUE) == 3
        done = await wait_terminal(redis, settings, [t.task_id for t in tasks])
    assert all(e.type == EventType.SUCCEEDED for e in done.values())


async def test_drain_finishes_held_runs_and_takes_nothing_new(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    flag = shared_dir / "go"
    wait = f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.05)"
    slow = await create_workflow(redis, settings, pool, linear(wait))
    quick = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    async with in_process_worker(settings):
        held = await enqueue(redis, settings, slow, {})
        await wait_for_events(redis, settings, lambda e: e.task_id == held.task_id and e.type == EventType.STARTED)
        await control.drain(True)
        state = await control.state()
        assert state["draining"] and state["held_by_workers"] == 1
        # Each worker reports that it has stopped reading (and what it still holds): drain progress.
        for _ in range(250):
            if (await control.state())["drained_workers"]:
                break
            await asyncio.sleep(0.02)
        assert list((await control.state())["drained_workers"].values()) == [1]
        waiting = await enqueue(redis, settings, quick, {})
        flag.write_text("")
        await wait_terminal(redis, settings, [held.task_id])
        assert (await control.state())["held_by_workers"] == 0
        assert await redis.hget(Keys.from_settings(settings).task(waiting.task_id), TaskField.STATUS) == "PENDING"
        await control.drain(False)
        await wait_terminal(redis, settings, [waiting.task_id])


async def test_a_worker_still_reading_one_shard_is_not_reported_drained(
    redis: Redis, redis_url: str, db_url: str
) -> None:
    """Drain progress summed a worker's readers shard by shard and listed it as drained once any one
    shard had all of its lanes stopped: `nova drain` showed a worker whose readers of another shard still
    started runs as drained (an operator stopping it then cuts those runs short)."""
    keys = Keys.from_settings(make_settings(redis_url, db_url, shards=2))
    control = RunControl(redis, keys, task_ttl=3600)
    await control.drain(True)
    first, second = keys.all_shards
    for lane in Lane:
        await redis.hset(first.drained, drained_field("w1", lane), "1")
    await redis.hset(second.drained, drained_field("w1", Lane.NORMAL), "0")
    assert (await control.state())["drained_workers"] == {}
    for lane in (Lane.HIGH, Lane.LOW):
        await redis.hset(second.drained, drained_field("w1", lane), "2")
    assert (await control.state())["drained_workers"] == {"w1": 3 + 4}


async def test_bulk_cancel_by_filter_and_ids_touches_only_what_matches(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    a = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    b = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    # Nothing runs: projected as pending, they are what a filter finds.
    await control.pause(QUEUE)
    async with in_process_worker(settings):
        of_a = [await enqueue(redis, settings, a, {}) for _ in range(3)]
        of_b = await enqueue(redis, settings, b, {})
        globex = await enqueue(redis, settings, b, {}, client="globex")
        await wait_projected(pool, [t.execution_id for t in [*of_a, of_b, globex]], {"pending"})
        by_workflow = await control.cancel_many(CancelFilter(workflow_id=a.id))
        assert sorted(c.execution_id or 0 for c in by_workflow) == sorted(t.execution_id for t in of_a)
        assert all(c.outcome == CancelOutcome.CANCELLED for c in by_workflow)
        # A client's bulk cancel reaches its own executions only, whatever ids it names.
        as_acme = await control.cancel_many(CancelFilter(execution_ids=[globex.execution_id]), client="acme")
        assert [c.outcome for c in as_acme] == [CancelOutcome.MISSING]
        again = await control.cancel_many(CancelFilter(execution_ids=[of_a[0].execution_id, of_b.execution_id]))
        assert [c.outcome for c in again] == [CancelOutcome.ALREADY_TERMINAL, CancelOutcome.CANCELLED]
        await wait_projected(pool, [t.execution_id for t in [*of_a, of_b]], {"cancelled"})
        assert await redis.hget(Keys.from_settings(settings).task(globex.task_id), TaskField.STATUS) == "PENDING"
        assert await control.cancel_many(CancelFilter()) == []


async def test_bulk_cancel_and_retry_reach_executions_the_projector_has_not_written(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """GET /executions/{id} shows an execution as soon as it is queued (from Redis); cancelling it by a
    filter found none of them (PostgreSQL only), and retrying a failure answered 404."""
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    control = RunControl(redis, Keys.from_settings(settings), task_ttl=settings.task_ttl, pool=pool)
    queued = [await enqueue(redis, settings, wf, {}) for _ in range(3)]  # no worker: none projected
    globex = await enqueue(redis, settings, wf, {}, client="globex")
    assert await pool.fetchval("SELECT count(*) FROM executions") == 0
    cancelled = await control.cancel_many(CancelFilter(workflow_id=wf.id, status="pending"), client="acme")
    assert sorted(c.execution_id or 0 for c in cancelled) == sorted(t.execution_id for t in queued)
    assert {c.outcome for c in cancelled} == {CancelOutcome.CANCELLED}
    assert await redis.hget(Keys.from_settings(settings).task(globex.task_id), TaskField.STATUS) == "PENDING"
    await control.cancel_task(globex.task_id)
    failing = await create_workflow(redis, settings, pool, linear("raise ValueError('boom')"))
    async with in_process_worker(settings, run_projector=False):
        failed = await enqueue(redis, settings, failing, {})
        await wait_terminal(redis, settings, [failed.task_id])
        retried = await api.post(f"/executions/{failed.execution_id}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["task_id"] == failed.task_id
        assert await pool.fetchval("SELECT count(*) FROM executions WHERE id = $1", failed.execution_id) == 0


# ---- the API ----------------------------------------------------------------------------------------


async def _client_headers(api: httpx.AsyncClient, slug: str) -> dict[str, str]:
    response = await api.post("/clients", json={"slug": slug, "name": slug.title()})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['api_key']}"}


async def test_api_cancel_routes_own_only_idempotent_and_retry(
    api: httpx.AsyncClient, redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    acme = await _client_headers(api, "acme")
    globex = await _client_headers(api, "globex")
    created = await api.post("/workflows", json={"name": "w", "definition": linear("context['ran'] = True")})
    wf = created.json()["id"]
    assert (await api.post("/queue/pause")).json() == {"paused": True}
    first = (await api.post(f"/workflows/{wf}/execute", json={}, headers=acme)).json()
    second = (await api.post(f"/workflows/{wf}/execute", json={}, headers=acme)).json()
    # Another client's execution answers 404, exactly like a missing one, and stays queued.
    assert (await api.post(f"/executions/{first['execution_id']}/cancel", headers=globex)).status_code == 404
    assert (await api.post(f"/tasks/{first['task_id']}/cancel", headers=globex)).status_code == 404
    assert (await api.post("/executions/999999/cancel")).status_code == 404
    assert (await api.post("/tasks/not-a-task/cancel")).status_code == 404
    response = await api.post(f"/executions/{first['execution_id']}/cancel", headers=acme)
    assert response.status_code == 200, response.text
    assert response.json()["cancelled"] and response.json()["status"] == "REVOKED"
    again = (await api.post(f"/tasks/{first['task_id']}/cancel", headers=acme)).json()
    assert not again["cancelled"] and again["status"] == "REVOKED"
    task = (await api.get(f"/tasks/{first['task_id']}", headers=acme)).json()
    assert task["status"] == "REVOKED" and task["message"] == "Task was cancelled" and "client acme" in task["error"]
    bulk = await api.post("/executions/cancel", json={"ids": [second["execution_id"], first["execution_id"]]})
    assert bulk.json()["cancelled"] == 1 and bulk.json()["already_finished"] == 1
    assert (await api.post("/executions/cancel", json={"status": "completed"})).status_code == 422
    # Operator-only controls refuse a client key.
    assert (await api.post("/queue/resume", headers=acme)).status_code == 403
    assert (await api.post(f"/workflows/{wf}/pause", headers=acme)).status_code == 403
    assert (await api.post("/workflows/999999/pause")).status_code == 404
    assert (await api.post("/queue/resume")).json() == {"paused": False, "resumed": 0}
    async with in_process_worker(settings):
        await wait_projected(pool, [first["execution_id"], second["execution_id"]], {"cancelled"})
        listed = (await api.get("/executions", params={"status": "cancelled"})).json()
        assert listed["total"] == 2
        retried = await api.post(f"/executions/{first['execution_id']}/retry", headers=acme)
        assert retried.status_code == 202, retried.text
        await wait_projected(pool, [first["execution_id"]], {"completed"})


async def test_api_pause_resume_and_drain_show_in_control_inspect_and_metrics(
    api: httpx.AsyncClient, redis: Redis, settings: Settings
) -> None:
    created = await api.post("/workflows", json={"name": "w", "definition": linear("context['ran'] = True")})
    wf = created.json()["id"]
    assert (await api.post(f"/workflows/{wf}/pause")).json() == {"workflow_id": wf, "paused": True}
    state = (await api.get("/queue/control")).json()
    assert [w["workflow_id"] for w in state["paused_workflows"]] == [wf] and not state["queue_paused"]
    drained = (await api.post("/queue/drain")).json()
    assert drained["draining"] and drained["held_by_workers"] == 0
    inspected = (await api.get("/inspect")).json()
    assert inspected["control"]["draining"] and inspected["control"]["paused_workflows"][0]["workflow_id"] == wf
    metrics = (await api.get("/metrics")).text
    assert "nova_draining 1.0" in metrics and "nova_paused_workflows 1.0" in metrics
    assert not (await api.delete("/queue/drain")).json()["draining"]
    assert (await api.post(f"/workflows/{wf}/resume")).json() == {"workflow_id": wf, "paused": False, "resumed": 0}
    assert "nova_draining 0.0" in (await api.get("/metrics")).text


# ---- the CLI ----------------------------------------------------------------------------------------


async def test_cli_cancel_pause_resume_drain(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    from tests.test_cli import nova

    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    env = {"REDIS_URL": settings.redis_url or "", "DATABASE_URL": settings.database_url or ""}
    paused = await asyncio.to_thread(nova, "pause", "--workflow", str(wf.id), env=env)
    assert paused.returncode == 0 and f"paused workflow {wf.id}" in paused.stdout
    a = await enqueue(redis, settings, wf, {})
    b = await enqueue(redis, settings, wf, {})
    c = await enqueue(redis, settings, wf, {})
    done = await asyncio.to_thread(nova, "cancel", str(a.execution_id), env=env)
    assert done.returncode == 0 and "cancelled 1 of 1" in done.stdout, done.stderr
    by_task = await asyncio.to_thread(nova, "cancel", "--task", b.task_id, env=env)
    assert "cancelled 1 of 1" in by_task.stdout
    unknown = await asyncio.to_thread(nova, "cancel", "--task", "nope", env=env)
    assert unknown.returncode == 1 and "not found" in unknown.stdout
    assert (await asyncio.to_thread(nova, "cancel", env=env)).returncode == 2
    drained = await asyncio.to_thread(nova, "drain", "--json", env=env)
    assert json.loads(drained.stdout)["draining"] is True
    inspected = await asyncio.to_thread(nova, "inspect", env=env)
    assert "draining:        since" in inspected.stdout and f"paused workflows: {wf.id}" in inspected.stdout
    assert "drain ended" in (await asyncio.to_thread(nova, "drain", "--off", env=env)).stdout
    resumed = await asyncio.to_thread(nova, "resume", "--workflow", str(wf.id), env=env)
    assert resumed.returncode == 0
    async with in_process_worker(settings):
        events = await wait_terminal(redis, settings, [c.task_id])
    assert events[c.task_id].type == EventType.SUCCEEDED
    help_text = (await asyncio.to_thread(nova, "--help")).stdout
    assert all(word in help_text for word in ("cancel", "pause", "resume", "drain"))


# ---- failure paths ----------------------------------------------------------------------------------


async def test_a_cancel_whose_push_was_missed_is_caught_by_the_heartbeat(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """A worker reconnecting to the channel misses pushes: its heartbeat re-reads the status."""
    fast = settings.model_copy(update={"visibility_timeout": 2.0})
    keys = Keys.from_settings(fast)
    code = WHO.format(path=str(shared_dir / "pid")) + "import time\ntime.sleep(30)"
    wf = await create_workflow(redis, fast, pool, linear(code))
    async with in_process_worker(fast):
        task = await enqueue(redis, fast, wf, {})
        for _ in range(500):
            if (shared_dir / "pid").exists() and (shared_dir / "pid").read_text():
                break
            await asyncio.sleep(0.02)
        [who] = _sandboxes(shared_dir / "pid")
        # REVOKED written without the push, as if it had been published while the worker was away.
        await redis.hset(keys.task(task.task_id), TaskField.STATUS, TaskStatus.REVOKED)
        for _ in range(500):
            if (
                not _sandbox_alive(*who)
                and not (await redis.xpending(fast.requests_stream, fast.worker_group))["pending"]
            ):
                break
            await asyncio.sleep(0.02)
        assert not _sandbox_alive(*who)
        assert (await redis.xpending(fast.requests_stream, fast.worker_group))["pending"] == 0


async def test_a_run_whose_cancel_was_missed_stops_once_a_retry_reopens_its_task(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """A cancel whose push the worker missed, then a retry before the heartbeat's re-check: the task is
    RETRY, not REVOKED, when it looks. The first run went on beside the retry's own run, and ran the
    node after the one in flight a second time; it stops at its next write now."""
    keys = Keys.from_settings(settings)
    log, go = shared_dir / "steps", shared_dir / "go"

    def step(name: str, wait: bool = False) -> str:
        hold = f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n" if wait else ""
        return f"import os, time\nopen({str(log)!r}, 'a').write({name!r} + ' ')\n{hold}"

    log.touch()
    log.chmod(0o666)  # each sandbox has a uid of its own
    wf = await create_workflow(redis, settings, pool, linear(step("a1", wait=True), step("a2"), step("a3")))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {})
        for _ in range(500):
            if log.read_text():
                break
            await asyncio.sleep(0.02)
        assert log.read_text() == "a1 "
        # REVOKED written without the push, as if published while the worker was away; then the retry.
        await redis.hset(keys.task(task.task_id), TaskField.STATUS, TaskStatus.REVOKED)
        await retry_failure(Scripts(redis, keys), task.execution_id, Owner(task.task_id, "acme", wf.id, wf.version))
        go.touch()
        await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.SUCCEEDED)
        for _ in range(500):
            if not (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"]:
                break
            await asyncio.sleep(0.02)
        assert (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"] == 0
    # a1 was in flight at the cancel: the retry runs it again (the first run's end of it was refused).
    assert sorted(log.read_text().split()) == ["a1", "a1", "a2", "a3"], log.read_text()


async def test_a_superseded_run_leaves_the_concurrency_slot_to_its_retry(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """The slot of a concurrency key is held under the task's id, the retry's run's too: the first run,
    refused once a retry re-opened its task, released it, and a waiting run started beside the retry's
    (two runs of a limit-1 key at once). The retry's run keeps it until its end."""
    keys = Keys.from_settings(settings)
    go, go2 = shared_dir / "go", shared_dir / "go2"

    def wait_for(flag: Path) -> str:
        return f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"

    wf = await create_workflow(
        redis, settings, pool, linear(wait_for(go), wait_for(go2), concurrency={"key": "k", "limit": 1})
    )

    def started(task_id: str, node: str) -> Callable[[Any], bool]:
        return lambda e: e.task_id == task_id and e.type == EventType.NODE_STARTED and e.data["node_id"] == node

    async with in_process_worker(settings):
        a = await enqueue(redis, settings, wf, {})
        await wait_for_events(redis, settings, started(a.task_id, "a1"))
        # The cancel as its step writes it (REVOKED, the slot given back), without the push; the retry.
        await redis.hset(keys.task(a.task_id), TaskField.STATUS, TaskStatus.REVOKED)
        await redis.zrem(keys.concurrency_holders("k"), a.task_id)
        await retry_failure(Scripts(redis, keys), a.execution_id, Owner(a.task_id, "acme", wf.id, wf.version))
        await wait_for_events(redis, settings, started(a.task_id, "a1"), count=2)  # the retry's run
        b = await enqueue(redis, settings, wf, {})
        go.touch()  # both runs of `a` end a1; the first is refused at its write
        await wait_for_events(redis, settings, started(a.task_id, "a2"))
        with contextlib.suppress(TimeoutError):  # b must not start meanwhile (it did, at once)
            await wait_for_events(redis, settings, started(b.task_id, "start"), timeout=1.5)
        go2.touch()
        done = await wait_terminal(redis, settings, [a.task_id, b.task_id])
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    order = [(f["task_id"], f["type"]) for _, f in await redis.xrange(settings.results_stream)]
    assert order.index((b.task_id, "started")) > order.index((a.task_id, "succeeded")), order


async def test_a_run_cancelled_while_its_worker_is_dead_is_never_resumed(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """kill -9 of the worker holding a run, then a cancel: the worker that reclaims it only acknowledges it."""
    fast = settings.model_copy(update={"visibility_timeout": 2.0})
    starts = shared_dir / "starts"
    code = f"open({str(starts)!r}, 'a').write('x')\nimport time\ntime.sleep(30)"
    wf = await create_workflow(redis, fast, pool, linear(code))
    control = RunControl(redis, Keys.from_settings(fast), task_ttl=fast.task_ttl, pool=pool)
    proc = start_worker_process(fast, shared_dir / "worker.log")
    try:
        task = await enqueue(redis, fast, wf, {})
        for _ in range(1500):
            if starts.exists() and starts.read_text():
                break
            await asyncio.sleep(0.02)
        assert starts.read_text() == "x"
    finally:
        kill9(proc)
    assert (await control.cancel_task(task.task_id)).outcome == CancelOutcome.CANCELLED
    async with in_process_worker(fast):
        for _ in range(500):
            if not (await redis.xpending(fast.requests_stream, fast.worker_group))["pending"]:
                break
            await asyncio.sleep(0.02)
        assert (await redis.xpending(fast.requests_stream, fast.worker_group))["pending"] == 0
    # Reclaimed and acknowledged, never run again.
    assert starts.read_text() == "x"
    events = await redis.lrange(Keys.from_settings(fast).task_events(task.task_id), 0, -1)
    last = await redis.xrange(fast.results_stream, events[-1], events[-1])
    assert last[0][1]["type"] == EventType.CANCELLED


async def test_sse_task_stream_ends_with_the_cancel(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    from api.event_hub import EventHub
    from api.event_streams import task_event_stream

    keys = Keys.from_settings(settings)
    hub = EventHub(redis, keys, block_ms=100)
    await hub.start()
    try:
        wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
        task = await enqueue(redis, settings, wf)
        await RunControl(redis, keys, task_ttl=settings.task_ttl).cancel_task(task.task_id)
        # The cancel is the terminal event: the stream replays it, then closes.
        events = [e async for e in task_event_stream(redis, keys, hub, task.task_id, None)]
        assert [e.event for e in events] == ["queued", "cancelled"]
    finally:
        await hub.stop()


def test_control_steps_touch_one_slot_under_a_shard_tag() -> None:
    from redis.crc import key_slot

    settings = Settings(redis_url="redis://unused")
    for shard in range(4):
        keys = Keys.shard(settings, shard)
        steps = {
            "cancel": [keys.task("t"), keys.results, keys.task_events("t"), keys.inflight("acme")],
            "park": [keys.control, keys.requests, keys.parked(QUEUE), keys.parked(workflow_scope(7))],
            "resume": [keys.control, keys.parked(workflow_scope(7)), keys.requests],
        }
        for step, names in steps.items():
            slots = {key_slot(n.encode()) for n in names}
            # The client's counter lives in the client's shard: only shard_of_client's keys share its slot.
            if step == "cancel" and shard != Keys.shard_of_client("acme", 4):
                continue
            assert len(slots) == 1, (step, names)


async def test_retrying_a_run_cancelled_while_queued_runs_it_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """The cancelled run's request is still in the stream when the retry adds its own: one runs."""
    runs = shared_dir / "runs"
    wf = await create_workflow(redis, settings, pool, linear(f"open({str(runs)!r}, 'a').write('x')"))
    keys = Keys.from_settings(settings)
    task = await enqueue(redis, settings, wf, {})
    await RunControl(redis, keys, task_ttl=settings.task_ttl).cancel_task(task.task_id)
    await retry_failure(Scripts(redis, keys), task.execution_id, Owner(task.task_id, "acme", wf.id, wf.version))
    assert await redis.xlen(settings.requests_stream) == 2
    async with in_process_worker(settings):
        await wait_projected(pool, [task.execution_id], {"completed"})
        for _ in range(500):
            if not (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"]:
                break
            await asyncio.sleep(0.02)
    assert runs.read_text() == "x"
    starts = [e async for e in _task_events(redis, keys, task.task_id) if e == EventType.STARTED]
    assert len(starts) == 1


async def _task_events(redis: Redis, keys: Keys, task_id: str) -> AsyncIterator[str]:
    for event_id in await redis.lrange(keys.task_events(task_id), 0, -1):
        [(_, fields)] = await redis.xrange(keys.results, event_id, event_id)
        yield fields["type"]
