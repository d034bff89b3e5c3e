"""The few multi-key Redis steps that must be atomic, each one Lua script (EVALSHA, Redis >= 6.2).

Why Lua rather than MULTI: each step reads before it writes (an idempotency key, a terminal status,
who owns an entry) and must decide inside the server, so that two API replicas or two workers racing
on the same task cannot both win. The scripts live in shared/lua/, one file each, with their KEYS and
ARGV named at the top; shared/lua/lib.lua is prepended to each. Every script is safe to run twice with
the same arguments (a reply lost on the way back and the call re-sent by the client's retry), and each
has a race test in tests/test_scripts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.connections import batcher_of, lean_command, refusal_of, takes_lean_commands
from shared.streams import FORMAT_VERSION, Keys, Lane, RequestField, decode_fields, pairs


@cache
def lua_source(name: str) -> str:
    """A script of shared/lua/ with the helpers of lib.lua before it."""
    folder = resources.files("shared") / "lua"
    return (folder / "lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


# The fields every event of one task shares, as record.lua names them (EventField's values): a run's
# events are sent without them, and the script writes them into each entry (see record).
# An event of a run as `record` takes it (`of_run`): its type, ts and data (JSON text); the fields every
# event of the run shares (task_id, execution_id, workflow_id, client, v) go once per call.
RunEvent = tuple[str, str, str]


def counted(items: list[str]) -> list[Any]:
    """A flat list prefixed by its length: how the scripts read a list out of ARGV."""
    return [len(items), *items]


# How long the execution id -> task id map is kept: it is read only until the projector has written the
# execution to PostgreSQL (normally within a second), so the default task TTL is ample.
EXECUTION_KEY_TTL = 7 * 24 * 3600


def semaphore_keys(prefix: str, name: str) -> list[str]:
    """A semaphore's holders and rate bucket: one hash tag, so that a cluster keeps them in one slot."""
    holders = f"{prefix}:{{semaphore:{name}}}"
    return [holders, f"{holders}:rate"]


class EnqueueOutcome(IntEnum):
    REPEAT = 0  # an idempotency key already named a task: its ids are returned
    NEW = 1
    AT_CAPACITY = 2  # execution id slot: the client's in-flight count
    RATE_LIMITED = 3  # execution id slot: milliseconds until a token frees
    NO_SEQUENCE = 4  # Redis lost the id sequence: raise it from PostgreSQL, then call again
    WORKFLOW_CHANGED = 5  # the workflow's head is not live at the version the request names: nothing written


class RecordOutcome(IntEnum):
    NOT_OWNER = -1  # the entry was taken over by another worker: nothing written
    FINISHED = 0  # the task was terminal, or re-opened past the run's request: nothing written, entry acked
    WRITTEN = 1
    STALE = 2  # an assumed first run's task was not as enqueued (or was paused): nothing written


# cancel.lua's reply when the task waits for another concurrency key than the one read (internal).
_CANCEL_STALE_KEY = 2


class ConcurrencyOutcome(IntEnum):
    NOT_OWNER = -1  # the entry is not this worker's (taken over, or parked already): nothing written
    PARKED = 0  # the key is at its limit: the request waits in the key's wait set, its entry acknowledged
    ACQUIRED = 1  # the slot is the task's: run it
    # The task finished meanwhile (a cancel after the worker read it): nothing held or parked, its entry
    # acknowledged; a slot held for it (woken from the wait set) is the caller's to release.
    FINISHED = -2


class CancelOutcome(IntEnum):
    MISSING = -1  # no such task (expired, never existed, or another client's)
    ALREADY_TERMINAL = 0  # it had finished (or was cancelled) already: nothing written
    CANCELLED = 1


class AtCapacity(Exception):
    """The client already has its maximum number of executions in flight."""

    def __init__(self, client: str, inflight: int, cap: int) -> None:
        super().__init__(f"client '{client}' has {inflight} executions in flight (limit {cap})")
        self.client, self.inflight, self.cap = client, inflight, cap


class RateLimited(Exception):
    """The client is starting executions faster than its rate."""

    def __init__(self, client: str, wait_ms: int, rate: float) -> None:
        super().__init__(f"client '{client}' is over its rate of {rate:g} executions/s")
        self.client, self.wait_ms, self.rate = client, wait_ms, rate


@dataclass
class SequenceSeen:
    value: int = 0


class SequenceLost(Exception):
    """Redis's execution id sequence is missing, or below a value this process saw it hold (Redis lost
    data): it must be raised before enqueueing."""


class WorkflowChanged(Exception):
    """The workflow was updated or deleted since the caller read the version its request names."""


@dataclass
class EnqueueResult:
    task_id: str
    execution_id: int
    entry_id: str | None
    created: bool


@dataclass
class RecordResult:
    outcome: RecordOutcome
    event_id: str | None
    status: str

    @property
    def written(self) -> bool:
        return self.outcome == RecordOutcome.WRITTEN


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Scripts:
    """The atomic steps bound to one Redis client (scripts load lazily through EVALSHA)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._registered: dict[str, AsyncScript] = {}
        # The highest value this shard's id sequence was seen to hold (enqueue's replies, raises): it
        # only grows, so a lower one means Redis lost data (see enqueue.lua). Shared with on().
        self._seen = SequenceSeen()
        self._siblings: dict[tuple[int, str], Scripts] = {(keys.shard_index, keys.lane): self}
        # Script calls are each run's and each enqueue's hottest command: sent the short way when it may.
        self._lean = takes_lean_commands(redis)
        # A worker's: the calls of its runs that reach them in the same pass of the loop go together.
        self._batcher = batcher_of(redis) if self._lean else None

    @property
    def sequence_seen(self) -> int:
        return self._seen.value

    def _saw_sequence(self, value: int) -> None:
        self._seen.value = max(self._seen.value, value)

    def on(self, redis: Redis) -> Scripts:
        """The same steps on the same keys through another client (one pinned connection), sharing what
        this one has seen of the id sequence."""
        pinned = Scripts(redis, self.keys)
        pinned._seen = self._seen
        return pinned

    def of(self, keys: Keys) -> Scripts:
        """The same steps on another shard's (or lane's) keys (kept, so scripts are registered once each)."""
        found = self._siblings.get((keys.shard_index, keys.lane))
        if found is None:
            found = self._siblings[(keys.shard_index, keys.lane)] = Scripts(self.redis, keys)
            found._siblings = self._siblings
        return found

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._registered.get(name)
        if script is None:
            script = self._registered[name] = self.redis.register_script(lua_source(name))  # type: ignore[assignment]
        try:
            if self._lean:
                try:
                    if self._batcher is not None:
                        return await self._batcher.command("EVALSHA", script.sha, len(keys), *keys, *args)
                    return await lean_command(self.redis, "EVALSHA", script.sha, len(keys), *keys, *args)
                except (NoScriptError, RedisConnectionError, RedisTimeoutError):
                    # The script object loads a script Redis lost; the client's retries get a new
                    # connection. Sending again is safe: every script gives the same outcome when run twice.
                    pass
            return await script(keys=keys, args=args)
        except ResponseError as exc:
            # A refusal of the script's writes (a replica's: Redis unavailable for a while; maxmemory's)
            # raised as its own class, on 6.2 as on 7: callers handle a refusal, not a failed script.
            refusal = refusal_of(exc)
            if refusal is None or refusal is exc:
                raise
            raise refusal from exc

    async def enqueue(
        self,
        *,
        task_id: str,
        workflow_id: int,
        workflow_name: str,
        client: str,
        enqueued_at: str,
        payload: str,
        queued_data: str,
        idempotency_key: str | None = None,
        idempotency_ttl: int = 24 * 3600,
        max_inflight: int = 0,
        rate: float = 0,
        burst: int = 1,
        lane: str = "",
        live_version: int | None = None,
    ) -> EnqueueResult:
        """With `live_version`, only while the workflow's head in Redis is live at that version (raises
        WorkflowChanged otherwise): not on a cluster, where the head is in another slot than the client's."""
        if live_version is not None and self.keys.cluster:
            raise ValueError("a cluster cannot check a workflow's head in the client's shard")
        if self.keys.of_client(client) is not self.keys:
            # A client's executions all live in its shard (its limits are checked there, in one slot).
            return await self.of(self.keys.of_client(client)).enqueue(
                task_id=task_id,
                workflow_id=workflow_id,
                workflow_name=workflow_name,
                client=client,
                enqueued_at=enqueued_at,
                payload=payload,
                queued_data=queued_data,
                idempotency_key=idempotency_key,
                idempotency_ttl=idempotency_ttl,
                max_inflight=max_inflight,
                rate=rate,
                burst=burst,
                lane=lane,
                live_version=live_version,
            )
        lane = Lane(lane or Lane.NORMAL)
        reply = await self._call(
            "enqueue",
            keys=[
                self.keys.in_lane(lane).requests,
                self.keys.results,
                self.keys.execution_seq,
                self.keys.task(task_id),
                self.keys.idempotency(client, idempotency_key) if idempotency_key else self.keys.absent,
                self.keys.task_events(task_id),
                self.keys.inflight(client),
                self.keys.rate_bucket(client),
                self.keys.absent if live_version is None else self.keys.workflow(workflow_id),
            ],
            args=[
                task_id,
                workflow_id,
                workflow_name,
                client,
                enqueued_at,
                payload,
                queued_data,
                idempotency_ttl,
                max_inflight,
                rate,
                burst,
                self.keys.execution(""),
                EXECUTION_KEY_TTL,
                FORMAT_VERSION,
                self.keys.shard_count,
                self.keys.shard_index,
                "" if lane == Lane.NORMAL else lane.value,
                "" if live_version is None else live_version,
                self.sequence_seen,
            ],
        )
        existing_task, exec_id, entry, outcome_raw = (_s(x) for x in reply)
        outcome = EnqueueOutcome(int(outcome_raw))
        if outcome == EnqueueOutcome.WORKFLOW_CHANGED:
            raise WorkflowChanged(f"workflow {workflow_id} is no longer live at version {live_version}")
        if outcome == EnqueueOutcome.AT_CAPACITY:
            raise AtCapacity(client, int(exec_id), max_inflight)
        if outcome == EnqueueOutcome.RATE_LIMITED:
            raise RateLimited(client, int(exec_id), rate)
        if outcome == EnqueueOutcome.NO_SEQUENCE:
            raise SequenceLost("the execution id sequence is missing from Redis, or behind ids it handed out")
        if exec_id:
            handed_out = (int(exec_id) - self.keys.shard_index) // self.keys.shard_count
            self._saw_sequence(handed_out)
        return EnqueueResult(
            task_id=existing_task,
            execution_id=int(exec_id) if exec_id else 0,
            entry_id=entry or None,
            created=outcome == EnqueueOutcome.NEW,
        )

    async def record(
        self,
        *,
        task_id: str,
        client: str,
        events: list[dict[str, str]] | list[RunEvent],
        task_fields: dict[str, str],
        terminal: bool,
        ack_entry_id: str | None,
        consumer: str = "",
        token: str,
        task_ttl: int,
        first_run_of: int | None = None,
        readable: int = FORMAT_VERSION,
        of_run: tuple[int, int] | None = None,
        reopen_token: str | None = None,
    ) -> RecordResult:
        """`first_run_of`: the workflow id of a first delivery's first write, made without reading the
        task before it; written only if the task is as enqueued, its workflow and the queue not paused
        (else STALE). `readable`: the newest task hash format the caller reads. `of_run`: the execution
        id and workflow id of this task's run, whose `events` are RunEvents: each is written as
        shared.events.event_fields makes it, and the call is shorter (the fields they share go once).
        Else `events` are whole events. `reopen_token`: a run's, the re-open token of its request ('' for
        none); written only if the task has not been re-opened since (else FINISHED)."""
        if of_run is not None:
            execution_id, workflow_id = of_run
            sent = orjson.dumps(events)
            shared = orjson.dumps([task_id, str(execution_id), str(workflow_id), client, str(FORMAT_VERSION)])
        else:
            sent, shared = orjson.dumps([pairs(event) for event in events]), b""  # type: ignore[arg-type]
        reply = await self._call(
            "record",
            keys=[
                self.keys.task(task_id),
                self.keys.results,
                self.keys.requests,
                self.keys.task_events(task_id),
                self.keys.inflight(client),
                self.keys.control,
            ],
            args=[
                ack_entry_id or "",
                self.keys.worker_group,
                consumer,
                task_ttl,
                "1" if terminal else "0",
                token,
                sent,
                orjson.dumps(pairs(task_fields)),
                "" if first_run_of is None else f"workflow:{first_run_of}",
                readable,
                shared,
                "" if reopen_token is None else f"={reopen_token}",
            ],
        )
        outcome, event_id, status = (_s(x) for x in reply)
        return RecordResult(outcome=RecordOutcome(int(outcome)), event_id=event_id or None, status=status)

    async def raise_sequence(self, floor: int) -> int:
        """Raise this shard's id sequence so that its next id is above `floor` (ids are n * shards + shard),
        and above every id this process saw it hand out."""
        target = max(floor // self.keys.shard_count, self.sequence_seen)
        value = int(await self._call("raise_sequence", keys=[self.keys.execution_seq], args=[target]))
        self._saw_sequence(value)
        return value

    async def retry_later(
        self,
        *,
        task_id: str,
        entry_id: str,
        consumer: str,
        request: dict[str, str],
        delay_ms: int,
        event: dict[str, str],
        task_fields: dict[str, str],
    ) -> int:
        """1 parked, 0 the task was terminal already, -1 the entry is not this consumer's (any more)."""
        reply = await self._call(
            "retry_later",
            keys=[
                self.keys.task(task_id),
                self.keys.results,
                self.keys.requests,
                self.keys.delayed,
                self.keys.task_events(task_id),
            ],
            args=[
                entry_id,
                self.keys.worker_group,
                consumer,
                delay_ms,
                orjson.dumps(request).decode(),
                *counted(pairs(event)),
                *pairs(task_fields),
            ],
        )
        return int(reply)

    async def promote_due(self, limit: int = 100) -> int:
        return int(await self._call("promote_due", keys=[self.keys.delayed, self.keys.normal_requests], args=[limit]))

    async def dead_letter(
        self,
        *,
        entry_id: str,
        consumer: str,
        letter: dict[str, str],
        task_id: str | None,
        client: str | None = None,
        event: dict[str, str] | None,
        task_fields: dict[str, str] | None,
        task_ttl: int,
    ) -> tuple[bool, str]:
        """(whether a DEAD event was written, the dead letter's id or "" when none was written)."""
        has_task = bool(task_id and client)
        reply = await self._call(
            "dead_letter",
            keys=[
                self.keys.dead_letter,
                self.keys.requests,
                self.keys.task(task_id) if task_id and has_task else self.keys.absent,
                self.keys.results,
                self.keys.task_events(task_id) if task_id and has_task else self.keys.absent,
                self.keys.inflight(client) if client and has_task else self.keys.absent,
            ],
            args=[
                self.keys.worker_group,
                entry_id,
                consumer,
                task_ttl,
                *counted(pairs(letter)),
                *counted(pairs(event or {})),
                *pairs(task_fields or {}),
            ],
        )
        written, dlq_id = (_s(x) for x in reply)
        return written == "1", dlq_id

    async def reopen(
        self, *, task_id: str, client: str, token: str, event: dict[str, str], request: dict[str, str]
    ) -> str:
        if self.keys.of_task(task_id) is not self.keys:
            # The request goes back onto the stream of the shard that holds the task.
            return await self.of(self.keys.of_task(task_id)).reopen(
                task_id=task_id, client=client, token=token, event=event, request=request
            )
        reply = await self._call(
            "reopen",
            keys=[
                self.keys.task(task_id),
                # The request goes back onto its lane's stream.
                self.keys.in_lane(request.get(RequestField.LANE)).requests,
                self.keys.results,
                self.keys.task_events(task_id),
                self.keys.inflight(client),
            ],
            args=[token, *counted(pairs(event)), *pairs(request)],
        )
        return _s(reply)

    async def claim_tick(self, name: str, *, now_ms: int, next_ms: int) -> int | None:
        """Claim the due tick of built-in schedule `name` (moving it on to `next_ms`); the tick's
        time in ms, or None when it is not due or another worker claimed it."""
        reply = int(await self._call("claim_tick", keys=[self.keys.builtin_schedules], args=[name, now_ms, next_ms]))
        return reply or None

    async def advance_schedule(self, schedules_key: str, schedule_id: str, *, fired_ms: int, next_ms: int) -> bool:
        """Move a schedule on from the tick `fired_ms` to `next_ms` if that tick is still its score
        (shared/lua/advance_schedule.lua); False when another scheduler moved it, or it was deleted."""
        reply = await self._call("advance_schedule", keys=[schedules_key], args=[schedule_id, fired_ms, next_ms])
        return bool(int(reply))

    async def rotate_secret(
        self, endpoints_key: str, previous_key: str, *, endpoint_id: str, expected: str, record: str, previous: str
    ) -> bool:
        """Write a webhook endpoint's new record and previous secret if the record is still `expected`."""
        reply = await self._call(
            "rotate_secret", keys=[endpoints_key, previous_key], args=[endpoint_id, expected, record, previous]
        )
        return int(reply) == 1

    async def pass_unwatched(self, endpoints: str, results: str, group: str) -> bool:
        """Move the webhook group past the results stream's end if no endpoint is registered (True)."""
        return int(await self._call("pass_unwatched", keys=[endpoints, results], args=[group])) == 1

    async def remove_consumer_if_idle(self, stream: str, group: str, consumer: str) -> bool:
        return int(await self._call("remove_idle_consumer", keys=[stream], args=[group, consumer])) == 1

    async def heartbeat(self, consumer: str, entry_ids: list[str]) -> set[str]:
        if not entry_ids:
            return set()
        reply = await self._call(
            "heartbeat", keys=[self.keys.requests], args=[self.keys.worker_group, consumer, *entry_ids]
        )
        return {_s(x) for x in reply}

    async def worker_report(self, consumer: str, report: str | None, *, ttl_ms: int = 0) -> int:
        """Write a worker's report (None: remove it, at shutdown); the number of stale reports dropped."""
        reply = await self._call(
            "worker_report",
            keys=[self.keys.worker_reports, self.keys.worker_report_deadlines],
            args=["remove", consumer] if report is None else ["report", consumer, report, ttl_ms],
        )
        return int(reply)

    async def semaphore(
        self,
        op: str,
        name: str,
        holders: list[str],
        *,
        ttl_ms: int,
        limit: int = 0,
        rate: float = 0,
        burst: int = 1,
        keys: list[str] | None = None,
    ) -> tuple[bool, int]:
        """One step of the named semaphore (shared/semaphore.py): (done, ms to wait or refreshed count).
        `keys` (holders, rate bucket) overrides the names derived from `name`: a concurrency key's."""
        reply = await self._call(
            "semaphore",
            keys=keys or semaphore_keys(self.keys.prefix, name),
            args=[op, ttl_ms, limit, rate, burst, *holders],
        )
        return int(reply[0]) == 1, int(reply[1])

    def _concurrency_keys(self, key: str, requests: str | None = None) -> list[str]:
        """A concurrency key's keys, then a requests stream: by default the shard's normal-lane one, which
        the steps that wake waiters put their requests back onto (each onto its lane's)."""
        k = self.keys
        return [
            k.concurrency_holders(key),
            k.concurrency_waiting(key),
            k.concurrency_parked(key),
            k.concurrency_index,
            requests or k.normal_requests,
        ]

    async def concurrency_acquire(
        self,
        *,
        key: str,
        limit: int,
        task_id: str,
        entry_id: str,
        consumer: str,
        order: int,
        request: dict[str, str],
        ttl_ms: int,
    ) -> ConcurrencyOutcome:
        """Take a slot of concurrency key `key` for the task, or park its request in the key's wait set
        (shared/lua/concurrency_acquire.lua)."""
        member = {
            **request,
            RequestField.CONCURRENCY_ORDER.value: str(order),
            RequestField.CONCURRENCY_LIMIT.value: str(limit),
        }
        reply = await self._call(
            "concurrency_acquire",
            # The stream this reader read the entry from: the step acknowledges it there.
            keys=[*self._concurrency_keys(key, self.keys.requests), self.keys.task(task_id)],
            args=[
                entry_id,
                self.keys.worker_group,
                consumer,
                key,
                task_id,
                ttl_ms,
                limit,
                order,
                orjson.dumps(member).decode(),
            ],
        )
        return ConcurrencyOutcome(int(reply))

    async def concurrency_release(self, *, key: str, limit: int, task_id: str, ttl_ms: int) -> int:
        """Give back the task's slot of `key` and wake the next waiters (task_id '': wake only, into
        slots freed by expiry); returns how many were woken."""
        reply = await self._call(
            "concurrency_release", keys=self._concurrency_keys(key), args=[key, task_id, ttl_ms, limit]
        )
        return int(reply)

    async def wake_concurrency_waiters(self, ttl_ms: int) -> int:
        """Hand every slot freed by an expired holder (a crashed worker's run) to its key's next waiters:
        the promote loop's half of the concurrency keys. Returns how many were woken."""
        woken = 0
        index = await self.redis.hgetall(self.keys.concurrency_index)
        for raw_key, raw_limit in index.items():
            woken += await self.concurrency_release(key=_s(raw_key), limit=int(raw_limit), task_id="", ttl_ms=ttl_ms)
        return woken

    def semaphore_holders_key(self, name: str) -> str:
        return semaphore_keys(self.keys.prefix, name)[0]

    async def cancel(
        self,
        *,
        task_id: str,
        client: str | None,
        event: dict[str, str],
        task_fields: dict[str, str],
        task_ttl: int,
        wait_ttl_ms: int = 60_000,
    ) -> tuple[CancelOutcome, str]:
        """End a task as REVOKED unless it is terminal already, and push its id to the workers.

        `client` None cancels any client's task (operators); otherwise only that client's (another's
        answers MISSING, exactly like an unknown id). The in-flight count is the task's client's.
        `wait_ttl_ms`: how long a slot handed to a concurrency key's next waiter is held (the visibility
        timeout), when the task was woken from that key's wait set but had not started."""
        if self.keys.of_task(task_id) is not self.keys:
            # Its event goes onto the results stream of the shard that holds the task (and its
            # concurrency key's wait set is that shard's).
            return await self.of(self.keys.of_task(task_id)).cancel(
                task_id=task_id,
                client=client,
                event=event,
                task_fields=task_fields,
                task_ttl=task_ttl,
                wait_ttl_ms=wait_ttl_ms,
            )
        task_client, waiting = (
            _s(x or "") for x in await self.redis.hmget(self.keys.task(task_id), ["client", "waiting_for"])
        )
        owner = task_client if client is None else client
        # A client's counter is in its shard, where its tasks are: an owner of another shard (or none:
        # an unknown task) cannot hold this task, and the step answers MISSING without touching it.
        inflight = self.keys.inflight(owner) if owner and self.keys.of_client(owner) is self.keys else self.keys.absent
        while True:
            # A task waiting for a concurrency key leaves the key's wait set in the same step.
            # Left out (no key): the shard's bare tag on a cluster, so that every key shares its slot.
            wait_keys = self._concurrency_keys(waiting) if waiting else [self.keys.absent] * 5
            reply = await self._call(
                "cancel",
                keys=[
                    self.keys.task(task_id),
                    self.keys.results,
                    self.keys.task_events(task_id),
                    inflight,
                    *wait_keys[1:4],
                    wait_keys[0],
                    self.keys.normal_requests,
                ],
                args=[
                    client or "",
                    task_ttl,
                    self.keys.control_channel,
                    task_id,
                    waiting,
                    wait_ttl_ms,
                    *counted(pairs(event)),
                    *pairs(task_fields),
                ],
            )
            outcome, status = (_s(x) for x in reply)
            if int(outcome) != _CANCEL_STALE_KEY:
                return CancelOutcome(int(outcome)), status
            # It was parked for (or left) a concurrency key after it was read: once more with the key it has.
            waiting = status

    async def task_state(self, task_id: str, workflow_id: int) -> tuple[dict[str, str], bool]:
        """The task's fields (empty if it has none), and whether its workflow or the queue is paused."""
        flat, flags = await self._call(
            "task_state", keys=[self.keys.task(task_id), self.keys.control], args=[f"workflow:{workflow_id}"]
        )
        return decode_fields(dict(zip(flat[::2], flat[1::2], strict=True))), any(flags)

    async def park(self, *, entry_id: str, consumer: str, workflow_id: int, score: int, request: dict[str, str]) -> int:
        """1 parked (paused), 0 not paused: run it, -1 the entry is not this consumer's (any more).
        `score` orders the parked requests (the entry's position in the stream): resume keeps it."""
        field = f"workflow:{workflow_id}"
        reply = await self._call(
            "park",
            keys=[self.keys.control, self.keys.requests, self.keys.parked("queue"), self.keys.parked(field)],
            args=[entry_id, self.keys.worker_group, consumer, field, score, orjson.dumps(request).decode()],
        )
        return int(reply)

    async def leave_to_newer(self, *, entry_id: str, consumer: str, version: int, score: int, member: str) -> int:
        """Park a request of a format newer than this worker reads for the workers that read it, and
        acknowledge its entry: 1 done, -1 the entry is not this consumer's (any more). `member` is the
        JSON of the request's fields."""
        reply = await self._call(
            "leave_to_newer",
            keys=[self.keys.requests, self.keys.newer_format(version)],
            args=[entry_id, self.keys.worker_group, consumer, score, member],
        )
        return int(reply)

    async def take_from_older(self, readable: int, *, limit: int = 500) -> int:
        """Move back onto the stream the requests older workers left for formats up to `readable`
        (this worker's newest); returns how many moved. Format 1 is read by every worker."""
        moved = 0
        for version in range(2, readable + 1):
            while True:
                # resume.lua with no flag: 'format:N' is never a control field, so it only moves.
                n = int(
                    await self._call(
                        "resume",
                        keys=[self.keys.control, self.keys.newer_format(version), self.keys.normal_requests],
                        args=[f"format:{version}", limit, "0"],
                    )
                )
                moved += n
                if n < limit:
                    break
        return moved

    async def resume(self, scope: str, *, limit: int = 500) -> int:
        """Clear the pause of `scope` (`queue` or `workflow:{id}`) and move its parked requests back, in
        order; returns how many moved."""
        moved = 0
        clear = True
        while True:
            n = int(
                await self._call(
                    "resume",
                    keys=[self.keys.control, self.keys.parked(scope), self.keys.normal_requests],
                    args=[scope, limit, "1" if clear else "0"],
                )
            )
            moved += n
            clear = False
            if n < limit:
                return moved
