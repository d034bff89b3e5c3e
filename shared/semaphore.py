"""A named counting semaphore across every worker, in Redis, with an optional start rate.

Built for E2B's plan limits (concurrent sandboxes, creates per second, shared by all replicas) and
meant for any cross-worker cap (the run-control concurrency keys): `acquire` waits for a slot (and a
rate token) without spending anything else, `release` gives it back, and while held the slot is
refreshed in the background. Holders expire `ttl` seconds after their last refresh: give it the
worker's reclaim horizon (NOVA_VISIBILITY_TIMEOUT), so that the slot of a worker killed with SIGKILL
comes back when its run is reclaimed, not never.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from shared.scripts import Scripts
from shared.tasks import cancel_until_done

log = logging.getLogger(__name__)

# Longest single sleep while waiting: a release elsewhere is not announced, so it is polled for.
_MAX_POLL = 0.5


class SemaphoreTimeout(Exception):
    """No slot came free before the caller's deadline."""


class Semaphore:
    def __init__(
        self, scripts: Scripts, name: str, *, limit: int, ttl: float, rate: float = 0.0, burst: int = 1
    ) -> None:
        self.scripts = scripts
        self.name = name
        self.limit = limit
        self.rate = rate
        self.burst = burst
        self.ttl_ms = max(int(ttl * 1000), 1)
        self.held: set[str] = set()
        self._refresher: asyncio.Task[None] | None = None

    async def acquire(self, holder: str, deadline: float | None = None) -> None:
        """Wait for a slot for `holder` (until the monotonic `deadline`, if any)."""
        while True:
            ok, wait_ms = await self.scripts.semaphore(
                "acquire", self.name, [holder], ttl_ms=self.ttl_ms, limit=self.limit, rate=self.rate, burst=self.burst
            )
            if ok:
                self.held.add(holder)
                self._ensure_refresher()
                return
            # Jitter: waiters polling in step would all ask at once.
            pause = min(wait_ms / 1000, _MAX_POLL) * random.uniform(0.5, 1.0)
            if deadline is not None and time.monotonic() + pause > deadline:
                raise SemaphoreTimeout(f"no '{self.name}' slot free (limit {self.limit}) before the deadline")
            await asyncio.sleep(pause)

    async def release(self, holder: str) -> None:
        self.held.discard(holder)
        await self.scripts.semaphore("release", self.name, [holder], ttl_ms=self.ttl_ms)

    async def live_holders(self) -> set[str]:
        """Every holder (of any worker) whose slot has not expired."""
        # A refresh of nobody first drops the expired holders, by Redis's clock, not this host's.
        await self.scripts.semaphore("refresh", self.name, [], ttl_ms=self.ttl_ms)
        return set(await self.scripts.redis.zrange(self.scripts.semaphore_holders_key(self.name), 0, -1))

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh(), name=f"semaphore-{self.name}")

    async def _refresh(self) -> None:
        while self.held:
            await asyncio.sleep(self.ttl_ms / 3000)
            held = sorted(self.held)
            try:
                _, kept = await self.scripts.semaphore("refresh", self.name, held, ttl_ms=self.ttl_ms)
            except Exception:
                # A missed refresh is not fatal: two more come before the slot expires.
                continue
            if kept < len(held):
                # The script will not bring an expired holder back over whoever took its slot: this
                # process went silent past the TTL (paused, cut off), and the cap may be exceeded
                # until its holders finish.
                log.warning("%d '%s' holder(s) expired while still held", len(held) - kept, self.name)

    async def aclose(self) -> None:
        """Stop refreshing and give back every slot still held."""
        if self._refresher is not None:
            # A single cancel can be lost (see cancel_until_done), and the refresher would refresh on.
            await cancel_until_done([self._refresher])
        if self.held:
            holders, self.held = sorted(self.held), set()
            await self.scripts.semaphore("release", self.name, holders, ttl_ms=self.ttl_ms)
