"""The named cross-worker semaphore (shared/semaphore.py, shared/lua/semaphore.lua) on a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from shared.scripts import Scripts
from shared.semaphore import Semaphore, SemaphoreTimeout
from shared.streams import Keys


async def test_never_more_holders_than_the_limit_under_a_race(redis: Redis, keys: Keys) -> None:
    # Two "workers" (separate Semaphore objects) racing for 3 slots with 12 holders.
    sems = [Semaphore(Scripts(redis, keys), "race", limit=3, ttl=5) for _ in range(2)]
    inside = peak = 0

    async def use(sem: Semaphore, holder: str) -> None:
        nonlocal inside, peak
        await sem.acquire(holder)
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.02)
        inside -= 1
        await sem.release(holder)

    await asyncio.gather(*(use(sems[i % 2], f"h{i}") for i in range(12)))
    assert peak == 3
    for sem in sems:
        await sem.aclose()


async def test_acquiring_twice_is_one_slot_and_release_is_idempotent(redis: Redis, keys: Keys) -> None:
    sem = Semaphore(Scripts(redis, keys), "twice", limit=1, ttl=5)
    await sem.acquire("a")
    await sem.acquire("a")  # a re-sent call: the same slot
    with pytest.raises(SemaphoreTimeout):
        await sem.acquire("b", deadline=time.monotonic() + 0.2)
    await sem.release("a")
    await sem.release("a")
    await sem.acquire("b", deadline=time.monotonic() + 1)
    assert await sem.live_holders() == {"b"}
    await sem.aclose()
    assert await sem.live_holders() == set()


async def test_a_crashed_holders_slot_comes_back_after_its_ttl(redis: Redis, keys: Keys) -> None:
    crashed = Semaphore(Scripts(redis, keys), "crash", limit=1, ttl=0.3)
    await crashed.acquire("dead")
    assert crashed._refresher is not None
    crashed._refresher.cancel()  # its worker stops refreshing: killed
    alive = Semaphore(Scripts(redis, keys), "crash", limit=1, ttl=0.3)
    await alive.acquire("next", deadline=time.monotonic() + 5)
    assert await alive.live_holders() == {"next"}
    await alive.aclose()


async def test_a_refreshed_holder_keeps_its_slot_past_its_ttl(redis: Redis, keys: Keys) -> None:
    sem = Semaphore(Scripts(redis, keys), "kept", limit=1, ttl=0.3)
    await sem.acquire("a")
    await asyncio.sleep(0.6)  # two TTLs: only the refreshes keep it
    assert await sem.live_holders() == {"a"}
    await sem.aclose()


async def test_the_start_rate_spaces_acquisitions(redis: Redis, keys: Keys) -> None:
    sem = Semaphore(Scripts(redis, keys), "rate", limit=10, ttl=5, rate=5)
    await sem.acquire("a")
    # The second token comes 200 ms later: not before a short deadline.
    with pytest.raises(SemaphoreTimeout):
        await sem.acquire("b", deadline=time.monotonic() + 0.05)
    await sem.acquire("b", deadline=time.monotonic() + 2)
    assert await sem.live_holders() == {"a", "b"}
    await sem.aclose()
