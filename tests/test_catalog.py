"""The workflow catalog when PostgreSQL, its record, is down: a miss in Redis is then "unknown for now",
never "no such workflow", and a worker started during the outage uses PostgreSQL once it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from cli.embedded import PostgresServer
from shared.catalog import CatalogUnavailable, StoredWorkflow, WorkflowCatalog
from shared.db import LazyPool, create_pool, migrate_url
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, entry_id_parts
from tests.support import create_workflow, enqueue, in_process_worker, linear, wait_terminal


async def known_only_to_postgres(redis: Redis, settings: Settings, pg: PostgresServer) -> StoredWorkflow:
    await migrate_url(pg.url)
    pool = await create_pool(pg.url)
    try:
        wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"), name="pg-only")
    finally:
        await pool.close()
    # As after a Redis flush or a new Redis instance: PostgreSQL still has the workflow, Redis has not.
    keys = Keys.from_settings(settings)
    await redis.delete(keys.workflow(wf.id), keys.workflow_version(wf.id, wf.version))
    return wf


async def test_a_miss_while_postgresql_is_down_is_transient_then_found(
    redis: Redis, settings: Settings, pg_factory: Callable[..., PostgresServer]
) -> None:
    pg = pg_factory()
    wf = await known_only_to_postgres(redis, settings, pg)
    pg.stop()
    lazy = LazyPool(pg.url)
    catalog = WorkflowCatalog(redis, lazy, Keys.from_settings(settings))
    try:
        with pytest.raises(CatalogUnavailable, match=str(wf.id)):
            await catalog.get(wf.id)
        assert lazy.current is None
        pg.start()
        found = await catalog.get(wf.id)
        assert found is not None and found.name == "pg-only"
        # Found in PostgreSQL, it is copied back to Redis for the hot paths.
        assert await redis.exists(Keys.from_settings(settings).workflow(wf.id))
        assert await catalog.get(wf.id + 1) is None
    finally:
        await lazy.close()


async def test_worker_started_during_a_postgresql_outage_runs_a_workflow_only_postgresql_knows(
    redis: Redis, settings: Settings, pg_factory: Callable[..., PostgresServer]
) -> None:
    pg = pg_factory()
    wf = await known_only_to_postgres(redis, settings, pg)
    settings = settings.model_copy(update={"database_url": pg.url})
    # The API raises the id sequence from PostgreSQL when it starts (none here yet); with PostgreSQL
    # down and no sequence in Redis, enqueueing would be refused rather than risk a reused id.
    await Scripts(redis, Keys.from_settings(settings)).raise_sequence(0)
    pg.stop()
    async with in_process_worker(settings, visibility_timeout=1.0):
        task = await enqueue(redis, settings, wf)
        # The worker takes the request while PostgreSQL is down; it must not give up on it.
        await wait_delivered(redis, settings, task.entry_id)
        pg.start()
        done = await wait_terminal(redis, settings, [task.task_id])
    assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
    assert done[task.task_id].data["final_context"] == {"ran": True}


async def wait_delivered(redis: Redis, settings: Settings, entry_id: str | None) -> None:
    """Until the workers' group has handed out `entry_id` (Redis's own record of its deliveries)."""
    assert entry_id is not None
    keys = Keys.from_settings(settings)
    deadline = time.monotonic() + 30
    while True:
        groups = await redis.xinfo_groups(keys.requests)
        # The group appears when the worker has started.
        delivered = next((g["last-delivered-id"] for g in groups if g["name"] == keys.worker_group), "0-0")
        if entry_id_parts(delivered) >= entry_id_parts(entry_id):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"entry {entry_id} not delivered; the group is at {delivered}")
        await asyncio.sleep(0.02)
