"""NOVA on a real Redis Cluster the suite starts itself (three masters with a replica each): the
pipeline with one shard and with three (the API, SSE, projection), reclaim after kill -9, dead letters,
a slot moved while executions run, and a master SIGKILLed while the API acknowledges in strict mode.

Scaled down for a shared 2-core machine: a handful of executions each, short nodes, one cluster for the
whole module (flushed between tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import uvicorn
from redis.asyncio import Redis
from redis.crc import key_slot

from api.app import create_app
from cli.embedded import find_redis_server, free_port
from consumer.sandbox.local import LocalSandboxProvider
from shared.catalog import WorkflowCatalog
from shared.connections import REDIS_UNAVAILABLE, create_redis, ensure_groups
from shared.control import RunControl
from shared.dead_letters import DeadLetters
from shared.inspection import inspect
from shared.settings import Settings
from shared.streams import EventType, Keys, Lane, Layout, TaskField, TaskStatus, loads
from tests.support import (
    ADMIN_KEY,
    CLUSTER_SLOTS,
    ClusterServers,
    create_workflow,
    enqueue,
    in_process_worker,
    kill9,
    linear,
    make_settings,
    private_dir,
    redis_version,
    sse_events,
    start_worker_process,
    wait_for_events,
    wait_projected,
    wait_terminal,
)
from tests.test_faults import FlakyProvider, flaky
from tests.test_live_api import _samples

# Cluster mode needs Redis 7 (`cluster-port`, CLUSTER ADDSLOTSRANGE): the redis-server on PATH.
pytestmark = pytest.mark.skipif(
    not redis_version(find_redis_server()).startswith("redis-7"), reason="Redis Cluster tests need Redis 7"
)

SHARDS = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    with private_dir("cluster") as root:
        servers = ClusterServers(root).start()
        try:
            yield servers
        finally:
            servers.stop()


def _reset(cluster: ClusterServers) -> None:
    """Flush every master; a test that killed one leaves the cluster to be built again."""
    if not all(node.running for node in cluster.nodes):
        raise RuntimeError("a previous test left the cluster without a node")
    for node in cluster.live_masters():
        with cluster.admin(node) as admin:
            admin.flushall()


@pytest.fixture
def one_shard(cluster: ClusterServers, db_url: str) -> Settings:
    _reset(cluster)
    return make_settings(cluster.url, db_url, redis_cluster=True)


@pytest.fixture
def sharded(cluster: ClusterServers, db_url: str) -> Settings:
    _reset(cluster)
    return make_settings(cluster.url, db_url, redis_cluster=True, shards=SHARDS)


@pytest.fixture
async def client_of(sharded: Settings) -> AsyncIterator[Redis]:
    client = create_redis(sharded)
    yield client
    await client.aclose()


def clients_in_every_shard(shards: int = SHARDS) -> list[str]:
    """One client slug per shard (the shard of a client is fixed by its name)."""
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(Keys.shard_of_client(f"client{i}", shards), f"client{i}")
        if len(found) == shards:
            break
    return [found[n] for n in range(shards)]


async def test_pipeline_on_a_cluster_with_one_shard(one_shard: Settings, pool: asyncpg.Pool) -> None:
    redis = create_redis(one_shard)
    try:
        wf = await create_workflow(redis, one_shard, pool, linear("context['n'] = context['n'] * 2"))
        high = Layout.from_settings(one_shard).home.in_lane(Lane.HIGH)
        # A group that never reads keeps every entry from the workers' trimming, to be counted.
        await redis.xgroup_create(high.requests, "spy", id="0", mkstream=True)
        # The first sandbox fails: the run is retried, put back by the promote step onto its lane's
        # stream, a key the step derives from the one it is given (the same slot).
        async with in_process_worker(one_shard, providers=flaky(one_shard, 1)):
            task = await enqueue(redis, one_shard, wf, {"n": 21}, lane=Lane.HIGH)
            events = await wait_terminal(redis, one_shard, [task.task_id])
            assert events[task.task_id].type == EventType.SUCCEEDED
            keys = Layout.from_settings(one_shard).of_task(task.task_id)
            # One shard on a cluster: the documented names with the shard's hash tag.
            assert keys.requests == "nova:requests:{nova:0}" and keys.task("x") == "nova:{nova:0}:task:x"
            assert high.requests == "nova:requests:{nova:0}:high"
            assert [f["task_id"] for _, f in await redis.xrange(high.requests)] == [task.task_id] * 2
            state = await redis.hgetall(keys.task(task.task_id))
            assert state[TaskField.STATUS] == TaskStatus.SUCCESS
            assert loads(state[TaskField.RESULT])["final_context"] == {"n": 42}
            await wait_projected(pool, [task.execution_id], {"completed"})
    finally:
        await redis.aclose()


async def _serve(settings: Settings) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{port}"


async def test_api_sse_and_projection_over_three_shards(
    sharded: Settings, client_of: Redis, pool: asyncpg.Pool
) -> None:
    slugs = clients_in_every_shard()
    server, serving, base = await _serve(sharded)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        async with httpx.AsyncClient(base_url=base, headers=admin, timeout=30) as http:
            for slug in slugs:
                assert (await http.post("/clients", json={"slug": slug, "name": slug})).status_code == 201
            graph = linear("context['n'] = context['n'] + 1")
            created = await http.post("/workflows", json={"name": "inc", "graph_definition": graph})
            wf_id = created.json()["id"]
            async with http.stream("GET", "/events", params={"workflow_id": wf_id}) as feed:
                async with in_process_worker(sharded):
                    tasks = []
                    for n, slug in enumerate(slugs):
                        body = {"client_slug": slug, "initial_context": {"n": n}}
                        accepted = await http.post(f"/workflows/{wf_id}/execute", json=body)
                        assert accepted.status_code == 202, accepted.text
                        tasks.append(accepted.json())
                    # Each client's task is in its own shard, and its id and execution id say which.
                    shards = {Keys.shard_of_task(t["task_id"], SHARDS) for t in tasks}
                    assert shards == set(range(SHARDS))
                    assert {t["execution_id"] % SHARDS for t in tasks} == shards
                    for t in tasks:
                        async with http.stream("GET", f"/tasks/{t['task_id']}/events") as response:
                            seen = [e async for e in sse_events(response)]
                        assert seen[0]["event"] == "queued" and seen[-1]["event"] == "succeeded"
                    live: list[dict[str, str]] = []
                    async for event in sse_events(feed):
                        live.append(event)
                        if sum(e["event"] == "succeeded" for e in live) == SHARDS:
                            break
                    # The projector runs inside the worker: what it has not written when the worker
                    # stops waits for the next worker, so the projection is awaited while it runs.
                    await wait_projected(pool, [t["execution_id"] for t in tasks], {"completed"})
            for n, t in enumerate(tasks):
                got = (await http.get(f"/tasks/{t['task_id']}")).json()
                assert got["status"] == "SUCCESS" and got["result"]["final_context"] == {"n": n + 1}
            # The feed's ids hold one position per shard; resuming after the first event replays the
            # rest exactly, from every shard.
            assert all(len(e["id"].split(",")) == SHARDS for e in live)
            async with http.stream("GET", "/events", headers={"Last-Event-ID": live[0]["id"]}) as response:
                replayed: list[dict[str, str]] = []
                async for event in sse_events(response):
                    replayed.append(event)
                    if len(replayed) == len(live) - 1:
                        break

            def key(e: dict[str, str]) -> tuple[str, str]:
                return orjson.loads(e["data"])["task_id"], e["event"]

            assert sorted(map(key, replayed)) == sorted(map(key, live[1:]))
            detail = (await http.get(f"/executions/{tasks[1]['execution_id']}")).json()
            assert detail["status"] == "completed"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


async def test_kill9_mid_run_is_reclaimed_on_a_cluster(
    sharded: Settings, client_of: Redis, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    shared = Path(tempfile.mkdtemp())
    shared.chmod(0o777)
    effects, marker = shared / "effects.txt", shared / "a2-started"
    once = f"open({str(effects)!r}, 'a').write(context['_nova']['node_id'] + '\\n')"
    slow_first_time = (
        f"import os, time\nif not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n    time.sleep(60)\ncontext['done'] = True"
    )
    wf = await create_workflow(client_of, sharded, pool, linear(once, slow_first_time))
    fast = sharded.model_copy(update={"visibility_timeout": 1.0, "sandbox_writable": str(shared)})
    victim = start_worker_process(fast, tmp_path / "victim.log")
    try:
        task = await enqueue(client_of, sharded, wf, client=clients_in_every_shard()[2])
        await wait_for_events(
            client_of, sharded, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a2", timeout=60
        )
        for _ in range(500):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
    finally:
        kill9(victim)
    async with in_process_worker(fast):
        done = await wait_terminal(client_of, sharded, [task.task_id], timeout=60)
        assert done[task.task_id].type == EventType.SUCCEEDED, done[task.task_id].data
        await wait_projected(pool, [task.execution_id], {"completed"})
    # a1 finished before the crash and is not run again; the second delivery resumed after it.
    assert effects.read_text().splitlines() == ["a1"]
    started = await wait_for_events(
        client_of, sharded, lambda e: e.task_id == task.task_id and e.type == EventType.STARTED, 2
    )
    assert [e.data["delivery"] for e in started] == [1, 2]
    shutil.rmtree(shared)


async def test_dead_letters_and_replay_over_shards(sharded: Settings, client_of: Redis, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(client_of, sharded, pool, linear("context['replayed'] = True"))
    slug = clients_in_every_shard()[1]
    home = Layout.from_settings(sharded).of_client(slug)
    broken = {"local": FlakyProvider(LocalSandboxProvider(sharded), 100)}
    # Written by hand into shard 1's stream: not a request, dead-lettered there with its reason.
    await client_of.xadd(home.requests, {"garbage": "yes"})
    async with in_process_worker(sharded, providers=broken, max_retries=0):
        task = await enqueue(client_of, sharded, wf, {"invoice": 7}, client=slug, lane=Lane.LOW)
        assert (await wait_terminal(client_of, sharded, [task.task_id]))[task.task_id].type == EventType.DEAD
    keys = Layout.from_settings(sharded).home
    dlq = DeadLetters(client_of, keys, sharded, WorkflowCatalog(client_of, pool, keys))
    letters = await dlq.list()
    assert sorted(d.reason for d in letters) == ["malformed", "retries_exhausted"]
    assert all(d.id.startswith("s1-") for d in letters)  # a letter's id names its shard
    [dead] = [d for d in letters if d.reason == "retries_exhausted"]
    replay = await dlq.replay(dead)
    async with in_process_worker(sharded):
        done = await wait_terminal(client_of, sharded, [replay.task_id])
    assert done[replay.task_id].data["final_context"] == {"invoice": 7, "replayed": True}
    # Replayed in the lane it was queued in.
    assert await client_of.hget(home.task(replay.task_id), TaskField.LANE) == Lane.LOW
    assert [d.reason for d in await dlq.list()] == ["malformed"]


def _move_slot(cluster: ClusterServers, key: str, enqueue_between: Any = None) -> tuple[int, int]:
    """Move `key`'s slot to another master as an operator would (SETSLOT IMPORTING/MIGRATING, MIGRATE
    in batches, SETSLOT NODE everywhere); `enqueue_between()` runs between batches. Returns the
    source and destination ports."""
    slot = key_slot(key.encode())
    source = cluster.master_of(key)
    target = next(n for n in cluster.nodes[: cluster.masters] if n is not source and n.running)
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    with cluster.admin(source) as src, cluster.admin(target) as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while names := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 10):
            src.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                "AUTH2", "default", source.admin_password, "KEYS", *names,
            )  # fmt: skip
            if enqueue_between is not None:
                enqueue_between()
        for node in cluster.nodes[: cluster.masters]:
            with cluster.admin(node) as admin:
                admin.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    return source.port, target.port


async def test_moving_a_slot_while_executions_run_loses_nothing(
    cluster: ClusterServers, sharded: Settings, client_of: Redis, pool: asyncpg.Pool
) -> None:
    slug = clients_in_every_shard()[0]
    keys = Layout.from_settings(sharded).of_client(slug)
    wf = await create_workflow(client_of, sharded, pool, linear("import time\ntime.sleep(0.05)", "context['n'] += 1"))
    loop = asyncio.get_running_loop()
    tasks = []

    during: list[Any] = []

    def enqueue_between() -> None:
        # From the migrating thread: one more request into the moving slot between two batches (not
        # waited for: a step whose keys are split between the nodes is retried until the move ends).
        during.append(asyncio.run_coroutine_threadsafe(enqueue(client_of, sharded, wf, {"n": 0}, slug), loop))

    async with in_process_worker(sharded):
        tasks += [await enqueue(client_of, sharded, wf, {"n": 0}, slug) for _ in range(6)]
        moved = await asyncio.to_thread(_move_slot, cluster, keys.requests, enqueue_between)
        assert moved[0] != moved[1] and cluster.master_of(keys.requests).port == moved[1]
        tasks += [await asyncio.wrap_future(f) for f in during]
        tasks += [await enqueue(client_of, sharded, wf, {"n": 0}, slug) for _ in range(4)]
        done = await wait_terminal(client_of, sharded, [t.task_id for t in tasks], timeout=90)
        assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
        await wait_projected(pool, [t.execution_id for t in tasks], {"completed"}, timeout=60)
    succeeded = await wait_for_events(client_of, sharded, lambda e: e.type == EventType.SUCCEEDED, len(tasks))
    assert sorted(e.task_id for e in succeeded) == sorted(t.task_id for t in tasks)  # each exactly once
    assert await client_of.xlen(keys.dead_letter) == 0


async def test_sigkill_of_a_master_keeps_what_strict_mode_acknowledged(
    cluster: ClusterServers, sharded: Settings, pool: asyncpg.Pool
) -> None:
    """Strict mode answers 202 only once the master's replica has the request (WAIT): SIGKILL the
    master of a shard mid-stream, and every acknowledged execution still runs to its end, from the
    promoted replica. Requests refused meanwhile (503) are retried by the client with their key."""
    strict = sharded.model_copy(update={"durability": "strict", "strict_wait_ms": 1000})
    slugs = clients_in_every_shard()
    victim_key = Layout.from_settings(strict).of_client(slugs[1]).requests
    victim = cluster.master_of(victim_key)
    server, serving, base = await _serve(strict)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    acknowledged: dict[str, dict[str, Any]] = {}
    try:
        async with httpx.AsyncClient(base_url=base, headers=admin, timeout=30) as http:
            for slug in slugs:
                assert (await http.post("/clients", json={"slug": slug, "name": slug})).status_code == 201
            graph = linear("import time\ntime.sleep(0.05)\ncontext['n'] += 1")
            wf_id = (await http.post("/workflows", json={"name": "kill", "graph_definition": graph})).json()["id"]
            async with in_process_worker(strict):
                for i in range(18):
                    if i == 6:
                        victim.kill()  # SIGKILL: no failover handshake, no last writes flushed
                        # Its replica takes over; strict mode refuses that shard (503) until the old
                        # master is back, as the new master's replica.
                        rejoined = asyncio.create_task(asyncio.to_thread(_rejoin, cluster, victim, victim_key))
                    key = f"req-{i}"
                    body = {"client_slug": slugs[i % len(slugs)], "initial_context": {"n": i}}
                    deadline = asyncio.get_running_loop().time() + 60
                    while True:
                        reply = await http.post(
                            f"/workflows/{wf_id}/execute", json=body, headers={"Idempotency-Key": key}
                        )
                        if reply.status_code == 202:
                            acknowledged[key] = reply.json()
                            break
                        assert reply.status_code in (500, 503), reply.text
                        assert asyncio.get_running_loop().time() < deadline, reply.text
                        await asyncio.sleep(0.2)
                await rejoined
                assert cluster.master_of(victim_key) is not victim  # its replica took over
                ids = [t["task_id"] for t in acknowledged.values()]
                redis = create_redis(strict)
                try:
                    done = await wait_terminal(redis, strict, ids, timeout=120)
                finally:
                    await redis.aclose()
                assert len(done) == len(ids) == 18
                assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
                await wait_projected(pool, [t["execution_id"] for t in acknowledged.values()], {"completed"}, 90)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)
        if not victim.running:
            victim.start()


def _rejoin(cluster: ClusterServers, victim: Any, key: str) -> None:
    """Wait for the failover, then start the killed node again: it rejoins as a replica."""
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(Exception):
            if cluster.master_of(key) is not victim:
                break
        assert time.monotonic() < deadline, "no replica took over the killed master's slots"
        time.sleep(0.1)
    victim.start()
    while not cluster.healthy():
        assert time.monotonic() < deadline, "the killed master did not rejoin as a replica"
        time.sleep(0.1)


async def test_cancels_worker_reports_and_builtin_ticks_on_a_cluster(sharded: Settings, client_of: Redis) -> None:
    """The steps that came with concurrency keys, worker reports and built-in schedules, on a real
    cluster: each call's keys in one slot (else redis-py refuses it), whichever shard's keys start."""
    from shared.control import RunControl
    from shared.enqueue import NewExecution, enqueue_execution
    from shared.inspection import worker_reports
    from shared.scripts import CancelOutcome, Scripts

    layout = Layout.from_settings(sharded)
    home = layout.home
    control = RunControl(client_of, home, task_ttl=60)
    # An unknown task of another shard than the home one: MISSING, as on a single Redis.
    stranger = layout.shards[1].new_task_id()
    assert (await control.cancel_task(stranger)).outcome == CancelOutcome.MISSING

    async def floor() -> int:
        return 0

    slugs = clients_in_every_shard()
    for shard, slug in enumerate(slugs):
        new = NewExecution(workflow_id=1, workflow_name="w", client=slug, initial_context={})
        accepted = await enqueue_execution(Scripts(client_of, home), new, floor=floor)
        keys = home.of_task(accepted.task_id)
        assert keys.shard_index == shard
        # Another client cancelling it: MISSING (its counter is in another shard), the task untouched.
        other = slugs[(shard + 1) % SHARDS]
        assert (await control.cancel_task(accepted.task_id, client=other)).outcome == CancelOutcome.MISSING
        # Waiting for its client's concurrency key: the cancel takes it out of its shard's wait set.
        await client_of.hset(keys.task(accepted.task_id), TaskField.WAITING_FOR, slug)
        await client_of.zadd(keys.concurrency_waiting(slug), {accepted.task_id: 1})
        await client_of.hset(keys.concurrency_index, slug, 1)
        assert (await control.cancel_task(accepted.task_id)).outcome == CancelOutcome.CANCELLED
        assert await client_of.zcard(keys.concurrency_waiting(slug)) == 0
        assert await client_of.hget(keys.task(accepted.task_id), TaskField.STATUS) == TaskStatus.REVOKED
        # And a task waiting for no key (the step's wait-set keys left out).
        plain = await enqueue_execution(Scripts(client_of, home), new, floor=floor)
        assert (await control.cancel_task(plain.task_id)).outcome == CancelOutcome.CANCELLED
    scripts = Scripts(client_of, layout.shards[2])
    await scripts.worker_report("w1", '{"inflight": 0}', ttl_ms=60_000)
    assert [r["consumer"] for r in await worker_reports(client_of, home)] == ["w1"]
    assert await scripts.claim_tick("cleanup", now_ms=1, next_ms=2) is None
    assert await Scripts(client_of, home).claim_tick("cleanup", now_ms=5, next_ms=10) == 2


async def test_metrics_and_inspect_count_every_shard_and_lane(
    sharded: Settings, client_of: Redis, pool: asyncpg.Pool
) -> None:
    """Queued, pending and dead entries put by hand in every shard's lanes, counted by `GET /metrics`,
    `/inspect` and `nova inspect` alike: each stream under its own key, totals summed over the shards."""
    from tests.test_cli import nova

    wf = await create_workflow(client_of, sharded, pool, linear("pass"))
    layout = Layout.from_settings(sharded)
    for shard in layout.shards:
        await ensure_groups(client_of, shard)
    lanes = list(Lane)
    queued: dict[str, int] = {}
    delivered: dict[str, int] = {}
    for slug in clients_in_every_shard():
        shard = layout.of_client(slug)
        for i, lane in enumerate(lanes):
            # A different count in each stream: a total, or another stream's figure, cannot pass for it.
            stream = shard.in_lane(lane).requests
            queued[stream] = 1 + (shard.shard_index + i) % 3
            delivered[stream] = (shard.shard_index + i) % 2
            for _ in range(queued[stream]):
                await enqueue(client_of, sharded, wf, client=slug, lane=lane)
            if delivered[stream]:
                # Delivered to a consumer that never acknowledges: pending, no longer lag.
                await client_of.xreadgroup(sharded.worker_group, "spy", {stream: ">"}, count=delivered[stream])
        for _ in range(shard.shard_index):
            await client_of.xadd(shard.dead_letter, {"reason": "malformed"})
    dead = sum(range(SHARDS))

    def check(report: dict[str, Any]) -> None:
        lengths = {s["key"]: s["length"] for s in report["streams"].values()}
        groups = {g["stream"]: g for g in report["groups"] if g["group"] == sharded.worker_group}
        for stream, n in queued.items():
            assert lengths[stream] == n, stream
            assert (groups[stream]["pending"], groups[stream]["lag"]) == (delivered[stream], n - delivered[stream])
        for shard in layout.shards:
            assert lengths[shard.dead_letter] == shard.shard_index
            assert report["streams"][f"dead_letter:{shard.shard_index}"]["key"] == shard.dead_letter
        assert report["dead_letters"] == dead
        assert report["control"]["held_by_workers"] == sum(delivered.values())
        spy = [c for c in report["consumers"] if c["consumer"] == "spy"]
        assert sorted((c["stream"], c["pending"]) for c in spy) == sorted((s, n) for s, n in delivered.items() if n)

    check(await inspect(client_of, layout.home))
    env = {
        "REDIS_URL": sharded.redis_url or "",
        "NOVA_REDIS_CLUSTER": "true",
        "NOVA_SHARDS": str(SHARDS),
    }
    cli = await asyncio.to_thread(nova, "inspect", "--json", env=env)
    assert cli.returncode == 0, cli.stderr
    check(orjson.loads(cli.stdout))

    app = create_app(sharded)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://nova", headers=admin) as http:
            check((await http.get("/inspect")).json())
            metrics = _samples((await http.get("/metrics")).text)
    group = sharded.worker_group
    for stream, n in queued.items():
        assert metrics[f'nova_stream_length{{stream="{stream}"}}'] == n
        labels = f'{{group="{group}",stream="{stream}"}}'
        assert metrics[f"nova_group_pending{labels}"] == delivered[stream]
        assert metrics[f"nova_group_lag{labels}"] == n - delivered[stream]
    assert metrics["nova_dead_letters"] == dead
    assert metrics["nova_drain_held"] == sum(delivered.values())
    # One worker process is one consumer, whatever the streams it reads: what it holds in all of them.
    assert metrics[f'nova_consumer_inflight{{consumer="spy",group="{group}"}}'] == sum(delivered.values())


async def test_schedules_fire_once_per_tick_with_two_schedulers_across_shards(
    sharded: Settings, client_of: Redis, pool: asyncpg.Pool
) -> None:
    """A schedule per shard (its client's), one in the high lane: two schedulers, each on a cluster
    client of its own as in two worker processes, tick together; every tick is enqueued once, into its
    client's shard and its workflow's lane. Then two workers fire an every-second schedule on their own."""
    from consumer.scheduler import Scheduler
    from shared.schedules import ScheduleStore

    layout = Layout.from_settings(sharded)
    plain = await create_workflow(client_of, sharded, pool, linear("context['ran'] = True"))
    urgent = await create_workflow(client_of, sharded, pool, linear("context['ran'] = True", priority="high"))
    store = ScheduleStore(client_of, layout.home)
    slugs = clients_in_every_shard()
    schedules = {
        slug: await store.create(
            cron="* * * * *", workflow_id=(urgent if n == 1 else plain).id, client=slug, initial_context={}
        )
        for n, slug in enumerate(slugs)
    }
    lane_of = {slug: Lane.HIGH if n == 1 else Lane.NORMAL for n, slug in enumerate(slugs)}
    clients = [create_redis(sharded) for _ in range(2)]
    try:
        schedulers = [
            Scheduler(sharded, c, WorkflowCatalog(c, pool, layout.home), f"replica{i}") for i, c in enumerate(clients)
        ]
        ticks: dict[str, list[int]] = {s.id: [] for s in schedules.values()}
        for _ in range(2):
            due = {s.id: next_ms for s, next_ms in await store.list() if next_ms is not None}
            # When every schedule is due (their first ticks differ if created across a minute's turn).
            now_ms = max(due.values()) + 10
            fired = await asyncio.gather(*(s.tick(now_ms=now_ms) for s in schedulers))
            assert sum(fired) == SHARDS, fired
            for schedule_id, tick in due.items():
                ticks[schedule_id].append(tick)
        for slug, schedule in schedules.items():
            stream = layout.of_client(slug).in_lane(lane_of[slug]).requests
            entries = [f for _, f in await client_of.xrange(stream)]
            assert [e["task_id"] for e in entries] == [
                layout.of_client(slug).placed_task_id(f"sched-{schedule.id}-{tick}") for tick in ticks[schedule.id]
            ]
            assert all(Keys.shard_of_task(e["task_id"], SHARDS) == layout.of_client(slug).shard_index for e in entries)
        # Nothing else anywhere: one request per schedule and tick in all the streams of all the shards.
        assert sum([await client_of.xlen(k.requests) for k in layout.streams]) == 2 * SHARDS
        for schedule in schedules.values():
            await store.delete(schedule.id)
    finally:
        for c in clients:
            await c.aclose()
    every_second = await store.create(cron="* * * * * *", workflow_id=urgent.id, client=slugs[2], initial_context={})
    async with in_process_worker(sharded), in_process_worker(sharded):
        done = await wait_for_events(
            client_of,
            sharded,
            lambda e: e.type == EventType.SUCCEEDED and e.task_id.startswith(f"sched-{every_second.id}-"),
            2,
        )
        await store.delete(every_second.id)
    assert all(e.data["final_context"]["ran"] for e in done)
    queued = await wait_for_events(
        client_of,
        sharded,
        lambda e: e.type == EventType.QUEUED and e.task_id.startswith(f"sched-{every_second.id}-"),
        2,
    )
    fired_ticks = [e.data["initial_context"]["_schedule"]["tick_ms"] for e in queued]
    assert len(fired_ticks) == len(set(fired_ticks))


async def _until(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll Redis-held state that has no notification (drain progress), bounded."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        await asyncio.sleep(0.05)


async def test_drain_and_sigterm_finish_runs_held_on_every_shard_and_lane(
    sharded: Settings, client_of: Redis, pool: asyncpg.Pool, shared_dir: Path, tmp_path: Path
) -> None:
    """A worker process holds a run in each shard, each in another lane. `nova drain`: it finishes them
    and takes nothing new, in no shard; the drain ended, it runs what waited. SIGTERM with runs held
    again: it finishes them and exits 0. Every run starts once, and nothing is left pending anywhere."""
    from tests.test_cli import nova

    layout = Layout.from_settings(sharded)
    hold = "import os, time\nwhile not os.path.exists(context['flag']): time.sleep(0.05)\ncontext['done'] = True"
    slow = await create_workflow(client_of, sharded, pool, linear(hold))
    quick = await create_workflow(client_of, sharded, pool, linear("context['done'] = True"))
    placements = list(zip(clients_in_every_shard(), (Lane.HIGH, Lane.NORMAL, Lane.LOW), strict=True))
    control = RunControl(client_of, layout.home, task_ttl=sharded.task_ttl, pool=pool)
    log = tmp_path / "worker.log"
    # Node code sees the host read-only, but for the folders an operator shares.
    shared = sharded.model_copy(update={"sandbox_writable": str(shared_dir)})
    worker = start_worker_process(shared, log, NOVA_CONCURRENCY="6", NOVA_SHUTDOWN_GRACE="30")
    all_tasks: list[str] = []

    async def hold_one_per_shard(flag: Path) -> list[str]:
        held = [
            await enqueue(client_of, sharded, slow, {"flag": str(flag)}, slug, lane=lane) for slug, lane in placements
        ]
        ids = [t.task_id for t in held]
        all_tasks.extend(ids)
        await wait_for_events(
            client_of, sharded, lambda e: e.task_id in ids and e.type == EventType.STARTED, len(ids), timeout=60
        )
        return ids

    try:
        held = await hold_one_per_shard(shared_dir / "a")
        env = {"REDIS_URL": sharded.redis_url or "", "NOVA_REDIS_CLUSTER": "true", "NOVA_SHARDS": str(SHARDS)}
        drained = await asyncio.to_thread(nova, "drain", "--json", env=env)
        assert drained.returncode == 0, drained.stderr
        assert orjson.loads(drained.stdout)["held_by_workers"] == len(placements)

        async def parked_holding(n: int) -> bool:
            # The process has stopped reading in every shard and lane, holding n runs in all.
            return list((await control.state())["drained_workers"].values()) == [n]

        await _until(lambda: parked_holding(len(placements)), "the worker to stop reading everywhere")
        waiting = [await enqueue(client_of, sharded, quick, {}, slug, lane=lane) for slug, lane in placements]
        all_tasks.extend(t.task_id for t in waiting)
        (shared_dir / "a").write_text("")
        done = await wait_terminal(client_of, sharded, held, timeout=60)
        assert {e.type for e in done.values()} == {EventType.SUCCEEDED}, [e.data for e in done.values()]
        await _until(lambda: parked_holding(0), "the drain's progress to reach 0")
        assert (await control.state())["held_by_workers"] == 0
        for task in waiting:
            status = await client_of.hget(layout.of_task(task.task_id).task(task.task_id), TaskField.STATUS)
            assert status == TaskStatus.PENDING  # no shard's reader took it during the drain
        await control.drain(False)
        await wait_terminal(client_of, sharded, [t.task_id for t in waiting], timeout=60)

        held = await hold_one_per_shard(shared_dir / "b")
        worker.send_signal(signal.SIGTERM)
        # Each reader holding a run says it drains it (in the log: the worker has no other trace of it).
        await _until(
            lambda: _logged(log, "draining 1 in-flight run(s)", len(placements)), "every reader to start draining"
        )
        (shared_dir / "b").write_text("")
        assert await asyncio.wait_for(asyncio.to_thread(worker.wait), 60) == 0
    finally:
        if worker.poll() is None:
            kill9(worker)
    done = await wait_terminal(client_of, sharded, held, timeout=10)
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    started = await wait_for_events(
        client_of, sharded, lambda e: e.type == EventType.STARTED and e.task_id in all_tasks, len(all_tasks)
    )
    assert sorted(e.task_id for e in started) == sorted(all_tasks)  # each once
    assert {e.data["delivery"] for e in started} == {1}
    for stream in layout.streams:
        assert (await client_of.xpending(stream.requests, sharded.worker_group))["pending"] == 0, stream.requests


async def _logged(log: Path, line: str, times: int) -> bool:
    return log.read_text(errors="replace").count(line) >= times


@contextlib.contextmanager
def _uncovered(cluster: ClusterServers, key: str) -> Iterator[None]:
    """`key`'s slot served by no master (CLUSTER DELSLOTS in every node's view), as between an
    operator's mistake and its repair; given back to its master on leaving, and awaited everywhere."""
    slot = key_slot(key.encode())
    owner = cluster.master_of(key)
    owner_id = cluster.node_id(owner)
    for node in cluster.nodes:
        with cluster.admin(node) as admin:
            admin.execute_command("CLUSTER DELSLOTS", slot)
    try:
        yield
    finally:
        for node in cluster.live_masters():
            with cluster.admin(node) as admin:
                admin.execute_command("CLUSTER SETSLOT", slot, "NODE", owner_id)

        def served_everywhere() -> bool:
            for node in cluster.nodes:
                with cluster.admin(node) as admin:
                    if int(admin.execute_command("CLUSTER INFO")["cluster_slots_assigned"]) != CLUSTER_SLOTS:
                        return False
            return True

        cluster._until(served_everywhere, 30, "the slot to be served again")


async def test_a_slot_without_a_master_is_transient(
    cluster: ClusterServers,
    sharded: Settings,
    client_of: Redis,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A shard's slot served by no master: the cluster client learns no slot map while it lasts, and
    refuses every command; that is Redis being unavailable (the API's 503, a worker's backoff), and the
    API's event hub reads every shard again once the slot is served.

    The hub has a cluster client of its own, as in an API process. Its readers' failures make that
    client close its connections under the other readers' commands (redis-py's own recovery), which
    some of them meet as an AttributeError: the test's own commands stay out of that."""
    from api.event_hub import EventHub

    wf = await create_workflow(client_of, sharded, pool, linear("pass"))
    layout = Layout.from_settings(sharded)
    hub_redis = create_redis(sharded)
    hub = EventHub(hub_redis, layout.home, shards=layout.shards)
    await hub.start()
    feed = hub.subscribe()
    try:
        with _uncovered(cluster, layout.shards[1].results):
            with pytest.raises(REDIS_UNAVAILABLE):
                await enqueue(client_of, sharded, wf, client=clients_in_every_shard()[1])

            async def hub_waits() -> bool:
                return sum("event hub: Redis unavailable" in r.getMessage() for r in caplog.records) >= SHARDS

            await _until(hub_waits, "the event hub's readers to meet the unserved slot")
        tasks = [await enqueue(client_of, sharded, wf, client=slug) for slug in clients_in_every_shard()]
        seen = {(await feed.get(30)).task_id for _ in tasks}  # type: ignore[union-attr]
        assert seen == {t.task_id for t in tasks}
    finally:
        feed.close()
        await hub.stop()
        await hub_redis.aclose()
