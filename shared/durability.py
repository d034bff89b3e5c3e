"""Strict durability: what the API makes sure of before it answers 202 (NOVA_DURABILITY=strict).

Redis acknowledges a write once it is in memory. What a crash then loses depends on its setup:
- `appendfsync always`: nothing acknowledged (each write is on disk before the reply).
- `appendfsync everysec` (Redis's default with AOF): up to about a second of writes.
- no AOF, RDB snapshots only: everything since the last snapshot.
- with a replica, a failover loses what the replica had not received (replication is asynchronous).
In strict mode the API confirms each enqueue before its 202: with a replica connected, WAIT until one
replica has the write; otherwise Redis must fsync every write (`appendfsync always`). When neither
holds, executions are refused with 503 rather than acknowledged without the guarantee.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)


class NotDurable(Exception):
    """The write could not be confirmed as strict mode requires."""


class StrictDurability:
    # How long the answer to "how is Redis set up" is reused; a replica that comes or goes is seen
    # within this time, and requests pay no extra round trip in between.
    RECHECK_SECONDS = 5.0

    def __init__(self, redis: Redis, wait_ms: int) -> None:
        self.redis = redis
        self.wait_ms = wait_ms
        self._checked_at = float("-inf")
        self._replicas = 0
        self._fsync_always = False

    async def _setup(self) -> tuple[int, bool]:
        if time.monotonic() - self._checked_at < self.RECHECK_SECONDS:
            return self._replicas, self._fsync_always
        info = await self.redis.info("replication")
        replicas = int(info.get("connected_slaves", 0))
        fsync_always = False
        try:
            persistence = await self.redis.info("persistence")
            if int(persistence.get("aof_enabled", 0)):
                config = await self.redis.config_get("appendfsync")
                fsync_always = config.get("appendfsync") == "always"
        except ResponseError as exc:
            # CONFIG is often disabled on managed Redis: then only a replica can give the guarantee.
            log.debug("cannot read appendfsync (%s)", exc)
        self._replicas, self._fsync_always, self._checked_at = replicas, fsync_always, time.monotonic()
        return replicas, fsync_always

    async def confirm(self, connection: Redis) -> None:
        """Return once the writes made on `connection` are durable, or raise NotDurable.

        WAIT counts the writes of the connection it is sent on: `connection` must be the single
        connection the writes went through (`Redis.client()`), not a pool.
        """
        replicas, fsync_always = await self._setup()
        if replicas > 0:
            acked = int(await connection.wait(1, self.wait_ms))
            if acked >= 1:
                return
            if not fsync_always:
                raise NotDurable(f"no replica confirmed the write within {self.wait_ms} ms")
        if fsync_always:
            return
        raise NotDurable("strict durability needs Redis with `appendfsync always` or a connected replica")
