"""Priority lanes: the rule by which a worker's slots go to the lanes (consumer/slots.py), each lane's
stream, and every path that puts a request back onto a stream keeping its lane, through the real
pipeline with real servers."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from consumer.slots import SlotBudget
from consumer.worker import Worker
from shared.catalog import WorkflowCatalog
from shared.connections import ensure_groups
from shared.control import QUEUE, RunControl
from shared.executions import Owner, retry_failure
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import LANES, EventType, Keys, Lane, TaskField, dumps, now_iso
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    script_keys,
    wait_for_events,
    wait_terminal,
)

WEIGHTS = {Lane.HIGH: 4, Lane.NORMAL: 2, Lane.LOW: 1}


def starts(budget: SlotBudget, n: int, stocked: dict[Lane, int] | None = None) -> str:
    """The lanes of the next `n` starts of a one-slot budget whose readers read what `stocked` holds
    (every lane unlimited when None), as a string of h/n/l."""
    order = ""
    while len(order) < n:
        for lane in LANES:
            got = budget.reserve(lane, lane)
            if not got:
                continue
            if stocked is not None and stocked[lane] == 0:
                # Its stream is empty: the slot goes back, and the lane waits for an append.
                budget.unreserve(got, lane)
                budget.idle(lane, lane)
                continue
            if stocked is not None:
                stocked[lane] -= 1
            budget.take()
            budget.unreserve(got, lane, unused=0)
            budget.give()
            order += lane.value[0]
            break
        else:
            return order
    return order


async def test_busy_lanes_share_slots_4_2_1_highest_first() -> None:
    budget = SlotBudget(1, readers=3, weights=WEIGHTS)
    for lane in LANES:
        budget.register(lane, lane)
    assert starts(budget, 21) == "hhnhhnl" * 3


async def test_a_lane_that_empties_gives_its_turns_to_the_others() -> None:
    budget = SlotBudget(1, readers=3, weights=WEIGHTS)
    for lane in LANES:
        budget.register(lane, lane)
    # High runs out after 6 starts; normal and low then share 2:1 until normal runs out too.
    order = starts(budget, 18, {Lane.HIGH: 6, Lane.NORMAL: 6, Lane.LOW: 6})
    assert order == "hhnhhnlhhnnlnnllll"


async def test_a_lane_idle_for_a_while_earns_no_credit() -> None:
    budget = SlotBudget(1, readers=3, weights=WEIGHTS)
    budget.register(Lane.HIGH, "high")
    for _ in range(40):  # only high has work for 40 starts
        assert starts(budget, 1) == "h"
    # Low joins: it gets its 1 in 7 from now on, not the 40 starts it missed.
    budget.register(Lane.LOW, "low")
    assert 1 <= starts(budget, 10).count("l") <= 2


async def test_slots_a_lane_does_not_use_go_back_with_its_turn() -> None:
    budget = SlotBudget(4, readers=3, weights=WEIGHTS)
    for lane in LANES:
        budget.register(lane, lane)
    high = budget.reserve(Lane.HIGH, "high")
    assert high == 3  # 4 free slots: high, high, normal, high
    assert budget.free == 0 and budget.granted[Lane.NORMAL] == 1
    budget.unreserve(high, Lane.HIGH)  # its read found nothing
    budget.idle(Lane.HIGH, "high")
    normal = budget.reserve(Lane.NORMAL, "normal")
    low = budget.reserve(Lane.LOW, "low")
    assert (normal, low) == (3, 1) and budget.free == 0


async def test_slots_granted_to_a_lane_that_turns_idle_go_back_to_the_others() -> None:
    budget = SlotBudget(2, readers=2)
    budget.register(Lane.HIGH, "h")
    budget.register(Lane.NORMAL, "n")
    assert budget.reserve(Lane.HIGH, "h") == 1  # the other slot is allotted to the normal lane
    budget.take()
    budget.unreserve(1, Lane.HIGH, unused=0)
    # The normal lane's reader finds its stream empty before it reserves: its slot is the high lane's.
    budget.idle(Lane.NORMAL, "n")
    assert budget.reserve(Lane.HIGH, "h") == 1


def test_lane_weights_setting_is_checked(settings: Settings) -> None:
    assert settings.model_copy().lane_weight_map == WEIGHTS
    assert Settings(lane_weights="low:1, normal:1,high:9").lane_weight_map[Lane.HIGH] == 9
    for bad in ("high:4,normal:2", "high:0,normal:1,low:1", "high:4,normal:2,low:x", "urgent:1,normal:1,low:1"):
        with pytest.raises(ValidationError, match="lane"):
            Settings(lane_weights=bad)


# ---- the real pipeline -------------------------------------------------------------------------


async def test_a_worker_starts_a_backlog_by_the_rule_whatever_the_arrival_order(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    lane_of: dict[str, str] = {}
    # Lowest first: arrival order is the opposite of priority.
    for lane in (Lane.LOW, Lane.NORMAL, Lane.HIGH):
        for i in range(6):
            lane_of[(await enqueue(redis, settings, wf, {"i": i}, lane=lane)).task_id] = lane.value[0]
    keys = Keys.from_settings(settings)
    assert [await redis.xlen(k.requests) for k in keys.lanes] == [6, 6, 6]
    # One slot: each run starts after the one before it finished, so start order is exact.
    async with in_process_worker(settings, concurrency=1):
        done = await wait_terminal(redis, settings, list(lane_of))
    assert all(e.type == EventType.SUCCEEDED for e in done.values())
    started = await wait_for_events(redis, settings, lambda e: e.type == EventType.STARTED, len(lane_of))
    assert "".join(lane_of[e.task_id] for e in started) == "hhnhhnlhhnnlnnllll"


async def test_every_way_back_onto_a_stream_keeps_the_lane(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A paused run resumed, a failed run retried, and a run waiting for its concurrency key go back
    onto their own lane's stream."""
    keys = Keys.from_settings(settings)
    high, low = keys.in_lane(Lane.HIGH), keys.in_lane(Lane.LOW)
    for lane in keys.lanes:
        # A group that never reads: the workers' maintenance trims nothing it has not delivered, so
        # every entry ever appended stays to be counted.
        await redis.xgroup_create(lane.requests, "spy", id="0", mkstream=True)
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, pool=pool)
    await control.pause(QUEUE)
    async with in_process_worker(settings):
        parked = await enqueue(redis, settings, wf, {}, lane=Lane.HIGH)
        for _ in range(500):
            if (await control.state())["parked"] == 1:
                break
            await asyncio.sleep(0.02)
        assert (await control.state())["parked"] == 1
        assert await control.resume(QUEUE) == 1
        await wait_terminal(redis, settings, [parked.task_id])
    entries = [f["task_id"] for _, f in await redis.xrange(high.requests)]
    assert entries == [parked.task_id] * 2  # queued, then resumed: both times on the high stream

    # A failed low run retried from its failed node.
    failing = await create_workflow(redis, settings, pool, linear("raise ValueError('no')"))
    async with in_process_worker(settings):
        failed = await enqueue(redis, settings, failing, {}, lane=Lane.LOW)
        await wait_terminal(redis, settings, [failed.task_id])
        assert await redis.hget(keys.task(failed.task_id), TaskField.LANE) == "low"
        owner = Owner(failed.task_id, "acme", failing.id, failing.version)
        await retry_failure(Scripts(redis, keys), failed.execution_id, owner)
        await wait_for_events(
            redis, settings, lambda e: e.task_id == failed.task_id and e.type == EventType.FAILED, count=2
        )
    assert [f["task_id"] for _, f in await redis.xrange(low.requests)] == [failed.task_id] * 2

    # Two high runs of a workflow with a concurrency key of limit 1: the second waits, and is woken
    # back onto the high stream.
    serial = await create_workflow(
        redis,
        settings,
        pool,
        {**linear("import time; time.sleep(0.3)"), "concurrency": {"key": "{client}", "limit": 1}},
    )
    async with in_process_worker(settings):
        pair = [await enqueue(redis, settings, serial, {}, lane=Lane.HIGH) for _ in range(2)]
        await wait_terminal(redis, settings, [t.task_id for t in pair])
    ids = {t.task_id for t in pair}
    # Both queued, and whichever was read second woken when the first finished.
    assert len([f for _, f in await redis.xrange(high.requests) if f["task_id"] in ids]) == 3
    assert await redis.xlen(keys.requests) == 0  # nothing went to the normal stream


async def test_api_takes_a_priority_per_execution_or_from_the_workflow(
    api: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    graph = linear("context['ran'] = True")
    low_wf = (
        await api.post("/workflows", json={"name": "Low", "graph_definition": {**graph, "priority": "low"}})
    ).json()
    plain_wf = (await api.post("/workflows", json={"name": "Plain", "graph_definition": graph})).json()
    by_default = (await api.post(f"/workflows/{low_wf['id']}/execute", json={})).json()
    assert by_default["priority"] == "low"
    named = (await api.post(f"/workflows/{low_wf['id']}/execute", json={"priority": "high"})).json()
    assert named["priority"] == "high"
    plain = (await api.post(f"/workflows/{plain_wf['id']}/execute", json={})).json()
    assert plain["priority"] == "normal"
    for task, lane in ((by_default, Lane.LOW), (named, Lane.HIGH), (plain, Lane.NORMAL)):
        assert (await api.get(f"/tasks/{task['task_id']}")).json()["priority"] == lane
        stream = keys.in_lane(lane).requests
        assert task["task_id"] in [f["task_id"] for _, f in await redis.xrange(stream)]
    refused = await api.post(f"/workflows/{plain_wf['id']}/execute", json={"priority": "urgent"})
    assert refused.status_code == 422 and "priority" in refused.text
    bad_wf = await api.post("/workflows", json={"name": "Bad", "graph_definition": {**graph, "priority": "asap"}})
    assert bad_wf.status_code == 422 and "priority" in bad_wf.text


# ---- the Lua step every way back goes through, on each Redis version ---------------------------

KEYS = script_keys("l")


@pytest.fixture
def r(versioned_redis: Redis) -> Redis:
    return versioned_redis


async def test_a_due_retry_goes_back_to_its_lane_and_a_forged_lane_to_normal(r: Redis) -> None:
    scripts = Scripts(r, KEYS.in_lane(Lane.LOW))  # a low lane's reader promotes for the whole shard
    request = {"task_id": "t", "payload": dumps({}), "enqueued_at": now_iso()}
    for n, lane in enumerate(("high", "low", "", "evil", "normal")):
        member = {**request, "task_id": f"t{n}", **({"lane": lane} if lane else {})}
        await r.zadd(KEYS.delayed, {dumps(member): 0})
    assert await scripts.promote_due() == 5
    on = {lane: [f["task_id"] for _, f in await r.xrange(KEYS.in_lane(lane).requests)] for lane in LANES}
    assert on == {Lane.HIGH: ["t0"], Lane.LOW: ["t1"], Lane.NORMAL: ["t2", "t3", "t4"]}
    assert sorted(await r.keys("l:requests*")) == ["l:requests", "l:requests:high", "l:requests:low"]


async def test_a_priority_is_never_dropped_on_the_way_in(api: httpx.AsyncClient, redis: Redis, keys: Keys) -> None:
    """Execute requests take two ways into the route (api/fast_paths.py answers the plain ones): a
    priority, valid or not, goes the way that validates it."""
    wf = (await api.post("/workflows", json={"name": "P", "graph_definition": linear("pass")})).json()
    high = (await api.post(f"/workflows/{wf['id']}/execute", json={"priority": "high", "initial_context": {}})).json()
    assert high["priority"] == "high"
    assert await redis.hget(keys.task(high["task_id"]), TaskField.LANE) == "high"
    refused = await api.post(f"/workflows/{wf['id']}/execute", json={"priority": "asap"})
    assert refused.status_code == 422 and "priority" in refused.text


async def test_the_watch_sees_an_entry_appended_to_a_quiet_lane_between_its_reads(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One XREAD watches every lane of a shard. A lane it had not yet seen an entry of was watched from
    # "$", which Redis takes anew at each read: an entry appended to it between two reads (the busy lane
    # answering every read at once) was never seen, and its reader slept its full wake-up timeout.
    keys = Keys.from_settings(settings)
    budget = SlotBudget(settings.concurrency, readers=2)
    catalog = WorkflowCatalog(redis, pool, keys)
    high, normal = (
        Worker(settings, redis, catalog, providers={}, keys=keys.in_lane(lane), budget=budget)
        for lane in (Lane.HIGH, Lane.NORMAL)
    )
    high.watches = [high, normal]
    read = redis.xread
    reads = 0

    async def busy_high_lane(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads > 1:
            return await read(*args, **kwargs)
        # The first read is answered by an entry of the busy lane; the quiet lane's entry comes just after.
        appending = asyncio.get_running_loop().call_later(
            0.05, lambda: asyncio.ensure_future(redis.xadd(high.keys.requests, {"n": "1"}))
        )
        try:
            reply = await read(*args, **kwargs)
        finally:
            appending.cancel()
        await redis.xadd(normal.keys.requests, {"n": "1"})
        return reply

    monkeypatch.setattr(redis, "xread", busy_high_lane)
    stop = asyncio.Event()
    watch = asyncio.create_task(high._watch(stop))
    try:
        await asyncio.wait_for(normal._appended.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(watch, 10)


async def test_the_watch_passes_over_entries_its_reader_has_read(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watch reads one entry per XREAD, only to wake the reader. Behind a backlog it went through the
    # whole backlog an entry at a time, one round trip per request, though the reader had read them all.
    keys = Keys.from_settings(settings)
    budget = SlotBudget(settings.concurrency, readers=2)
    normal = Worker(settings, redis, WorkflowCatalog(redis, pool, keys), providers={}, keys=keys, budget=budget)
    normal.watches = [normal]
    await ensure_groups(redis, keys)
    read = redis.xread
    calls = 0
    replies: list[Any] = []
    watching, second_read, backlog_read = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def after_the_reader(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        (watching if calls == 1 else second_read).set()
        reply = await read(*args, **kwargs)
        replies.append(reply)
        if calls == 1:
            # Woken by the backlog's first entry: the reader reads the whole backlog meanwhile.
            await backlog_read.wait()
        return reply

    monkeypatch.setattr(redis, "xread", after_the_reader)
    stop = asyncio.Event()
    watch = asyncio.create_task(normal._watch(stop))
    try:
        await asyncio.wait_for(watching.wait(), 10)
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(20):
                pipe.xadd(keys.requests, {"n": str(n)})
            backlog = await pipe.execute()
        got = await normal._read(len(backlog))
        assert [entry_id for entry_id, _ in got] == backlog
        backlog_read.set()
        await asyncio.wait_for(second_read.wait(), 10)
    finally:
        stop.set()
        backlog_read.set()
        await asyncio.wait_for(watch, 10)
    assert normal._appended.is_set()
    assert replies[0] and replies[0][0][1][0][0] == backlog[0]
    # Past the first: the reads found nothing the reader had not read.
    assert all(not reply for reply in replies[1:]), replies


async def test_each_look_of_the_watch_takes_every_lane_of_its_shard(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watch once left out of its next XREAD the stream of a reader it had just woken (to spare a look
    # at a backlog that reader would read anyway). That XREAD then blocked on the other lanes, up to a
    # second, while the reader read and went idle: the next request of its lane waited for the XREAD's
    # timeout (an idle round trip of 950 ms instead of 10). Every look takes every lane.
    keys = Keys.from_settings(settings)
    budget = SlotBudget(settings.concurrency, readers=len(LANES))
    catalog = WorkflowCatalog(redis, pool, keys)
    readers = {
        lane: Worker(settings, redis, catalog, providers={}, keys=keys.in_lane(lane), budget=budget) for lane in LANES
    }
    normal = readers[Lane.NORMAL]
    normal.watches = list(readers.values())
    read = redis.xread
    looks: list[set[str]] = []
    watching, looked_again = asyncio.Event(), asyncio.Event()

    async def recorded(streams: dict[str, str], *args: Any, **kwargs: Any) -> Any:
        looks.append(set(streams))
        (watching if len(looks) == 1 else looked_again).set()
        return await read(streams, *args, **kwargs)

    monkeypatch.setattr(redis, "xread", recorded)
    stop = asyncio.Event()
    watch = asyncio.create_task(normal._watch(stop))
    try:
        await asyncio.wait_for(watching.wait(), 10)
        await redis.xadd(normal.keys.requests, {"n": "1"})
        await asyncio.wait_for(normal._appended.wait(), 10)
        await asyncio.wait_for(looked_again.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(watch, 10)
    every_lane = {reader.keys.requests for reader in readers.values()}
    assert looks[0] == looks[1] == every_lane
