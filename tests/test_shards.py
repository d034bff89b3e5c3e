"""NOVA_SHARDS on a single Redis: every shard's stream is read, a client's limits hold whichever shard's
keys a caller starts from, and ids say their shard."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import pytest
from redis.asyncio import Redis

from shared.enqueue import Admission, NewExecution, enqueue_execution
from shared.scripts import AtCapacity, Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, Layout
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    make_settings,
    wait_for_events,
    wait_projected,
    wait_terminal,
)

SHARDS = 3


@pytest.fixture
def sharded(redis_url: str, db_url: str) -> Settings:
    return make_settings(redis_url, db_url, shards=SHARDS)


def one_client_per_shard() -> list[str]:
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(Keys.shard_of_client(f"c{i}", SHARDS), f"c{i}")
    return [found[n] for n in range(SHARDS)]


async def test_one_worker_process_reads_every_shard(redis: Redis, sharded: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, sharded, pool, linear("context['n'] += 1"))
    slugs = one_client_per_shard()
    async with in_process_worker(sharded, concurrency=2):
        tasks = [await enqueue(redis, sharded, wf, {"n": i}, client=slugs[i % SHARDS]) for i in range(9)]
        done = await wait_terminal(redis, sharded, [t.task_id for t in tasks])
        assert [done[t.task_id].data["final_context"]["n"] for t in tasks] == [i + 1 for i in range(9)]
        await wait_projected(pool, [t.execution_id for t in tasks], {"completed"})
    started = await wait_for_events(redis, sharded, lambda e: e.type == EventType.STARTED, 9)
    assert Counter(e.task_id for e in started) == Counter({t.task_id: 1 for t in tasks})
    layout = Layout.from_settings(sharded)
    for n, keys in enumerate(layout.shards):
        assert keys.requests == f"nova:requests:{{nova:{n}}}"
        # Three requests per shard, each in its client's shard, ids saying so.
        assert await redis.xlen(keys.results) > 0
    for i, t in enumerate(tasks):
        assert Keys.shard_of_task(t.task_id, SHARDS) == i % SHARDS == t.execution_id % SHARDS
        assert len(t.task_id) == 32


async def test_a_clients_in_flight_cap_holds_across_shards(redis: Redis, sharded: Settings) -> None:
    """Two API replicas may start from any shard's keys: the enqueue goes to the client's shard, where
    its counter is, so the cap is exact."""
    acme, globex = one_client_per_shard()[:2]
    limits = Admission(max_inflight=2)

    async def floor() -> int:
        return 0

    def execution(client: str) -> NewExecution:
        return NewExecution(workflow_id=1, workflow_name="w", client=client, initial_context={}, admission=limits)

    replicas = [Scripts(redis, keys) for keys in Layout.from_settings(sharded).shards]
    for replica in replicas[:2]:
        await enqueue_execution(replica, execution(acme), floor=floor)
    with pytest.raises(AtCapacity):
        await enqueue_execution(replicas[2], execution(acme), floor=floor)
    # Another client, in another shard, is not held back.
    accepted = await enqueue_execution(replicas[0], execution(globex), floor=floor)
    assert Keys.shard_of_task(accepted.task_id, SHARDS) == Keys.shard_of_client(globex, SHARDS)


def test_a_schedules_task_id_names_its_clients_shard() -> None:
    from api.schemas import is_task_id
    from shared.settings import Settings

    keys = Keys.shard(Settings(redis_url="redis://unused", shards=SHARDS), 0)
    for slug in one_client_per_shard():
        home = keys.of_client(slug)
        placed = home.placed_task_id("sched-1a2b-1700000000000")
        assert Keys.shard_of_task(placed, SHARDS) == home.shard_index and is_task_id(placed)
        assert home.placed_task_id(placed) == placed  # deterministic: a repeated tick names the same task


async def test_one_worker_report_per_process_counts_every_shards_runs(
    redis: Redis, sharded: Settings, pool: asyncpg.Pool
) -> None:
    """A process reads every shard with one reader each, sharing its slots: what it reports of itself
    (health, metrics) is one report whose in-flight count is every reader's."""
    import time

    from shared.inspection import worker_reports
    from tests.support import private_dir

    with private_dir("shards") as shared:
        shared.chmod(0o777)
        flag = shared / "go"
        hold = f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
        wf = await create_workflow(redis, sharded, pool, linear(hold))
        slugs = one_client_per_shard()
        settings = sharded.model_copy(update={"sandbox_writable": str(shared), "visibility_timeout": 2.0})
        async with in_process_worker(settings, concurrency=4, consumer_name="one-process"):
            tasks = [await enqueue(redis, settings, wf, client=slugs[n]) for n in (1, 2)]
            deadline = time.monotonic() + 60
            while True:
                reports = await worker_reports(redis, Keys.from_settings(settings))
                if [(r["consumer"], r["inflight"]) for r in reports] == [("one-process", 2)]:
                    break
                assert len(reports) <= 1, reports
                assert time.monotonic() < deadline, f"never one report of both shards' runs: {reports}"
                await asyncio.sleep(0.05)
            flag.touch()
            await wait_terminal(redis, settings, [t.task_id for t in tasks])
