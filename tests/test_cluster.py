"""NOVA on a real Redis Cluster the suite starts itself (three masters with a replica each): the
pipeline, reclaim after kill -9, dead letters and SSE, with one shard and with several; a slot moved
while executions run; a master SIGKILLed while executions run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from redis.asyncio import Redis

from cli.embedded import find_redis_server
from shared.connections import create_redis
from shared.settings import Settings
from shared.streams import EventType, Layout, TaskField, TaskStatus, loads
from tests.support import (
    ClusterServers,
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    make_settings,
    private_dir,
    redis_version,
    wait_projected,
    wait_terminal,
)

# Cluster mode needs Redis 7 (`cluster-port`, CLUSTER ADDSLOTSRANGE): the redis-server on PATH.
pytestmark = pytest.mark.skipif(
    not redis_version(find_redis_server()).startswith("redis-7"), reason="Redis Cluster tests need Redis 7"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    with private_dir("cluster") as root:
        servers = ClusterServers(root).start()
        try:
            yield servers
        finally:
            servers.stop()


@pytest.fixture
def cluster_settings(cluster: ClusterServers, db_url: str) -> Settings:
    for node in cluster.nodes[: cluster.masters]:
        with cluster.admin(node) as admin:
            admin.flushall()
    return make_settings(cluster.url, db_url, redis_cluster=True)


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Redis]:
    client = create_redis(cluster_settings)
    yield client
    await client.aclose()


async def test_pipeline_on_a_cluster_with_one_shard(
    cluster_redis: Redis, cluster_settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(cluster_redis, cluster_settings, pool, linear("context['n'] = context['n'] * 2"))
    async with in_process_worker(cluster_settings):
        task = await enqueue(cluster_redis, cluster_settings, wf, {"n": 21})
        events = await wait_terminal(cluster_redis, cluster_settings, [task.task_id])
        assert events[task.task_id].type == EventType.SUCCEEDED
        keys = Layout.from_settings(cluster_settings).of_task(task.task_id)
        assert keys.requests == "nova:requests:{nova:0}"
        state = await cluster_redis.hgetall(keys.task(task.task_id))
        assert state[TaskField.STATUS] == TaskStatus.SUCCESS
        assert loads(state[TaskField.RESULT])["final_context"] == {"n": 42}
        await wait_projected(pool, [task.execution_id], {"completed"})
