"""Retention: what NOVA_RETENTION_DAYS removes, and how, without getting in the projector's way.

PostgreSQL keeps a finished execution (completed, failed, dead, cancelled) and its chain of work
(`node_runs`) for `retention_days` after its last event (`updated_at`: the terminal event's time for
a finished row). The dead-letter streams (the requests' and the projector's) drop entries older than
that too; stream ids are times, so that is one XTRIM MINID each.

Deleting goes in batches of `cleanup_batch` executions, each its own short transaction, oldest first:
the batch locks its rows with FOR UPDATE SKIP LOCKED, so a row the projector is writing right now is
skipped (and taken by a later run) rather than waited for, and the projector never waits for more
than one batch's rows, which are old and finished, so it has nothing to write to them. A row that
PostgreSQL shows finished while its task in Redis is running again (a retry reopened it and the
projector has not caught up) is kept: only an execution terminal in both places goes. And the
execution with the largest id always stays: it is the floor from which a Redis that lost its id
sequence raises it again, so ids are never handed out twice however old everything is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis

from shared.streams import TERMINAL_STATUSES, ExecutionStatus, Keys, TaskField

log = logging.getLogger(__name__)

# Execution statuses that never change again (a retry reopens one only through Redis, checked below).
FINISHED = [
    ExecutionStatus.COMPLETED.value,
    ExecutionStatus.FAILED.value,
    ExecutionStatus.DEAD.value,
    ExecutionStatus.CANCELLED.value,
]
# A pause between batches: the cleanup is background work and yields PostgreSQL to the projector.
BATCH_PAUSE_S = 0.05
# Dead letters read per call while counting (dry run).
_COUNT_PAGE = 1000

_CANDIDATES = """
SELECT id, task_id FROM executions
WHERE status = ANY($1::text[]) AND updated_at < $2 AND NOT (id = ANY($4::bigint[])) AND id < $5
ORDER BY updated_at
LIMIT $3
FOR UPDATE SKIP LOCKED
"""


_NODE_RUNS_OF = "SELECT count(*) FROM node_runs WHERE execution_id = ANY($1::bigint[])"

# The same rows as _CANDIDATES, read (not locked) in id order after $3, for the dry run.
_PLANNED = """
SELECT id, task_id, updated_at FROM executions
WHERE status = ANY($1::text[]) AND updated_at < $2 AND id > $3 AND id < $4
ORDER BY id
LIMIT $5
"""


@dataclass
class CleanupReport:
    """What a cleanup removed (or, for a dry run, would remove)."""

    cutoff: datetime
    dry_run: bool = False
    executions: int = 0
    node_runs: int = 0
    # Stream name -> entries older than the cutoff.
    dead_letters: dict[str, int] = field(default_factory=dict)
    oldest: datetime | None = None
    batches: int = 0
    kept_reopened: int = 0

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        data["oldest"] = self.oldest.isoformat() if self.oldest else None
        return data


def cutoff_for(days: int, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(days=days)


class Retention:
    def __init__(self, redis: Redis, keys: Keys, pool: asyncpg.Pool, *, batch: int = 500) -> None:
        self.redis = redis
        self.keys = keys
        self.pool = pool
        self.batch = batch

    @property
    def dead_letter_streams(self) -> list[str]:
        """Every shard's dead letters (the workers' and the projector's): one cleanup covers them all."""
        return [stream for k in self.keys.all_shards for stream in (k.dead_letter, k.projector_dead_letter)]

    async def plan(self, cutoff: datetime) -> CleanupReport:
        """What `run(cutoff)` would delete, deleting nothing (`nova cleanup --dry-run`): the same rows, those
        a retry reopened in Redis left out (counted as kept), read a batch at a time in id order."""
        report = CleanupReport(cutoff=cutoff, dry_run=True)
        async with self.pool.acquire() as conn:
            floor = await conn.fetchval("SELECT coalesce(max(id), 0) FROM executions")
            after = 0
            while True:
                rows = await conn.fetch(_PLANNED, FINISHED, cutoff, after, floor, self.batch)
                if not rows:
                    break
                after = rows[-1]["id"]
                reopened = await self._running_in_redis([r["task_id"] for r in rows])
                going = [r for r in rows if r["task_id"] not in reopened]
                report.kept_reopened += len(rows) - len(going)
                report.executions += len(going)
                oldest = min((r["updated_at"] for r in going), default=None)
                if oldest is not None and (report.oldest is None or oldest < report.oldest):
                    report.oldest = oldest
                going_ids = [r["id"] for r in going]
                runs = await conn.fetchval(_NODE_RUNS_OF, going_ids)
                report.node_runs += int(runs)
        for stream in self.dead_letter_streams:
            report.dead_letters[stream] = await self._count_older(stream, _ms(cutoff))
        return report

    async def run(
        self,
        cutoff: datetime,
        *,
        pause: float = BATCH_PAUSE_S,
        on_batch: Callable[[CleanupReport], Awaitable[None]] | None = None,
    ) -> CleanupReport:
        """Delete what is older than `cutoff`, a batch per transaction, until nothing is left.

        `on_batch` is awaited inside each batch's transaction, after its deletes (the tests hold a
        batch open there to show that the projector goes on meanwhile)."""
        report = CleanupReport(cutoff=cutoff)
        kept: list[int] = []
        floor = await self.pool.fetchval("SELECT max(id) FROM executions")
        while floor is not None:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_CANDIDATES, FINISHED, cutoff, self.batch, kept, floor)
                if not rows:
                    break
                reopened = await self._running_in_redis([r["task_id"] for r in rows])
                ids = [r["id"] for r in rows if r["task_id"] not in reopened]
                kept += [r["id"] for r in rows if r["task_id"] in reopened]
                # Children first and by name: a table that later hangs off executions without a
                # cascade must be listed here, not found by a failing foreign key.
                node_runs = await conn.execute("DELETE FROM node_runs WHERE execution_id = ANY($1::bigint[])", ids)
                executions = await conn.execute("DELETE FROM executions WHERE id = ANY($1::bigint[])", ids)
                report.node_runs += _count(node_runs)
                report.executions += _count(executions)
                report.batches += 1
                if on_batch is not None:
                    await on_batch(report)
            if len(rows) < self.batch:
                break
            await asyncio.sleep(pause)
        report.kept_reopened = len(kept)
        for stream in self.dead_letter_streams:
            removed = await self.redis.xtrim(stream, minid=f"{_ms(cutoff)}-0", approximate=False)
            report.dead_letters[stream] = int(removed or 0)
        return report

    async def _running_in_redis(self, task_ids: list[str]) -> set[str]:
        """The tasks among these that Redis shows unfinished (reopened by a retry)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(self.keys.task(task_id), TaskField.STATUS)
            statuses = await pipe.execute()
        return {
            task_id
            for task_id, status in zip(task_ids, statuses, strict=True)
            if status is not None and _text(status) not in TERMINAL_STATUSES
        }

    async def _count_older(self, stream: str, cutoff_ms: int) -> int:
        count, start = 0, "-"
        while True:
            page = await self.redis.xrange(stream, min=start, max=f"({cutoff_ms}-0", count=_COUNT_PAGE)
            count += len(page)
            if len(page) < _COUNT_PAGE:
                return count
            start = f"({_text(page[-1][0])}"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _count(status: str) -> int:
    # asyncpg answers a DELETE with its command tag, "DELETE <rows>".
    return int(status.rsplit(" ", 1)[-1])
