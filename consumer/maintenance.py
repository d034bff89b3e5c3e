"""Housekeeping any worker may do at any time; every step is safe to run in several replicas at once.

- Trim the requests stream below what every group has both delivered and acknowledged (XTRIM MINID).
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
        await self.remove_dead_consumers()

    async def trim_requests(self) -> int:
        """Drop entries every group has acknowledged; returns how many were removed."""
        groups = await self.redis.xinfo_groups(self.keys.requests)
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for group in groups:
            candidates = [group["last-delivered-id"]]
            summary = await self.redis.xpending(self.keys.requests, group["name"])
            if summary and summary.get("pending"):
                oldest = summary["min"]
                if await self._acknowledge_phantoms(group["name"], oldest):
                    summary = await self.redis.xpending(self.keys.requests, group["name"])
                if summary and summary.get("pending"):
                    candidates.append(summary["min"])
            for candidate in candidates:
                parts = entry_id_parts(candidate)
                floor = parts if floor is None or parts < floor else floor
        if floor is None or floor == (0, 0):
            return 0
        # MINID keeps the floor entry itself: it is the oldest one some group still needs.
        removed = await self.redis.xtrim(self.keys.requests, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        return int(removed or 0)

    async def _acknowledge_phantoms(self, group: str, oldest_pending: str) -> bool:
        first = await self.redis.xrange(self.keys.requests, count=1)
        first_id = first[0][0] if first else None
        if first_id is not None and entry_id_parts(oldest_pending) >= entry_id_parts(first_id):
            return False
        upper = f"({first_id}" if first_id else "+"
        phantoms = await self.redis.xpending_range(self.keys.requests, group, min="-", max=upper, count=1000)
        ids = [p["message_id"] for p in phantoms]
        if ids:
            log.warning("acknowledging %d pending id(s) whose entries were deleted", len(ids))
            await self.redis.xack(self.keys.requests, group, *ids)
        return bool(ids)

    async def remove_dead_consumers(self) -> list[str]:
        # Idle longer than several visibility timeouts and owning nothing: a replica that is gone.
        # Deleting a live-but-quiet consumer is harmless: its next XREADGROUP recreates it.
        threshold_ms = int(max(self.settings.visibility_timeout * 5, 60) * 1000)
        removed: list[str] = []
        for stream, group in (
            (self.keys.requests, self.keys.worker_group),
            (self.keys.results, self.keys.projector_group),
        ):
            for consumer in await self.redis.xinfo_consumers(stream, group):
                name = consumer["name"]
                if name == self.consumer or consumer["pending"] or consumer["idle"] < threshold_ms:
                    continue
                if await self.scripts.remove_consumer_if_idle(stream, group, name):
                    removed.append(name)
        if removed:
            log.info("removed idle consumers with nothing pending: %s", ", ".join(removed))
        return removed
