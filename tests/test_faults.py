"""Delivery guarantees when things break: retries, dead letters, redelivery, reclaim, outages."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from cli.embedded import PostgresServer, RedisServer, free_port
from consumer.maintenance import Maintenance
from consumer.runs import _durably
from consumer.sandbox.base import Sandbox, SandboxInfraError, SandboxProvider, SandboxSpec
from consumer.sandbox.local import LocalSandboxProvider
from shared.db import create_pool, migrate_url
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, TaskField, TaskStatus, dumps, loads
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    make_settings,
    redis_binaries,
    redis_version,
    wait_for_events,
    wait_projected,
    wait_terminal,
)


class FlakyProvider:
    """The real local sandbox, but the first `failures` opens fail as an unreachable sandbox service would."""

    def __init__(self, inner: SandboxProvider, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.opened = 0

    async def start(self) -> None:
        await self.inner.start()

    async def open(self, spec: SandboxSpec) -> Sandbox:
        if self.failures > 0:
            self.failures -= 1
            raise SandboxInfraError("sandbox service unavailable")
        self.opened += 1
        return await self.inner.open(spec)

    async def aclose(self) -> None:
        await self.inner.aclose()


def flaky(settings: Settings, failures: int) -> dict[str, SandboxProvider]:
    return {"local": FlakyProvider(LocalSandboxProvider(settings), failures)}


def of_task(task_id: str, *types: EventType) -> Callable[[Any], bool]:
    return lambda e: e.task_id == task_id and (not types or e.type in types)


async def test_transient_error_is_retried_with_backoff_then_succeeds(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ok'] = True"))
    async with in_process_worker(settings, providers=flaky(settings, 2)):
        task = await enqueue(redis, settings, wf)
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.SUCCEEDED
    retries = await wait_for_events(redis, settings, of_task(task.task_id, EventType.RETRY), 2)
    assert [r.data["attempt"] for r in retries] == [1, 2]
    assert retries[0].data["error"]["message"] == "sandbox service unavailable"
    state = await redis.hgetall(Keys.from_settings(settings).task(task.task_id))
    assert state[TaskField.STATUS] == TaskStatus.SUCCESS and state[TaskField.ATTEMPT] == "2"
    # Each retry was parked off the stream and re-appended when due: no slot waited on the backoff.
    assert await redis.xlen(settings.requests_stream) == 3
    assert (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"] == 0


async def test_retries_exhausted_go_to_the_dead_letter_stream(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with in_process_worker(settings, providers=flaky(settings, 100), max_retries=2):
        task = await enqueue(redis, settings, wf, {"invoice": 1})
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.DEAD
    [(_, letter)] = await redis.xrange(settings.dead_letter_stream)
    assert letter["task_id"] == task.task_id and letter["dlq_reason"] == "retries_exhausted"
    assert letter["dlq_attempts"] == "2" and "sandbox service unavailable" in letter["dlq_error"]
    assert loads(letter["payload"]) == {"workflow_version": 1, "initial_context": {"invoice": 1}}
    state = await redis.hgetall(Keys.from_settings(settings).task(task.task_id))
    assert state[TaskField.STATUS] == TaskStatus.DEAD


async def test_malformed_entries_are_dead_lettered_and_the_worker_keeps_going(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['after'] = True"))
    stream = settings.requests_stream
    # What someone might type in redis-cli.
    await redis.xadd(stream, {"hello": "world"})
    await redis.xadd(
        stream,
        {"task_id": "t1", "execution_id": "901", "workflow_id": str(wf.id), "client": "acme", "payload": "{not json"},
    )
    await redis.xadd(
        stream,
        {
            "task_id": "t2",
            "execution_id": "902",
            "workflow_id": "999",
            "client": "acme",
            "payload": dumps({"initial_context": {}}),
        },
    )
    await redis.xadd(
        stream, {"task_id": "t3", "execution_id": "x", "workflow_id": "1", "client": "acme", "payload": "{}"}
    )
    async with in_process_worker(settings):
        good = await enqueue(redis, settings, wf)
        done = await wait_terminal(redis, settings, [good.task_id, "t2"])
    assert done[good.task_id].type == EventType.SUCCEEDED
    assert done["t2"].type == EventType.DEAD
    letters = {f.get("task_id", "-"): f for _, f in await redis.xrange(settings.dead_letter_stream)}
    assert letters["-"]["dlq_reason"] == "malformed" and "missing field" in letters["-"]["dlq_error"]
    assert letters["t1"]["dlq_reason"] == "malformed" and "not valid JSON" in letters["t1"]["dlq_error"]
    assert letters["t2"]["dlq_reason"] == "unknown_workflow" and "999" in letters["t2"]["dlq_error"]
    assert letters["t3"]["dlq_reason"] == "malformed" and "integers" in letters["t3"]["dlq_error"]
    assert letters["t1"]["payload"] == "{not json"
    assert (await redis.xpending(stream, settings.worker_group))["pending"] == 0


async def test_entry_delivered_too_often_is_dead_lettered(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    keys = Keys.from_settings(settings)
    from shared.connections import ensure_groups

    await ensure_groups(redis, keys)
    task = await enqueue(redis, settings, wf)
    # A consumer that keeps taking the entry and dying with it (a poison message crashing workers).
    await redis.xreadgroup(settings.worker_group, "crashy", {settings.requests_stream: ">"})
    for _ in range(settings.max_deliveries):
        await redis.xclaim(settings.requests_stream, settings.worker_group, "crashy", 0, [task.entry_id])
    async with in_process_worker(settings, visibility_timeout=0.2):
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.DEAD
    [(_, letter)] = await redis.xrange(settings.dead_letter_stream)
    assert letter["dlq_reason"] == "max_deliveries" and letter["dlq_original_id"] == task.entry_id
    assert int(letter["dlq_deliveries"]) == settings.max_deliveries + 2


async def test_redelivered_finished_task_is_acknowledged_without_running(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf)
        await wait_terminal(redis, settings, [task.task_id])
        [(_, fields)] = await redis.xrange(settings.requests_stream, min=task.entry_id, max=task.entry_id)
        again = await redis.xadd(settings.requests_stream, fields)
        # A marker after the duplicate: once it is done, the duplicate has been handled too.
        marker = await enqueue(redis, settings, wf)
        await wait_terminal(redis, settings, [marker.task_id])
    started = await wait_for_events(redis, settings, of_task(task.task_id, EventType.STARTED), 1)
    assert len(started) == 1
    pending = await redis.xpending_range(settings.requests_stream, settings.worker_group, again, again, 1)
    assert pending == []


async def test_healthy_long_run_is_not_taken_over(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("import time\ntime.sleep(2.5)"))
    async with (
        in_process_worker(settings, visibility_timeout=0.6),
        in_process_worker(settings, visibility_timeout=0.6),
    ):
        task = await enqueue(redis, settings, wf)
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.SUCCEEDED
    started = [e for e in await wait_for_events(redis, settings, of_task(task.task_id, EventType.STARTED), 1)]
    assert len(started) == 1 and started[0].data["delivery"] == 1


async def test_execution_time_limit_fails_with_reason_timeout(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['a'] = 1", "while True: pass", timeout=1.0))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf)
        done = await wait_terminal(redis, settings, [task.task_id])
    failed = done[task.task_id]
    assert failed.type == EventType.FAILED
    assert failed.data["error"]["reason"] == "timeout" and failed.data["error"]["node_id"] == "a2"


async def test_maintenance_trims_only_acknowledged_entries(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    keys = Keys.from_settings(settings)
    async with in_process_worker(settings):
        tasks = [await enqueue(redis, settings, wf) for _ in range(5)]
        await wait_terminal(redis, settings, [t.task_id for t in tasks])
    # One entry read by a consumer that then died: it must survive trimming.
    stuck = await enqueue(redis, settings, wf)
    await redis.xreadgroup(settings.worker_group, "dead-one", {settings.requests_stream: ">"})
    later = await enqueue(redis, settings, wf)
    maintenance = Maintenance(settings, redis, keys, Scripts(redis, keys), "me")
    removed = await maintenance.trim_requests()
    assert removed == 5
    remaining = [i for i, _ in await redis.xrange(settings.requests_stream)]
    assert remaining == [stuck.entry_id, later.entry_id]


async def test_worker_survives_a_redis_restart_with_aof(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool
) -> None:
    server = redis_factory(appendonly=True)
    settings = make_settings(server.url, db_url)
    client = Redis.from_url(server.url, decode_responses=True)
    wf = await create_workflow(client, settings, pool, linear("import time\ntime.sleep(0.05)\ncontext['x'] = 1"))
    async with in_process_worker(settings, concurrency=2):
        tasks = [await enqueue(client, settings, wf) for _ in range(10)]
        await wait_for_events(client, settings, lambda e: e.type == EventType.SUCCEEDED, 2)
        server.stop()
        server.start()
        done = await wait_terminal(client, settings, [t.task_id for t in tasks], timeout=60)
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    await client.aclose()


@pytest.mark.parametrize("binary", redis_binaries(), ids=redis_version)
async def test_worker_waits_out_a_read_only_redis_and_goes_on(
    redis_factory: Callable[..., RedisServer],
    db_url: str,
    pool: asyncpg.Pool,
    binary: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A failover leaves a worker's address on a replica for a while, which refuses writes with READONLY
    # (6.2: inside a script, as a script error). The worker's projector took it for a bug and stopped
    # the worker, and every run in it.
    server = redis_factory(binary=binary)
    settings = make_settings(server.url, db_url)
    client = Redis.from_url(server.url, decode_responses=True)
    admin = Redis.from_url(server.admin_url, decode_responses=True)
    wf = await create_workflow(client, settings, pool, linear("context['x'] = 1"))
    caplog.set_level(logging.WARNING, logger="consumer.projector")
    async with in_process_worker(settings) as worker:
        first = await enqueue(client, settings, wf)
        await wait_terminal(client, settings, [first.task_id])
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that is not there
        try:
            # Until the projector has met the refusal and waits it out (or the worker has ended).
            deadline = time.monotonic() + 30
            while not any(
                r.name == "consumer.projector" and "read only replica" in r.getMessage() for r in caplog.records
            ):
                assert not worker.task.done(), "the worker stopped on a read-only Redis"
                assert time.monotonic() < deadline, "the projector never met the read-only Redis"
                await asyncio.sleep(0.02)
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")
        second = await enqueue(client, settings, wf)
        done = await wait_terminal(client, settings, [second.task_id])
        # Projected by the worker's own projector, which met the refusal: before the worker stops.
        await wait_projected(pool, [first.execution_id, second.execution_id], {"completed"})
        assert not worker.task.done()
    assert done[second.task_id].type == EventType.SUCCEEDED
    await client.aclose()
    await admin.aclose()


async def test_a_full_redis_leaves_runs_waiting_not_redelivered(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool
) -> None:
    """Redis at its memory limit (noeviction) refuses a run's writes for as long as it stays full. The
    run waits for room: ended, its entry was reclaimed every visibility timeout (a delivery each), and
    after max_deliveries both it and the request queued behind it were dead-lettered."""
    server = redis_factory()
    settings = make_settings(server.url, db_url, visibility_timeout=1.5, max_deliveries=1, concurrency=1)
    client = Redis.from_url(server.url, decode_responses=True)
    admin = Redis.from_url(server.admin_url, decode_responses=True)
    keys = Keys.from_settings(settings)
    wf = await create_workflow(client, settings, pool, linear("import time\ntime.sleep(0.3)", "context['b'] = 2"))
    async with in_process_worker(settings):
        running, queued = await enqueue(client, settings, wf), await enqueue(client, settings, wf)
        await wait_for_events(
            client,
            settings,
            lambda e: e.task_id == running.task_id and e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1",
        )
        await admin.config_set("maxmemory", "1")
        try:
            # Full for two visibility timeouts: time to reclaim the entry of a run that ended (the waiting
            # run's heartbeats, every quarter of one, keep it).
            await asyncio.sleep(2 * settings.visibility_timeout)
            pending = await admin.xpending_range(keys.requests, keys.worker_group, min="-", max="+", count=10)
        finally:
            await admin.config_set("maxmemory", "0")
        assert [p["times_delivered"] for p in pending] == [1], pending
        done = await wait_terminal(client, settings, [running.task_id, queued.task_id])
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}, done
    await client.aclose()
    await admin.aclose()


async def test_an_outage_after_a_wait_for_memory_gets_its_whole_visibility_timeout() -> None:
    """A run's write waits out a full Redis for as long as it lasts; an outage that follows is then
    retried for a visibility timeout from its own first failure. It was timed from the last refusal
    for memory, so the backoff grown meanwhile (up to 2 s) was taken out of it."""
    settings = Settings(visibility_timeout=0.5)
    full_until = time.monotonic() + 2.0
    failures: list[float] = []

    async def write() -> None:
        if time.monotonic() < full_until:
            raise OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'")
        failures.append(time.monotonic())
        raise RedisConnectionError("Connection refused")

    with pytest.raises(RedisConnectionError):
        await _durably(write, settings)
    assert failures[-1] - failures[0] >= 0.9 * settings.visibility_timeout, failures


async def test_a_redis_back_from_an_older_snapshot_hands_out_no_id_twice(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool
) -> None:
    """Redis restarted from a snapshot older than its last ids (or a lagging replica promoted) has an id
    sequence that is behind, not missing: it handed out the id of an execution PostgreSQL holds for
    another task, whose events the projector then refused, and the new execution never reached
    PostgreSQL. The API's process remembers how far it saw the sequence go, and raises it again."""
    server = redis_factory()
    settings = make_settings(server.url, db_url)
    client = Redis.from_url(server.url, decode_responses=True)
    admin = Redis.from_url(server.admin_url, decode_responses=True)
    wf = await create_workflow(client, settings, pool, linear("context['x'] = 1"))
    scripts = Scripts(client, Keys.from_settings(settings))  # the API's, for its whole life
    async with in_process_worker(settings):
        first = await enqueue(client, settings, wf, scripts=scripts)
        await wait_terminal(client, settings, [first.task_id])
        await admin.save()
        later = [await enqueue(client, settings, wf, scripts=scripts) for _ in range(2)]
        await wait_terminal(client, settings, [t.task_id for t in later])
        await wait_projected(pool, [first.execution_id, *(t.execution_id for t in later)], {"completed"})
    server.kill()
    server.start()  # from the snapshot: the sequence is back at the first execution's id
    async with in_process_worker(settings):
        new = await enqueue(client, settings, wf, scripts=scripts)
        assert new.execution_id > later[-1].execution_id
        await wait_terminal(client, settings, [new.task_id])
        await wait_projected(pool, [new.execution_id], {"completed"})
    stored = await pool.fetch("SELECT id, task_id FROM executions ORDER BY id")
    assert [r["task_id"] for r in stored] == [first.task_id, *(t.task_id for t in later), new.task_id]
    await client.aclose()
    await admin.aclose()


async def test_postgres_outage_delays_projection_but_not_execution(
    redis: Redis, pg_factory: Callable[..., PostgresServer], settings: Settings
) -> None:
    pg = pg_factory()
    await migrate_url(pg.url)
    settings = settings.model_copy(update={"database_url": pg.url})
    pool = await create_pool(pg.url)
    wf = await create_workflow(redis, settings, pool, linear("context['done'] = True"))
    # The API raises the id sequence from PostgreSQL when it starts; with PostgreSQL down and no
    # sequence in Redis, enqueueing is refused rather than risk handing out an id twice.
    await Scripts(redis, Keys.from_settings(settings)).raise_sequence(
        await pool.fetchval("SELECT coalesce(max(id), 0) FROM executions")
    )
    await pool.close()
    async with in_process_worker(settings):
        pg.stop()
        tasks = [await enqueue(redis, settings, wf) for _ in range(5)]
        done = await wait_terminal(redis, settings, [t.task_id for t in tasks])
        assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
        # The events wait in the results stream: read but unacknowledged, or not yet read.
        groups = {g["name"]: g for g in await redis.xinfo_groups(settings.results_stream)}
        projector = groups[settings.projector_group]
        unread = await redis.xrange(settings.results_stream, min=f"({projector['last-delivered-id']}", max="+")
        assert projector["pending"] + len(unread) > 0
        pg.start()
        pool = await create_pool(pg.url)
        from tests.support import wait_projected

        await wait_projected(pool, [t.execution_id for t in tasks], {"completed"}, timeout=60)
        await pool.close()


async def test_checkpoint_resume_skips_finished_nodes(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    """A delivery that finds a checkpoint resumes after the last completed node."""
    # Node code may run under its own uid: the side-effect log must be writable by anyone.
    shared_dir = Path(tempfile.mkdtemp())
    shared_dir.chmod(0o777)
    marker = shared_dir / "side-effects.txt"
    count = 3
    effect = f"open({str(marker)!r}, 'a').write(context['_nova']['idempotency_key'] + '\\n')"
    wf = await create_workflow(redis, settings, pool, linear(*([effect] * count)))
    keys = Keys.from_settings(settings)
    task = await enqueue(redis, settings, wf)
    # As if a worker finished node a1 (step 2) and then died: its checkpoint is in the task hash.
    checkpoint = {"step": 2, "next_node": "a2", "context": {"resumed": True}, "visits": {"start": 1, "a1": 1}}
    await redis.hset(keys.task(task.task_id), TaskField.CHECKPOINT, dumps(checkpoint))
    # Sandboxes see the host read-only but for folders an operator shares.
    async with in_process_worker(settings, sandbox_writable=str(shared_dir)):
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
    assert done[task.task_id].data["final_context"] == {"resumed": True}
    assert done[task.task_id].data["nodes_executed"] == count + 2
    lines = marker.read_text().splitlines()
    assert lines == [f"{task.execution_id}:a{i}:{i + 1}" for i in range(2, count + 1)]
    started = await wait_for_events(redis, settings, of_task(task.task_id, EventType.STARTED), 1)
    assert started[0].data["resumed_from_step"] == 2
    shutil.rmtree(shared_dir)
