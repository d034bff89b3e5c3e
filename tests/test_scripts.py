"""Each atomic step in shared/scripts.py, with its race, on every Redis version available here
(the packaged 6.2 and the 7.x on PATH, when present)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cli.embedded import RedisServer, free_port
from shared.connections import REDIS_UNAVAILABLE, batcher_of, create_redis
from shared.events import event_fields
from shared.inspection import worker_reports
from shared.scripts import RecordOutcome, RecordResult, Scripts, WorkflowChanged
from shared.settings import Settings
from shared.streams import FORMAT_VERSION, EventType, Keys, TaskField, TaskStatus, dumps, now_iso
from tests.support import ready_for_scripts, redis_binaries, redis_version, script_keys

KEYS = script_keys("t")


@pytest.fixture
async def r(versioned_redis: Redis) -> Redis:
    return await ready_for_scripts(versioned_redis, KEYS)


@pytest.fixture
def scripts(r: Redis) -> Scripts:
    return Scripts(r, KEYS)


async def enqueue(scripts: Scripts, task_id: str, key: str | None = None, client: str = "acme"):
    return await scripts.enqueue(
        task_id=task_id,
        workflow_id=1,
        workflow_name="wf",
        client=client,
        enqueued_at=now_iso(),
        payload=dumps({"initial_context": {}}),
        queued_data=dumps({"workflow_name": "wf"}),
        idempotency_key=key,
    )


def event(task_id: str, type_: EventType) -> dict[str, str]:
    return event_fields(type_, task_id=task_id, execution_id=1, workflow_id=1, client="acme", data={})


async def test_enqueue_writes_hash_entry_and_event_together(r: Redis, scripts: Scripts) -> None:
    result = await enqueue(scripts, "a")
    assert result.created and result.execution_id == 1 and result.entry_id
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.PENDING
    [(entry_id, fields)] = await r.xrange(KEYS.requests)
    assert entry_id == result.entry_id
    assert fields["task_id"] == "a" and fields["execution_id"] == "1" and fields["client"] == "acme"
    [(_, queued)] = await r.xrange(KEYS.results)
    assert queued["type"] == "queued" and queued["task_id"] == "a"
    assert (await enqueue(scripts, "b")).execution_id == 2


async def test_idempotency_key_race_enqueues_once(r: Redis, scripts: Scripts) -> None:
    results = await asyncio.gather(*(enqueue(scripts, f"task{i}", key="k1") for i in range(20)))
    assert sum(res.created for res in results) == 1
    assert len({(res.task_id, res.execution_id) for res in results}) == 1
    assert await r.xlen(KEYS.requests) == 1
    other = await enqueue(scripts, "other", key="k1", client="globex")
    assert other.created and other.task_id == "other"


async def test_concurrent_terminal_records_write_one_terminal_event(r: Redis, scripts: Scripts) -> None:
    await enqueue(scripts, "a")
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    entry_id = reply[0][1][0][0]

    async def finish(status: TaskStatus, type_: EventType):
        return await scripts.record(
            task_id="a",
            client="acme",
            events=[event("a", type_)],
            task_fields={TaskField.STATUS: status},
            terminal=True,
            ack_entry_id=entry_id,
            consumer="w1",
            token=uuid.uuid4().hex,
            task_ttl=60,
        )

    results = await asyncio.gather(
        *(finish(TaskStatus.SUCCESS, EventType.SUCCEEDED) for _ in range(5)),
        *(finish(TaskStatus.FAILURE, EventType.FAILED) for _ in range(5)),
    )
    assert sum(res.written for res in results) == 1
    terminal = [f for _, f in await r.xrange(KEYS.results) if f["type"] in ("succeeded", "failed")]
    assert len(terminal) == 1
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    assert 0 < await r.ttl(KEYS.task("a")) <= 60
    # The task's own event index lists its queued and terminal events, in order, and expires with it.
    ids = await r.lrange(KEYS.task_events("a"), 0, -1)
    all_ids = [i for i, f in await r.xrange(KEYS.results) if f["task_id"] == "a"]
    assert ids == all_ids and len(ids) == 2
    assert 0 < await r.ttl(KEYS.task_events("a")) <= 60
    # Progress after the end is refused too, and does not touch the status.
    late = await record_progress(scripts, entry_id)
    assert not late.written and late.status in ("SUCCESS", "FAILURE")


async def record_progress(scripts: Scripts, entry_id: str, reopen_token: str | None = None) -> RecordResult:
    """A run's write of progress (a node started) for task "a", whose entry worker w1 holds."""
    return await scripts.record(
        task_id="a",
        client="acme",
        events=[event("a", EventType.NODE_STARTED)],
        task_fields={TaskField.STATUS: TaskStatus.RUNNING},
        terminal=False,
        ack_entry_id=entry_id,
        consumer="w1",
        token=uuid.uuid4().hex,
        task_ttl=60,
        reopen_token=reopen_token,
    )


async def test_record_refuses_a_run_of_a_request_its_task_was_reopened_past(r: Redis, scripts: Scripts) -> None:
    """A retry of a cancelled run re-opens the task (status RETRY) with a request of its own: a run of the
    earlier request (its cancel missed) is refused at its next write and its entry acknowledged, though
    the task is not terminal and the entry is still its worker's. The retry's own run writes."""
    await enqueue(scripts, "a")
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    entry_id = reply[0][1][0][0]
    # A task never re-opened has no token to compare: a request carrying one (a retry's dead letter,
    # replayed as a new task) is its own.
    assert (await record_progress(scripts, entry_id, "t0")).outcome == RecordOutcome.WRITTEN
    await r.hset(KEYS.task("a"), mapping={TaskField.STATUS: TaskStatus.RETRY, TaskField.REOPEN_TOKEN: "t2"})

    assert (await record_progress(scripts, entry_id, "t2")).outcome == RecordOutcome.WRITTEN  # the retry's run
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 1
    for earlier in ("", "t1"):  # a request of no re-open, or of an earlier one
        assert (await record_progress(scripts, entry_id, earlier)).outcome == RecordOutcome.FINISHED
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.RUNNING


async def test_retry_later_parks_and_promote_moves_each_once(r: Redis, scripts: Scripts) -> None:
    await enqueue(scripts, "a")
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    entry_id, fields = reply[0][1][0]
    parked = await scripts.retry_later(
        task_id="a",
        entry_id=entry_id,
        consumer="w1",
        request=fields,
        delay_ms=3_600_000,
        event=event("a", EventType.RETRY),
        task_fields={TaskField.STATUS: TaskStatus.RETRY, TaskField.ATTEMPT: "1"},
    )
    assert parked == 1
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    assert await r.zcard(KEYS.delayed) == 1
    assert await scripts.promote_due() == 0  # due in an hour, by Redis's clock
    [member] = await r.zrange(KEYS.delayed, 0, -1)
    await r.zadd(KEYS.delayed, {member: 0}, xx=True)  # the hour has passed
    moved = await asyncio.gather(*(scripts.promote_due() for _ in range(5)))
    assert sum(moved) == 1
    assert await r.zcard(KEYS.delayed) == 0
    entries = await r.xrange(KEYS.requests)
    assert len(entries) == 2
    assert entries[1][1] == fields


async def test_dead_letter_acks_and_ends_task_once(r: Redis, scripts: Scripts) -> None:
    await enqueue(scripts, "a")
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    entry_id, fields = reply[0][1][0]
    letter = {**fields, "dlq_reason": "max_deliveries"}
    ends = await asyncio.gather(
        *(
            scripts.dead_letter(
                entry_id=entry_id,
                consumer="w1",
                letter=letter,
                task_id="a",
                client="acme",
                event=event("a", EventType.DEAD),
                task_fields={TaskField.STATUS: TaskStatus.DEAD},
                task_ttl=60,
            )
            for _ in range(3)
        )
    )
    assert sum(written for written, _ in ends) == 1
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.DEAD
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    dead_events = [f for _, f in await r.xrange(KEYS.results) if f["type"] == "dead"]
    assert len(dead_events) == 1
    # A garbage entry (no task) is dead-lettered without touching any task.
    await r.xadd(KEYS.requests, {"junk": "1"})
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    junk_id = reply[0][1][0][0]
    written, dlq_id = await scripts.dead_letter(
        entry_id=junk_id,
        consumer="w1",
        letter={"junk": "1", "dlq_reason": "malformed"},
        task_id=None,
        event=None,
        task_fields=None,
        task_ttl=60,
    )
    assert not written and dlq_id
    # One letter per request: the racing copies found the entry acknowledged and wrote none.
    assert await r.xlen(KEYS.dead_letter) == 2


async def test_heartbeat_refreshes_own_entries_and_never_steals_back(r: Redis, scripts: Scripts) -> None:
    await enqueue(scripts, "a")
    await enqueue(scripts, "b")
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    ids = [entry_id for entry_id, _ in reply[0][1]]
    # Another worker takes over the second entry.
    await r.xclaim(KEYS.requests, KEYS.worker_group, "w2", 0, [ids[1]])
    kept = await scripts.heartbeat("w1", ids)
    assert kept == {ids[0]}
    owners = {
        p["message_id"]: p["consumer"] for p in await r.xpending_range(KEYS.requests, KEYS.worker_group, "-", "+", 10)
    }
    assert owners == {ids[0]: "w1", ids[1]: "w2"}
    # JUSTID: a heartbeat is not a delivery.
    [info] = await r.xpending_range(KEYS.requests, KEYS.worker_group, ids[0], ids[0], 1)
    assert info["times_delivered"] == 1


async def test_remove_consumer_only_when_it_owns_nothing(r: Redis, scripts: Scripts) -> None:
    await enqueue(scripts, "a")
    await r.xreadgroup(KEYS.worker_group, "busy", {KEYS.requests: ">"})
    await r.xreadgroup(KEYS.worker_group, "idle", {KEYS.requests: ">"})
    assert not await scripts.remove_consumer_if_idle(KEYS.requests, KEYS.worker_group, "busy")
    assert await scripts.remove_consumer_if_idle(KEYS.requests, KEYS.worker_group, "idle")
    names = {c["name"] for c in await r.xinfo_consumers(KEYS.requests, KEYS.worker_group)}
    assert names == {"busy"}


async def test_pass_unwatched_moves_the_webhook_group_only_while_no_endpoint_is_registered(
    r: Redis, scripts: Scripts
) -> None:
    endpoints, group = f"{KEYS.home}:webhooks", "webhooks"
    # No stream, then no group: nothing to move; the fan-out reads, and its read makes them.
    assert not await scripts.pass_unwatched(endpoints, KEYS.results, group)
    first = await r.xadd(KEYS.results, {"type": "queued"})
    assert not await scripts.pass_unwatched(endpoints, KEYS.results, group)
    await r.xgroup_create(KEYS.results, group, id="0")
    assert await scripts.pass_unwatched(endpoints, KEYS.results, group)
    [info] = await r.xinfo_groups(KEYS.results)
    assert info["last-delivered-id"] == first and info["pending"] == 0
    # At the end already: no write (each would go to the replicas and the append-only file).
    writes = (await r.info("persistence"))["rdb_changes_since_last_save"]
    assert await scripts.pass_unwatched(endpoints, KEYS.results, group)
    assert (await r.info("persistence"))["rdb_changes_since_last_save"] == writes
    # The race the script closes: an endpoint registered, then an event. It is never passed over.
    await r.hset(endpoints, "e1", "{}")
    after = await r.xadd(KEYS.results, {"type": "succeeded"})
    assert not await scripts.pass_unwatched(endpoints, KEYS.results, group)
    assert await r.xreadgroup(group, "c1", {KEYS.results: ">"}) == [[KEYS.results, [(after, {"type": "succeeded"})]]]
    # Entries read and not acknowledged stay pending when the group is moved on.
    await r.hdel(endpoints, "e1")
    await r.xadd(KEYS.results, {"type": "started"})
    await twice(r, lambda: scripts.pass_unwatched(endpoints, KEYS.results, group))
    assert (await r.xpending(KEYS.results, group))["pending"] == 1


@pytest.mark.parametrize("binary", redis_binaries(), ids=redis_version)
async def test_pass_unwatched_holds_no_copy_of_the_streams_entries(
    binary: str, redis_factory: Callable[..., RedisServer]
) -> None:
    """An idle fan-out asks at every pass: the check must not build a reply out of the stream's first and
    last entries (a context of megabytes each). Their copy shows in Redis's peak memory, which only a
    fresh server has at a known level."""
    server = redis_factory(binary=binary)
    r = Redis.from_url(server.admin_url, decode_responses=True)
    try:
        endpoints, group, big = f"{KEYS.home}:webhooks", "webhooks", "x" * (8 << 20)
        await r.xadd(KEYS.results, {"data": big})
        await r.xadd(KEYS.results, {"data": "small"})
        await r.xadd(KEYS.results, {"data": big})
        await r.xgroup_create(KEYS.results, group, id="$")
        scripts = Scripts(r, KEYS)
        before = (await r.info("memory"))["used_memory_peak"]
        assert await scripts.pass_unwatched(endpoints, KEYS.results, group)
        assert (await r.info("memory"))["used_memory_peak"] - before < 1 << 20
        # Behind, it moves on; at the greatest id (nothing can come after), it leaves the group be.
        await r.xgroup_setid(KEYS.results, group, id="0")
        assert await scripts.pass_unwatched(endpoints, KEYS.results, group)
        [info] = await r.xinfo_groups(KEYS.results)
        assert info["last-delivered-id"] == (await r.xinfo_stream(KEYS.results))["last-generated-id"]
        greatest = "18446744073709551615-18446744073709551615"
        await r.xgroup_setid(KEYS.results, group, id=greatest)
        assert await scripts.pass_unwatched(endpoints, KEYS.results, group)
        assert (await r.xinfo_groups(KEYS.results))[0]["last-delivered-id"] == greatest
    finally:
        await r.aclose()


async def test_task_state_reads_the_task_and_both_pause_flags(r: Redis, scripts: Scripts) -> None:
    assert await scripts.task_state("nothing", 1) == ({}, False)
    await enqueue(scripts, "t1")
    task, paused = await scripts.task_state("t1", 1)
    assert task == await r.hgetall(KEYS.task("t1")) and task[TaskField.STATUS] == TaskStatus.PENDING
    assert not paused
    # Either flag pauses the run: its own workflow's, or the whole queue's; another workflow's does not.
    await r.hset(KEYS.control, "workflow:2", "1")
    assert (await scripts.task_state("t1", 1))[1] is False
    assert (await scripts.task_state("t1", 2))[1] is True
    await r.hdel(KEYS.control, "workflow:2")
    await r.hset(KEYS.control, "queue", "1")
    assert (await scripts.task_state("t1", 1))[1] is True


async def test_raise_sequence_only_raises(r: Redis, scripts: Scripts) -> None:
    assert await scripts.raise_sequence(10) == 10
    assert await scripts.raise_sequence(3) == 10
    assert (await enqueue(scripts, "a")).execution_id == 11


async def test_record_writes_several_events_in_order(r: Redis, scripts: Scripts) -> None:
    await enqueue(scripts, "a")
    kinds = [EventType.STARTED, EventType.NODE_STARTED, EventType.NODE_FINISHED]
    result = await scripts.record(
        task_id="a",
        client="acme",
        events=[event("a", k) for k in kinds],
        task_fields={TaskField.STATUS: TaskStatus.RUNNING, TaskField.CURRENT_NODE: "start"},
        terminal=False,
        ack_entry_id=None,
        token="t1",
        task_ttl=60,
    )
    entries = await r.xrange(KEYS.results)
    assert [f["type"] for _, f in entries] == ["queued", *kinds]
    assert result.written and result.event_id == entries[-1][0] and result.status == "RUNNING"
    assert await r.lrange(KEYS.task_events("a"), 0, -1) == [i for i, _ in entries]
    assert await r.hget(KEYS.task("a"), TaskField.CURRENT_NODE) == "start"
    assert await r.ttl(KEYS.task("a")) == -1


async def test_record_writes_each_event_field_for_field_in_its_order(r: Redis, scripts: Scripts) -> None:
    """A run's events are sent without the fields they share (of_run, a shorter call): each entry is
    written as event_fields makes it all the same, every field in its place; events sent whole are
    written as given."""
    await enqueue(scripts, "a")
    same = [
        event_fields(k, task_id="a", execution_id=7, workflow_id=3, client="acme", data={"step": i, "x": "é\x00"})
        for i, k in enumerate([EventType.STARTED, EventType.NODE_STARTED, EventType.NODE_FINISHED])
    ]
    odd = {**event_fields(EventType.NODE_STARTED, task_id="a", execution_id=7, workflow_id=2, client="acme", data={})}
    unordered = dict(reversed(list(same[0].items())))
    of_run = [(e["type"], e["ts"], e["data"]) for e in same]
    for events, written_as, run in (
        (of_run, same, (7, 3)),
        (same, same, None),
        ([*same, odd], [*same, odd], None),
        ([unordered], [unordered], None),
    ):
        before = await r.xrange(KEYS.results)
        await scripts.record(
            task_id="a",
            client="acme",
            events=events,
            task_fields={TaskField.STATUS: TaskStatus.RUNNING},
            terminal=False,
            ack_entry_id=None,
            token=uuid.uuid4().hex,
            task_ttl=60,
            of_run=run,
        )
        written = (await r.xrange(KEYS.results))[len(before) :]
        # Field for field, in order (a dict's items keep the entry's order).
        assert [list(f.items()) for _, f in written] == [list(e.items()) for e in written_as]


async def test_inflight_cap_counts_unfinished_tasks_per_client(r: Redis, scripts: Scripts) -> None:
    from shared.scripts import AtCapacity

    async def capped(task_id: str, client: str = "acme"):
        return await scripts.enqueue(
            task_id=task_id, workflow_id=1, workflow_name="wf", client=client, enqueued_at=now_iso(),
            payload="{}", queued_data="{}", max_inflight=2,
        )  # fmt: skip

    await capped("a")
    await capped("b")
    with pytest.raises(AtCapacity, match="2 executions in flight"):
        await capped("c")
    await capped("other", client="globex")
    assert await r.get(KEYS.inflight("acme")) == "2"
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=1)
    entry_id = reply[0][1][0][0]
    await scripts.record(
        task_id="a", client="acme", events=[event("a", EventType.SUCCEEDED)],
        task_fields={TaskField.STATUS: TaskStatus.SUCCESS}, terminal=True, ack_entry_id=entry_id, consumer="w1",
        token="t1", task_ttl=60,
    )  # fmt: skip
    assert await r.get(KEYS.inflight("acme")) == "1"
    await capped("c")  # a slot was freed by the terminal event


# ---- each step run twice with the same arguments (its reply lost, the call re-sent) ----------------


async def snapshot(r: Redis) -> dict[str, object]:
    """Every key's type and content, pending lists with owners and delivery counts (not idle times)."""
    state: dict[str, object] = {}
    for key in sorted(await r.keys("*")):
        kind = await r.type(key)
        if kind == "string":
            value: object = await r.get(key)
        elif kind == "hash":
            value = await r.hgetall(key)
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        elif kind == "zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            groups = await r.xinfo_groups(key)
            pending = {
                g["name"]: [
                    (p["message_id"], p["consumer"], p["times_delivered"])
                    for p in await r.xpending_range(key, g["name"], "-", "+", 1000)
                ]
                for g in groups
            }
            value = (await r.xrange(key), pending)
        else:
            value = kind
        state[key] = (kind, value, await r.ttl(key) > 0)
    return state


async def twice(r: Redis, step: Callable[[], Awaitable[object]]) -> None:
    await step()
    once = await snapshot(r)
    await step()
    assert await snapshot(r) == once


async def delivered(r: Redis, scripts: Scripts, task_id: str, consumer: str = "w1") -> tuple[str, dict[str, str]]:
    await enqueue(scripts, task_id)
    reply = await r.xreadgroup(KEYS.worker_group, consumer, {KEYS.requests: ">"}, count=1)
    return reply[0][1][0]


async def test_enqueue_twice_is_enqueue_once(r: Redis, scripts: Scripts) -> None:
    limited = dict(workflow_id=1, workflow_name="wf", client="acme", enqueued_at="t", payload="{}", queued_data="{}")
    await twice(r, lambda: scripts.enqueue(task_id="a", **limited))
    await twice(r, lambda: scripts.enqueue(task_id="b", idempotency_key="k", **limited))
    await twice(r, lambda: scripts.enqueue(task_id="c", max_inflight=10, rate=5, burst=5, **limited))
    assert await r.xlen(KEYS.requests) == 3
    assert await r.get(KEYS.inflight("acme")) == "3"
    # The re-sent call is answered as the first one was.
    again = await scripts.enqueue(task_id="a", **limited)
    assert again.created and again.execution_id == 1 and again.entry_id == (await r.xrange(KEYS.requests))[0][0]


# Workflow 1's head in Redis, at version 2, and an enqueue call of it without its task id.
HEAD = {"id": 1, "name": "wf", "description": None, "version": 2, "created_at": "t", "updated_at": "t"}
HEAD_CALL: dict[str, Any] = dict(
    workflow_id=1, workflow_name="wf", client="acme", enqueued_at="t", payload="{}", queued_data="{}"
)


async def set_head(r: Redis, **changes: Any) -> None:
    await r.set(KEYS.workflow(1), dumps({**HEAD, "deleted": False, **changes}))


async def test_enqueue_with_a_live_version_goes_in_only_while_the_workflow_is_live_at_it(
    r: Redis, scripts: Scripts
) -> None:
    head, call = HEAD, HEAD_CALL
    await set_head(r)
    assert (await scripts.enqueue(task_id="a", live_version=2, **call)).created
    head_key = KEYS.workflow(1)
    before = {k: v for k, v in (await snapshot(r)).items() if k != head_key}
    # Updated since the caller read version 1, deleted, gone from Redis, a copy without a version, not
    # JSON: nothing is written, and the caller is told to read the head again.
    for written in (
        dumps({**head, "deleted": False, "version": 3}),
        dumps({**head, "deleted": True}),
        None,
        dumps({k: v for k, v in head.items() if k != "version"}),
        "not json",
    ):
        await (r.delete(head_key) if written is None else r.set(head_key, written))
        with pytest.raises(WorkflowChanged):
            await scripts.enqueue(task_id="b", idempotency_key="k", live_version=2, **call)
        assert {k: v for k, v in (await snapshot(r)).items() if k != head_key} == before
    # Without a live version the head is not looked at (the caller read it itself).
    assert (await scripts.enqueue(task_id="b", **call)).created


async def test_an_enqueue_sent_again_answers_as_its_first_call_did_though_the_workflow_changed_between(
    r: Redis, scripts: Scripts
) -> None:
    # A reply lost on its way back: the call is sent again, the same task id. The step looked at the
    # workflow's head first: updated in between, it answered "changed", and the API queued the request
    # again under a new task id, two executions of one request.
    call = HEAD_CALL
    await set_head(r)
    first = await scripts.enqueue(task_id="a", live_version=2, **call)
    await set_head(r, version=3)
    again = await scripts.enqueue(task_id="a", live_version=2, **call)
    assert (again.task_id, again.execution_id, again.entry_id) == (first.task_id, first.execution_id, first.entry_id)
    # The same for a request repeated with its Idempotency-Key (a new task id each time it is sent).
    keyed = await scripts.enqueue(task_id="b", idempotency_key="k", live_version=3, **call)
    await set_head(r, version=4)
    repeated = await scripts.enqueue(task_id="c", idempotency_key="k", live_version=3, **call)
    assert not repeated.created and (repeated.task_id, repeated.execution_id) == (keyed.task_id, keyed.execution_id)
    assert await r.xlen(KEYS.requests) == 2


@pytest.mark.parametrize("terminal", [False, True])
async def test_record_twice_is_record_once(r: Redis, scripts: Scripts, terminal: bool) -> None:
    entry_id, _ = await delivered(r, scripts, "a")
    call = dict(
        task_id="a",
        client="acme",
        events=[event("a", EventType.NODE_FINISHED), event("a", EventType.SUCCEEDED)],
        task_fields={TaskField.STATUS: TaskStatus.SUCCESS if terminal else TaskStatus.RUNNING},
        terminal=terminal,
        ack_entry_id=entry_id,
        consumer="w1",
        token="one-call",
        task_ttl=60,
    )
    await twice(r, lambda: scripts.record(**call))
    again = await scripts.record(**call)
    assert again.written and again.event_id == (await r.xrevrange(KEYS.results, count=1))[0][0]


async def test_retry_later_promote_and_dead_letter_twice_are_once(r: Redis, scripts: Scripts) -> None:
    entry_id, fields = await delivered(r, scripts, "a")
    await twice(
        r,
        lambda: scripts.retry_later(
            task_id="a",
            entry_id=entry_id,
            consumer="w1",
            request=fields,
            delay_ms=0,
            event=event("a", EventType.RETRY),
            task_fields={TaskField.STATUS: TaskStatus.RETRY},
        ),
    )
    await twice(r, scripts.promote_due)
    entry_id, fields = await delivered(r, scripts, "b")
    await twice(
        r,
        lambda: scripts.dead_letter(
            entry_id=entry_id,
            consumer="w1",
            letter={**fields, "dlq_reason": "max_deliveries"},
            task_id="b",
            client="acme",
            event=event("b", EventType.DEAD),
            task_fields={TaskField.STATUS: TaskStatus.DEAD},
            task_ttl=60,
        ),
    )
    assert await r.xlen(KEYS.dead_letter) == 1


async def test_reopen_heartbeat_and_bookkeeping_twice_are_once(r: Redis, scripts: Scripts) -> None:
    entry_id, fields = await delivered(r, scripts, "a")
    await scripts.record(
        task_id="a", client="acme", events=[event("a", EventType.FAILED)],
        task_fields={TaskField.STATUS: TaskStatus.FAILURE}, terminal=True, ack_entry_id=entry_id,
        consumer="w1", token="t", task_ttl=60,
    )  # fmt: skip
    await twice(
        r,
        lambda: scripts.reopen(
            task_id="a", client="acme", token="retry-1", event=event("a", EventType.RETRY), request=fields
        ),
    )
    assert (
        await scripts.reopen(
            task_id="a", client="acme", token="retry-1", event=event("a", EventType.RETRY), request=fields
        )
        == "FAILURE"
    )
    entry_id, _ = await delivered(r, scripts, "b")
    await twice(r, lambda: scripts.heartbeat("w1", [entry_id]))
    await twice(r, lambda: scripts.raise_sequence(50))
    await r.xreadgroup(KEYS.worker_group, "idle", {KEYS.requests: ">"})
    await twice(r, lambda: scripts.remove_consumer_if_idle(KEYS.requests, KEYS.worker_group, "idle"))


# ---- ownership, terminal states, the id sequence ---------------------------------------------------


async def test_heartbeat_refreshes_every_entry_it_holds(r: Redis, scripts: Scripts) -> None:
    for task_id in ("a", "b", "c"):
        await enqueue(scripts, task_id)
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    ids = [entry_id for entry_id, _ in reply[0][1]]
    # Make them look an hour old, then heartbeat: each must be fresh again, not only the oldest.
    await r.xclaim(KEYS.requests, KEYS.worker_group, "w1", 0, ids, idle=3_600_000, justid=True)
    assert await scripts.heartbeat("w1", ids) == set(ids)
    idle = {p["message_id"]: p["time_since_delivered"] for p in await r.xpending_range(
        KEYS.requests, KEYS.worker_group, "-", "+", 10)}  # fmt: skip
    assert all(idle[i] < 600_000 for i in ids), idle


async def test_heartbeat_keeps_live_entries_behind_many_orphans(r: Redis, scripts: Scripts) -> None:
    for i in range(150):
        await enqueue(scripts, f"orphan{i}")
    await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})  # pending to w1, run by nobody
    for i in range(30):
        await enqueue(scripts, f"live{i}")
    reply = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"})
    live = [entry_id for entry_id, _ in reply[0][1]]
    assert await scripts.heartbeat("w1", live) == set(live)


async def test_a_run_that_lost_its_entry_writes_nothing(r: Redis, scripts: Scripts) -> None:
    entry_id, _ = await delivered(r, scripts, "a")
    await r.xclaim(KEYS.requests, KEYS.worker_group, "w2", 0, [entry_id])  # reclaimed by w2
    head_key = KEYS.workflow(1)
    before = {k: v for k, v in (await snapshot(r)).items() if k != head_key}
    stale = await scripts.record(
        task_id="a", client="acme", events=[event("a", EventType.NODE_FINISHED)],
        task_fields={TaskField.CHECKPOINT: '{"step": 9}'}, terminal=False, ack_entry_id=entry_id,
        consumer="w1", token="stale", task_ttl=60,
    )  # fmt: skip
    assert stale.outcome == RecordOutcome.NOT_OWNER and not stale.written
    parked = await scripts.retry_later(
        task_id="a", entry_id=entry_id, consumer="w1", request={}, delay_ms=0,
        event=event("a", EventType.RETRY), task_fields={},
    )  # fmt: skip
    assert parked == -1
    assert await snapshot(r) == before


@pytest.mark.parametrize(
    "not_as_enqueued",
    [
        {TaskField.STATUS: TaskStatus.RETRY, TaskField.ATTEMPT: "1"},
        {TaskField.STATUS: TaskStatus.RUNNING},
        {TaskField.ATTEMPT: "2"},
        {TaskField.STARTED_AT: "2026-01-01T00:00:00.000Z"},
        {TaskField.CHECKPOINT: '{"step": 1}'},
        {TaskField.REOPENED_FROM: TaskStatus.REVOKED},
        {TaskField.VERSION: str(FORMAT_VERSION + 1)},
        {TaskField.VERSION: "x"},
        "queue paused",
        "workflow paused",
    ],
)
async def test_an_assumed_first_run_writes_only_onto_a_task_as_enqueued(
    r: Redis, scripts: Scripts, not_as_enqueued: dict[str, str] | str
) -> None:
    """A first delivery's first write, made without a read of its task, is refused (STALE, nothing
    written) when the task is not as enqueued or is paused; onto one as enqueued it is written."""
    entry_id, _ = await delivered(r, scripts, "a")
    first_write = dict(
        task_id="a", client="acme", events=[event("a", EventType.STARTED)],
        task_fields={TaskField.STATUS: TaskStatus.RUNNING}, terminal=False, ack_entry_id=entry_id,
        consumer="w1", task_ttl=60, first_run_of=1, readable=FORMAT_VERSION,
    )  # fmt: skip
    if not_as_enqueued == "queue paused":
        await r.hset(KEYS.control, "queue", "1")
    elif not_as_enqueued == "workflow paused":
        await r.hset(KEYS.control, "workflow:1", "1")
    else:
        await r.hset(KEYS.task("a"), mapping=not_as_enqueued)
    before = await snapshot(r)
    refused = await scripts.record(token="first", **first_write)  # type: ignore[arg-type]
    assert refused.outcome == RecordOutcome.STALE and not refused.written
    assert await snapshot(r) == before
    # Another workflow's pause does not hold this one back; as enqueued, the task takes the write.
    await r.delete(KEYS.control)
    await r.hset(KEYS.control, "workflow:2", "1")
    as_enqueued = {TaskField.STATUS: TaskStatus.PENDING, TaskField.ATTEMPT: "0", TaskField.VERSION: str(FORMAT_VERSION)}
    await r.hset(KEYS.task("a"), mapping=as_enqueued)
    await r.hdel(KEYS.task("a"), TaskField.STARTED_AT, TaskField.CHECKPOINT, TaskField.REOPENED_FROM)
    written = await scripts.record(token="again", **first_write)  # type: ignore[arg-type]
    assert written.written and (await r.hget(KEYS.task("a"), TaskField.STATUS)) == TaskStatus.RUNNING


async def test_an_assumed_first_run_of_a_finished_task_only_acknowledges(r: Redis, scripts: Scripts) -> None:
    entry_id, _ = await delivered(r, scripts, "a")
    await r.hset(KEYS.task("a"), TaskField.STATUS, TaskStatus.REVOKED)
    finished = await scripts.record(
        task_id="a", client="acme", events=[event("a", EventType.STARTED)],
        task_fields={TaskField.STATUS: TaskStatus.RUNNING}, terminal=False, ack_entry_id=entry_id,
        consumer="w1", token="first", task_ttl=60, first_run_of=1,
    )  # fmt: skip
    assert finished.outcome == RecordOutcome.FINISHED and finished.status == TaskStatus.REVOKED
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    assert await r.xlen(KEYS.results) == 1  # its queued event only


async def test_dead_letter_of_a_finished_task_writes_no_letter(r: Redis, scripts: Scripts) -> None:
    entry_id, fields = await delivered(r, scripts, "a")
    await r.hset(KEYS.task("a"), TaskField.STATUS, TaskStatus.SUCCESS)  # a copy finished meanwhile
    written, letter_id = await scripts.dead_letter(
        entry_id=entry_id, consumer="w1", letter={**fields, "dlq_reason": "max_deliveries"}, task_id="a",
        client="acme", event=event("a", EventType.DEAD), task_fields={TaskField.STATUS: TaskStatus.DEAD}, task_ttl=60,
    )  # fmt: skip
    assert not written and letter_id == ""
    assert await r.xlen(KEYS.dead_letter) == 0
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 0
    assert await r.hget(KEYS.task("a"), TaskField.STATUS) == TaskStatus.SUCCESS


async def test_lost_sequence_is_raised_from_the_floor_before_any_id_is_handed_out(r: Redis, scripts: Scripts) -> None:
    from shared.enqueue import NewExecution, SequenceUnavailable, enqueue_execution

    await enqueue(scripts, "a")
    await r.flushall()  # Redis lost its data; PostgreSQL knows executions up to 41
    new = NewExecution(workflow_id=1, workflow_name="wf", client="globex", initial_context={})

    async def unreachable() -> int:
        raise OSError("connection refused")

    with pytest.raises(SequenceUnavailable, match="PostgreSQL is unreachable"):
        await enqueue_execution(scripts, new, floor=unreachable)
    assert await r.xlen(KEYS.requests) == 0

    async def floor() -> int:
        return 41

    result = await enqueue_execution(scripts, new, floor=floor)
    assert result.created and result.execution_id == 42


def test_every_atomic_step_touches_one_slot_under_a_shard_tag() -> None:
    from redis.crc import key_slot

    from shared.scripts import semaphore_keys
    from shared.settings import Settings
    from shared.webhooks import WebhookKeys

    single = Keys.from_settings(Settings(redis_url="redis://unused"))
    assert single.task("t") == "nova:task:t" and single.requests == "nova:requests"  # documented names
    shards = 4
    # On a cluster too: deployment-wide keys are tagged with `home` there, not by a shard.
    for settings in (
        Settings(redis_url="redis://unused", shards=shards),
        Settings(redis_url="redis://unused", shards=shards, redis_cluster=True),
    ):
        for client in ("acme", "globex", "initech"):
            # Any shard's keys name the client's keys in its shard, and a new task id of that shard.
            keys = Keys.shard(settings, 0).of_client(client)
            assert keys.shard_index == Keys.shard_of_client(client, shards)
            t = keys.new_task_id()
            assert Keys.shard_of_task(t, shards) == keys.shard_index and Keys.shard(settings, 3).task(t) == keys.task(t)
            ckey = Scripts(None, keys)._concurrency_keys(f"{{{client}}}:reports")  # type: ignore[arg-type]
            hooks = WebhookKeys(keys)
            steps = {
                "enqueue": [keys.requests, keys.results, keys.execution_seq, keys.task(t),
                            keys.idempotency(client, "k"),
                            keys.task_events(t), keys.inflight(client), keys.rate_bucket(client), keys.absent],
                "record": [keys.task(t), keys.results, keys.requests, keys.task_events(t), keys.inflight(client),
                           keys.control],
                "retry_later": [keys.task(t), keys.results, keys.requests, keys.delayed, keys.task_events(t)],
                "promote_due": [keys.delayed, keys.requests],
                "dead_letter": [keys.dead_letter, keys.requests, keys.task(t), keys.results, keys.task_events(t),
                                keys.inflight(client)],
                "reopen": [keys.task(t), keys.requests, keys.results, keys.task_events(t), keys.inflight(client)],
                "park": [keys.control, keys.requests, keys.parked("queue"), keys.parked("workflow:1")],
                "task_state": [keys.task(t), keys.control],
                "resume": [keys.control, keys.parked("queue"), keys.requests],
                # The steps that came with concurrency keys, rolling deploys, worker reports, built-in
                # schedules and secret rotation, with the keys shared/scripts.py passes them.
                "cancel": [keys.task(t), keys.results, keys.task_events(t), keys.inflight(client), *ckey[1:4], ckey[0],
                           keys.requests],
                "cancel (no concurrency key)": [keys.task(t), keys.results, keys.task_events(t), keys.inflight(client),
                                                *[keys.absent] * 4, keys.requests],
                "concurrency_acquire": [*ckey, keys.task(t)],
                "concurrency_release": ckey,
                "leave_to_newer": [keys.requests, keys.newer_format(2)],
                "take_from_older": [keys.control, keys.newer_format(2), keys.requests],
                "heartbeat holders": [keys.concurrency_holders("k")],
                "worker_report": [keys.worker_reports, keys.worker_report_deadlines],
                "claim_tick": [keys.builtin_schedules],
                "rotate_secret": [hooks.endpoints, hooks.previous],
                "semaphore": semaphore_keys(keys.prefix, "gpu"),
            }  # fmt: skip
            if not settings.cluster:
                # Deployment-wide keys need one slot only on a cluster (`Keys.home`).
                for step in ("worker_report", "rotate_secret"):
                    steps.pop(step)
            for step, names in steps.items():
                assert len({key_slot(n.encode()) for n in names}) == 1, (step, names)
            # Deployment-wide keys are one set whichever shard's `Keys` names them.
            assert keys.worker_reports == Keys.shard(settings, 0).worker_reports
            assert keys.builtin_schedules == Keys.shard(settings, 0).builtin_schedules
    # The shards' slots differ (spread over a cluster's masters), and execution ids say their shard.
    assert len({key_slot(Keys.shard(settings, n).requests.encode()) for n in range(shards)}) == shards
    assert Keys.shard(settings, 0).of_execution(4 * 17 + 2).shard_index == 2
    assert len({Keys.shard_of_client(c, shards) for c in ("acme", "globex", "initech", "umbrella", "hooli")}) > 1


class _SlotRecorder(Scripts):
    """The steps as shared/scripts.py calls them, each call's keys recorded instead of run (our own
    interface: what goes to EVAL is what a cluster checks for one slot)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        super().__init__(redis, keys)
        self.calls: list[tuple[str, list[str]]] = []

    def of(self, keys: Keys) -> Scripts:
        recorder = _SlotRecorder(self.redis, keys)
        recorder.calls = self.calls
        return recorder

    async def _call(self, name: str, keys: list[str], args: list[object]) -> object:
        self.calls.append((name, keys))
        return {"cancel": [1, "REVOKED"], "resume": 0}.get(name, 1)


async def test_the_keys_each_new_step_passes_share_one_slot_on_a_cluster_of_shards(r: Redis) -> None:
    """Cancel (with and without a concurrency key), the concurrency steps, rolling deploys' steps,
    worker reports and built-in schedules, called as the workers call them, on a cluster's names."""
    from redis.crc import key_slot

    from shared.settings import Settings

    settings = Settings(
        redis_url="redis://unused", shards=3, redis_cluster=True, key_prefix=f"slot{uuid.uuid4().hex[:6]}"
    )
    for shard in range(3):
        keys = Keys.shard(settings, shard)
        recorder = _SlotRecorder(r, keys)
        task_id = keys.new_task_id()
        # Unknown to Redis: no concurrency key; then one that waits for a key (read before the step).
        await recorder.cancel(task_id=task_id, client=None, event={}, task_fields={}, task_ttl=0)
        waiting = keys.new_task_id()
        await r.hset(keys.task(waiting), mapping={"client": "acme", "waiting_for": "{acme}:k"})
        await recorder.cancel(task_id=waiting, client=None, event={}, task_fields={}, task_ttl=0)
        await recorder.concurrency_acquire(
            key="k", limit=1, task_id=task_id, entry_id="1-0", consumer="c", order=1, request={}, ttl_ms=1000
        )
        await recorder.concurrency_release(key="k", limit=1, task_id=task_id, ttl_ms=1000)
        await recorder.leave_to_newer(entry_id="1-0", consumer="c", version=2, score=1, member="{}")
        await recorder.take_from_older(3)
        await recorder.worker_report("c", "{}", ttl_ms=1000)
        await recorder.worker_report("c", None)
        await recorder.claim_tick("cleanup", now_ms=1, next_ms=2)
        names = {name for name, _ in recorder.calls}
        assert {"cancel", "concurrency_acquire", "concurrency_release", "leave_to_newer", "resume"} <= names
        assert {"worker_report", "claim_tick"} <= names
        for name, used in recorder.calls:
            assert len({key_slot(k.encode()) for k in used}) == 1, (shard, name, used)


# ---- built-in schedules ----------------------------------------------------------------------------


async def test_claim_tick_race_one_worker_claims_each_tick(r: Redis, scripts: Scripts) -> None:
    # Not yet registered: the first look registers the next tick and claims nothing.
    assert await scripts.claim_tick("cleanup", now_ms=1_000, next_ms=60_000) is None
    assert await r.zscore(KEYS.builtin_schedules, "cleanup") == 60_000
    assert await scripts.claim_tick("cleanup", now_ms=59_999, next_ms=60_000) is None  # not due
    for tick, nxt in ((60_000, 120_000), (120_000, 180_000)):
        claims = await asyncio.gather(*(scripts.claim_tick("cleanup", now_ms=tick + 5, next_ms=nxt) for _ in range(8)))
        assert sorted(claims, key=lambda c: c or 0) == [None] * 7 + [tick]
    # Down through several ticks: the missed one is claimed once, the next is computed from now.
    claims = [await scripts.claim_tick("cleanup", now_ms=600_005, next_ms=660_000) for _ in range(3)]
    assert claims == [180_000, None, None]
    assert await r.zscore(KEYS.builtin_schedules, "cleanup") == 660_000


async def test_claim_tick_twice_is_once(r: Redis, scripts: Scripts) -> None:
    await twice(r, lambda: scripts.claim_tick("cleanup", now_ms=1_000, next_ms=60_000))
    await twice(r, lambda: scripts.claim_tick("cleanup", now_ms=60_001, next_ms=120_000))


async def test_rotate_secret_race_one_rotation_writes_and_a_deleted_endpoint_stays_deleted(
    r: Redis, scripts: Scripts
) -> None:
    await r.hset("t:webhooks", "e1", "read")

    def rotate(record: str, expected: str = "read") -> Awaitable[bool]:
        return scripts.rotate_secret(
            "t:webhooks", "t:webhooks:previous", endpoint_id="e1", expected=expected, record=record,
            previous=f"old-of-{record}",
        )  # fmt: skip

    written = await asyncio.gather(*(rotate(f"new-{n}") for n in range(8)))
    assert sum(written) == 1
    winner = f"new-{written.index(True)}"
    assert await r.hget("t:webhooks", "e1") == winner
    assert await r.hget("t:webhooks:previous", "e1") == f"old-of-{winner}"
    await r.hdel("t:webhooks", "e1")
    assert not await rotate("late", expected=winner)
    assert await r.hget("t:webhooks", "e1") is None


async def test_rotate_secret_twice_is_once(r: Redis, scripts: Scripts) -> None:
    await r.hset("t:webhooks", "e1", "read")
    step = dict(endpoint_id="e1", expected="read", record="new", previous="")
    await twice(r, lambda: scripts.rotate_secret("t:webhooks", "t:webhooks:previous", **step))
    assert await r.hget("t:webhooks", "e1") == "new"


async def test_worker_report_race_a_dead_workers_report_goes_a_live_ones_stays(r: Redis, scripts: Scripts) -> None:
    await scripts.worker_report("dead", dumps({"executors": {"e2b": "refused key"}}), ttl_ms=200)
    await scripts.worker_report("live", dumps({"executors": {"e2b": None}}), ttl_ms=60_000)
    # Readers leave a stale report out by Redis's clock, before anyone has pruned it...
    deadline = asyncio.get_running_loop().time() + 10
    while [w["consumer"] for w in await worker_reports(r, KEYS)] != ["live"]:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert await r.hexists(KEYS.worker_reports, "dead")
    # ...and the next live report drops it.
    assert await scripts.worker_report("live", dumps({"executors": {}}), ttl_ms=60_000) == 1
    assert await r.hkeys(KEYS.worker_reports) == ["live"]
    # A shutdown's removal racing a last report (its loop cancelled mid-call): whichever lands last
    # wins, and the report and its deadline stay together.
    for _ in range(20):
        await asyncio.gather(
            scripts.worker_report("live", None), scripts.worker_report("live", dumps({}), ttl_ms=60_000)
        )
        assert set(await r.hkeys(KEYS.worker_reports)) == set(await r.zrange(KEYS.worker_report_deadlines, 0, -1))


async def test_a_script_call_goes_through_after_redis_closed_its_connection(
    r: Redis, scripts: Scripts, versioned_server: RedisServer
) -> None:
    # Script calls take a shorter way than other commands (shared/connections.py lean_command): a pooled
    # connection that Redis closed since (a restart, a proxy's idle timeout) must not fail the next call.
    assert (await enqueue(scripts, "before")).created
    admin = Redis.from_url(versioned_server.admin_url)
    try:
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        await admin.aclose()
    assert (await enqueue(scripts, "after")).created
    assert await r.hget(KEYS.task("after"), TaskField.STATUS) == TaskStatus.PENDING


@pytest.fixture
async def batched(versioned_server: RedisServer) -> AsyncIterator[Redis]:
    """A client as the worker's: its script calls of one pass of the event loop go in one batch."""
    client = create_redis(Settings(redis_url=versioned_server.admin_url), prompt_writes=True, batch_commands=True)
    assert batcher_of(client) is not None
    yield client
    await client.aclose()


async def test_script_calls_of_one_pass_of_the_loop_share_one_connection(r: Redis, batched: Redis) -> None:
    scripts = Scripts(batched, KEYS)
    # Warm: the script loaded, the client's one connection open.
    assert (await enqueue(scripts, "warm")).created
    before = (await r.info("stats"))["total_connections_received"]
    results = await asyncio.gather(*(enqueue(scripts, f"t{i}") for i in range(20)))
    # Each call got its own reply, as if it had been alone...
    assert all(x.created for x in results)
    assert [x.task_id for x in results] == [f"t{i}" for i in range(20)]
    assert len({x.execution_id for x in results}) == 20
    assert await r.xlen(KEYS.requests) == 21
    # ...and all went on the connection the first one had opened: one at a time, they would have taken 20.
    assert (await r.info("stats"))["total_connections_received"] == before


async def test_one_failed_command_of_a_batch_fails_alone(r: Redis, batched: Redis) -> None:
    batcher = batcher_of(batched)
    assert batcher is not None
    replies = await asyncio.gather(
        batcher.command("ECHO", "a"),
        batcher.command("EVALSHA", "0" * 40, 0),  # a script Redis does not have
        batcher.command("ECHO", "b"),
        return_exceptions=True,
    )
    assert replies[0] == "a" and replies[2] == "b"
    assert isinstance(replies[1], NoScriptError)


async def test_a_batch_cancelled_before_it_was_sent_fails_its_commands_and_the_next_ones_go(batched: Redis) -> None:
    batcher = batcher_of(batched)
    assert batcher is not None
    lost = batcher.command("ECHO", "a")
    [send] = batcher._sending
    send.cancel()  # before its first step, as when the loop closes
    with pytest.raises(RedisConnectionError):
        await lost
    # The next command opens a batch of its own; before, it joined the cancelled one and waited for ever.
    assert await asyncio.wait_for(batcher.command("ECHO", "b"), 10) in (b"b", "b")


async def test_a_batch_takes_commands_up_to_its_size_and_the_rest_go_in_batches_of_their_own(
    batched: Redis,
) -> None:
    # One write per batch, under one socket timeout: a burst of large commands (an enqueue carries its
    # context twice) went as one write however large.
    batcher = batcher_of(batched)
    assert batcher is not None
    big = "x" * (batcher.max_batch_bytes // 4)
    replies = [batcher.command("ECHO", f"{i}{big}") for i in range(7)]
    # Issued in one pass: three commands fit in a batch, so three batches are under way.
    assert len(batcher._sending) == 3
    assert [len(r) for r in await asyncio.gather(*replies)] == [len(big) + 1] * 7
    assert [r[0] for r in await asyncio.gather(*replies)] == [str(i) for i in range(7)]


async def test_a_full_batch_cancelled_before_it_was_sent_fails_its_commands(batched: Redis) -> None:
    batcher = batcher_of(batched)
    assert batcher is not None
    big = "x" * (batcher.max_batch_bytes // 2 + 1)
    first, second = batcher.command("ECHO", big), batcher.command("ECHO", big)
    assert len(batcher._sending) == 2
    for send in list(batcher._sending):
        send.cancel()  # before their first step, as when the loop closes
    for lost in (first, second):
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(lost, 10)


async def test_a_batch_redis_does_not_answer_within_the_socket_timeout_fails_as_a_timeout(
    versioned_server: RedisServer,
) -> None:
    # A batch's replies are read under one socket timeout: a Redis that stops answering fails every
    # command of the batch as a timeout (its callers go the whole way), and closes the connection, so
    # late replies never reach the next batch.
    client = create_redis(
        Settings(redis_url=versioned_server.admin_url), prompt_writes=True, batch_commands=True, socket_timeout=0.3
    )
    batcher = batcher_of(client)
    assert batcher is not None
    try:
        assert await batcher.command("ECHO", "warm") == "warm"
        os.kill(versioned_server.proc.pid, signal.SIGSTOP)  # Redis stops answering, its sockets open
        try:
            commands = [batcher.command("ECHO", f"e{i}") for i in range(3)]
            replies = await asyncio.wait_for(asyncio.gather(*commands, return_exceptions=True), 10)
        finally:
            os.kill(versioned_server.proc.pid, signal.SIGCONT)
        assert all(isinstance(reply, RedisTimeoutError) for reply in replies), replies
        assert await asyncio.gather(*(batcher.command("ECHO", f"n{i}") for i in range(3))) == ["n0", "n1", "n2"]
    finally:
        await client.aclose()


async def test_a_script_a_read_only_redis_refuses_is_an_outage_on_every_version(
    r: Redis, scripts: Scripts, batched: Redis
) -> None:
    # A failover leaves a client's address on a replica for a while. Redis 7 answers a script's write
    # with READONLY; 6.2 wraps it in a script error, which callers took for a bug in the step (a
    # worker's projector stopped the worker on it). Both are now an outage, as an unreachable Redis is.
    await r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that is not there
    try:
        for client in (scripts, Scripts(batched, KEYS)):
            with pytest.raises(ReadOnlyError) as raised:
                await enqueue(client, f"refused-{len(str(client))}")
            assert isinstance(raised.value, REDIS_UNAVAILABLE)
    finally:
        await r.execute_command("REPLICAOF", "NO", "ONE")
    assert (await enqueue(scripts, "after")).created
    assert await r.xlen(KEYS.requests) == 1


@pytest.mark.parametrize("prompt_writes", [False, True])
async def test_a_connection_a_read_only_redis_refused_connects_anew(
    r: Redis, versioned_server: RedisServer, prompt_writes: bool
) -> None:
    # After a managed Redis's failover its address (DNS) reaches the new master, but a connection open
    # to the demoted one refused every write for as long as it lived: the API answered 503 until restarted.
    client = create_redis(Settings(redis_url=versioned_server.admin_url), prompt_writes=prompt_writes)
    scripts = Scripts(client, KEYS)
    try:
        await client.ping()
        await r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that is not there
        try:
            before = (await r.info("stats"))["total_connections_received"]
            for write in (lambda: client.set("k", "v"), lambda: enqueue(scripts, "refused")):  # 6.2: in a script
                with pytest.raises(ReadOnlyError):
                    await write()
                await client.ping()
            # Each refusal closed its connection: the command after it connected anew.
            assert (await r.info("stats"))["total_connections_received"] == before + 2
        finally:
            await r.execute_command("REPLICAOF", "NO", "ONE")
        assert await client.set("k", "v")
    finally:
        await client.aclose()


def test_a_client_with_a_batcher_can_still_be_collected() -> None:
    client = create_redis(Settings(redis_url="redis://127.0.0.1:1/0"), prompt_writes=True, batch_commands=True)
    assert batcher_of(client) is not None
    gone = weakref.ref(client)
    del client
    gc.collect()
    assert gone() is None


async def test_a_batch_whose_connection_redis_closed_goes_through(
    r: Redis, batched: Redis, versioned_server: RedisServer
) -> None:
    scripts = Scripts(batched, KEYS)
    assert (await enqueue(scripts, "before")).created
    assert await r.client_kill_filter(_type="normal", skipme=True) >= 1
    # Every call of the batch fails on the closed connection and goes the whole way (a new connection):
    # each is written once.
    results = await asyncio.gather(*(enqueue(scripts, f"after{i}") for i in range(10)))
    assert all(x.created for x in results)
    assert await r.xlen(KEYS.requests) == 11
