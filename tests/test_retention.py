"""Retention against real PostgreSQL and Redis: what goes, what stays, once per tick across workers,
a dry run that deletes nothing, and a projector that goes on projecting during a long cleanup."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from redis.asyncio import Redis

from cli.embedded import PostgresServer, RedisServer
from consumer.maintenance import Maintenance
from consumer.scheduler import CLEANUP, Scheduler
from shared.catalog import WorkflowCatalog
from shared.connections import REDIS_UNAVAILABLE
from shared.db import LazyPool, migrate_url
from shared.retention import CleanupReport, Retention, cutoff_for
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys
from tests.support import create_workflow, enqueue, in_process_worker, linear, wait_projected

pytestmark = pytest.mark.timeout(120)

DAY = timedelta(days=1)


async def seed(pool: asyncpg.Pool, workflow_id: int, first: int, last: int, status: str, age: timedelta) -> None:
    """Executions first..last (ids) in `status`, last touched `age` ago, with two node runs each."""
    moment = datetime.now(UTC) - age
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO clients (slug, name) VALUES ('acme', 'acme') ON CONFLICT DO NOTHING")
        await conn.execute(
            """INSERT INTO executions (id, task_id, workflow_id, client_slug, status, enqueued_at, finished_at,
                                       updated_at, last_event_ms, last_event_seq)
               SELECT g, 'seed-' || g, $1, 'acme', $2, $3, $3, $3, 1, 0 FROM generate_series($4::bigint, $5) g""",
            workflow_id,
            status,
            moment,
            first,
            last,
        )
        await conn.execute(
            """INSERT INTO node_runs (execution_id, step, node_id, node_type, status, last_event_ms, last_event_seq)
               SELECT g, s, 'n' || s, 'action', 'success', 1, 0
               FROM generate_series($1::bigint, $2) g, generate_series(1, 2) s""",
            first,
            last,
        )


async def ids(pool: asyncpg.Pool) -> set[int]:
    return {r["id"] for r in await pool.fetch("SELECT id FROM executions")}


async def test_old_finished_executions_go_recent_and_unfinished_stay(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    old = 40 * DAY
    for first, status in enumerate(["completed", "failed", "dead", "cancelled"], start=1):
        await seed(pool, wf.id, first * 10, first * 10 + 2, status, old)  # 10-12, 20-22, 30-32, 40-42
    for first, status in enumerate(["pending", "running", "retrying"], start=5):
        await seed(pool, wf.id, first * 10, first * 10 + 2, status, old)  # 50-52, 60-62, 70-72: unfinished
    await seed(pool, wf.id, 80, 82, "completed", 29 * DAY)  # finished, but within the retention
    # Finished in PostgreSQL, running again in Redis (a retry reopened it; the projector lags).
    await redis.hset(Keys.from_settings(settings).task("seed-11"), mapping={"status": "RUNNING"})
    await redis.hset(Keys.from_settings(settings).task("seed-12"), mapping={"status": "FAILURE"})
    keys = Keys.from_settings(settings)
    old_ms = int((datetime.now(UTC) - old).timestamp() * 1000)
    for stream in (keys.dead_letter, keys.projector_dead_letter):
        await redis.xadd(stream, {"dlq_reason": "old"}, id=f"{old_ms}-0")
        await redis.xadd(stream, {"dlq_reason": "recent"})

    retention = Retention(redis, keys, pool, batch=2)  # several batches, and the kept row among them
    planned = await retention.plan(cutoff_for(30))
    # What the run deletes: the reopened one is kept (a dry run counted it as going).
    assert (planned.executions, planned.node_runs, planned.kept_reopened) == (11, 22, 1)
    assert planned.oldest is not None and abs(planned.oldest - (datetime.now(UTC) - old)) < DAY
    assert planned.dead_letters == {keys.dead_letter: 1, keys.projector_dead_letter: 1}
    assert len(await ids(pool)) == 24  # the plan deleted nothing

    report = await retention.run(cutoff_for(30), pause=0)
    assert (report.executions, report.node_runs, report.kept_reopened) == (11, 22, 1)
    assert report.batches >= 6
    assert await ids(pool) == {11, 50, 51, 52, 60, 61, 62, 70, 71, 72, 80, 81, 82}
    orphans = await pool.fetchval(
        "SELECT count(*) FROM node_runs n WHERE NOT EXISTS (SELECT 1 FROM executions e WHERE e.id = n.execution_id)"
    )
    assert orphans == 0 and await pool.fetchval("SELECT count(*) FROM node_runs") == 26
    for stream in (keys.dead_letter, keys.projector_dead_letter):
        [(_, fields)] = await redis.xrange(stream)
        assert fields["dlq_reason"] == "recent"
    again = await retention.run(cutoff_for(30), pause=0)
    assert (again.executions, again.node_runs) == (0, 0)


async def test_two_workers_schedulers_run_one_cleanup_per_tick(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    keys = Keys.from_settings(settings)
    cron = settings.model_copy(update={"cleanup_cron": "* * * * *"})  # a tick a minute

    def scheduler(name: str) -> Scheduler:
        return Scheduler(cron, redis, WorkflowCatalog(redis, pool, keys), name, pool)

    a, b = scheduler("worker-a"), scheduler("worker-b")
    await seed(pool, wf.id, 10_000, 10_000, "completed", DAY)  # a recent one, with the largest id
    now = int(time.time() * 1000)
    # Nobody created it: the first look registers the built-in schedule for its next tick.
    assert await asyncio.gather(a.tick(now_ms=now), b.tick(now_ms=now)) == [0, 0]
    tick = await redis.zscore(keys.builtin_schedules, CLEANUP)
    assert tick is not None and now < tick <= now + 60_000
    for n in range(3):
        await seed(pool, wf.id, 100 * n + 1, 100 * n + 5, "completed", 40 * DAY)
        at = int(tick) + n * 60_000 + 10
        await asyncio.gather(a.tick(now_ms=at), b.tick(now_ms=at))
        assert a.cleanups + b.cleanups == n + 1
        running = [s.cleanup for s in (a, b) if s.cleanup is not None and not s.cleanup.done()]
        await asyncio.gather(*running)
        last = json.loads(await redis.get(keys.cleanup_last) or "{}")
        assert last["tick_ms"] == int(tick) + n * 60_000 and last["executions"] == 5
        assert await ids(pool) == {10_000}
    # Retention off: no claim at all.
    off = Scheduler(settings.model_copy(update={"retention_days": 0}), redis, a.catalog, "c", pool)
    assert not await off.claim_cleanup(int(tick) + 3_600_000)


async def test_a_worker_runs_the_cleanup_on_its_own(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    """No operator step: a running worker registers the built-in schedule and fires it."""
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    keys = Keys.from_settings(settings)
    await seed(pool, wf.id, 1, 20, "failed", 31 * DAY)
    await seed(pool, wf.id, 21, 22, "failed", 1 * DAY)
    async with in_process_worker(settings, cleanup_cron="* * * * * *"):  # every second
        deadline = time.monotonic() + 60
        while await redis.get(keys.cleanup_last) is None:
            assert time.monotonic() < deadline, "no cleanup ran"
            await asyncio.sleep(0.1)
    assert await ids(pool) == {21, 22}


async def test_projector_keeps_projecting_while_a_big_cleanup_holds_its_batches(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
    await seed(pool, wf.id, 1_000_001, 1_002_000, "completed", 60 * DAY)
    await seed(pool, wf.id, 2_000_000, 2_000_000, "completed", DAY)
    keys = Keys.from_settings(settings)
    projected: list[int] = []

    async def while_held(report: CleanupReport) -> None:
        # Inside the batch's transaction, its rows locked: a new execution must still reach PostgreSQL.
        if report.batches in (1, 7, 15):
            task = await enqueue(redis, settings, wf)
            await wait_projected(pool, [task.execution_id], {"completed"}, timeout=60)
            projected.append(task.execution_id)

    # The worker's own cleanup is off: this test runs one by hand, a batch at a time.
    async with in_process_worker(settings, retention_days=0):
        # Its own pool: the test's is for wait_projected, which runs while a batch holds a connection.
        async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) as cleanup_pool:
            report = await Retention(redis, keys, cleanup_pool, batch=100).run(cutoff_for(30), on_batch=while_held)
    assert report.batches == 20 and report.executions == 2000 and report.node_runs == 4000
    assert len(projected) == 3
    assert await ids(pool) == {2_000_000, *projected}


async def test_dead_letter_streams_are_capped(redis: Redis, settings: Settings) -> None:
    capped = settings.model_copy(update={"dead_letter_maxlen": 1000})
    keys = Keys.from_settings(capped)
    for stream in (keys.dead_letter, keys.projector_dead_letter):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(3000):
                pipe.xadd(stream, {"n": str(i)})
            await pipe.execute()
    maintenance = Maintenance(capped, redis, keys, Scripts(redis, keys), "me")
    assert await maintenance.trim_dead_letters() > 0
    for stream in (keys.dead_letter, keys.projector_dead_letter):
        # Approximate: whole nodes go, so a little more than the cap may stay, never less.
        assert 1000 <= await redis.xlen(stream) < 2000
        [(_, newest)] = await redis.xrevrange(stream, count=1)
        assert newest["n"] == "2999"


async def test_redis_lost_mid_cleanup_rolls_its_batch_back_and_the_next_run_finishes(
    redis_factory: Callable[..., RedisServer], settings: Settings, pool: asyncpg.Pool
) -> None:
    server = redis_factory(appendonly=True)
    own = settings.model_copy(update={"redis_url": server.url})
    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        wf = await create_workflow(redis, own, pool, linear("pass"))
        await seed(pool, wf.id, 1, 9, "completed", 40 * DAY)
        await seed(pool, wf.id, 10, 10, "completed", DAY)
        retention = Retention(redis, Keys.from_settings(own), pool, batch=3)

        async def stop_redis(report: CleanupReport) -> None:
            if report.batches == 1:
                server.stop()  # the next batch's check of Redis fails

        with pytest.raises(REDIS_UNAVAILABLE):
            await retention.run(cutoff_for(30), pause=0, on_batch=stop_redis)
        # The first batch is gone whole; the failed one left its rows and their node runs whole.
        left = await ids(pool)
        assert len(left) == 7
        runs = await pool.fetch("SELECT execution_id, count(*) AS n FROM node_runs GROUP BY execution_id")
        assert {r["execution_id"]: r["n"] for r in runs} == {i: 2 for i in left}
        server.start()
        await redis.aclose()
        redis = Redis.from_url(server.url, decode_responses=True)
        report = await Retention(redis, Keys.from_settings(own), pool, batch=3).run(cutoff_for(30), pause=0)
        assert report.executions == 6 and await ids(pool) == {10}
    finally:
        await redis.aclose()


async def test_postgresql_down_at_a_tick_the_next_tick_cleans_up(
    redis: Redis, pg_factory: Callable[..., PostgresServer], settings: Settings
) -> None:
    pg = pg_factory()
    await migrate_url(pg.url)
    own = settings.model_copy(update={"database_url": pg.url, "cleanup_cron": "* * * * *"})
    keys = Keys.from_settings(own)
    lazy = LazyPool(pg.url)
    try:
        setup = await lazy.get()  # a running worker's pool, open before PostgreSQL goes away
        wf = await create_workflow(redis, own, setup, linear("pass"))
        await seed(setup, wf.id, 1, 4, "dead", 40 * DAY)
        await seed(setup, wf.id, 5, 5, "completed", DAY)
        scheduler = Scheduler(own, redis, WorkflowCatalog(redis, lazy, keys), "w", lazy)
        now = int(time.time() * 1000)
        await scheduler.claim_cleanup(now)  # registers the built-in schedule
        tick = int(await redis.zscore(keys.builtin_schedules, CLEANUP) or 0)
        pg.stop()
        assert await scheduler.claim_cleanup(tick + 10)
        assert scheduler.cleanup is not None
        await scheduler.cleanup  # fails inside, logs, and ends: nothing escapes into the scheduler
        assert await redis.get(keys.cleanup_last) is None
        pg.start()
        assert await scheduler.claim_cleanup(tick + 60_010)
        await scheduler.cleanup
        last = json.loads(await redis.get(keys.cleanup_last) or "{}")
        assert last["executions"] == 4 and last["node_runs"] == 8
        assert await (await lazy.get()).fetchval("SELECT count(*) FROM executions") == 1
    finally:
        await lazy.close()


async def test_the_largest_execution_id_stays_so_ids_are_never_handed_out_twice(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await seed(pool, wf.id, 1, 3, "completed", 400 * DAY)  # nothing ran for a year
    keys = Keys.from_settings(settings)
    retention = Retention(redis, keys, pool)
    assert (await retention.plan(cutoff_for(30))).executions == 2
    report = await retention.run(cutoff_for(30), pause=0)
    assert report.executions == 2 and await ids(pool) == {3}
    # Redis loses its id sequence: PostgreSQL still says where it stood, and the next id is above it.
    await redis.delete(keys.execution_seq)
    task = await enqueue(redis, settings, wf)
    assert task.execution_id == 4


async def test_the_cleanup_trims_every_shards_dead_letters(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """With several shards each has its own dead-letter streams (the workers' and the projector's): one
    cleanup, wherever it runs, covers them all."""
    sharded = settings.model_copy(update={"shards": 3})
    shards = Keys.from_settings(sharded).all_shards
    old_ms = int((datetime.now(UTC) - 40 * DAY).timestamp() * 1000)
    streams = [s for k in shards for s in (k.dead_letter, k.projector_dead_letter)]
    assert len(set(streams)) == 6
    for stream in streams:
        await redis.xadd(stream, {"dlq_reason": "old"}, id=f"{old_ms}-0")
        await redis.xadd(stream, {"dlq_reason": "recent"})
    retention = Retention(redis, shards[0], pool)
    planned = await retention.plan(cutoff_for(30))
    assert planned.dead_letters == dict.fromkeys(streams, 1)
    report = await retention.run(cutoff_for(30), pause=0)
    assert report.dead_letters == dict.fromkeys(streams, 1)
    for stream in streams:
        [(_, fields)] = await redis.xrange(stream)
        assert fields["dlq_reason"] == "recent"
