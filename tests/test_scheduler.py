"""Scheduled executions: exactly one execution per tick, whatever the number of replicas."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from cli.embedded import PostgresServer, RedisServer
from consumer.scheduler import CATCH_UP_PER_PASS, CLEANUP, Scheduler
from shared.catalog import WorkflowCatalog
from shared.cron import InvalidSchedule, validate_cron
from shared.db import LazyPool, migrate_url
from shared.schedules import ScheduleStore, tick_key
from shared.settings import Settings
from shared.streams import EventType, Keys
from tests.support import create_workflow, in_process_worker, linear, make_settings, wait_for_events, wait_projected


def scheduler(redis: Redis, settings: Settings, pool: asyncpg.Pool, name: str) -> Scheduler:
    keys = Keys.from_settings(settings)
    return Scheduler(settings, redis, WorkflowCatalog(redis, pool, keys), name)


def test_cron_validation() -> None:
    assert validate_cron("*/5  * * * *") == "*/5 * * * *"
    assert validate_cron("* * * * * */10") == "* * * * * */10"
    for bad in ("", "every minute", "* * *", "61 * * * *"):
        with pytest.raises(InvalidSchedule):
            validate_cron(bad)


async def test_concurrent_schedulers_fire_a_tick_once(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, Keys.from_settings(settings))
    schedule = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={"a": 1})
    [(_, tick)] = await store.due(int(time.time() * 1000) + 61_000)
    replicas = [scheduler(redis, settings, pool, f"r{i}") for i in range(5)]
    fired = await asyncio.gather(*(r.tick(now_ms=tick + 10) for r in replicas))
    assert sum(fired) == 1
    assert await redis.xlen(settings.requests_stream) == 1
    [(_, entry)] = await redis.xrange(settings.requests_stream)
    assert entry["task_id"] == f"sched-{schedule.id}-{tick}"
    [(_, nxt)] = await store.list()
    assert nxt is not None and nxt > tick


async def test_missed_ticks_fire_once_on_recovery(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    keys = Keys.from_settings(settings)
    store = ScheduleStore(redis, keys)
    schedule = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    now = int(time.time() * 1000)
    # Down for ten minutes: ten ticks were missed.
    await redis.zadd(f"{keys.prefix}:schedules:next", {schedule.id: now - 600_000})
    s = scheduler(redis, settings, pool, "r")
    assert await s.tick(now_ms=now) == 1
    assert await s.tick(now_ms=now) == 0
    [(_, nxt)] = await store.list()
    assert nxt is not None and now < nxt <= now + 60_000


async def test_lease_has_one_holder(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    a, b = scheduler(redis, settings, pool, "a"), scheduler(redis, settings, pool, "b")
    assert await a.hold_lease()
    assert not await b.hold_lease()
    assert await a.hold_lease()  # renewal
    await redis.delete(a.lease_key)  # the holder's lease expired
    assert await b.hold_lease()
    assert not await a.hold_lease()


async def test_every_second_schedule_with_two_workers(redis: Redis, settings: Settings, pool: asyncpg.Pool) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    store = ScheduleStore(redis, Keys.from_settings(settings))
    schedule = await store.create(cron="* * * * * *", workflow_id=wf.id, client="acme", initial_context={})
    async with in_process_worker(settings), in_process_worker(settings):
        done = await wait_for_events(
            redis, settings, lambda e: e.type == EventType.SUCCEEDED and e.task_id.startswith("sched-"), 3
        )
        await store.delete(schedule.id)
    assert all(e.data["final_context"]["ran"] for e in done)
    queued = await wait_for_events(redis, settings, lambda e: e.type == EventType.QUEUED, 3)
    ticks = Counter(e.data["initial_context"]["_schedule"]["tick_ms"] for e in queued)
    assert all(n == 1 for n in ticks.values()), ticks
    assert all(tick % 1000 == 0 for tick in ticks)


async def test_a_tick_already_run_is_not_fired_again_after_redis_restores_an_older_snapshot(
    redis_factory: Callable[..., RedisServer], db_url: str, pool: asyncpg.Pool
) -> None:
    """Redis back from an older snapshot (or AOF everysec losing its last second, or a lagging replica
    promoted) had neither the tick's idempotency key nor its moved-on score: "exactly once per tick"
    rested on those Redis keys alone, so a tick PostgreSQL showed completed fired a second execution."""
    server = redis_factory()
    settings = make_settings(server.url, db_url)
    keys = Keys.from_settings(settings)
    client = Redis.from_url(server.url, decode_responses=True)
    admin = Redis.from_url(server.admin_url)
    try:
        wf = await create_workflow(client, settings, pool, linear("context['ran'] = True"))
        store = ScheduleStore(client, keys)
        # Yearly: the worker's own scheduler (real clock) leaves it alone; the test drives the tick.
        schedule = await store.create(cron="0 0 1 1 *", workflow_id=wf.id, client="acme", initial_context={})
        [(_, tick)] = await store.due(2**62)
        await admin.save()  # the snapshot Redis will come back from (taken before the tick)
        s = Scheduler(settings, client, WorkflowCatalog(client, pool, keys), "r")
        assert await s.tick(now_ms=tick + 10) == 1
        async with in_process_worker(settings):
            [done] = await wait_for_events(client, settings, lambda e: e.type == EventType.SUCCEEDED)
            await wait_projected(pool, [done.execution_id], {"completed"})
        assert done.task_id.startswith(f"sched-{schedule.id}-{tick}")
        server.kill()
        server.start()  # back from the snapshot
        await client.aclose()
        client = Redis.from_url(server.url, decode_responses=True)
        store = ScheduleStore(client, keys)
        assert await store.due(tick + 20) == [(schedule.id, tick)]  # Redis forgot the tick ran
        s = Scheduler(settings, client, WorkflowCatalog(client, pool, keys), "r")
        # PostgreSQL has this tick's execution, completed: skipped, and the schedule moves on.
        assert await s.tick(now_ms=tick + 20) == 0
        assert await client.xlen(settings.requests_stream) == 0
        [(_, nxt)] = await store.list()
        assert nxt is not None and nxt > tick
        assert await pool.fetchval("SELECT count(*) FROM executions") == 1
    finally:
        await client.aclose()
        await admin.aclose()


async def test_a_tick_waits_while_postgresql_cannot_say_whether_it_ran(
    redis: Redis, settings: Settings, pg_factory: Callable[..., PostgresServer]
) -> None:
    """Firing a tick rested on Redis alone, so it went ahead whatever PostgreSQL knew. Now that PostgreSQL
    is asked first, its being down must neither fire the tick (it may have run) nor drop it (it may
    not have): the tick stays due and fires, once, when PostgreSQL answers again."""
    pg = pg_factory()
    await migrate_url(pg.url)
    own = settings.model_copy(update={"database_url": pg.url})
    keys = Keys.from_settings(own)
    lazy = LazyPool(pg.url)
    try:
        wf = await create_workflow(redis, own, await lazy.get(), linear("pass"))
        store = ScheduleStore(redis, keys)
        schedule = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
        [(_, first)] = await store.due(2**62)
        s = Scheduler(own, redis, WorkflowCatalog(redis, lazy, keys), "r")
        assert await s.tick(now_ms=first + 10) == 1
        second = first + 60_000
        pg.stop()
        assert await s.tick(now_ms=second + 10) == 0
        assert await s.tick(now_ms=second + 510) == 0
        assert await store.due(second + 510) == [(schedule.id, second)]  # still due: delayed, not lost
        pg.start()
        assert await s.tick(now_ms=second + 1010) == 1
        assert [e["task_id"] for _, e in await redis.xrange(own.requests_stream)] == [
            f"sched-{schedule.id}-{first}",
            f"sched-{schedule.id}-{second}",
        ]
        assert await s.tick(now_ms=second + 1510) == 0
    finally:
        await lazy.close()


async def test_a_forward_clock_jump_does_not_strand_a_minutely_schedule(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Redis's clock stepped forward a day (a bad NTP step) and was corrected: the schedule fired its due
    tick at the wrong time and moved on to the cron's next tick after that wrong time, so after the
    correction a `* * * * *` schedule stayed silent for a whole day."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, keys)
    await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    s = scheduler(redis, settings, pool, "r")
    now = int(time.time() * 1000)
    assert await s.tick(now_ms=now + 86_400_000) == 1  # the clock a day ahead
    # Corrected: within the next few minutes a minutely schedule must fire again.
    fired = 0
    for minute in range(1, 4):
        fired += await s.tick(now_ms=now + minute * 60_000)
    assert fired >= 2
    [(_, nxt)] = await store.list()
    assert nxt is not None and now + 3 * 60_000 < nxt <= now + 4 * 60_000


async def test_a_schedule_brought_back_from_a_clock_jump_does_not_fire_a_tick_twice(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """The clock jumped ahead before the first tick was due: that tick fired early. Brought back, the
    schedule is due at that same tick again, which must not run a second time."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, keys)
    schedule = await store.create(cron="0 * * * *", workflow_id=wf.id, client="acme", initial_context={})
    [(_, first)] = await store.due(2**62)
    s = scheduler(redis, settings, pool, "r")
    assert await s.tick(now_ms=first + 86_400_000) == 1  # fires `first`, a day late by the clock
    back = first - 1000  # corrected to before `first`
    assert await s.tick(now_ms=back) == 0
    assert await store.due(first) == [(schedule.id, first)]  # brought back to the cron's next tick
    assert await s.tick(now_ms=first + 10) == 0  # ... which already ran
    assert await redis.xlen(settings.requests_stream) == 1
    [(_, nxt)] = await store.list()
    assert nxt == first + 3_600_000


async def test_a_forward_clock_jump_does_not_strand_the_retention_cleanup(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """The built-in cleanup's tick moved on from the wrong time too: after the clock's correction, an
    hourly cleanup did not run for as long as the clock had been ahead."""
    hourly = settings.model_copy(update={"cleanup_cron": "0 * * * *", "retention_days": 30})
    keys = Keys.from_settings(hourly)
    s = Scheduler(hourly, redis, WorkflowCatalog(redis, pool, keys), "r", pool)
    await s.tick(now_ms=int(time.time() * 1000))  # registers the cleanup at its next tick
    first = int(await redis.zscore(keys.builtin_schedules, CLEANUP) or 0)
    await s.tick(now_ms=first + 86_400_000)  # the clock a day ahead: claims `first`
    assert s.cleanups == 1 and s.cleanup is not None
    await s.cleanup
    await s.tick(now_ms=first + 10)  # corrected
    assert await redis.zscore(keys.builtin_schedules, CLEANUP) == first + 3_600_000


async def test_a_cleanup_cron_that_never_fires_is_refused_or_harmless(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """NOVA_CLEANUP_CRON was checked with croniter.is_valid only: `0 0 30 2 *` passed, then every
    scheduler pass raised CroniterBadDateError in claim_cleanup, logged as "scheduler tick failed" twice
    a second, and no cleanup ever ran. POST /schedules refused the same expression (validate_cron)."""
    with pytest.raises(ValidationError, match="never fires"):
        make_settings(settings.redis_url or "", settings.database_url or "", cleanup_cron="0 0 30 2 *")
    # Past the settings' check all the same (model_copy does not validate): schedules still fire, and
    # the cleanup's cron is reported once, not at every pass.
    bad = settings.model_copy(update={"cleanup_cron": "0 0 30 2 *", "retention_days": 30})
    wf = await create_workflow(redis, bad, pool, linear("pass"))
    store = ScheduleStore(redis, Keys.from_settings(bad))
    await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    s = Scheduler(bad, redis, WorkflowCatalog(redis, pool, Keys.from_settings(bad)), "r", pool=pool)
    now = int(time.time() * 1000)
    with caplog.at_level(logging.ERROR, logger="consumer.scheduler"):
        assert await s.tick(now_ms=now + 60_000) == 1
        assert await s.tick(now_ms=now + 120_000) == 1
        assert not await s.claim_cleanup(now + 180_000)
    assert s.cleanup is None and s.cleanups == 0
    assert await redis.zscore(Keys.from_settings(bad).builtin_schedules, CLEANUP) is None
    [problem] = [r for r in caplog.records if r.name == "consumer.scheduler"]
    assert "NOVA_CLEANUP_CRON" in problem.getMessage()


async def test_a_schedule_that_cannot_be_read_holds_back_no_other(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """One schedule's failure (here a record written by a newer release, with a field this one does not
    know) raised out of the whole pass: it stayed first in line, and every schedule due after it, and the
    retention cleanup, waited for as long as it failed. It is said once and skipped; the others fire."""
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    keys = Keys.from_settings(settings)
    store = ScheduleStore(redis, keys)
    newer = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    raw = await redis.hget(store._all, newer.id)
    await redis.hset(store._all, newer.id, raw[:-1] + ', "timezone": "Europe/Madrid"}')
    good = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    ticks = dict(await store.due(int(time.time() * 1000) + 61_000))
    await redis.zadd(store._next, {newer.id: ticks[newer.id] - 1})  # first in line
    replica = scheduler(redis, settings, pool, "r")
    with caplog.at_level(logging.ERROR):
        for n in range(3):
            assert await replica.tick(now_ms=max(ticks.values()) + 10) == (1 if n == 0 else 0)
    [(_, entry)] = await redis.xrange(settings.requests_stream)
    assert entry["task_id"] == f"sched-{good.id}-{ticks[good.id]}"
    assert len([r for r in caplog.records if newer.id in r.getMessage()]) == 1
    # Still due: a release that reads it fires its tick.
    assert newer.id in dict(await store.due(max(ticks.values()) + 10))


async def test_a_new_schedules_first_tick_is_counted_on_redis_clock(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler decides what is due by Redis's clock, but a new schedule's first tick was taken
    from the creating host's: an API host a day ahead created a minutely schedule that stayed silent for
    a day (and one behind fired at once a tick from before it existed)."""
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, Keys.from_settings(settings))
    ahead = time.time() + 86_400
    monkeypatch.setattr(time, "time", lambda: ahead)
    await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    monkeypatch.undo()
    seconds, _ = await redis.time()
    [(_, first)] = await store.due(2**62)
    assert seconds * 1000 < first <= (seconds + 61) * 1000


async def test_a_tick_missed_while_redis_was_down_fires_once_after_it_comes_back_older(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Redis came back from a snapshot taken before tick t0, which ran (PostgreSQL holds it), and t1
    passed while it was down. The scheduler found t0 run and moved on from now, skipping t1, which never
    ran: a tick missed during downtime fires once on recovery, Redis's data lost or not."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, keys)
    schedule = await store.create(cron="0 0 1 1 *", workflow_id=wf.id, client="acme", initial_context={})
    [(_, t0)] = await store.due(2**62)
    t1 = schedule.next_after(t0)
    s = scheduler(redis, settings, pool, "r")
    assert await s.tick(now_ms=t0 + 10) == 1
    async with in_process_worker(settings):
        [done] = await wait_for_events(redis, settings, lambda e: e.type == EventType.SUCCEEDED)
        await wait_projected(pool, [done.execution_id], {"completed"})
    # Redis comes back from a snapshot taken before t0, after t1 passed while it was down.
    await redis.delete(tick_key(schedule.id, t0))
    await redis.zadd(store._next, {schedule.id: t0})
    await redis.delete(store._clock)
    s = scheduler(redis, settings, pool, "r2")
    assert await s.tick(now_ms=t1 + 5_000) == 1, "the missed tick t1 did not fire"


async def test_a_hundred_failing_schedules_hold_back_no_other(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Failing schedules stay first in line (their ticks are the oldest due), and a pass read 100 due
    schedules: with 100 of them failing (records a newer release wrote, in a rolling deploy), no other
    schedule ever fired."""
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, Keys.from_settings(settings))
    good = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    [(_, tick)] = await store.due(2**62)
    for _ in range(100):
        newer = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
        raw = await redis.hget(store._all, newer.id)
        await redis.hset(store._all, newer.id, raw[:-1] + ', "timezone": "Europe/Madrid"}')
        await redis.zadd(store._next, {newer.id: tick - 1})
    replica = scheduler(redis, settings, pool, "r")
    fired = 0
    for n in range(3):
        fired += await replica.tick(now_ms=tick + 10 + n * 500)
    assert fired == 1, "the good schedule's tick never fired"
    [(_, entry)] = await redis.xrange(settings.requests_stream)
    assert entry["task_id"] == f"sched-{good.id}-{tick}"


async def test_a_schedule_brought_back_stays_back_when_a_replica_fires_it_meanwhile(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A replica's pass outlived its lease while it fired a tick due by a clock a day ahead; meanwhile
    another replica saw the clock step back and brought the schedule back. The late pass then moved it on
    past the wrong time ("only forward", ZADD GT, which won), silencing a minutely schedule for a day."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, keys)
    schedule = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    [(_, first)] = await store.due(2**62)
    a, b = scheduler(redis, settings, pool, "a"), scheduler(redis, settings, pool, "b")
    ahead = first + 86_400_000
    assert await a.tick(now_ms=ahead) == 1  # the clock a day ahead: fires `first`, moves on from `ahead`
    [(_, wrong)] = await store.due(2**62)
    corrected = first + 10

    ran = a._tick_ran

    async def slow_check(*args: object) -> bool | None:
        answer = await ran(*args)  # type: ignore[arg-type]
        await b.tick(now_ms=corrected)  # meanwhile: the clock corrected, B's pass
        return answer

    a._tick_ran = slow_check  # type: ignore[method-assign]
    await a.tick(now_ms=wrong + 10)  # A's slow pass, still on the wrong clock
    score = await redis.zscore(store._next, schedule.id)
    assert score is not None and score <= corrected + 60_000, f"next tick {score - corrected:.0f} ms away"


async def test_a_pass_catching_up_on_lost_ticks_asks_postgresql_a_bounded_number_of_times(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """Redis came back from a snapshot 350 minutely ticks old, all of which ran. The catch-up is meant to
    check CATCH_UP_PER_PASS ticks per pass and leave the rest to the next, but the recursive _due starts a
    new catch-up of 100 at each level: one pass asks PostgreSQL once per lost tick (a day of a per-second
    schedule: 86,400 sequential lookups, each allowed 2 s, in a pass holding a 5 s lease)."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, keys)
    await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    [(_, t0)] = await store.due(2**62)
    lost = 350
    s = scheduler(redis, settings, pool, "r")
    checks: list[list[str]] = []

    async def holds_any_task(task_ids: list[str]) -> bool:
        checks.append(task_ids)
        tick = int(re.search(r"-(\d{13})", task_ids[0]).group(1))  # type: ignore[union-attr]
        return tick < t0 + lost * 60_000

    s.catalog.holds_any_task = holds_any_task  # type: ignore[method-assign]
    await s.tick(now_ms=t0 + 400 * 60_000)
    assert len(checks) <= CATCH_UP_PER_PASS + 2, f"one pass asked PostgreSQL {len(checks)} times"


async def test_postgresql_failing_during_a_catch_up_ends_the_pass(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    """A schedule catching up on ticks that ran (Redis back from an older snapshot) found PostgreSQL unable
    to answer for the next one, and the pass went on to the other schedules, each to wait up to 2 s on
    PostgreSQL in turn within a pass holding a 5 s lease. A pass ends as soon as PostgreSQL cannot say,
    as it does for a first tick; the schedule keeps the progress it made, and its tick waits, due."""
    keys = Keys.from_settings(settings)
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    store = ScheduleStore(redis, keys)
    first = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    [(_, t0)] = await store.due(2**62)
    other = await store.create(cron="* * * * *", workflow_id=wf.id, client="acme", initial_context={})
    await store.advance(other.id, (await store.next_fire(other.id)) or 0, t0 + 1)  # due right after the first
    s = scheduler(redis, settings, pool, "r")
    checks: list[str] = []

    async def holds_any_task(task_ids: list[str]) -> bool:
        checks.append(task_ids[0])
        if len(checks) > 1:
            raise ConnectionRefusedError("PostgreSQL is down")
        return True  # the first tick ran; the one after it cannot be said

    s.catalog.holds_any_task = holds_any_task  # type: ignore[method-assign]
    assert await s.tick(now_ms=t0 + 10 * 60_000) == 0
    assert len(checks) == 2 and all(f"-{first.id}-" in c for c in checks), checks
    # The tick found run is behind it; the next waits, due, and nothing was enqueued.
    assert await store.next_fire(first.id) == t0 + 60_000
    assert await redis.xlen(settings.requests_stream) == 0
