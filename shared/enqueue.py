"""Enqueueing an execution: the one function every caller (API, scheduler, dead-letter replay, tests)
goes through, so the request entry, its payload and its queued event are built in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, TryAgainError

from shared.connections import REDIS_UNAVAILABLE
from shared.durability import NotDurable, StrictDurability
from shared.scripts import EnqueueResult, Scripts, SequenceLost
from shared.streams import Lane, dumps, now_iso

log = logging.getLogger(__name__)

# The Idempotency-Keys of the system's own enqueues: a schedule's tick (one execution per tick, whichever
# worker fires it) and a dead letter's replay (one per letter). Reserved: the API refuses keys that start
# so, or a caller could fire a tick or a replay early, or stop it from happening.
SCHEDULE_KEY_PREFIX = "schedule:"
REPLAY_KEY_PREFIX = "replay:"
RESERVED_KEY_PREFIXES = (SCHEDULE_KEY_PREFIX, REPLAY_KEY_PREFIX)

# The largest execution id PostgreSQL knows (its `executions` table): the floor of the id sequence.
SequenceFloor = Callable[[], Awaitable[int]]


class SequenceUnavailable(Exception):
    """Redis lost the execution id sequence and PostgreSQL cannot say where it stood."""


@dataclass(frozen=True)
class Admission:
    """Per-client limits checked atomically with the enqueue (0: none)."""

    max_inflight: int = 0
    rate: float = 0
    burst: int = 1


@dataclass(frozen=True)
class NewExecution:
    workflow_id: int
    workflow_name: str
    client: str
    initial_context: dict[str, Any]
    # The version the execution runs, whatever updates follow; None: the one current when it starts.
    workflow_version: int | None = None
    # Request keys beside initial_context (e.g. replay_of, schedule_id); also shown on the queued event.
    extra: dict[str, Any] = field(default_factory=dict)
    task_id: str = ""
    idempotency_key: str | None = None
    idempotency_ttl: int = 24 * 3600
    admission: Admission = Admission()
    # The priority lane whose stream the request joins (consumer/slots.py: how workers weigh lanes).
    lane: Lane = Lane.NORMAL
    # Enqueue only while the workflow's head in Redis is live at workflow_version, in the same atomic
    # step (raises WorkflowChanged otherwise): the caller may then build the request from a head it
    # remembers instead of reading it first. Not on a Redis Cluster (the head is in another slot).
    check_head: bool = False

    def __post_init__(self) -> None:
        if self.check_head and self.workflow_version is None:
            raise ValueError("check_head needs the workflow_version the request was built for")

    def extra_fields(self) -> dict[str, Any]:
        version = {} if self.workflow_version is None else {"workflow_version": self.workflow_version}
        return {**self.extra, **version}

    def queued_fields(self) -> dict[str, Any]:
        """What the queued event tells beside the request's payload: the lane, when not normal."""
        return {} if self.lane == Lane.NORMAL else {"priority": str(self.lane)}

    def payload(self) -> str:
        return dumps({**self.extra_fields(), "initial_context": self.initial_context})


async def enqueue_execution(
    scripts: Scripts,
    execution: NewExecution,
    *,
    floor: SequenceFloor,
    payload: str | None = None,
    strict: StrictDurability | None = None,
) -> EnqueueResult:
    """Append one execution request (see shared/lua/enqueue.lua). `payload` may be passed when the
    caller has already serialized it (to measure it); it must equal `execution.payload()`. With
    `strict`, return only once the request is durable (see shared/durability.py).

    Raises AtCapacity / RateLimited (admission refused), WorkflowChanged (with `check_head`),
    SequenceUnavailable, NotDurable.
    """
    # The client's shard: its limits, its idempotency keys and the new task all live there.
    scripts = scripts.of(scripts.keys.of_client(execution.client))
    if strict is None:
        return await _enqueue(scripts, execution, floor, payload)
    if isinstance(scripts.redis, RedisCluster):
        return await _enqueue_strict_on_cluster(scripts.redis, scripts, execution, floor, payload, strict)
    async with scripts.redis.client() as connection:
        result = await _enqueue(scripts.on(connection), execution, floor, payload)
        await strict.confirm(connection)
    return result


# Tries of a strict enqueue on a cluster whose slot map changed under it (the slot moved).
MOVED_TRIES = 3


async def _enqueue_strict_on_cluster(
    cluster: RedisCluster,
    scripts: Scripts,
    execution: NewExecution,
    floor: SequenceFloor,
    payload: str | None,
    strict: StrictDurability,
) -> EnqueueResult:
    """The enqueue on one connection to the master of the client's shard, then WAIT on it: the
    cluster client spreads commands over pooled connections, and WAIT counts one connection's writes."""
    for _ in range(MOVED_TRIES):
        node = cluster.get_node_from_key(scripts.keys.requests)
        pool = ConnectionPool(connection_class=node.connection_class, max_connections=1, **node.connection_kwargs)
        client = Redis(connection_pool=pool)
        try:
            async with client.client() as connection:
                result = await _enqueue(scripts.on(connection), execution, floor, payload)
                await strict.confirm(connection, node.name)
            return result
        except (MovedError, AskError, TryAgainError) as exc:
            # The slot moved (MOVED), is moving (ASK, TRYAGAIN): nothing was written; look again.
            log.info("strict enqueue: %r; refreshing the cluster's slot map", exc)
            await cluster.nodes_manager.initialize()
            await asyncio.sleep(0.05)
        except REDIS_UNAVAILABLE:
            # The master may be dead: learn the new map (a promoted replica) before the client retries.
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await cluster.nodes_manager.initialize()
            raise
        finally:
            await client.aclose()
            await pool.disconnect()
    raise NotDurable("the shard's slot is moving between cluster nodes; retry with the same Idempotency-Key")


async def _enqueue(
    scripts: Scripts, execution: NewExecution, floor: SequenceFloor, payload: str | None
) -> EnqueueResult:
    enqueued_at = now_iso()
    task_id = scripts.keys.placed_task_id(execution.task_id) if execution.task_id else scripts.keys.new_task_id()
    call = {
        "task_id": task_id,
        "workflow_id": execution.workflow_id,
        "workflow_name": execution.workflow_name,
        "client": execution.client,
        "enqueued_at": enqueued_at,
        "payload": payload if payload is not None else execution.payload(),
        "queued_data": dumps(
            {
                "workflow_name": execution.workflow_name,
                "enqueued_at": enqueued_at,
                "initial_context": execution.initial_context,
                **execution.extra_fields(),
                **execution.queued_fields(),
            }
        ),
        "idempotency_key": execution.idempotency_key,
        "idempotency_ttl": execution.idempotency_ttl,
        "max_inflight": execution.admission.max_inflight,
        "rate": execution.admission.rate,
        "burst": execution.admission.burst,
        "lane": execution.lane,
        "live_version": execution.workflow_version if execution.check_head else None,
    }
    try:
        return await scripts.enqueue(**call)
    except SequenceLost:
        pass
    # Redis lost its data (a restart without persistence, a flush, a new server) or some of it (an older
    # snapshot, a lagging replica promoted): ids handed out again would collide with executions
    # PostgreSQL already holds.
    try:
        highest = await floor()
    except Exception as exc:
        raise SequenceUnavailable(
            "execution ids cannot be handed out safely: Redis lost its id sequence and PostgreSQL is unreachable"
            f" ({exc})"
        ) from exc
    # The client's shard's sequence: the one enqueue() used.
    shard = scripts.of(scripts.keys.of_client(execution.client))
    raised = await shard.raise_sequence(highest)
    log.warning(
        "execution id sequence of %s missing from Redis or behind; raised to %d (PostgreSQL's highest id %d)",
        shard.keys.execution_seq,
        raised,
        highest,
    )
    return await scripts.enqueue(**call)
