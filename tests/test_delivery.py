"""The delivery promises under long nodes, stalls, restarts and odd bytes: each run's node code starts
once, a healthy run is never taken over, and a run that cannot prove it still owns its entry stops."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from cli.embedded import RedisServer
from consumer.maintenance import Maintenance
from consumer.worker import Worker
from shared.catalog import WorkflowCatalog
from shared.connections import create_redis, ensure_groups
from shared.dead_letters import DeadLetters
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    make_settings,
    redis_binaries,
    redis_version,
    wait_for_events,
    wait_terminal,
)


@pytest.fixture
def effects() -> Iterator[Path]:
    """A log node code appends to; world-writable because sandboxes may run under their own uids."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o777)
    log = folder / "effects.log"
    log.touch()
    log.chmod(0o666)
    yield log
    log.unlink(missing_ok=True)
    folder.rmdir()


def shared(log: Path) -> dict[str, str]:
    """Worker settings that let node code write the log (sandboxes see the host read-only otherwise)."""
    return {"sandbox_writable": str(log.parent)}


def logged(log: Path, what: str) -> str:
    """Node code that appends `what` and the execution id to `log`."""
    return f"open({str(log)!r}, 'a').write({what!r} + ':' + str(context['_nova']['execution_id']) + '\\n')"


async def test_long_nodes_on_two_healthy_workers_each_start_once(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, effects: Path
) -> None:
    # Several runs per worker, each far longer than the visibility timeout: every one of them (not
    # only each worker's oldest) must stay with the worker that runs it.
    code = f"{logged(effects, 'start')}\nimport time\ntime.sleep(3.0)"
    wf = await create_workflow(redis, settings, pool, linear(code))
    async with (
        in_process_worker(settings, visibility_timeout=1.0, concurrency=3, sandbox_pool_size=3, **shared(effects)),
        in_process_worker(settings, visibility_timeout=1.0, concurrency=3, sandbox_pool_size=3, **shared(effects)),
    ):
        tasks = [await enqueue(redis, settings, wf) for _ in range(4)]
        done = await wait_terminal(redis, settings, [t.task_id for t in tasks], timeout=60)
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    starts = sorted(effects.read_text().splitlines())
    assert starts == sorted(f"start:{t.execution_id}" for t in tasks)
    started = await wait_for_events(redis, settings, lambda e: e.type == EventType.STARTED, len(tasks))
    assert all(e.data["delivery"] == 1 for e in started)


async def test_entry_with_bytes_that_are_not_utf8_is_dead_lettered_and_the_rest_runs(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ok'] = True"))
    raw = Redis.from_url(settings.redis_url or "")  # no decoding: writes the bytes as they are
    await ensure_groups(redis, Keys.from_settings(settings))
    before = await enqueue(redis, settings, wf)
    bad_id = await raw.xadd(
        settings.requests_stream,
        {b"task_id": b"\xff\xfe-task", b"execution_id": b"99", b"workflow_id": str(wf.id).encode(),
         b"client": b"acme", b"payload": b'{"initial_context": {"x": "\xc3\x28"}}'},
    )  # fmt: skip
    after = await enqueue(redis, settings, wf)
    async with in_process_worker(settings):
        done = await wait_terminal(redis, settings, [before.task_id, after.task_id])
        keys = Keys.from_settings(settings)
        # Housekeeping reads the same stream: it must not choke on the entry either.
        worker_redis = create_redis(settings)
        await Maintenance(settings, worker_redis, keys, Scripts(worker_redis, keys), "me").run()
        letters = await DeadLetters(worker_redis, keys, settings, WorkflowCatalog(worker_redis, pool, keys)).list()
        await worker_redis.aclose()
    assert {e.type for e in done.values()} == {EventType.SUCCEEDED}
    [letter] = letters
    shown = letter.as_json()
    assert shown["reason"] == "malformed" and "not valid UTF-8" in shown["error"]
    assert orjson.dumps(shown)  # shown as escapes, encodable as JSON
    # The letter keeps the original bytes.
    [(_, fields)] = await raw.xrange(settings.dead_letter_stream)
    assert fields[b"task_id"] == b"\xff\xfe-task" and fields[b"dlq_original_id"] == bad_id
    assert (await redis.xpending(settings.requests_stream, settings.worker_group))["pending"] == 0
    await raw.aclose()


async def _await_uptime(client: Redis, seconds: int) -> None:
    # A freshly started Redis holds reclaims back until it has been up a visibility timeout.
    for _ in range(100):
        if int((await client.info("server"))["uptime_in_seconds"]) >= seconds:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("Redis uptime did not advance")


@pytest.mark.parametrize("binary", redis_binaries(), ids=redis_version)
async def test_reclaim_scans_past_live_entries_to_reach_dead_ones(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool, binary: str
) -> None:
    server = redis_factory(binary=binary)
    settings = make_settings(server.url, db_url, visibility_timeout=1.0, concurrency=1)
    keys = Keys.from_settings(settings)
    client = create_redis(settings)
    await ensure_groups(client, keys)
    # Redis 7 looks at no more than ten pending entries per claimed one (6.2 scans on until it claims).
    for i in range(25):
        await client.xadd(keys.requests, {"junk": f"live{i}"})
    live = [
        entry_id for entry_id, _ in (await client.xreadgroup(keys.worker_group, "alive", {keys.requests: ">"}))[0][1]
    ]
    for i in range(2):
        await client.xadd(keys.requests, {"junk": f"dead{i}"})
    reply = await client.xreadgroup(keys.worker_group, "crashed", {keys.requests: ">"})
    dead = [entry_id for entry_id, _ in reply[0][1]]
    await client.xclaim(keys.requests, keys.worker_group, "crashed", 0, dead, idle=3_600_000, justid=True)
    await _await_uptime(client, 1)
    worker = Worker(settings, client, WorkflowCatalog(client, pool, keys), providers={})
    # One free slot per pass: each pass must move on from where the last one stopped, not look at the
    # live entries at the head of the pending list again.
    for _ in range(6):
        # The live worker's heartbeat, as it would send it: on a slow machine a second could pass between
        # reads and make the live entries look dead (visibility timeout 1 s).
        await client.xclaim(keys.requests, keys.worker_group, "alive", 0, live, justid=True)
        await worker._reclaim()
        await asyncio.gather(*worker.inflight.values())
    letters = await client.xrange(keys.dead_letter)
    assert sorted(f["dlq_original_id"] for _, f in letters) == sorted(dead)
    await client.aclose()


async def _idle_entry(client: Redis, keys: Keys) -> str:
    """One entry delivered to a silent consumer and made to look an hour idle."""
    await ensure_groups(client, keys)
    await client.xadd(keys.requests, {"junk": "x"})
    reply = await client.xreadgroup(keys.worker_group, "other", {keys.requests: ">"})
    [(entry_id, _)] = reply[0][1]
    await client.xclaim(keys.requests, keys.worker_group, "other", 0, [entry_id], idle=3_600_000, justid=True)
    return str(entry_id)


async def test_reclaim_waits_while_redis_has_been_up_less_than_a_visibility_timeout(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool
) -> None:
    server = redis_factory(appendonly=True)
    # A visibility timeout far longer than this test: Redis's uptime stays below it throughout.
    settings = make_settings(server.url, db_url, visibility_timeout=600.0)
    keys = Keys.from_settings(settings)
    client = create_redis(settings)
    await _idle_entry(client, keys)
    # The AOF keeps the delivery time: after the restart the entry looks idle for as long as Redis was down.
    server.stop()
    server.start()
    worker = Worker(settings, client, WorkflowCatalog(client, pool, keys), providers={})
    await worker._reclaim()
    assert not worker.inflight
    [pending] = await client.xpending_range(keys.requests, keys.worker_group, "-", "+", 1)
    assert pending["consumer"] == "other"
    await client.aclose()


async def test_reclaim_waits_a_visibility_timeout_after_an_outage_this_worker_saw(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool
) -> None:
    server = redis_factory()
    settings = make_settings(server.url, db_url, visibility_timeout=1.0)
    keys = Keys.from_settings(settings)
    client = create_redis(settings)
    await _idle_entry(client, keys)
    await _await_uptime(client, 1)  # Redis itself has been up long enough
    worker = Worker(settings, client, WorkflowCatalog(client, pool, keys), providers={})
    worker._outage()
    await worker._reclaim()
    assert not worker.inflight
    worker._reclaim_not_before = 0.0  # the grace has passed
    await worker._reclaim()
    await asyncio.gather(*worker.inflight.values())
    assert await client.xlen(keys.dead_letter) == 1
    await client.aclose()


async def test_worker_cut_off_from_redis_stops_its_runs_before_they_can_be_taken_over(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool, effects: Path
) -> None:
    server = redis_factory()
    settings = make_settings(server.url, db_url, visibility_timeout=1.0)
    client = Redis.from_url(server.url, decode_responses=True)
    code = f"{logged(effects, 'start')}\nimport time\ntime.sleep(3)\n{logged(effects, 'end')}"
    wf = await create_workflow(client, settings, pool, linear(code))
    await _await_uptime(client, 1)
    async with in_process_worker(settings, **shared(effects)):
        task = await enqueue(client, settings, wf)
        await wait_for_events(
            client, settings, lambda e: e.type == EventType.NODE_STARTED and e.data["node_id"] == "a1"
        )
        for _ in range(200):
            if effects.read_text():
                break
            await asyncio.sleep(0.02)
        # Freeze Redis: every connection hangs, as in a network partition.
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.5)  # past half the visibility timeout: the worker must have given up
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        done = await wait_terminal(client, settings, [task.task_id], timeout=60)
    assert done[task.task_id].type == EventType.SUCCEEDED
    lines = effects.read_text().splitlines()
    # The first copy was stopped (its sandbox killed) before it could finish; the node then ran again.
    assert lines == [f"start:{task.execution_id}", f"start:{task.execution_id}", f"end:{task.execution_id}"]
    await client.aclose()


async def test_results_are_trimmed_to_their_length_but_never_past_what_the_projector_has_not_acknowledged(
    redis: Redis, settings: Settings
) -> None:
    settings = settings.model_copy(update={"results_maxlen": 1000})
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    pipe = redis.pipeline(transaction=False)
    for i in range(3000):
        # One entry per millisecond: the trim estimates its cut from the ids' times.
        pipe.xadd(keys.results, {"type": "queued", "n": str(i)}, id=f"{1_700_000_000_000 + i}-0")
    added = await pipe.execute()
    maintenance = Maintenance(settings, redis, keys, Scripts(redis, keys), "me")
    # PostgreSQL is down: the projector has read nothing. Nothing may go, however long the stream.
    assert await maintenance.trim_results() == 0
    assert await redis.xlen(keys.results) == 3000
    # It catches up on the first 2,500 and acknowledges 2,400; 100 are read but not yet written, 500 unread.
    reply = await redis.xreadgroup(keys.projector_group, "p1", {keys.results: ">"}, count=2500)
    read = [entry_id for entry_id, _ in reply[0][1]]
    await redis.xack(keys.results, keys.projector_group, *read[:2400])
    assert await maintenance.trim_results() > 0
    remaining = {entry_id for entry_id, _ in await redis.xrange(keys.results)}
    assert set(added[2400:]) <= remaining, "an entry the projector still needs was trimmed"
    assert 1000 <= len(remaining) < 3000
    pending = await redis.xpending(keys.results, keys.projector_group)
    assert pending["pending"] == 100
