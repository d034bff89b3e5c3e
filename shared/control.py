"""Run control: cancel executions, pause and resume a workflow or the whole queue, drain the workers.

Everything here is a write to Redis that the workers obey, so it works the same from the API and from
the CLI (which talks to Redis directly, for when the API is down):

- **Cancel** (shared/lua/cancel.lua) ends a task as `REVOKED` (a `cancelled` event, execution status
  `cancelled`) unless it is terminal already, and pushes its id on the control channel; the worker
  holding it stops the run (its sandbox killed), a worker reading it later only acknowledges it.
- **Pause** sets a flag in the control hash; a worker that delivers a request of a paused workflow (or
  any request while the queue is paused) parks it (shared/lua/park.lua) without holding a slot, and
  **resume** (shared/lua/resume.lua) clears the flag and puts what was parked back, oldest first.
- **Drain** sets the `drain` flag and pushes it: workers finish what they hold and read nothing new
  until it is cleared. Progress is what the workers still hold (the workers' group pending count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.events import event_fields
from shared.executions import ExecutionFilter, ExecutionStore, unprojected_unfinished
from shared.scripts import CancelOutcome, Scripts
from shared.streams import (
    ACTIVE_EXECUTION_STATUSES,
    EventType,
    ExecutionStatus,
    Keys,
    Lane,
    TaskField,
    decode_fields,
    dumps,
    now_iso,
)

QUEUE = "queue"
DRAIN = "drain"
# Most executions one bulk cancel touches: a filter matching more is cancelled in several calls.
BULK_LIMIT = 1000


def workflow_scope(workflow_id: int) -> str:
    return f"workflow:{workflow_id}"


@dataclass(frozen=True)
class Cancelled:
    """What one cancel did: `outcome` CANCELLED (now REVOKED), ALREADY_TERMINAL (with the status it
    has), or MISSING (unknown, expired, or another client's)."""

    task_id: str
    execution_id: int | None
    outcome: CancelOutcome
    status: str

    @property
    def found(self) -> bool:
        return self.outcome != CancelOutcome.MISSING


@dataclass
class CancelFilter:
    """Which executions a bulk cancel targets: the listed ones, and/or every unfinished one matching
    the fields given (all given fields must match). An empty filter matches nothing."""

    execution_ids: list[int] = field(default_factory=list)
    workflow_id: int | None = None
    client_slug: str | None = None
    status: str | None = None  # an execution status (pending, running, retrying)

    @property
    def by_query(self) -> bool:
        return self.workflow_id is not None or self.client_slug is not None or self.status is not None


# A worker's field in a shard's drained hash is its consumer name, then `|` and the lane for a reader of
# a priority lane (each of its readers reports what it holds; the state sums them per worker).
_LANE_SEPARATOR = "|"


def drained_field(consumer: str, lane: Lane) -> str:
    return consumer if lane == Lane.NORMAL else f"{consumer}{_LANE_SEPARATOR}{lane}"


class RunControl:
    """Cancel, pause, resume and drain, bound to one Redis (and PostgreSQL for bulk filters)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        task_ttl: int,
        pool: asyncpg.Pool | None = None,
        visibility_timeout: float = 60.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, keys)
        self.task_ttl = task_ttl
        self.pool = pool
        # How long a concurrency-key slot handed on by a cancel is held for the waiter it wakes.
        self.visibility_timeout = visibility_timeout

    # ---- cancel --------------------------------------------------------------------------------

    async def cancel_task(self, task_id: str, *, client: str | None = None, by: str = "operator") -> Cancelled:
        """Cancel one task; `client` set: only if it is that client's (else MISSING, as for any unknown id)."""
        task = decode_fields(await self.redis.hgetall(self.keys.task(task_id)))
        if not task or (client is not None and task.get(TaskField.CLIENT) != client):
            return Cancelled(task_id, None, CancelOutcome.MISSING, "")
        execution_id = int(task.get(TaskField.EXECUTION_ID) or 0) or None
        finished_at = now_iso()
        error = {"type": "Cancelled", "message": f"cancelled by {by}", "reason": "cancelled"}
        event = event_fields(
            EventType.CANCELLED,
            task_id=task_id,
            execution_id=execution_id or 0,
            workflow_id=int(task.get(TaskField.WORKFLOW_ID) or 0),
            client=task.get(TaskField.CLIENT, ""),
            data={
                "finished_at": finished_at,
                "cancelled_by": by,
                "previous_status": task.get(TaskField.STATUS),
                "current_node": task.get(TaskField.CURRENT_NODE),
                "error": error,
            },
        )
        outcome, status = await self.scripts.cancel(
            task_id=task_id,
            client=client,
            event=event,
            task_fields={
                TaskField.FINISHED_AT: finished_at,
                TaskField.UPDATED_AT: finished_at,
                TaskField.ERROR: dumps(error),
                TaskField.CANCEL_REASON: by,
            },
            task_ttl=self.task_ttl,
            wait_ttl_ms=int(self.visibility_timeout * 1000),
        )
        return Cancelled(task_id, execution_id, outcome, status)

    async def task_of_execution(self, execution_id: int) -> str | None:
        """The task id of an execution: Redis's map first (unprojected ones too), then PostgreSQL."""
        task_id = await self.redis.get(self.keys.execution(execution_id))
        if task_id:
            return task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        if self.pool is not None:
            owner = await ExecutionStore(self.pool).owner(execution_id)
            return owner.task_id if owner else None
        return None

    async def cancel_execution(
        self, execution_id: int, *, client: str | None = None, by: str = "operator"
    ) -> Cancelled:
        task_id = await self.task_of_execution(execution_id)
        if task_id is None:
            return Cancelled("", execution_id, CancelOutcome.MISSING, "")
        result = await self.cancel_task(task_id, client=client, by=by)
        return Cancelled(result.task_id, execution_id, result.outcome, result.status)

    async def cancel_many(
        self, where: CancelFilter, *, client: str | None = None, by: str = "operator"
    ) -> list[Cancelled]:
        """Cancel the listed executions and the unfinished ones matching the filter (at most BULK_LIMIT):
        PostgreSQL's, and those the projector has not written yet (Redis's; ProjectionBehind when too
        many events wait to tell them). Each is its own atomic cancel: one finishing meanwhile simply
        keeps its outcome."""
        ids: list[int] = list(dict.fromkeys(where.execution_ids))
        statuses = [where.status] if where.status else sorted(s.value for s in ACTIVE_EXECUTION_STATUSES)
        if where.by_query:
            # First: an execution queued a moment ago is in Redis only (the projector writes it soon).
            owner = client if client is not None else where.client_slug
            for unprojected in await unprojected_unfinished(
                self.redis, self.keys, workflow_id=where.workflow_id, client=owner
            ):
                if unprojected.status.value in statuses and unprojected.execution_id not in ids:
                    ids.append(unprojected.execution_id)
        if where.by_query and self.pool is not None:
            store = ExecutionStore(self.pool)
            for status in statuses:
                rows, _ = await store.list(
                    ExecutionFilter(
                        workflow_id=where.workflow_id,
                        client_slug=client if client is not None else where.client_slug,
                        status=ExecutionStatus(status),
                        limit=BULK_LIMIT,
                    )
                )
                ids.extend(int(r["id"]) for r in rows if int(r["id"]) not in ids)
        results = []
        for execution_id in ids[:BULK_LIMIT]:
            results.append(await self.cancel_execution(execution_id, client=client, by=by))
        return results

    # ---- pause, resume, drain ------------------------------------------------------------------

    # Each shard has its own control hash (its workers' park step reads it in the shard's slot): a
    # pause, resume or drain is written to every shard, and the state read from all of them.

    async def pause(self, scope: str) -> None:
        """Pause `queue` or `workflow:{id}`: requests are still accepted, and parked by the workers."""
        since = now_iso()
        for keys in self.keys.all_shards:
            await self.redis.hset(keys.control, scope, since)

    async def resume(self, scope: str) -> int:
        """Resume `scope`; returns how many parked requests were put back in line."""
        moved = 0
        for keys in self.keys.all_shards:
            moved += await self.scripts.of(keys).resume(scope)
        return moved

    async def drain(self, on: bool = True) -> None:
        """Start (or end) a drain: workers finish what they hold and take nothing new."""
        since = now_iso()
        for keys in self.keys.all_shards:
            # The flag before the push: a worker that hears the push and re-reads finds it. (No MULTI:
            # on a cluster the channel is not in the hash's slot, and the heartbeat's re-read covers a
            # push that is lost.)
            pipe = self.redis.pipeline(transaction=False)
            if on:
                pipe.hset(keys.control, DRAIN, since)
            else:
                pipe.hdel(keys.control, DRAIN)
                pipe.delete(keys.drained)
            await pipe.execute()
            await self.redis.publish(keys.control_channel, f"drain {'on' if on else 'off'}")

    async def state(self) -> dict[str, Any]:
        """The control flags and what they hold back (every shard's): for `nova inspect`, /metrics and the API."""
        flags = decode_fields(await self.redis.hgetall(self.keys.control))
        workflows = sorted(int(k.split(":", 1)[1]) for k in flags if k.startswith("workflow:"))
        # Per process: what its readers hold, and in how many shards every one of them has stopped.
        drained: dict[str, int] = {}
        shards_drained: dict[str, int] = {}
        queue_parked = 0
        workflow_parked = [0] * len(workflows)
        held = 0
        for keys in self.keys.all_shards:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(keys.drained)
            pipe.zcard(keys.parked(QUEUE))
            for workflow_id in workflows:
                pipe.zcard(keys.parked(workflow_scope(workflow_id)))
            shard_drained, shard_queue, *shard_workflows = await pipe.execute()
            # A process reads every shard, each in every lane: what it holds is summed over them, once
            # each of its readers of every shard has stopped (one that still reads is not drained yet).
            readers: dict[str, dict[str, int]] = {}
            for reader, count in decode_fields(shard_drained).items():
                consumer, _, lane = reader.partition(_LANE_SEPARATOR)
                readers.setdefault(consumer, {})[lane or Lane.NORMAL] = int(count)
            for consumer, lanes in readers.items():
                if len(lanes) == len(Lane):
                    drained[consumer] = drained.get(consumer, 0) + sum(lanes.values())
                    shards_drained[consumer] = shards_drained.get(consumer, 0) + 1
            queue_parked += int(shard_queue)
            workflow_parked = [a + int(b) for a, b in zip(workflow_parked, shard_workflows, strict=True)]
            # Drain progress: what the workers still hold (delivered, not yet acknowledged).
            for lane in keys.lanes:
                try:
                    summary = await self.redis.xpending(lane.requests, lane.worker_group)
                    held += int(summary.get("pending", 0)) if summary else 0
                except ResponseError:  # no stream or group yet: nothing is held
                    pass
        return {
            "queue_paused": QUEUE in flags,
            "queue_paused_since": flags.get(QUEUE),
            "paused_workflows": [
                {"workflow_id": w, "since": flags[workflow_scope(w)], "parked": int(n)}
                for w, n in zip(workflows, workflow_parked, strict=True)
            ],
            "parked": int(queue_parked) + sum(int(n) for n in workflow_parked),
            "draining": DRAIN in flags,
            "draining_since": flags.get(DRAIN),
            "held_by_workers": held,
            # Workers that have heard of the drain and stopped reading, with the runs each still holds.
            "drained_workers": {
                consumer: held_runs
                for consumer, held_runs in drained.items()
                if shards_drained[consumer] == self.keys.shard_count
            }
            if DRAIN in flags
            else {},
        }
