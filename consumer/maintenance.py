"""Housekeeping any worker may do at any time; every step is safe to run in several replicas at once.

- Trim the requests stream below what every group has both delivered and acknowledged (XTRIM MINID).
- Trim the results stream to about NOVA_RESULTS_MAXLEN entries, but never past an event a group
  (the projector) has not read and acknowledged: a PostgreSQL outage delays projection, never loses it.
- Cap the dead-letter streams (the requests' and the projector's) at about NOVA_DEAD_LETTER_MAXLEN
  entries each, so a flood of poison requests cannot fill Redis; by age they follow
  NOVA_RETENTION_DAYS (the retention cleanup, shared/retention.py).
- Acknowledge pending ids whose entry no longer exists (Redis 6.2 keeps them in the PEL forever).
- Remove consumers that own nothing and have been silent for a while (crashed replicas).
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys, entry_id_parts

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, settings: Settings, redis: Redis, keys: Keys, scripts: Scripts, consumer: str) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer

    async def run(self) -> None:
        await self.trim_requests()
        await self.trim_results()
        await self.trim_dead_letters()
        await self.remove_dead_consumers()

    async def run_stream(self) -> None:
        """Only the steps for this reader's requests stream: what a priority lane's reader does (the
        shard's other streams are its normal lane's reader's)."""
        await self.trim_requests()
        await self.remove_dead_consumers(results=False)

    async def trim_requests(self) -> int:
        """Drop entries every group has acknowledged; returns how many were removed."""
        floor = await self.group_floor(self.keys.requests)
        if floor is None or floor == (0, 0):
            return 0
        # MINID keeps the floor entry itself: it is the oldest one some group still needs.
        removed = await self.redis.xtrim(self.keys.requests, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        return int(removed or 0)

    async def trim_results(self) -> int:
        """Keep about `results_maxlen` events, never trimming one a group still needs."""
        stream = self.keys.results
        length = int(await self.redis.xlen(stream))
        excess = length - self.settings.results_maxlen
        if excess <= 0:
            return 0
        first = await self.redis.xrange(stream, count=1)
        last = await self.redis.xrevrange(stream, count=1)
        if not first or not last:
            return 0
        # Streams have no index by position: estimate the id `excess` entries in from the first and
        # last ids' times. An estimate too low trims less now and the next pass trims the rest.
        first_ms, last_ms = entry_id_parts(first[0][0])[0], entry_id_parts(last[0][0])[0]
        cut = (first_ms + (last_ms - first_ms) * excess // length, 0)
        floor = await self.group_floor(stream)
        if floor is not None and floor < cut:
            log.warning("results stream over its length (%d > %d): a group lags behind", length, length - excess)
            cut = floor
        # Approximate MINID removes only whole nodes below the cut: nothing at or above it goes.
        removed = await self.redis.xtrim(stream, minid=f"{cut[0]}-{cut[1]}", approximate=True)
        return int(removed or 0)

    async def trim_dead_letters(self) -> int:
        """Keep about `dead_letter_maxlen` entries per dead-letter stream, dropping the oldest."""
        removed = 0
        for stream in (self.keys.dead_letter, self.keys.projector_dead_letter):
            # Approximate: whole stream nodes only, so the cap costs nothing until it is reached.
            removed += int(
                await self.redis.xtrim(stream, maxlen=self.settings.dead_letter_maxlen, approximate=True) or 0
            )
        return removed

    async def group_floor(self, stream: str) -> tuple[int, int] | None:
        """The oldest id some group of `stream` has not both delivered and acknowledged (None: no group)."""
        groups = await self.redis.xinfo_groups(stream)
        floor: tuple[int, int] | None = None
        for group in groups:
            candidates = [group["last-delivered-id"]]
            summary = await self.redis.xpending(stream, group["name"])
            if summary and summary.get("pending"):
                oldest = summary["min"]
                if await self._acknowledge_phantoms(stream, group["name"], oldest):
                    summary = await self.redis.xpending(stream, group["name"])
                if summary and summary.get("pending"):
                    candidates.append(summary["min"])
            for candidate in candidates:
                parts = entry_id_parts(candidate)
                floor = parts if floor is None or parts < floor else floor
        return floor

    async def _acknowledge_phantoms(self, stream: str, group: str, oldest_pending: str) -> bool:
        first = await self.redis.xrange(stream, count=1)
        first_id = first[0][0] if first else None
        if first_id is not None and entry_id_parts(oldest_pending) >= entry_id_parts(first_id):
            return False
        upper = f"({first_id}" if first_id else "+"
        phantoms = await self.redis.xpending_range(stream, group, min="-", max=upper, count=1000)
        ids = [p["message_id"] for p in phantoms]
        if ids:
            log.warning("acknowledging %d pending id(s) of %s whose entries were deleted", len(ids), stream)
            await self.redis.xack(stream, group, *ids)
        return bool(ids)

    async def remove_dead_consumers(self, *, results: bool = True) -> list[str]:
        # Idle longer than several visibility timeouts and owning nothing: a replica that is gone.
        # Deleting a live-but-quiet consumer is harmless: its next XREADGROUP recreates it.
        threshold_ms = int(max(self.settings.visibility_timeout * 5, 60) * 1000)
        removed: list[str] = []
        streams = [(self.keys.requests, self.keys.worker_group)]
        if results:
            streams.append((self.keys.results, self.keys.projector_group))
        for stream, group in streams:
            for consumer in await self.redis.xinfo_consumers(stream, group):
                name = consumer["name"]
                if name == self.consumer or consumer["pending"] or consumer["idle"] < threshold_ms:
                    continue
                if await self.scripts.remove_consumer_if_idle(stream, group, name):
                    removed.append(name)
        if removed:
            log.info("removed idle consumers with nothing pending: %s", ", ".join(removed))
        return removed
