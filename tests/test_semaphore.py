"""The named cross-worker semaphore (shared/semaphore.py, shared/lua/semaphore.lua) on every Redis
version here (6.2 and 7), with one test per race of its script."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from redis.asyncio import Redis

from shared.connections import create_redis
from shared.scripts import Scripts
from shared.semaphore import Semaphore, SemaphoreTimeout
from shared.settings import Settings
from shared.streams import Keys
from tests.support import script_keys, stop_in_a_lost_cancel_window

KEYS = script_keys("t")


@pytest.fixture
def r(versioned_redis: Redis) -> Redis:
    return versioned_redis


@pytest.fixture
def scripts(r: Redis) -> Scripts:
    return Scripts(r, KEYS)


async def step(scripts: Scripts, op: str, holders: list[str], ttl_ms: int, **kw: float) -> tuple[bool, int]:
    """One call of the script, as a Semaphore makes it."""
    return await scripts.semaphore(op, "s", holders, ttl_ms=ttl_ms, **kw)  # type: ignore[arg-type]


async def until_expired(sem: Semaphore) -> None:
    deadline = time.monotonic() + 10
    while await sem.live_holders():
        assert time.monotonic() < deadline, "a holder never expired"
        await asyncio.sleep(0.02)


async def test_never_more_holders_than_the_limit_under_a_race(scripts: Scripts) -> None:
    # Two "workers" (separate Semaphore objects) racing for 3 slots with 12 holders.
    sems = [Semaphore(scripts, "race", limit=3, ttl=5) for _ in range(2)]
    inside = peak = 0
    full = asyncio.Event()

    async def use(sem: Semaphore, holder: str) -> None:
        nonlocal inside, peak
        await sem.acquire(holder)
        inside += 1
        peak = max(peak, inside)
        if inside == 3:
            full.set()
        # The first holders stay until three are in at once, however slow the machine: a fixed sleep let
        # one leave before the third came in on a loaded machine (peak 2), which proved nothing either way.
        await asyncio.wait_for(full.wait(), 30)
        inside -= 1
        await sem.release(holder)

    await asyncio.gather(*(use(sems[i % 2], f"h{i}") for i in range(12)))
    assert peak == 3
    for sem in sems:
        await sem.aclose()


async def test_acquiring_twice_is_one_slot_and_release_is_idempotent(scripts: Scripts) -> None:
    sem = Semaphore(scripts, "twice", limit=1, ttl=5)
    # A re-sent call racing its original: the same slot, and still room for nobody else.
    await asyncio.gather(sem.acquire("a"), sem.acquire("a"))
    with pytest.raises(SemaphoreTimeout):
        await sem.acquire("b", deadline=time.monotonic() + 0.2)
    await sem.release("a")
    await sem.release("a")
    await sem.acquire("b", deadline=time.monotonic() + 1)
    assert await sem.live_holders() == {"b"}
    await sem.aclose()
    assert await sem.live_holders() == set()


async def test_race_acquire_vs_expiry_exactly_one_takes_the_freed_slot(scripts: Scripts) -> None:
    # A crashed holder's slot frees by Redis's clock; twenty waiters polling for it at that moment:
    # exactly one gets it, and the crashed one is gone.
    assert await step(scripts, "acquire", ["crashed"], 300, limit=1) == (True, 0)
    winners: list[str] = []

    async def wait_for_slot(holder: str) -> None:
        deadline = time.monotonic() + 10
        while not winners and time.monotonic() < deadline:
            ok, _ = await step(scripts, "acquire", [holder], 5000, limit=1)
            if ok:
                winners.append(holder)
                return
            await asyncio.sleep(0.005)

    await asyncio.gather(*(wait_for_slot(f"w{i}") for i in range(20)))
    assert len(winners) == 1
    assert await Semaphore(scripts, "s", limit=1, ttl=5).live_holders() == {winners[0]}


async def test_race_release_twice_never_frees_another_holders_slot(scripts: Scripts) -> None:
    # A release re-sent after its holder expired and the slot went to someone else (or released twice
    # at once) removes only its own holder: the limit still holds.
    sem = Semaphore(scripts, "s", limit=1, ttl=0.2)
    assert await step(scripts, "acquire", ["late"], 200, limit=1) == (True, 0)
    await until_expired(sem)
    assert await step(scripts, "acquire", ["next"], 5000, limit=1) == (True, 0)
    await asyncio.gather(step(scripts, "release", ["late"], 5000), step(scripts, "release", ["late"], 5000))
    assert (await step(scripts, "acquire", ["third"], 5000, limit=1))[0] is False
    assert await sem.live_holders() == {"next"}


async def test_race_refresh_of_an_expired_holder_does_not_bring_it_back(scripts: Scripts) -> None:
    # A worker paused past the TTL refreshes a holder whose slot was given away meanwhile: the refresh
    # must not put it back (two holders for one slot); it reports that it kept nothing.
    sem = Semaphore(scripts, "s", limit=1, ttl=0.2)
    assert await step(scripts, "acquire", ["paused"], 200, limit=1) == (True, 0)
    await until_expired(sem)
    assert await step(scripts, "acquire", ["other"], 5000, limit=1) == (True, 0)
    assert await step(scripts, "refresh", ["paused"], 5000) == (True, 0)
    assert await sem.live_holders() == {"other"}
    # A live holder's refresh is counted as kept (a longer TTL: its deadline surely moves).
    assert await step(scripts, "refresh", ["other", "paused"], 6000) == (True, 1)


async def test_race_rate_limit_boundary_one_token_per_interval_however_many_ask(scripts: Scripts) -> None:
    # 2 per second, burst 1: a crowd asking at once gets exactly one start; each refused caller is told
    # to come back within one interval; and a long pause does not bank tokens beyond the burst.
    async def crowd() -> list[tuple[bool, int]]:
        return await asyncio.gather(
            *(step(scripts, "acquire", [f"h{i}-{time.monotonic_ns()}"], 5000, limit=100, rate=2) for i in range(10))
        )

    first = await crowd()
    assert sum(ok for ok, _ in first) == 1
    assert all(0 < wait <= 500 for ok, wait in first if not ok)
    await asyncio.sleep(1.25)  # two and a half intervals: still one token, the burst
    assert sum(ok for ok, _ in await crowd()) == 1


async def test_a_crashed_holders_slot_comes_back_after_its_ttl(scripts: Scripts) -> None:
    crashed = Semaphore(scripts, "crash", limit=1, ttl=0.3)
    await crashed.acquire("dead")
    assert crashed._refresher is not None
    crashed._refresher.cancel()  # its worker stops refreshing: killed
    alive = Semaphore(scripts, "crash", limit=1, ttl=0.3)
    await alive.acquire("next", deadline=time.monotonic() + 5)
    assert await alive.live_holders() == {"next"}
    await alive.aclose()


async def test_a_refreshed_holder_keeps_its_slot_past_its_ttl(r: Redis, scripts: Scripts) -> None:
    # A ttl long enough that a loop stalled by a loaded host still refreshes in time (every ttl/3).
    # A name of its own: a holder some other test's semaphore left behind could never take its slot.
    name = f"kept-{uuid.uuid4().hex}"
    sem = Semaphore(scripts, name, limit=1, ttl=2)
    await sem.acquire("a", deadline=time.monotonic() + 10)
    first_deadline = await r.zscore(scripts.semaphore_holders_key(name), "a")
    assert first_deadline is not None
    # Past the deadline it was given at acquire, by Redis's clock: only the refreshes keep it.
    while (now := await r.time())[0] * 1000 + now[1] // 1000 <= first_deadline:  # noqa: ASYNC110 - Redis time
        await asyncio.sleep(0.05)
    assert await sem.live_holders() == {"a"}
    await sem.aclose()


async def test_the_start_rate_spaces_acquisitions(scripts: Scripts) -> None:
    sem = Semaphore(scripts, "rate", limit=10, ttl=5, rate=5)
    await sem.acquire("a")
    # The second token comes 200 ms later: not before a short deadline.
    with pytest.raises(SemaphoreTimeout):
        await sem.acquire("b", deadline=time.monotonic() + 0.05)
    await sem.acquire("b", deadline=time.monotonic() + 2)
    assert await sem.live_holders() == {"a", "b"}
    await sem.aclose()


async def test_aclose_ends_the_refresher_even_when_its_cancel_is_swallowed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py sends each command through asyncio.wait_for, which on Python 3.11 returns normally when the
    task is cancelled just as the send completes: the cancel is lost. aclose() must end the refresher anyway
    (after a single cancel, a worker's shutdown would await a refresher that refreshes on for ever)."""
    client = create_redis(settings)  # a socket timeout, as the workers open it: sends go through wait_for
    scripts = Scripts(client, Keys.from_settings(settings))
    sem = Semaphore(scripts, f"lost-{uuid.uuid4().hex}", limit=1, ttl=0.3)  # a refresh every 100 ms
    await sem.acquire("a", deadline=time.monotonic() + 10)
    refresher = sem._refresher
    assert refresher is not None
    closing: list[asyncio.Task[None]] = []
    try:
        await asyncio.sleep(0.2)  # past the acquire's own commands: the next send is a refresh
        closing.append(await stop_in_a_lost_cancel_window(monkeypatch, sem.aclose, "the refresher"))
        done, _ = await asyncio.wait(closing, timeout=5)
        assert done, "Semaphore.aclose() is still waiting for a refresher that lost its cancel"
        assert refresher.done()
        assert await sem.live_holders() == set()
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(refresher, *closing), 5)
        await client.aclose()
