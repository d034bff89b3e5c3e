"""Strict durability: what the API makes sure of before it answers 202 (NOVA_DURABILITY=strict).

Redis acknowledges a write once it is in memory. What a crash then loses depends on its setup:
- `appendfsync always`: nothing acknowledged (each write is on disk before the reply).
- `appendfsync everysec` (Redis's default with AOF): up to about a second of writes.
- no AOF, RDB snapshots only: everything since the last snapshot.
- with a replica, a failover loses what the replica had not received (replication is asynchronous).
In strict mode the API confirms each enqueue before its 202: with a replica connected, WAIT until one
replica has the write; otherwise Redis must fsync every write (`appendfsync always`). When neither
holds, executions are refused with 503 rather than acknowledged without the guarantee.

On Redis Cluster the same holds per master: the enqueue runs on one connection to the master of the
client's shard, and WAIT there waits for that master's replica. A master SIGKILLed then loses only what
its replica had not received, which strict mode never acknowledged; its replica is promoted with every
acknowledged request (see the README's recovery point).
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
        # Per server (one entry on a single Redis, one per master on a cluster): when it was last
        # checked, its replicas connected, and whether it fsyncs every write.
        self._setups: dict[str, tuple[float, int, bool]] = {}

    async def _setup(self, via: Redis, server: str) -> tuple[int, bool]:
        checked_at, replicas, fsync_always = self._setups.get(server, (float("-inf"), 0, False))
        if time.monotonic() - checked_at < self.RECHECK_SECONDS:
            return replicas, fsync_always
        info = await via.info("replication")
        replicas = int(info.get("connected_slaves", 0))
        fsync_always = False
        try:
            persistence = await via.info("persistence")
            if int(persistence.get("aof_enabled", 0)):
                config = await via.config_get("appendfsync")
                fsync_always = config.get("appendfsync") == "always"
        except ResponseError as exc:
            # CONFIG is often disabled on managed Redis: then only a replica can give the guarantee.
            log.debug("cannot read appendfsync (%s)", exc)
        self._setups[server] = (time.monotonic(), replicas, fsync_always)
        return replicas, fsync_always

    async def confirm(self, connection: Redis, server: str = "") -> None:
        """Return once the writes made on `connection` are durable, or raise NotDurable.

        WAIT counts the writes of the connection it is sent on: `connection` must be the single
        connection the writes went through (`Redis.client()`), not a pool. `server` names the server it
        is connected to (a cluster's master), whose setup is remembered for a few seconds.
        """
        replicas, fsync_always = await self._setup(connection, server)
        if replicas > 0:
            acked = int(await connection.wait(1, self.wait_ms))
            if acked >= 1:
                return
            if not fsync_always:
                raise NotDurable(f"no replica confirmed the write within {self.wait_ms} ms")
        if fsync_always:
            return
        raise NotDurable("strict durability needs Redis with `appendfsync always` or a connected replica")
