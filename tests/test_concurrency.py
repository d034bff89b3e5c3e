"""Concurrency keys: a workflow's `{"concurrency": {"key", "limit"}}`.

The template (validated at create, rendered per run); the atomic steps (concurrency_acquire.lua,
concurrency_release.lua, and cancel.lua's part) with one race test each, on every Redis version here;
then the real pipeline: runs with one key never overlap across two workers and all finish, distinct keys
run side by side, a holder killed with SIGKILL gives its slot back, a waiting run shows its wait and can
be cancelled, and a run whose context lacks a field of the key fails, naming it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pydantic
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from consumer.runs import Delivery, RunContext, run_delivery
from consumer.sandbox.base import Sandbox, SandboxInfraError, SandboxProvider, SandboxSpec
from consumer.sandbox.local import LocalSandboxProvider
from shared.catalog import WorkflowCatalog
from shared.connections import ensure_groups
from shared.control import RunControl, workflow_scope
from shared.inspection import inspect, render_text
from shared.scripts import CancelOutcome, ConcurrencyOutcome, Scripts
from shared.settings import Settings
from shared.streams import TERMINAL_EVENTS, EventType, Keys, RequestField, TaskField, TaskStatus, dumps, now_iso
from shared.workflow import Concurrency, ConcurrencyKeyError, validate_definition
from tests.support import (
    create_workflow,
    enqueue,
    in_process_worker,
    kill9,
    linear,
    ready_for_scripts,
    script_keys,
    start_worker_process,
    wait_for_events,
    wait_terminal,
)

KEYS = script_keys("k")
TTL_MS = 60_000


# ---- the template ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{}", "'{}' names no field"),
        ("{client}:{box.name}", "'{box.name}' reads an attribute"),
        ("{box[0]}", "'{box[0]}' indexes into a field"),
        ("{box!r}", "'{box!r}' has a conversion or format spec"),
        ("{box:>10}", "'{box:>10}' has a conversion or format spec"),
        ("{__import__('os')}", "is not a field name"),
        ("{1box}", "'{1box}' is not a field name"),
        ("{ box}", "'{ box}' is not a field name"),
        ("mail{", "unmatched '{'"),
        ("mail}", "unmatched '}'"),
    ],
)
def test_a_template_is_field_names_only(template: str, problem: str) -> None:
    graph = linear("pass", concurrency={"key": template, "limit": 1})
    with pytest.raises(pydantic.ValidationError, match=re.escape(problem)):
        validate_definition(graph)


@pytest.mark.parametrize(
    "concurrency",
    [{"key": "{client}", "limit": 0}, {"key": "{client}", "limit": "1"}, {"key": "", "limit": 1}, {"limit": 1},
     {"key": "{client}", "limit": 1, "scope": "x"}],
)  # fmt: skip
def test_a_concurrency_needs_a_key_and_a_whole_positive_limit(concurrency: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError, match="concurrency"):
        validate_definition(linear("pass", concurrency=concurrency))


def test_a_key_renders_the_client_and_scalar_fields() -> None:
    c = Concurrency(key="{client}:{mailbox}:{n}:{flag}", limit=1)
    assert c.fields == ["client", "mailbox", "n", "flag"]
    assert c.render("acme", {"mailbox": "in@acme", "n": 3, "flag": True, "other": [1]}) == "acme:in@acme:3:true"
    with pytest.raises(ConcurrencyKeyError, match="needs initial_context field 'mailbox', which this run lacks"):
        c.render("acme", {"n": 1, "flag": False})
    with pytest.raises(ConcurrencyKeyError, match="'mailbox' to be a string, number or boolean; it is dict"):
        c.render("acme", {"mailbox": {"a": 1}, "n": 1, "flag": False})
    with pytest.raises(ConcurrencyKeyError, match="it is null"):
        c.render("acme", {"mailbox": None, "n": 1, "flag": False})


async def test_the_api_refuses_a_bad_template_naming_it(api: httpx.AsyncClient) -> None:
    graph = linear("pass", concurrency={"key": "{client}:{mailbox.address}", "limit": 1})
    reply = await api.post("/workflows", json={"name": "bad-key", "graph_definition": graph})
    assert reply.status_code == 422
    message = reply.json()["error"]["message"]
    assert "graph_definition.concurrency.key" in message and "'{mailbox.address}' reads an attribute" in message
    good = linear("pass", concurrency={"key": "{client}:{mailbox}", "limit": 2})
    reply = await api.post("/workflows", json={"name": "good-key", "graph_definition": good})
    assert reply.status_code == 201, reply.text


# ---- the atomic steps --------------------------------------------------------------------------------


@pytest.fixture
async def r(versioned_redis: Redis) -> Redis:
    return await ready_for_scripts(versioned_redis, KEYS)


async def _deliver(r: Redis, task_id: str, consumer: str = "w1") -> tuple[str, dict[str, str]]:
    """Enqueue a task and read its entry as `consumer` (what a worker holds when it asks for a slot)."""
    await Scripts(r, KEYS).enqueue(
        task_id=task_id,
        workflow_id=1,
        workflow_name="wf",
        client="acme",
        enqueued_at=now_iso(),
        payload=dumps({"initial_context": {}}),
        queued_data=dumps({"workflow_name": "wf"}),
    )
    return await _read(r, consumer)


async def _read(r: Redis, consumer: str = "w1") -> tuple[str, dict[str, str]]:
    [[_, [(entry, fields)]]] = await r.xreadgroup(KEYS.worker_group, consumer, {KEYS.requests: ">"}, count=1)
    return entry, fields


def _order(entry: str, fields: dict[str, str]) -> int:
    if fields.get(RequestField.CONCURRENCY_ORDER):
        return int(fields[RequestField.CONCURRENCY_ORDER])
    ms, _, seq = entry.partition("-")
    return int(ms) * 1000 + int(seq)


async def _acquire(
    r: Redis, entry: str, fields: dict[str, str], *, key: str = "acme:box", limit: int = 1, consumer: str = "w1"
) -> ConcurrencyOutcome:
    return await Scripts(r, KEYS).concurrency_acquire(
        key=key,
        limit=limit,
        task_id=fields["task_id"],
        entry_id=entry,
        consumer=consumer,
        order=_order(entry, fields),
        request=fields,
        ttl_ms=TTL_MS,
    )


async def _release(r: Redis, task_id: str, *, key: str = "acme:box", limit: int = 1, ttl_ms: int = TTL_MS) -> int:
    return await Scripts(r, KEYS).concurrency_release(key=key, limit=limit, task_id=task_id, ttl_ms=ttl_ms)


async def _holders(r: Redis, key: str = "acme:box") -> list[str]:
    return list(await r.zrange(KEYS.concurrency_holders(key), 0, -1))


async def _waiting(r: Redis, key: str = "acme:box") -> list[str]:
    return list(await r.zrange(KEYS.concurrency_waiting(key), 0, -1))


async def test_excess_runs_wait_in_order_and_a_release_wakes_the_next_with_its_slot(r: Redis) -> None:
    first = await _deliver(r, "t1")
    assert await _acquire(r, *first) == ConcurrencyOutcome.ACQUIRED
    assert await _acquire(r, *first) == ConcurrencyOutcome.ACQUIRED  # a re-sent call: the same slot
    later = [await _deliver(r, t) for t in ("t2", "t3")]
    # Parked in reverse: the wait set keeps entry order, not arrival order.
    for entry, fields in reversed(later):
        assert await _acquire(r, entry, fields) == ConcurrencyOutcome.PARKED
    assert await _waiting(r) == ["t2", "t3"]
    assert await r.hget(KEYS.task("t2"), TaskField.WAITING_FOR) == "acme:box"
    assert await r.hget(KEYS.task("t2"), TaskField.STATUS) == TaskStatus.PENDING
    # Parking acknowledged the entries: the workers hold nothing for them.
    assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 1
    assert await r.hgetall(KEYS.concurrency_index) == {"acme:box": "1"}

    assert await _release(r, "t1") == 1
    # The slot is held for t2 at once, and its request is back on the stream with its order.
    assert await _holders(r) == ["t2"] and await _waiting(r) == ["t3"]
    entry, fields = await _read(r, "w2")
    assert fields["task_id"] == "t2" and _order(entry, fields) == _order(*later[0])
    assert await _acquire(r, entry, fields, consumer="w2") == ConcurrencyOutcome.ACQUIRED
    assert await r.hget(KEYS.task("t2"), TaskField.WAITING_FOR) is None
    assert await _release(r, "t1") == 0  # a re-sent release: nothing more
    assert await _release(r, "t2") == 1
    assert await _release(r, "t3") == 0
    assert await _holders(r) == [] and await _waiting(r) == [] and await r.hgetall(KEYS.concurrency_index) == {}


async def test_a_newcomer_waits_behind_earlier_waiters_for_a_slot_freed_by_expiry(r: Redis) -> None:
    scripts = Scripts(r, KEYS)
    crashed = await _deliver(r, "t1")
    await scripts.concurrency_acquire(
        key="acme:box", limit=1, task_id="t1", entry_id=crashed[0], consumer="w1",
        order=_order(*crashed), request=crashed[1], ttl_ms=200,
    )  # fmt: skip
    waiter = await _deliver(r, "t2")
    assert await _acquire(r, *waiter) == ConcurrencyOutcome.PARKED
    deadline = time.monotonic() + 10
    while await _holders(r):  # t1's worker died: nobody refreshes it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    newcomer = await _deliver(r, "t3")
    assert await _acquire(r, *newcomer) == ConcurrencyOutcome.PARKED
    # The promote loop's step hands the free slot to t2, the earliest waiter.
    assert await scripts.wake_concurrency_waiters(TTL_MS) == 1
    assert await _holders(r) == ["t2"] and await _waiting(r) == ["t3"]
    assert await scripts.wake_concurrency_waiters(TTL_MS) == 0


async def test_race_release_against_park_never_strands_a_waiter(r: Redis) -> None:
    """The run asking for a slot and the holder releasing it, at once: either it takes the slot, or it
    parks and the release wakes it. Never parked beside a free slot. Both calls are sent at once, each
    going first in turn, so that both orders happen."""
    seen = set()
    for i in range(24):
        key = f"race{i}"
        holder = await _deliver(r, f"h{i}")
        assert await _acquire(r, *holder, key=key) == ConcurrencyOutcome.ACQUIRED
        asking = await _deliver(r, f"a{i}")
        if i % 2:
            outcome, woken = await asyncio.gather(_acquire(r, *asking, key=key), _release(r, f"h{i}", key=key))
        else:
            woken, outcome = await asyncio.gather(_release(r, f"h{i}", key=key), _acquire(r, *asking, key=key))
        seen.add(outcome)
        assert await _holders(r, key) == [f"a{i}"]
        assert await _waiting(r, key) == []
        if outcome == ConcurrencyOutcome.PARKED:
            assert woken == 1
            entry, fields = await _read(r)
            assert fields["task_id"] == f"a{i}"
            assert await _acquire(r, entry, fields, key=key) == ConcurrencyOutcome.ACQUIRED
        else:
            assert (outcome, woken) == (ConcurrencyOutcome.ACQUIRED, 0)
    assert seen == {ConcurrencyOutcome.PARKED, ConcurrencyOutcome.ACQUIRED}


async def test_race_two_wakers_move_each_waiter_once(r: Redis) -> None:
    """Two workers' promote loops after a crashed holder's expiry: one wakes the waiters, the other finds
    no free slot. Limit 2, so two waiters are woken, not four."""
    scripts = Scripts(r, KEYS)
    for t in ("c1", "c2"):
        entry, fields = await _deliver(r, t)
        await scripts.concurrency_acquire(
            key="acme:box", limit=2, task_id=t, entry_id=entry, consumer="w1", order=_order(entry, fields),
            request=fields, ttl_ms=200,
        )  # fmt: skip
    for t in ("t1", "t2", "t3"):
        assert await _acquire(r, *await _deliver(r, t), limit=2) == ConcurrencyOutcome.PARKED
    deadline = time.monotonic() + 10
    while await _holders(r):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    length = await r.xlen(KEYS.requests)
    woken = await asyncio.gather(scripts.wake_concurrency_waiters(TTL_MS), scripts.wake_concurrency_waiters(TTL_MS))
    assert sorted(woken) == [0, 2]
    assert await _holders(r) == ["t1", "t2"] and await _waiting(r) == ["t3"]
    assert await r.xlen(KEYS.requests) == length + 2


async def test_race_cancel_of_a_waiter_against_the_release_that_wakes_it(r: Redis) -> None:
    """Whichever runs first, the cancelled waiter never runs and never keeps a slot; the next waiter
    gets the slot either way."""
    control = RunControl(r, KEYS, task_ttl=3600)
    seen = set()
    for i in range(20):
        key = f"race{i}"
        holder = await _deliver(r, f"h{i}")
        assert await _acquire(r, *holder, key=key) == ConcurrencyOutcome.ACQUIRED
        for t in (f"x{i}", f"n{i}"):
            assert await _acquire(r, *await _deliver(r, t), key=key) == ConcurrencyOutcome.PARKED
        # A cancel makes round trips before its script; the steps themselves are atomic, so what matters
        # is which script runs first: each order in turn.
        if i % 2:
            cancelled = await control.cancel_task(f"x{i}", by="test")
            woken = await _release(r, f"h{i}", key=key)
        else:
            woken = await _release(r, f"h{i}", key=key)
            cancelled = await control.cancel_task(f"x{i}", by="test")
        assert cancelled.outcome == CancelOutcome.CANCELLED
        assert await r.hget(KEYS.task(f"x{i}"), TaskField.STATUS) == TaskStatus.REVOKED
        assert await r.hget(KEYS.task(f"x{i}"), TaskField.WAITING_FOR) is None
        # Cancel first: the release wakes n. Release first: x was woken with a slot held for it, and the
        # cancel hands that slot on to n.
        assert await _holders(r, key) == [f"n{i}"]
        assert await _waiting(r, key) == []
        assert await r.hget(KEYS.concurrency_index, key) is None
        # Whatever came back onto the stream for x finds its task finished; n's runs.
        back = await r.xreadgroup(KEYS.worker_group, "w1", {KEYS.requests: ">"}, count=10)
        tasks = [fields["task_id"] for _, items in back for _, fields in items]
        # The release woke x (then the cancel handed its slot to n) or, after the cancel, n.
        assert tasks == ([f"x{i}", f"n{i}"] if woken == 1 and tasks[0] == f"x{i}" else [f"n{i}"])
        seen.add(len(tasks))
    assert seen == {1, 2}


async def test_a_cancel_finds_a_task_parked_after_it_was_read(r: Redis) -> None:
    """cancel.lua checks the key it is given against the task's own: a run parked between the read and
    the script is taken out of its wait set all the same."""
    holder = await _deliver(r, "h")
    assert await _acquire(r, *holder) == ConcurrencyOutcome.ACQUIRED
    late = await _deliver(r, "late")
    real_hmget = r.hmget

    async def hmget_then_park(name: str, fields: list[str]) -> Any:
        values = await real_hmget(name, fields)  # read before it parks: no waiting_for yet
        assert await _acquire(r, *late) == ConcurrencyOutcome.PARKED
        return values

    r.hmget = hmget_then_park  # type: ignore[method-assign]
    try:
        cancelled = await RunControl(r, KEYS, task_ttl=3600).cancel_task("late", by="test")
    finally:
        r.hmget = real_hmget  # type: ignore[method-assign]
    assert cancelled.outcome == CancelOutcome.CANCELLED
    assert await _waiting(r) == [] and await r.hget(KEYS.concurrency_parked("acme:box"), "late") is None
    assert await _release(r, "h") == 0


async def test_a_release_admits_each_waiter_against_its_own_workflows_limit(r: Redis) -> None:
    """Every workflow rendering a key shares its holders, each run admitted within its own workflow's
    limit. A release woke waiters up to the releasing run's limit (and the promote loop up to the limit
    last written to the index), and a woken waiter's slot is already held for it: when a limit-3 run
    ended, two runs of a limit-1 workflow ran side by side."""
    assert await _acquire(r, *await _deliver(r, "b1"), limit=3) == ConcurrencyOutcome.ACQUIRED
    for t in ("a1", "a2"):
        assert await _acquire(r, *await _deliver(r, t), limit=1) == ConcurrencyOutcome.PARKED
    assert await _release(r, "b1", limit=3) == 1
    assert await _holders(r) == ["a1"] and await _waiting(r) == ["a2"]
    entry, fields = await _read(r, "w2")
    assert fields["task_id"] == "a1" and await _acquire(r, entry, fields, consumer="w2") == ConcurrencyOutcome.ACQUIRED
    # The other way round: a limit-3 waiter behind a limit-1 waiter is admitted beside it, in its turn.
    assert await _acquire(r, *await _deliver(r, "b2"), limit=3) == ConcurrencyOutcome.PARKED
    assert await _release(r, "a1") == 2
    assert sorted(await _holders(r)) == ["a2", "b2"] and await _waiting(r) == []
    for _ in range(2):  # their deliveries take the slots held for them
        entry, fields = await _read(r, "w2")
        outcome = await _acquire(r, entry, fields, limit=int(fields["ckey_limit"]), consumer="w2")
        assert outcome == ConcurrencyOutcome.ACQUIRED
    # In order: a waiter its own limit holds back holds back those behind it (the promote loop's wake too).
    for t, limit in (("a3", 1), ("b3", 3)):
        assert await _acquire(r, *await _deliver(r, t), limit=limit) == ConcurrencyOutcome.PARKED
    assert await _release(r, "b2", limit=3) == 0
    assert await Scripts(r, KEYS).wake_concurrency_waiters(TTL_MS) == 0
    assert await _holders(r) == ["a2"] and await _waiting(r) == ["a3", "b3"]
    assert await _release(r, "a2") == 2


async def test_a_task_cancelled_after_it_was_read_is_neither_parked_nor_given_a_slot(r: Redis) -> None:
    """A cancel landing between a worker's read of the task and its acquire: the step parked the ended
    task, and the release that later woke it held the key's slot for a request whose delivery is only
    acknowledged: every live waiter waited a visibility timeout. The step now ends there."""
    control = RunControl(r, KEYS, task_ttl=3600)
    assert await _acquire(r, *await _deliver(r, "h")) == ConcurrencyOutcome.ACQUIRED
    for free in (False, True):
        late = await _deliver(r, f"late{free}")
        if free:
            assert await _release(r, "h") == 0
        assert (await control.cancel_task(f"late{free}", by="test")).outcome == CancelOutcome.CANCELLED
        assert await _acquire(r, *late) == ConcurrencyOutcome.FINISHED
        assert await _holders(r) == ([] if free else ["h"]) and await _waiting(r) == []
        # Its entry acknowledged: only h's own is pending.
        assert (await r.xpending(KEYS.requests, KEYS.worker_group))["pending"] == 1


def test_concurrency_steps_touch_one_slot_under_a_shard_tag() -> None:
    from redis.crc import key_slot

    settings = Settings(redis_url="redis://unused", shards=4)
    for shard in range(4):
        keys = Keys.shard(settings, shard)
        t = keys.new_task_id()  # a task of this shard (its id says so): its keys carry the shard's tag
        box = "acme:{in}box"  # a rendered key may hold braces: the shard's tag comes first
        common = [keys.concurrency_holders(box), keys.concurrency_waiting(box), keys.concurrency_parked(box),
                  keys.concurrency_index, keys.requests]  # fmt: skip
        steps = {
            "concurrency_acquire": [*common, keys.task(t)],
            "concurrency_release": common,
            "semaphore refresh": [keys.concurrency_holders(box), keys.concurrency_holders(box) + ":rate"],
            "cancel": [keys.task(t), keys.results, keys.task_events(t), *common],
        }
        for step, names in steps.items():
            assert len({key_slot(n.encode()) for n in names}) == 1, (step, names)


# ---- the real pipeline -------------------------------------------------------------------------------


@pytest.fixture
def settings(settings: Settings, shared_dir: Path) -> Settings:
    return settings.model_copy(update={"sandbox_writable": str(shared_dir)})


def _writable(path: Path) -> Path:
    """A file every sandbox may append to: each may run under its own uid."""
    path.touch()
    path.chmod(0o666)
    return path


def _exclusive(folder: Path) -> dict[str, Any]:
    """Two nodes that record when a run starts and ends in `folder`, and fail if another run is inside
    (the lock file is created exclusively by the first node and removed by the second)."""
    lock, log = str(folder / "lock"), str(_writable(folder / "log"))
    enter = (
        "import os, time\n"
        f"fd = os.open({lock!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)\n"
        "os.close(fd)\n"
        f"open({log!r}, 'a').write(f\"start {{context['n']}} {{time.time()}}\\n\")\n"
    )
    leave = (
        "import os, time\n"
        f"open({log!r}, 'a').write(f\"end {{context['n']}} {{time.time()}}\\n\")\n"
        f"os.remove({lock!r})\n"
    )
    return linear(enter, leave, concurrency={"key": "{client}:{mailbox}", "limit": 1})


def _with_holder(graph: dict[str, Any], flag: Path) -> dict[str, Any]:
    """The run with n == 0 keeps the key (inside its first node) until `flag` exists."""
    graph["nodes"][1]["code"] += f"while context['n'] == 0 and not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
    return graph


def _intervals(log: Path) -> list[tuple[int, float, float]]:
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for line in log.read_text().splitlines():
        kind, n, at = line.split()
        (starts if kind == "start" else ends)[int(n)] = float(at)
    return sorted((starts[n], ends[n], n) for n in starts)  # type: ignore[misc]


async def test_runs_with_one_key_never_overlap_across_two_workers_and_all_finish(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    wf = await create_workflow(redis, settings, pool, _exclusive(shared_dir))
    runs = 50
    tasks = [await enqueue(redis, settings, wf, {"mailbox": "in@acme", "n": n}) for n in range(runs)]
    async with in_process_worker(settings), in_process_worker(settings):
        ends = await wait_terminal(redis, settings, [t.task_id for t in tasks], timeout=300)
    assert {e.type for e in ends.values()} == {EventType.SUCCEEDED}, [e.data for e in ends.values()][:3]
    intervals = _intervals(shared_dir / "log")
    assert len(intervals) == runs
    for (_, end, n), (start, _, m) in itertools.pairwise(intervals):
        assert end <= start, f"run {m} started before run {n} ended"
    keys = Keys.from_settings(settings)
    assert await redis.zcard(keys.concurrency_holders("acme:in@acme")) == 0
    assert await redis.hgetall(keys.concurrency_index) == {}


async def test_waiters_start_in_the_order_they_were_queued(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    flag = shared_dir / "go"
    graph = _with_holder(_exclusive(shared_dir), flag)
    wf = await create_workflow(redis, settings, pool, graph)
    keys = Keys.from_settings(settings)
    async with in_process_worker(settings), in_process_worker(settings):
        first = await enqueue(redis, settings, wf, {"mailbox": "in", "n": 0})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == first.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a1",
        )  # fmt: skip
        # Read by either worker in any order, parked by their place in the stream.
        rest = [await enqueue(redis, settings, wf, {"mailbox": "in", "n": n}) for n in range(1, 9)]
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.concurrency_waiting("acme:in")) < len(rest):
            assert time.monotonic() < deadline, "the runs never parked"
            await asyncio.sleep(0.02)
        flag.touch()
        ends = await wait_terminal(redis, settings, [t.task_id for t in [first, *rest]], timeout=120)
    assert {e.type for e in ends.values()} == {EventType.SUCCEEDED}
    assert [n for _, _, n in _intervals(shared_dir / "log")] == list(range(9))


async def test_a_holder_running_past_the_slot_ttl_keeps_its_slot(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """The worker's heartbeat refreshes its runs' slots: a run longer than the visibility timeout (the
    slots' ttl) keeps the key, and the next run waits for it."""
    flag = shared_dir / "go"
    hold = f"import os, time\nwhile context['n'] == 0 and not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
    wf = await create_workflow(redis, settings, pool, linear(hold, concurrency={"key": "{client}", "limit": 1}))
    keys = Keys.from_settings(settings)
    quick = settings.model_copy(update={"visibility_timeout": 1.0})
    async with in_process_worker(quick):
        first = await enqueue(redis, settings, wf, {"n": 0})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == first.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a1",
        )  # fmt: skip
        acquired = await redis.zscore(keys.concurrency_holders("acme"), first.task_id)
        assert acquired is not None
        second = await enqueue(redis, settings, wf, {"n": 1})
        # Until its slot has been refreshed past three times its first deadline's ttl: it outlived it.
        deadline = time.monotonic() + 60
        while (await redis.zscore(keys.concurrency_holders("acme"), first.task_id) or 0) < acquired + 3000:
            assert time.monotonic() < deadline, "the slot was not kept by the heartbeat"
            await asyncio.sleep(0.05)
        assert await redis.zrange(keys.concurrency_waiting("acme"), 0, -1) == [second.task_id]
        assert await redis.hget(keys.task(second.task_id), TaskField.STATUS) == TaskStatus.PENDING
        flag.touch()
        ends = await wait_terminal(redis, settings, [first.task_id, second.task_id])
    assert {e.type for e in ends.values()} == {EventType.SUCCEEDED}
    assert ends[second.task_id].data["started_at"] >= ends[first.task_id].data["finished_at"]


async def test_distinct_keys_run_side_by_side(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    # Each run waits until the other key's run has started too: possible only if they overlap.
    meet = (
        "import os, time\n"
        f"open(os.path.join({str(shared_dir)!r}, context['mailbox']), 'w').close()\n"
        "deadline = time.time() + 20\n"
        f"while len(os.listdir({str(shared_dir)!r})) < 2 and time.time() < deadline: time.sleep(0.02)\n"
        f"context['met'] = len(os.listdir({str(shared_dir)!r})) >= 2\n"
    )
    wf = await create_workflow(
        redis, settings, pool, linear(meet, concurrency={"key": "{client}:{mailbox}", "limit": 1})
    )
    tasks = [await enqueue(redis, settings, wf, {"mailbox": box}) for box in ("a", "b")]
    async with in_process_worker(settings):
        ends = await wait_terminal(redis, settings, [t.task_id for t in tasks], timeout=60)
    assert [ends[t.task_id].data["final_context"]["met"] for t in tasks] == [True, True]


async def test_a_waiting_run_shows_its_wait_and_a_cancel_removes_it(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path, api: httpx.AsyncClient
) -> None:
    flag = shared_dir / "go"
    hold = f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
    mark = f"open({str(_writable(shared_dir / 'ran'))!r}, 'a').write(context['who'] + ' ')"
    graph = linear(hold, mark, concurrency={"key": "{client}", "limit": 1})
    wf = await create_workflow(redis, settings, pool, graph)
    async with in_process_worker(settings):
        first = await enqueue(redis, settings, wf, {"who": "first"})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == first.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a1",
        )  # fmt: skip
        waiting = await enqueue(redis, settings, wf, {"who": "cancelled"})
        last = await enqueue(redis, settings, wf, {"who": "last"})
        keys = Keys.from_settings(settings)
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.concurrency_waiting("acme")) < 2:
            assert time.monotonic() < deadline, "the runs never parked"
            await asyncio.sleep(0.02)
        shown = (await api.get(f"/tasks/{waiting.task_id}")).json()
        assert (shown["status"], shown["waiting_for"]) == ("PENDING", "acme")
        assert "concurrency key 'acme'" in shown["message"]
        report = (await api.get("/inspect")).json()["concurrency_waiting"]
        assert report == {"runs": 2, "keys": [{"key": "acme", "limit": 1, "waiting": 2, "holders": 1}]}
        assert "concurrency:     2 run(s) waiting for a key: acme (2 waiting, 1/1 held)" in render_text(
            await inspect(redis, keys)
        )
        assert "nova_concurrency_waiting 2.0" in (await api.get("/metrics")).text
        cancel = await api.post(f"/tasks/{waiting.task_id}/cancel")
        assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
        flag.touch()
        ends = await wait_terminal(redis, settings, [first.task_id, last.task_id, waiting.task_id], timeout=60)
    assert ends[waiting.task_id].type == EventType.CANCELLED
    assert ends[last.task_id].type == EventType.SUCCEEDED, ends[last.task_id].data["error"]
    assert (shared_dir / "ran").read_text() == "first last "
    assert await redis.zcard(keys.concurrency_waiting("acme")) == 0


async def test_a_cancelled_holder_hands_its_slot_on_once_stopped(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    forever = "import time\nwhile context['n'] == 0: time.sleep(0.02)"
    wf = await create_workflow(redis, settings, pool, linear(forever, concurrency={"key": "{client}", "limit": 1}))
    keys = Keys.from_settings(settings)
    # Slots outlive the test's wait: the waiter can only start through the cancel's release, not expiry.
    patient = settings.model_copy(update={"visibility_timeout": 120.0})
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, visibility_timeout=120.0)
    async with in_process_worker(patient):
        holder = await enqueue(redis, settings, wf, {"n": 0})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == holder.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a1",
        )  # fmt: skip
        waiter = await enqueue(redis, settings, wf, {"n": 1})
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.concurrency_waiting("acme")) < 1:
            assert time.monotonic() < deadline, "the run never parked"
            await asyncio.sleep(0.02)
        assert (await control.cancel_task(holder.task_id, by="test")).outcome == CancelOutcome.CANCELLED
        ends = await wait_terminal(redis, settings, [holder.task_id, waiter.task_id], timeout=60)
    assert ends[holder.task_id].type == EventType.CANCELLED
    assert ends[waiter.task_id].type == EventType.SUCCEEDED
    assert await redis.zcard(keys.concurrency_holders("acme")) == 0


@pytest.mark.parametrize("cancel_lands", ["before the acquire", "while its reply is on its way"])
async def test_a_run_cancelled_around_its_concurrency_acquire_leaves_the_key_free(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, cancel_lands: str
) -> None:
    """Before: the run, cancelled after its task was read, was parked anyway, then woken into a slot its
    delivery never gave back. While: the step took the slot, the cancel's push stopped the run before
    it read the reply, and the worker, seeing no slot held, gave none back. Either way the key's next
    run waited for the slot to expire (a visibility timeout, two minutes here)."""
    forever = "import time\nwhile context['n'] == 0: time.sleep(0.02)"
    wf = await create_workflow(redis, settings, pool, linear(forever, concurrency={"key": "{client}", "limit": 1}))
    keys = Keys.from_settings(settings)
    patient = settings.model_copy(update={"visibility_timeout": 120.0})
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, visibility_timeout=120.0)
    acquire = Scripts.concurrency_acquire
    cancelled: list[str] = []

    async def cancelled_around_the_acquire(self: Scripts, **kwargs: Any) -> ConcurrencyOutcome:
        request = kwargs["request"]
        if orjson.loads(request["payload"])["initial_context"] != {"n": 1} or cancelled:
            return await acquire(self, **kwargs)
        cancelled.append(kwargs["task_id"])
        if cancel_lands == "before the acquire":
            assert (await control.cancel_task(kwargs["task_id"], by="test")).outcome == CancelOutcome.CANCELLED
            return await acquire(self, **kwargs)
        outcome = await acquire(self, **kwargs)
        assert outcome == ConcurrencyOutcome.ACQUIRED
        assert (await control.cancel_task(kwargs["task_id"], by="test")).outcome == CancelOutcome.CANCELLED
        await asyncio.sleep(60)  # the reply never read: the cancel's push stops the run here
        return outcome

    monkeypatch.setattr(Scripts, "concurrency_acquire", cancelled_around_the_acquire)
    async with in_process_worker(patient):
        if cancel_lands == "before the acquire":
            holder = await enqueue(redis, settings, wf, {"n": 0})
            await wait_for_events(
                redis, settings, lambda e: e.task_id == holder.task_id and e.type == EventType.NODE_STARTED
            )
        victim = await enqueue(redis, settings, wf, {"n": 1})
        ended = await wait_terminal(redis, settings, [victim.task_id], timeout=30)
        assert cancelled == [victim.task_id] and ended[victim.task_id].type == EventType.CANCELLED
        waiter = await enqueue(redis, settings, wf, {"n": 2})
        if cancel_lands == "before the acquire":
            assert (await control.cancel_task(holder.task_id, by="test")).outcome == CancelOutcome.CANCELLED
        ends = await wait_terminal(redis, settings, [waiter.task_id], timeout=30)
    assert ends[waiter.task_id].type == EventType.SUCCEEDED
    assert await redis.zcard(keys.concurrency_holders("acme")) == 0


async def test_a_run_missing_a_field_of_its_key_fails_naming_it(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    graph = linear("context['ran'] = True", concurrency={"key": "{client}:{mailbox}", "limit": 1})
    wf = await create_workflow(redis, settings, pool, graph)
    task = await enqueue(redis, settings, wf, {"folder": "in"})
    async with in_process_worker(settings):
        end = (await wait_terminal(redis, settings, [task.task_id]))[task.task_id]
    assert end.type == EventType.FAILED
    error = end.data["error"]
    assert error["type"] == "ConcurrencyKeyError" and error["reason"] == "concurrency_key"
    assert "needs initial_context field 'mailbox', which this run lacks" in error["message"]
    assert "ran" not in end.data["final_context"]


async def test_a_killed_holders_slot_comes_back_and_the_waiters_finish(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path, tmp_path: Path
) -> None:
    flag = shared_dir / "go"
    hold = (
        f"import os, time\nopen({str(_writable(shared_dir / 'held'))!r}, 'a').write(context['_nova']['worker'] + ' ')\n"
        f"while context['n'] == 0 and not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
    )
    record = f"open({str(_writable(shared_dir / 'done'))!r}, 'a').write(str(context['n']) + ' ')"
    wf = await create_workflow(redis, settings, pool, linear(hold, record, concurrency={"key": "{client}", "limit": 1}))
    fast = settings.model_copy(update={"visibility_timeout": 2.0})
    doomed = start_worker_process(fast, tmp_path / "doomed.log")
    try:
        holder = await enqueue(redis, settings, wf, {"n": 0})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == holder.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a1", timeout=60,
        )  # fmt: skip
        waiters = [await enqueue(redis, settings, wf, {"n": n}) for n in (1, 2)]
        keys = Keys.from_settings(settings)
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.concurrency_waiting("acme")) < 2:
            assert time.monotonic() < deadline, "the runs never parked"
            await asyncio.sleep(0.02)
    finally:
        kill9(doomed)
    flag.touch()
    async with in_process_worker(fast):
        ends = await wait_terminal(redis, settings, [holder.task_id, *(w.task_id for w in waiters)], timeout=120)
    assert {e.type for e in ends.values()} == {EventType.SUCCEEDED}
    assert sorted((shared_dir / "done").read_text().split()) == ["0", "1", "2"]
    assert await redis.zcard(keys.concurrency_holders("acme")) == 0
    # The holder's first node ran on the killed worker, then again where it was reclaimed; the waiters
    # started nowhere before the kill.
    held = (shared_dir / "held").read_text().split()
    assert len(held) == 4 and len(set(held)) == 2 and held.count(held[0]) == 1


async def test_a_pause_while_runs_wait_loses_none_and_overlaps_none(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """Runs wait for the key, the workflow is paused, the holder finishes (its waiter is woken into the
    pause and parked for it), then the workflow is resumed: every run finishes, one at a time."""
    flag = shared_dir / "go"
    wf = await create_workflow(redis, settings, pool, _with_holder(_exclusive(shared_dir), flag))
    keys = Keys.from_settings(settings)
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, visibility_timeout=settings.visibility_timeout)
    async with in_process_worker(settings):
        first = await enqueue(redis, settings, wf, {"mailbox": "in", "n": 0})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == first.task_id and e.type == EventType.NODE_STARTED
            and e.data.get("node_id") == "a1",
        )  # fmt: skip
        rest = [await enqueue(redis, settings, wf, {"mailbox": "in", "n": n}) for n in (1, 2, 3)]
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.concurrency_waiting("acme:in")) < 3:
            assert time.monotonic() < deadline, "the runs never parked"
            await asyncio.sleep(0.02)
        await control.pause(workflow_scope(wf.id))
        flag.touch()
        await wait_terminal(redis, settings, [first.task_id])
        # The woken waiter met the pause: parked for it, nothing of it ran.
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.parked(workflow_scope(wf.id))) < 1:
            assert time.monotonic() < deadline, "the woken run was not parked for the pause"
            await asyncio.sleep(0.02)
        assert len(_intervals(shared_dir / "log")) == 1
        await control.resume(workflow_scope(wf.id))
        ends = await wait_terminal(redis, settings, [t.task_id for t in rest], timeout=120)
    assert {e.type for e in ends.values()} == {EventType.SUCCEEDED}
    intervals = _intervals(shared_dir / "log")
    assert sorted(n for _, _, n in intervals) == [0, 1, 2, 3]
    for (_, end, n), (start, _, m) in itertools.pairwise(intervals):
        assert end <= start, f"run {m} started before run {n} ended"


class _FailFirstOpen:
    """The real local sandbox, but its first open fails as an unreachable sandbox service would."""

    def __init__(self, inner: SandboxProvider) -> None:
        self.inner = inner
        self.failed = False

    async def start(self) -> None:
        await self.inner.start()

    async def open(self, spec: SandboxSpec) -> Sandbox:
        if not self.failed:
            self.failed = True
            raise SandboxInfraError("sandbox service unavailable")
        return await self.inner.open(spec)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_run_waiting_out_a_retry_gives_its_slot_to_the_next(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    graph = linear("context['ran'] = True", concurrency={"key": "{client}", "limit": 1})
    wf = await create_workflow(redis, settings, pool, graph)
    tasks = {(await enqueue(redis, settings, wf, {"n": n})).task_id for n in (0, 1)}
    # A backoff far longer than the other run takes: it can only run if the first let go of the key.
    slow = settings.model_copy(update={"retry_backoff": 600.0, "retry_backoff_max": 600.0})
    async with in_process_worker(slow, providers={"local": _FailFirstOpen(LocalSandboxProvider(slow))}):
        # Delivered together, either may take the key first; that one's sandbox fails and it retries.
        [end] = await wait_for_events(redis, settings, lambda e: e.task_id in tasks and e.type in TERMINAL_EVENTS)
    assert end.type == EventType.SUCCEEDED
    [retrying] = tasks - {end.task_id}
    keys = Keys.from_settings(settings)
    assert await redis.hget(keys.task(retrying), TaskField.STATUS) == TaskStatus.RETRY
    assert await redis.zcard(keys.delayed) == 1
    assert await redis.zcard(keys.concurrency_holders("acme")) == 0


async def test_with_shards_a_clients_key_holds_in_its_shard_and_every_shards_waiters_are_seen(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, shared_dir: Path
) -> None:
    """NOVA_SHARDS=3: each client's runs (one client per shard) wait for `{client}` in the client's shard;
    inspection counts every shard's waiters, a cancel from any shard's keys takes the waiter out of its
    shard's wait set, and each shard's reader wakes the next."""
    sharded = settings.model_copy(update={"shards": 3})
    flag = shared_dir / "go"
    hold = f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
    wf = await create_workflow(redis, sharded, pool, linear(hold, concurrency={"key": "{client}", "limit": 1}))
    slugs: dict[int, str] = {}
    for i in range(1000):
        slugs.setdefault(Keys.shard_of_client(f"ck{i}", 3), f"ck{i}")
    home = Keys.from_settings(sharded)
    async with in_process_worker(sharded, concurrency=6):
        tasks = {n: [await enqueue(redis, sharded, wf, client=slugs[n]) for _ in range(2)] for n in range(3)}
        deadline = time.monotonic() + 30
        # Per shard: one holder, one waiter (the key is the client's, and the client is in one shard).
        while [await redis.zcard(home.sibling(n).concurrency_waiting(slugs[n])) for n in range(3)] != [1, 1, 1]:
            assert time.monotonic() < deadline, "the runs never parked in their shards"
            await asyncio.sleep(0.02)
        report = await inspect(redis, home)
        assert report["concurrency_waiting"]["runs"] == 3
        assert sorted((k["shard"], k["key"], k["holders"]) for k in report["concurrency_waiting"]["keys"]) == [
            (n, slugs[n], 1) for n in range(3)
        ]
        assert f"{slugs[1]} [shard 1] (1 waiting, 1/1 held)" in render_text(report)
        # Cancelled from the home shard's keys: the waiter is in shard 1.
        [waiter] = await redis.zrange(home.sibling(1).concurrency_waiting(slugs[1]), 0, -1)
        control = RunControl(redis, home, task_ttl=sharded.task_ttl, visibility_timeout=sharded.visibility_timeout)
        assert (await control.cancel_task(waiter)).outcome == CancelOutcome.CANCELLED
        assert await redis.zcard(home.sibling(1).concurrency_waiting(slugs[1])) == 0
        flag.touch()
        ids = [t.task_id for ts in tasks.values() for t in ts]
        ends = await wait_terminal(redis, sharded, ids, timeout=60)
    assert ends[waiter].type == EventType.CANCELLED
    assert sorted(e.type for e in ends.values()) == sorted([EventType.SUCCEEDED] * 5 + [EventType.CANCELLED])


# ---- review findings ---------------------------------------------------------------------------------


async def test_a_woken_waiter_of_a_paused_workflow_does_not_keep_a_shared_key(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A release holds the key's slot for the waiter it wakes; that waiter's delivery, its workflow
    paused meanwhile, was parked for the pause with the slot still held: the other workflows sharing the
    key waited for it to expire (a visibility timeout, two minutes here)."""
    """Workflows A and B share the key `{client}` (limit 1). A is paused while one of its runs waits for
    the key; a B run waits behind it. When the holder ends, the release holds the slot for A's waiter
    and requeues it; its delivery finds A paused and parks it (park.lua) without giving the slot back:
    B's run waits for the slot to expire (a visibility timeout, 120s here) though nothing runs."""
    forever = "import time\nwhile context['n'] == 0: time.sleep(0.02)"
    a = await create_workflow(redis, settings, pool, linear(forever, concurrency={"key": "{client}", "limit": 1}))
    b = await create_workflow(redis, settings, pool, linear("pass", concurrency={"key": "{client}", "limit": 1}))
    keys = Keys.from_settings(settings)
    patient = settings.model_copy(update={"visibility_timeout": 120.0})
    control = RunControl(redis, keys, task_ttl=settings.task_ttl, visibility_timeout=120.0)
    async with in_process_worker(patient):
        holder = await enqueue(redis, settings, a, {"n": 0})
        await wait_for_events(
            redis, settings, lambda e: e.task_id == holder.task_id and e.type == EventType.NODE_STARTED
        )
        waiter_a = await enqueue(redis, settings, a, {"n": 1})
        deadline = time.monotonic() + 30
        while await redis.zcard(keys.concurrency_waiting("acme")) < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await control.pause(workflow_scope(a.id))
        waiter_b = await enqueue(redis, settings, b, {"n": 1})
        while await redis.zcard(keys.concurrency_waiting("acme")) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await control.cancel_task(holder.task_id, by="test")).outcome == CancelOutcome.CANCELLED
        while await redis.zcard(keys.parked(workflow_scope(a.id))) < 1:  # A's waiter, parked by the pause
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(1)
        holders = await redis.zrange(keys.concurrency_holders("acme"), 0, -1)
        waiting = await redis.zrange(keys.concurrency_waiting("acme"), 0, -1)
        assert holders != [waiter_a.task_id], f"paused {waiter_a.task_id} holds the key; B waits: {waiting}"
        ends = await wait_terminal(redis, settings, [waiter_b.task_id], timeout=30)
    assert ends[waiter_b.task_id].type == EventType.SUCCEEDED


async def test_a_park_answered_not_this_workers_entry_leaves_the_owners_slot(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A woken waiter's entry, reclaimed by worker B (A was silent), is read by A just as the workflow is
    paused; B takes the slot held for it (acquire) and runs. A's park answers -1 (the entry is B's), which
    _park counts as parked, and A gives the woken slot back: it releases the slot B's running run holds,
    waking the next waiter into a key of limit 1 (two runs at once)."""
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    wf = await create_workflow(redis, settings, pool, linear("pass", concurrency={"key": "{client}", "limit": 1}))
    holder = await enqueue(redis, settings, wf, {"n": 0})
    waiter = await enqueue(redis, settings, wf, {"n": 1})
    third = await enqueue(redis, settings, wf, {"n": 2})
    scripts = Scripts(redis, keys)
    [[_, entries]] = await redis.xreadgroup(keys.worker_group, "w0", {keys.requests: ">"}, count=3)

    def order(entry: str, fields: dict[str, str]) -> int:
        if fields.get(RequestField.CONCURRENCY_ORDER):
            return int(fields[RequestField.CONCURRENCY_ORDER])
        ms, _, seq = entry.partition("-")
        return int(ms) * 1000 + int(seq)

    async def acquire(entry: str, fields: dict[str, str], consumer: str) -> ConcurrencyOutcome:
        return await scripts.concurrency_acquire(
            key="acme", limit=1, task_id=fields["task_id"], entry_id=entry, consumer=consumer,
            order=order(entry, fields), request=fields, ttl_ms=120_000,
        )  # fmt: skip

    assert await acquire(*entries[0], "w0") == ConcurrencyOutcome.ACQUIRED
    assert await acquire(*entries[1], "w0") == ConcurrencyOutcome.PARKED
    assert await acquire(*entries[2], "w0") == ConcurrencyOutcome.PARKED
    # The holder ends: the slot is held for the waiter, whose request is back on the stream.
    await scripts.concurrency_release(key="acme", limit=1, task_id=holder.task_id, ttl_ms=120_000)
    assert list(await redis.zrange(keys.concurrency_holders("acme"), 0, -1)) == [waiter.task_id]
    # Worker B has the woken waiter's entry (it reclaimed it from A).
    [[_, [(woken, fields)]]] = await redis.xreadgroup(keys.worker_group, "B", {keys.requests: ">"}, count=1)
    assert fields["task_id"] == waiter.task_id
    await RunControl(redis, keys, task_ttl=settings.task_ttl, visibility_timeout=120.0).pause(workflow_scope(wf.id))

    ctx = RunContext(
        settings=settings, redis=redis, keys=keys, scripts=Scripts(redis, keys),
        catalog=WorkflowCatalog(redis, pool, keys), open_sandbox=None,  # type: ignore[arg-type]
        consumer="A", definitions={},
    )  # fmt: skip
    real_park = ctx.scripts.park

    async def park_after_b_acquired(**kwargs: object) -> int:
        # Meanwhile B (which read the task before the pause) takes the slot held for it and runs.
        assert await acquire(woken, fields, "B") == ConcurrencyOutcome.ACQUIRED
        reply = await real_park(**kwargs)  # type: ignore[arg-type]
        assert reply == -1  # not A's entry
        return reply

    ctx.scripts.park = park_after_b_acquired  # type: ignore[method-assign]
    await run_delivery(ctx, Delivery(woken, fields, 2))
    holders = list(await redis.zrange(keys.concurrency_holders("acme"), 0, -1))
    assert holders == [waiter.task_id], f"B runs {waiter.task_id}, yet the key's holders are {holders}"
    assert await redis.hget(keys.task(third.task_id), TaskField.WAITING_FOR) == "acme"


async def _woken_waiter(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> tuple[Keys, Any, Any, str, dict[str, str], RunContext]:
    """A key of limit 1 whose holder released it: its first waiter woken (the slot held for it) and its
    request read by worker A, which runs the delivery with the context returned."""
    keys = Keys.from_settings(settings)
    await ensure_groups(redis, keys)
    wf = await create_workflow(redis, settings, pool, linear("pass", concurrency={"key": "{client}", "limit": 1}))
    holder = await enqueue(redis, settings, wf, {"n": 0})
    waiter = await enqueue(redis, settings, wf, {"n": 1})
    await enqueue(redis, settings, wf, {"n": 2})
    scripts = Scripts(redis, keys)
    [[_, entries]] = await redis.xreadgroup(keys.worker_group, "A", {keys.requests: ">"}, count=3)
    expected = [ConcurrencyOutcome.ACQUIRED, ConcurrencyOutcome.PARKED, ConcurrencyOutcome.PARKED]
    for (entry, fields), outcome in zip(entries, expected, strict=True):
        acquired = await scripts.concurrency_acquire(
            key="acme", limit=1, task_id=fields["task_id"], entry_id=entry, consumer="A",
            order=_order(entry, fields), request=fields, ttl_ms=120_000,
        )  # fmt: skip
        assert acquired == outcome
    await scripts.concurrency_release(key="acme", limit=1, task_id=holder.task_id, ttl_ms=120_000)
    assert list(await redis.zrange(keys.concurrency_holders("acme"), 0, -1)) == [waiter.task_id]
    [[_, [(woken, fields)]]] = await redis.xreadgroup(keys.worker_group, "A", {keys.requests: ">"}, count=1)
    ctx = RunContext(
        settings=settings, redis=redis, keys=keys, scripts=Scripts(redis, keys),
        catalog=WorkflowCatalog(redis, pool, keys), open_sandbox=None,  # type: ignore[arg-type]
        consumer="A", definitions={},
    )  # fmt: skip
    return keys, wf, waiter, woken, fields, ctx


@pytest.mark.parametrize("step", ["park", "dead_letter"])
async def test_a_woken_waiters_slot_is_given_back_when_the_reply_of_its_step_was_lost(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, step: str
) -> None:
    """The step (a park for a pause, a dead letter) acknowledged the entry, its reply was lost, and the call
    sent again answered "not this worker's entry": taken for a takeover, the slot held for the woken waiter
    was kept, and the key idled for a visibility timeout. Nobody holds the entry: the lost write was ours."""
    keys, wf, waiter, woken, fields, ctx = await _woken_waiter(redis, settings, pool)
    real = getattr(ctx.scripts, step)
    lost: list[Any] = []

    async def reply_lost_once(**kwargs: Any) -> Any:
        reply = await real(**kwargs)  # written in Redis...
        if not lost:
            lost.append(reply)
            raise RedisConnectionError("connection lost before the reply")  # ...its reply lost
        return reply

    setattr(ctx.scripts, step, reply_lost_once)
    deliveries = 2
    if step == "park":
        await RunControl(redis, keys, task_ttl=settings.task_ttl, visibility_timeout=120.0).pause(workflow_scope(wf.id))
    else:
        deliveries = settings.max_deliveries + 1
    await run_delivery(ctx, Delivery(woken, fields, deliveries))
    assert lost, "the step was never made"
    holders = list(await redis.zrange(keys.concurrency_holders("acme"), 0, -1))
    assert waiter.task_id not in holders, f"{waiter.task_id} still holds the key: {holders}"
