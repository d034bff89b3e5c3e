"""Scheduled executions (what Celery Beat did), kept in Redis next to the queue they feed.

A schedule is a cron expression (five fields, or six with seconds last) plus what to run. Two keys:
the `nova:schedules` hash (id -> JSON) and the `nova:schedules:next` sorted set (id scored by its next
fire time in ms), which is all the scheduler reads each second.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis

from shared.connections import redis_ms
from shared.cron import next_tick, validate_cron
from shared.enqueue import SCHEDULE_KEY_PREFIX
from shared.scripts import Scripts
from shared.streams import Keys, dumps, loads, now_iso


@dataclass
class Schedule:
    id: str
    cron: str
    workflow_id: int
    client: str
    initial_context: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    created_at: str = ""

    def next_after(self, moment_ms: int) -> int:
        return next_tick(self.cron, moment_ms)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def tick_task_id(schedule_id: str, tick_ms: int) -> str:
    """The task id a schedule's tick is enqueued with (the API's TASK_ID_PATTERN accepts it)."""
    return f"sched-{schedule_id}-{tick_ms}"


def tick_key(schedule_id: str, tick_ms: int) -> str:
    """The Idempotency-Key of a schedule's tick (reserved: see shared/enqueue.py)."""
    return f"{SCHEDULE_KEY_PREFIX}{schedule_id}:{tick_ms}"


class ScheduleStore:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    @property
    def _all(self) -> str:
        # Under `keys.home`: on a cluster both keys share one slot, as the transactions writing them need.
        return f"{self.keys.home}:schedules"

    @property
    def _next(self) -> str:
        return f"{self.keys.home}:schedules:next"

    @property
    def _clock(self) -> str:
        # Redis's time (ms) at the scheduler's last pass: a later pass that finds an earlier time knows
        # the clock stepped back (see bring_back).
        return f"{self.keys.home}:schedules:clock"

    async def create(
        self, *, cron: str, workflow_id: int, client: str, initial_context: dict[str, Any], name: str | None = None
    ) -> Schedule:
        schedule = Schedule(
            id=uuid.uuid4().hex[:12],
            cron=validate_cron(cron),
            workflow_id=workflow_id,
            client=client,
            initial_context=initial_context,
            name=name,
            created_at=now_iso(),
        )
        # Redis's clock, as the scheduler counts what is due (this host's may be skewed).
        first = schedule.next_after(await redis_ms(self.redis))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._all, schedule.id, dumps(schedule.as_json()))
            pipe.zadd(self._next, {schedule.id: first})
            await pipe.execute()
        return schedule

    async def get(self, schedule_id: str) -> Schedule | None:
        raw = await self.redis.hget(self._all, schedule_id)
        return Schedule(**loads(raw)) if raw else None

    async def list(self) -> list[tuple[Schedule, int | None]]:
        """Every schedule with its next fire time (ms)."""
        raw = await self.redis.hgetall(self._all)
        return [(Schedule(**loads(data)), await self.next_fire(sid)) for sid, data in sorted(raw.items())]

    async def next_fire(self, schedule_id: str) -> int | None:
        """The schedule's next tick (ms), as stored: counted on Redis's clock."""
        score = await self.redis.zscore(self._next, schedule_id)
        return int(score) if score is not None else None

    async def delete(self, schedule_id: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._all, schedule_id)
            pipe.zrem(self._next, schedule_id)
            removed, _ = await pipe.execute()
        return bool(removed)

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        reply = await self.redis.zrangebyscore(self._next, "-inf", now_ms, start=0, num=limit, withscores=True)
        return [(member, int(score)) for member, score in reply]

    async def advance(self, schedule_id: str, fired_ms: int, next_ms: int) -> bool:
        """Move the schedule on from the tick it fired to `next_ms`, unless another scheduler moved it
        meanwhile (the same tick fired by a replica, a bring-back) or it was deleted."""
        return await Scripts(self.redis, self.keys).advance_schedule(
            self._next, schedule_id, fired_ms=fired_ms, next_ms=next_ms
        )

    async def clock_stepped_back(self, now_ms: int) -> int | None:
        """The time of the scheduler's last pass if it is later than `now_ms` (Redis's clock stepped
        back since), else None."""
        last = await self.redis.get(self._clock)
        return int(last) if last is not None and int(last) > now_ms else None

    async def passed(self, now_ms: int) -> None:
        """Record `now_ms` as the time of the scheduler's last pass."""
        await self.redis.set(self._clock, now_ms)

    async def bring_back(self, now_ms: int, batch: int = 500) -> list[str]:
        """Re-score at their cron's next tick after `now_ms` the schedules scored later than that; returns
        their ids. A schedule moves on from max(now, tick) when it fires: if `now` was ahead (Redis's
        clock stepped forward, then back), its next tick is the cron's tick after that wrong time, and
        a minutely schedule would stay silent until that time came round again. Reads every schedule
        not yet due, so it is for after a step back, not for every pass."""
        ahead = await self.redis.zrangebyscore(self._next, f"({now_ms}", "+inf", withscores=True)
        moved: list[str] = []
        for start in range(0, len(ahead), batch):
            chunk = ahead[start : start + batch]
            records = await self.redis.hmget(self._all, [member for member, _ in chunk])
            earlier: dict[str, int] = {}
            for (member, score), raw in zip(chunk, records, strict=True):
                if not raw:
                    continue  # deleted meanwhile: the scheduler drops its score when it comes due
                try:
                    expected = Schedule(**loads(raw)).next_after(now_ms)
                except ValueError:
                    continue  # a cron with no tick after now (CroniterError): nothing to bring it back to
                if expected < score:
                    earlier[member] = expected
            if earlier:
                # LT: never later than a score a replica firing meanwhile set; XX: not a deleted one.
                await self.redis.zadd(self._next, earlier, xx=True, lt=True)
                moved.extend(earlier)
        return moved

    async def drop_orphan(self, schedule_id: str) -> None:
        await self.redis.zrem(self._next, schedule_id)
